"""The embedded transcription engine: pocketsphinx (the PyPI wheel, whose en-us acoustic model,
dictionary and language model ship inside it; nothing is downloaded).

Input: the upload, decoded to 16 kHz mono 16-bit PCM (decode.py: WAV by numpy, other formats by a
program on PATH). Before decoding, two things make synthetic and very clean audio decodable: low-level
noise (``dither``, a fixed seed, so the same file always gives the same text) over the digital silence,
whose zero energy pocketsphinx cannot normalise, and ``PAD_SECONDS`` of that noise before and after, so
the first and last words have silence around them.

Decoding runs in a small thread pool of its own (``threads`` decoders, one per thread; one by default,
requests queue in its FIFO), as the embedded llama model does: it is CPU-bound C code that would
otherwise stall the event loop. Per request:

1. pocketsphinx's VAD endpointer finds the speech; each stretch of it, with ``PAD_SECONDS`` of what
   surrounds it, is an utterance (silence is never searched), cut after ``max_utterance_seconds``.
2. Each utterance's cepstral mean is computed first, as the acoustic model was trained (per utterance,
   over the whole of it): a keyword search, which scores almost nothing, runs over the utterance in one
   piece, and the real search starts from the mean that leaves. Searching from the model's default mean
   instead lost about a fifth of the words of short clips (measured on espeak-ng sentences); and the
   text never depends on what the decoder heard before.
3. The utterance is fed to the real search in ``chunk_seconds`` pieces; the cancel flag is checked
   between them, so a client that leaves stops the decoding within one piece (a few tens of
   milliseconds of CPU).

Streaming (``stream=true``): after each piece the partial hypothesis is read. pocketsphinx's later
passes (a flat-lexicon search and a best path through the word lattice at the end of the utterance)
often revise what the first pass said, so a word is sent (``transcript.text.delta``) only once it is
*stable*: not the last word of the partial hypothesis, and unchanged, with the same words before it,
in the last ``STABLE_PARTIALS`` partial hypotheses. At the end of the utterance the final hypothesis
decides the rest: if it starts with the words already sent, its remaining words are sent; if it revised
words that were already sent, those stand (a delta cannot be taken back) and the final hypothesis's words
that begin after the last sent word ends follow. So the deltas always join up to the ``text`` of
``transcript.text.done``, which can then differ from what the same file gives without ``stream``
(always the final hypotheses).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec
import numpy as np

from tokenrelay.audio.decode import (
    KNOWN_CONVERTERS,
    RATE,
    AudioInputError,
    AudioTooLongError,
    Converters,
    read_wav_header,
    sniff,
    wav_to_pcm16k,
)
from tokenrelay.audio.transcription import (
    DEFAULT_MAX_FILE_BYTES,
    TranscriptionEngine,
    TranscriptionForm,
    TranscriptionResult,
    TranscriptionStream,
    TranscriptUsage,
)
from tokenrelay.config import AudioModelConfig
from tokenrelay.errors import invalid

PAD_SECONDS = 0.3
# a word is sent once it held still this many partial hypotheses (with 0.5 s pieces, 2.5 s of audio):
# measured on espeak-ng paragraphs, 3 loses 3 points of word accuracy to revisions, 5 loses 2, and 8 loses
# 0.5 but sends the first word only half-way through the decoding
STABLE_PARTIALS = 5
FRAME_SECONDS = 0.01  # pocketsphinx's frame rate: 100 a second
_BYTES_PER_SECOND = RATE * 2
_PRIME_SEARCH = "tokenrelay-cmn"
_encode = msgspec.json.encode

# what a response_format is sent as, without stream
MEDIA_TYPES = {
    "json": "application/json",
    "verbose_json": "application/json",
    "text": "text/plain; charset=utf-8",
    "srt": "text/plain; charset=utf-8",
    "vtt": "text/vtt; charset=utf-8",
}
LANGUAGES = ("en", "english")  # ISO-639-1, and the name verbose_json reports


class SphinxOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    max_seconds: float = 600.0  # longer audio is a 400 naming the file
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    threads: int = 1  # decoders (each ~95 MB), each in a thread of its own
    chunk_seconds: float = 0.5  # audio fed to the decoder between partial results and cancel checks
    max_utterance_seconds: float = 30.0  # speech with no pause is cut into utterances this long
    dither: int = 128  # amplitude (16-bit steps) of the noise added over the audio; 0: none
    converters: list[str] = msgspec.field(default_factory=lambda: list(KNOWN_CONVERTERS))
    convert_timeout: float = 60.0  # seconds a converter program may take for one file
    # pocketsphinx's own options, passed to its Decoder: another model (hmm, lm, dict), tuning (lw, beam ...)
    decoder: dict[str, str | int | float | bool] = msgspec.field(default_factory=dict)


def parse_options(options: dict[str, Any]) -> SphinxOptions:
    opts = msgspec.convert(options, SphinxOptions, strict=False)
    checks = (
        (0 < opts.max_seconds <= 24 * 3600, "`float` from 0 to 86400", "max_seconds"),
        (opts.max_file_bytes > 0, "`int` >= 1", "max_file_bytes"),
        (1 <= opts.threads <= 64, "`int` from 1 to 64", "threads"),
        (0.05 <= opts.chunk_seconds <= 10, "`float` from 0.05 to 10", "chunk_seconds"),
        (1 <= opts.max_utterance_seconds <= 300, "`float` from 1 to 300", "max_utterance_seconds"),
        (0 <= opts.dither <= 4096, "`int` from 0 to 4096", "dither"),
        (opts.convert_timeout > 0, "`float` > 0", "convert_timeout"),
    )
    for ok, expected, key in checks:
        if not ok:
            raise msgspec.ValidationError(f"Expected {expected} - at `$.{key}`")
    for i, name in enumerate(opts.converters):
        if name not in KNOWN_CONVERTERS:
            raise msgspec.ValidationError(
                f"Unknown converter '{name}' (known: {', '.join(KNOWN_CONVERTERS)}) - at `$.converters[{i}]`"
            )
    if opts.decoder:
        from pocketsphinx import Config

        known = Config()
        for key in opts.decoder:
            if key not in known:
                raise msgspec.ValidationError(f"Unknown pocketsphinx option - at `$.decoder.{key}`")
    return opts


class Word:
    __slots__ = ("end", "start", "word")

    def __init__(self, word: str, start: float, end: float) -> None:
        self.word = word
        self.start = start  # seconds into the file
        self.end = end


class Segment:
    """One utterance's final hypothesis."""

    __slots__ = ("end", "logprob", "start", "text", "words")

    def __init__(self, start: float, end: float, words: list[Word], logprob: float) -> None:
        self.start = start
        self.end = end
        self.words = words
        self.text = " ".join(w.word for w in words)
        self.logprob = logprob  # the mean natural-log posterior of its words


class Transcript:
    """What one decoding produced."""

    __slots__ = ("cancelled", "decode_seconds", "seconds", "segments", "streamed")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds  # of audio in the file
        self.segments: list[Segment] = []
        self.streamed = ""  # the deltas, joined
        self.cancelled = False
        self.decode_seconds = 0.0

    @property
    def text(self) -> str:
        return " ".join(s.text for s in self.segments if s.text)


class Deltas:
    """Partial and final hypotheses in, text out that only ever extends what was sent (module notes).

    A hypothesis is a list of ``(word, start frame, end frame)``, frames counted within the utterance."""

    __slots__ = ("history", "sent", "sent_end", "text")

    def __init__(self, stable: int = STABLE_PARTIALS) -> None:
        self.text = ""  # everything sent so far, every utterance
        self.sent: list[str] = []  # the words sent of the current utterance
        self.sent_end = 0  # the frame where the last of them ends
        self.history: deque[list[str]] = deque(maxlen=stable)

    def partial(self, words: list[tuple[str, int, int]]) -> str:
        candidate = words[:-1]  # the last word is still being heard
        names = [w for w, _, _ in candidate]
        self.history.append(names)
        if len(self.history) < (self.history.maxlen or 1):
            return ""
        n = len(names)
        for earlier in self.history:
            n = min(n, _common_prefix(names, earlier))
        if n <= len(self.sent) or names[: len(self.sent)] != self.sent:
            return ""
        new = names[len(self.sent) : n]
        self.sent += new
        self.sent_end = candidate[n - 1][2]
        return self._send(new)

    def final(self, words: list[tuple[str, int, int]]) -> str:
        names = [w for w, _, _ in words]
        if names[: len(self.sent)] == self.sent:
            rest = names[len(self.sent) :]
        else:  # words already sent were revised: they stand, the final words after them follow
            rest = [w for w, start, end in words if (start + end) / 2 > self.sent_end]
        self.sent = []
        self.sent_end = 0
        self.history.clear()
        return self._send(rest)

    def _send(self, words: list[str]) -> str:
        if not words:
            return ""
        delta = " ".join(words)
        if self.text:
            delta = " " + delta
        self.text += delta
        return delta


def _common_prefix(a: list[str], b: list[str]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _at(seconds: float) -> int:
    """The byte offset of a time in 16 kHz 16-bit PCM (a whole sample)."""
    return max(0, round(seconds * RATE)) * 2


def _is_word(name: str) -> bool:
    # <s>, </s>, <sil> and the noise words ([NOISE], [SPEECH] ...) are not text
    return not name.startswith(("<", "[", "+"))


class Job:
    """One decoding: its audio, whether it streams, and its cancel flag."""

    __slots__ = ("cancel", "emit", "pcm", "seconds", "stream")

    def __init__(self, pcm: bytes, seconds: float, stream: bool, emit: Callable[[str], None]) -> None:
        self.pcm = pcm
        self.seconds = seconds
        self.stream = stream
        self.emit = emit  # called from the decoding thread with each delta
        self.cancel = threading.Event()


class SphinxTranscription(TranscriptionEngine):
    provider = "pocketsphinx"

    def __init__(self, cfg: AudioModelConfig) -> None:
        self.opts = parse_options(cfg.options)
        super().__init__(cfg)
        self.converters = Converters(self.opts.converters)
        self._executor = ThreadPoolExecutor(self.opts.threads, thread_name_prefix=f"pocketsphinx-{cfg.name}")
        self._decoders: queue.SimpleQueue[Any] = queue.SimpleQueue()  # one per thread, taken per job
        self._lm_search = ""
        self._noise = np.zeros(0, dtype=np.int32)
        self.load_seconds: float | None = None
        self._jobs: set[Job] = set()  # decoding or waiting for a decoder
        self.active = 0
        self.cancelled = 0
        self.audio_seconds = 0.0
        self.decode_seconds = 0.0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        for _ in range(self.opts.threads):
            self._decoders.put(await loop.run_in_executor(self._executor, self._load))
        self.load_seconds = time.perf_counter() - t0
        await self.converters.find()
        # the dither: one fixed stretch of noise, repeated, so a file always decodes to the same text
        rng = np.random.default_rng(0)
        self._noise = rng.integers(-self.opts.dither, self.opts.dither + 1, RATE * 7, dtype=np.int32)
        self.ready = True

    def _load(self) -> Any:
        from pocketsphinx import Decoder

        options = {"loglevel": "ERROR", **self.opts.decoder}
        try:
            decoder = Decoder(**options)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise RuntimeError(f"pocketsphinx could not load with {self.opts.decoder}: {exc}") from None
        self._lm_search = decoder.current_search()
        decoder.add_keyphrase(_PRIME_SEARCH, "oh")  # the cheap search that primes the mean (notes)
        return decoder

    async def close(self) -> None:
        for job in self._jobs:
            job.cancel.set()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def stats(self) -> dict[str, Any]:
        return {
            **super().stats(),
            "active": self.active,
            "cancelled": self.cancelled,
            "load_seconds": self.load_seconds,
            "audio_seconds": round(self.audio_seconds, 3),
            "decode_seconds": round(self.decode_seconds, 3),
            "real_time_factor": round(self.decode_seconds / self.audio_seconds, 4)
            if self.audio_seconds
            else None,
            "formats": self.converters.formats,
        }

    # ---------------------------------------------------------------------------------- the request

    def check(self, form: TranscriptionForm, param: str = "file") -> None:
        super().check(form, param)
        for name in ("language", "languages[]", "languages"):
            for key, value in form.fields:
                language = value.strip().lower().replace("_", "-").split("-")[0]
                if key == name and language and language not in LANGUAGES:
                    raise invalid(
                        f"'{form.param(name)}' is '{value[:40]}'; '{self.cfg.name}' transcribes English "
                        "only (en).",
                        param=form.param(name),
                        code="unsupported_language",
                    )
        fmt = form.response_format
        if fmt == "diarized_json":
            raise invalid(
                "response_format 'diarized_json' needs a model that tells speakers apart; "
                f"'{self.cfg.name}' gives json, text, verbose_json, srt or vtt.",
                param=form.param("response_format"),
                code="unsupported_value",
            )
        if form.stream and fmt not in ("json", "text"):
            raise invalid(
                f"With stream=true the transcript comes as events; response_format must be json or text, "
                f"not {fmt}.",
                param=form.param("response_format"),
                code="unsupported_value",
            )

    async def load(self, form: TranscriptionForm) -> tuple[bytes, float]:
        """The upload as 16 kHz mono PCM and its duration; a 400 naming the file when it cannot be."""
        param = form.param("file")
        data = form.file.data
        fmt = sniff(data)
        max_seconds = self.opts.max_seconds
        try:
            if fmt != "wav":
                if fmt is None or fmt not in self.converters.by_format:
                    raise invalid(self.converters.unsupported(fmt), param=param, code="unsupported_format")
                data = await self.converters.decode(data, fmt, max_seconds, self.opts.convert_timeout)
            header = read_wav_header(data)
            if header.seconds > max_seconds:
                raise AudioTooLongError(f"{header.seconds:.1f} s of audio")
            pcm = await asyncio.to_thread(wav_to_pcm16k, data, header)
        except AudioTooLongError as exc:
            raise invalid(
                f"'{param}' holds {exc}; the limit for '{self.cfg.name}' is {max_seconds:g} seconds.",
                param=param,
                code="audio_too_long",
            ) from None
        except AudioInputError as exc:
            what = f"'{param}' ({fmt})" if fmt else f"'{param}'"
            raise invalid(f"{what} could not be read: {exc}.", param=param, code="invalid_audio") from None
        return pcm, header.seconds

    async def open(self, form: TranscriptionForm) -> TranscriptionStream:
        pcm, seconds = await self.load(form)
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[str | None] = asyncio.Queue()

        def emit(delta: str) -> None:
            loop.call_soon_threadsafe(deltas.put_nowait, delta)

        job = Job(pcm, seconds, form.stream, emit)
        future = self._submit(job)
        future.add_done_callback(lambda _: deltas.put_nowait(None))
        result = TranscriptionResult()
        if form.stream:
            chunks = self._events(future, deltas, result)
            media = "text/event-stream"
        else:
            chunks = self._body(future, form, result)
            media = MEDIA_TYPES[form.response_format]
        self.requests += 1
        return TranscriptionStream(media, chunks, job.cancel.set, result)

    async def transcribe(self, form: TranscriptionForm) -> TranscriptionResult:
        """The whole transcript (the voice pipeline's use); cancelling the caller stops the decoding."""
        pcm, seconds = await self.load(form)
        job = Job(pcm, seconds, False, lambda _: None)
        self.requests += 1
        try:
            # shielded: the caller's cancellation sets the flag below, and the stats see the job end
            transcript = await asyncio.shield(self._submit(job))
        finally:
            job.cancel.set()  # the caller was cancelled: the thread stops at its next piece
        result = TranscriptionResult()
        result.take(transcript.text, _usage(transcript))
        return result

    def _submit(self, job: Job) -> asyncio.Future[Transcript]:
        self.active += 1
        self._jobs.add(job)
        future = asyncio.get_running_loop().run_in_executor(self._executor, self._run, job)

        def finished(f: asyncio.Future[Transcript]) -> None:
            self.active -= 1
            self._jobs.discard(job)
            if f.cancelled() or f.exception() is not None:
                return
            transcript = f.result()
            if transcript.cancelled:
                self.cancelled += 1
            else:  # the real-time factor of whole decodings
                self.audio_seconds += transcript.seconds
                self.decode_seconds += transcript.decode_seconds

        future.add_done_callback(finished)
        return future

    async def _events(
        self,
        future: asyncio.Future[Transcript],
        deltas: asyncio.Queue[str | None],
        result: TranscriptionResult,
    ) -> AsyncIterator[bytes]:
        """``transcript.text.delta`` as the decoding goes, then ``transcript.text.done``."""
        while (delta := await deltas.get()) is not None:
            yield b"data: " + _encode({"type": "transcript.text.delta", "delta": delta}) + b"\n\n"
        transcript = await asyncio.shield(future)
        usage = _usage(transcript)
        result.take(transcript.streamed, usage)
        done = {"type": "transcript.text.done", "text": transcript.streamed, "usage": _usage_body(usage)}
        yield b"data: " + _encode(done) + b"\n\n"

    async def _body(
        self, future: asyncio.Future[Transcript], form: TranscriptionForm, result: TranscriptionResult
    ) -> AsyncIterator[bytes]:
        transcript = await asyncio.shield(future)
        usage = _usage(transcript)
        result.take(transcript.text, usage)
        yield render(transcript, form, usage)

    # ---------------------------------------------------------------------------- the decoding thread

    def _run(self, job: Job) -> Transcript:
        decoder = self._decoders.get()  # there are as many as threads: one is free
        try:
            t0 = time.perf_counter()
            transcript = Decoding(decoder, self._lm_search, self.opts, job).run(self._prepare(job.pcm))
            transcript.decode_seconds = time.perf_counter() - t0
            return transcript
        except BaseException:
            with contextlib.suppress(Exception):  # leave no utterance open for the next job
                decoder.end_utt()
            raise
        finally:
            self._decoders.put(decoder)

    def _prepare(self, pcm: bytes) -> bytes:
        """The dither over the audio, and the padding before and after (module notes)."""
        pad = np.zeros(int(PAD_SECONDS * RATE), dtype=np.int32)
        x = np.concatenate((pad, np.frombuffer(pcm, dtype="<i2").astype(np.int32), pad))
        if self.opts.dither:
            noise = np.resize(self._noise, len(x))
            x += noise
        out: bytes = np.clip(x, -32768, 32767).astype("<i2").tobytes()
        return out


class Decoding:
    """One file through one decoder, in the decoding thread (the steps in the module notes)."""

    def __init__(self, decoder: Any, lm_search: str, opts: SphinxOptions, job: Job) -> None:
        self.decoder = decoder
        self.lm_search = lm_search
        self.job = job
        self.chunk_bytes = int(opts.chunk_seconds * RATE) * 2
        self.max_utterance_bytes = int(opts.max_utterance_seconds * RATE) * 2
        self.transcript = Transcript(job.seconds)
        self.deltas = Deltas(STABLE_PARTIALS)
        self.logmath = decoder.get_logmath()

    def run(self, pcm: bytes) -> Transcript:
        decoder, job = self.decoder, self.job
        for start, audio in self._utterances(pcm):
            if job.cancel.is_set():  # the client left (maybe while this waited for a decoder)
                self.transcript.cancelled = True
                return self.transcript
            # a fresh front end: pocketsphinx switches its CMN to live for good on the first piecemeal
            # utterance, after which a one-piece pass would mix in the mean of whatever came before
            decoder.reinit_feat()
            decoder.activate_search(_PRIME_SEARCH)
            decoder.start_utt()
            decoder.process_raw(audio, False, True)
            decoder.end_utt()
            decoder.activate_search(self.lm_search)
            decoder.set_cmn(decoder.get_cmn())  # the utterance's own mean, to start from
            decoder.start_utt()
            for pos in range(0, len(audio), self.chunk_bytes):
                if job.cancel.is_set():
                    decoder.end_utt()
                    self.transcript.cancelled = True
                    return self.transcript
                decoder.process_raw(audio[pos : pos + self.chunk_bytes], False, False)
                if job.stream and pos + self.chunk_bytes < len(audio):
                    self._send(self.deltas.partial(self._words()))
            decoder.end_utt()
            self._finish(start)
        return self.transcript

    def _utterances(self, pcm: bytes) -> list[tuple[float, bytes]]:
        """The speech in the audio as utterances: where pocketsphinx's VAD endpointer found speech, with
        ``PAD_SECONDS`` of what surrounds it (the search expects silence before the first word), cut into
        pieces of at most ``max_utterance_seconds``. Each is (start in seconds into the padded audio, PCM).
        """
        from pocketsphinx import Endpointer

        endpointer = Endpointer(sample_rate=RATE)
        frame = endpointer.frame_bytes
        spans: list[tuple[float, float]] = []
        in_speech = False
        pos = 0
        while pos < len(pcm):
            piece = pcm[pos : pos + frame]
            pos += frame
            last = pos >= len(pcm)
            if (endpointer.end_stream(piece) if last else endpointer.process(piece)) is None:
                continue
            if not in_speech:
                in_speech = True
                begin = endpointer.speech_start
            if not endpointer.in_speech or last:
                in_speech = False
                spans.append((begin, endpointer.speech_end if not endpointer.in_speech else pos / 2 / RATE))
        out: list[tuple[float, bytes]] = []
        done = 0  # bytes already in an utterance: the padding of one never overlaps the next
        for i, (begin, finish) in enumerate(spans):
            first = max(done, _at(begin - PAD_SECONDS))
            after = spans[i + 1][0] if i + 1 < len(spans) else len(pcm) / 2 / RATE
            last_byte = min(len(pcm), _at(min(finish + PAD_SECONDS, (finish + after) / 2)))
            for cut in range(first, last_byte, self.max_utterance_bytes):
                out.append(
                    (cut / _BYTES_PER_SECOND, pcm[cut : min(cut + self.max_utterance_bytes, last_byte)])
                )
            done = max(done, last_byte)
        return out

    def _words(self) -> list[tuple[str, int, int]]:
        return [
            (s.word.split("(")[0], s.start_frame, s.end_frame) for s in self.decoder.seg() if _is_word(s.word)
        ]

    def _finish(self, utt_start: float) -> None:
        """The utterance just ended: keep its final hypothesis, and send what it adds to the deltas."""
        segs = [s for s in self.decoder.seg() if _is_word(s.word)]
        words = [(s.word.split("(")[0], s.start_frame, s.end_frame) for s in segs]
        if self.job.stream:
            self._send(self.deltas.final(words))
        if not segs:
            return
        offset = utt_start - PAD_SECONDS
        seconds = self.job.seconds

        def at(frame: int) -> float:
            return round(min(max(offset + frame * FRAME_SECONDS, 0.0), seconds), 3)

        timed = [Word(w, at(start), at(end + 1)) for w, start, end in words]
        logprob = sum(self.logmath.log_to_ln(s.prob) for s in segs) / len(segs)
        self.transcript.segments.append(Segment(timed[0].start, timed[-1].end, timed, logprob))

    def _send(self, delta: str) -> None:
        if delta:
            self.transcript.streamed = self.deltas.text
            self.job.emit(delta)


# ------------------------------------------------------------------------------------------ responses


def _usage(transcript: Transcript) -> TranscriptUsage:
    return TranscriptUsage(type="duration", seconds=float(math.ceil(transcript.seconds)))


def _usage_body(usage: TranscriptUsage) -> dict[str, Any]:
    return {"type": "duration", "seconds": int(usage.seconds or 0)}


def render(transcript: Transcript, form: TranscriptionForm, usage: TranscriptUsage) -> bytes:
    """The non-streamed answer in ``response_format``."""
    fmt = form.response_format
    text = transcript.text
    if fmt == "text":
        return (text + "\n").encode()
    if fmt == "json":
        return _encode({"text": text, "usage": _usage_body(usage)})
    if fmt == "verbose_json":
        body: dict[str, Any] = {
            "task": "transcribe",
            "language": "english",
            "duration": round(transcript.seconds, 3),
            "text": text,
            "segments": [
                {
                    "id": i,
                    "seek": round(s.start * 100),
                    "start": s.start,
                    "end": s.end,
                    "text": s.text,
                    "tokens": [],
                    "temperature": 0.0,
                    "avg_logprob": round(s.logprob, 4),
                    "compression_ratio": 1.0,
                    "no_speech_prob": 0.0,
                }
                for i, s in enumerate(transcript.segments)
            ],
            "usage": _usage_body(usage),
        }
        granularities = {v for k, v in form.fields if k.startswith("timestamp_granularities")}
        if "word" in granularities:
            body["words"] = [
                {"word": w.word, "start": w.start, "end": w.end} for s in transcript.segments for w in s.words
            ]
            if "segment" not in granularities:
                del body["segments"]
        return _encode(body)
    vtt = fmt == "vtt"
    cues = ["WEBVTT\n"] if vtt else []
    for i, s in enumerate(transcript.segments, 1):
        span = f"{_timestamp(s.start, vtt)} --> {_timestamp(s.end, vtt)}"
        cues.append(f"{span}\n{s.text}\n" if vtt else f"{i}\n{span}\n{s.text}\n")
    return "\n".join(cues).encode()


def _timestamp(seconds: float, vtt: bool) -> str:
    ms = round(seconds * 1000)
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{'.' if vtt else ','}{ms:03d}"
