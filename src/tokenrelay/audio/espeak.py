"""The embedded speech engine: espeak-ng (Debian's ``espeak-ng`` package), one process per request.

``espeak-ng --stdout`` writes a WAV stream as it synthesizes (its first bytes come ~10 ms after start,
and it runs at several hundred times real time), so the audio streams from the first phrase on. The text
goes in on stdin, never on the command line: a text that starts with ``-`` would be read as an option,
and the command line has a length limit. Everything runs as asyncio subprocesses: nothing blocks the
event loop, and cancelling the request (a client that left) kills the processes.

Output: ``pcm`` and ``wav`` are espeak-ng's samples, resampled from its 22050 Hz to ``sample_rate``
(24000 by default, the rate OpenAI's ``pcm`` has and clients assume) by linear interpolation (wav.py);
``sample_rate: 22050`` passes them through untouched. Compressed formats go through an encoder program
(formats.py): espeak-ng's stdout is piped straight into the encoder's stdin by the OS, and the encoder
resamples.

Voices: OpenAI's names map to espeak-ng voices and variants (``DEFAULT_VOICES``; ``options.voices`` adds
or replaces names), and any espeak-ng language (``de``, ``en-gb``) or language+variant (``fr+f3``) is a
voice as well. ``speed`` scales the speaking rate (175 words per minute at 1.0); espeak-ng speaks no
slower than 80 words a minute, so speeds under ~0.46 all sound the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from tokenrelay.audio.formats import KNOWN_ENCODERS, MEDIA_TYPES, encoder_command, missing_encoder_message
from tokenrelay.audio.speech import (
    IdleWatch,
    SpeechEngine,
    SpeechRequest,
    SpeechStream,
    VoiceId,
    sse_audio,
)
from tokenrelay.audio.wav import LinearResampler, WavFormatError, WavStreamReader, stream_header
from tokenrelay.config import AudioModelConfig
from tokenrelay.errors import GatewayError, invalid

NATIVE_RATE = 22050  # what espeak-ng writes
READ_SIZE = 64 * 1024

# OpenAI's voice names -> an espeak-ng voice (language + variant); none sound like OpenAI's, but each
# name gets a distinct voice
DEFAULT_VOICES = {
    "alloy": "en-us",
    "ash": "en-us+m3",
    "ballad": "en-gb+m2",
    "coral": "en-us+f2",
    "echo": "en-us+m1",
    "fable": "en-gb-x-rp",
    "onyx": "en-us+m7",
    "nova": "en-us+f3",
    "sage": "en-us+f4",
    "shimmer": "en-us+f5",
    "verse": "en-gb+m4",
    "marin": "en-us+f1",
    "cedar": "en-us+m5",
}


class EspeakOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    binary: str = "espeak-ng"
    sample_rate: int = msgspec.field(default=24000)
    voices: dict[str, str] = msgspec.field(default_factory=dict)  # name -> espeak-ng voice, added
    max_input_chars: int = 4096
    encoders: list[str] = msgspec.field(default_factory=lambda: list(KNOWN_ENCODERS))
    words_per_minute: int = 175  # at speed 1.0


def parse_options(options: dict[str, Any]) -> EspeakOptions:
    opts = msgspec.convert(options, EspeakOptions, strict=False)
    if not 8000 <= opts.sample_rate <= 48000:
        raise msgspec.ValidationError("Expected `int` from 8000 to 48000 - at `$.sample_rate`")
    for i, name in enumerate(opts.encoders):
        if name not in KNOWN_ENCODERS:
            raise msgspec.ValidationError(
                f"Unknown encoder '{name}' (known: {', '.join(KNOWN_ENCODERS)}) - at `$.encoders[{i}]`"
            )
    return opts


class EspeakSpeech(SpeechEngine):
    provider = "espeak"

    def __init__(self, cfg: AudioModelConfig) -> None:
        self.opts = parse_options(cfg.options)
        super().__init__(cfg, self.opts.max_input_chars)
        self.binary = ""
        self.languages: set[str] = set()
        self.variants: set[str] = set()
        self.voices = {**DEFAULT_VOICES, **self.opts.voices}
        self.encoders: dict[str, list[str]] = {}
        self.active = 0

    async def start(self) -> None:
        binary = shutil.which(self.opts.binary)
        if binary is None:
            raise RuntimeError(
                f"{self.opts.binary} is not installed (Debian/Ubuntu: apt-get install espeak-ng)"
            )
        self.binary = binary
        self.languages = {line.split()[1] for line in await self._list("--voices") if line[:1] == " "}
        self.variants = {
            line.split()[-1].removeprefix("!v/")
            for line in await self._list("--voices=variant")
            if line[:1] == " "
        }
        for name, spec in self.voices.items():
            if not self._known(spec):
                raise RuntimeError(f"voice '{name}' maps to '{spec}', which this espeak-ng does not have")
        rate = self.opts.sample_rate
        for fmt in MEDIA_TYPES:
            argv = encoder_command(fmt, self.opts.encoders, rate)
            if argv is not None:
                self.encoders[fmt] = argv
        self.ready = True

    async def _list(self, flag: str) -> list[str]:
        proc = await asyncio.create_subprocess_exec(
            self.binary, flag, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
        )
        out, _ = await proc.communicate()
        return out.decode("utf-8", "replace").splitlines()[1:]  # a header line first

    def _known(self, spec: str) -> bool:
        language, _, variant = spec.partition("+")
        return language in self.languages and (not variant or variant in self.variants)

    def voice_spec(self, voice: str | VoiceId, prefix: str = "") -> str:
        if isinstance(voice, VoiceId):
            raise invalid(
                "Custom voices (an object with 'id') are not available on espeak-ng models.",
                param=f"{prefix}voice",
            )
        spec = self.voices.get(voice)
        if spec is not None:
            return spec
        if self._known(voice):
            return voice
        raise invalid(
            f"Unknown voice '{voice[:80]}'. Voices: {', '.join(self.voices)}, or an espeak-ng language "
            "(en-gb, de, fr ...) with an optional +variant (en-us+f3).",
            param=f"{prefix}voice",
            code="invalid_value",
        )

    def check(self, req: SpeechRequest, prefix: str = "") -> None:
        super().check(req, prefix)
        self.voice_spec(req.voice, prefix)
        fmt = req.response_format
        if fmt not in ("pcm", "wav") and fmt not in self.encoders:
            raise invalid(
                missing_encoder_message(fmt, self.opts.encoders),
                param=f"{prefix}response_format",
                code="unsupported_value",
            )

    def stats(self) -> dict[str, Any]:
        return {
            **super().stats(),
            "active": self.active,
            "sample_rate": self.opts.sample_rate,
            "formats": ["pcm", "wav", *self.encoders],
        }

    def argv(self, req: SpeechRequest) -> list[str]:
        wpm = max(80, min(1000, round(self.opts.words_per_minute * req.speed)))
        # -b 1: the input is UTF-8; --stdout: a WAV stream on stdout
        return [self.binary, "--stdout", "-b", "1", "-v", self.voice_spec(req.voice), "-s", str(wpm)]

    async def open(self, req: SpeechRequest) -> SpeechStream:
        self.check(req)
        run = EspeakRun(self, req)
        try:
            await run.start()
        except BaseException:
            await run.close()
            raise
        self.requests += 1
        self.characters += len(req.input)
        chunks = run.chunks()
        media = MEDIA_TYPES[req.response_format]
        if req.stream_format == "sse":
            chunks, media = sse_audio(chunks, len(req.input)), "text/event-stream"
        headers = []
        if req.response_format in ("pcm", "wav"):
            headers.append((b"x-audio-sample-rate", str(self.opts.sample_rate).encode()))
        return SpeechStream(media, chunks, run.close, headers)


class EspeakRun:
    """One synthesis: espeak-ng (and an encoder), their output read as it comes."""

    def __init__(self, engine: EspeakSpeech, req: SpeechRequest) -> None:
        self.engine = engine
        self.req = req
        self.procs: list[asyncio.subprocess.Process] = []
        self.source: asyncio.StreamReader | None = None
        self.first = b""
        self.wav: WavStreamReader | None = None
        self.resampler: LinearResampler | None = None
        self.header_done = False
        self.counted = False  # in the engine's count of active syntheses
        self.closed = False

    async def start(self) -> None:
        engine, req = self.engine, self.req
        encoder = engine.encoders.get(req.response_format)
        pipe = asyncio.subprocess.PIPE
        if encoder is None:  # pcm or wav: the samples come through here
            espeak = await asyncio.create_subprocess_exec(
                *engine.argv(req), stdin=pipe, stdout=pipe, stderr=pipe
            )
            self.procs.append(espeak)
            self.wav = WavStreamReader()
            self.source = espeak.stdout
        else:  # espeak-ng | encoder, joined by an OS pipe
            read_end, write_end = os.pipe()
            try:
                espeak = await asyncio.create_subprocess_exec(
                    *engine.argv(req), stdin=pipe, stdout=write_end, stderr=pipe
                )
                self.procs.append(espeak)
                enc = await asyncio.create_subprocess_exec(*encoder, stdin=read_end, stdout=pipe, stderr=pipe)
                self.procs.append(enc)
            finally:
                os.close(read_end)
                os.close(write_end)
            self.source = enc.stdout
        engine.active += 1
        self.counted = True
        assert espeak.stdin is not None
        try:
            espeak.stdin.write(req.input.encode())
            await espeak.stdin.drain()
            espeak.stdin.close()
        except OSError:  # it died at once; its exit status and stderr say why
            raise GatewayError(
                500, await self._failure() or "espeak-ng exited", type="server_error"
            ) from None
        # wait for the first audio, so a failure still gets a real status
        self.first = await self._next()
        if not self.first:
            raise GatewayError(
                500, await self._failure() or "espeak-ng produced no audio", type="server_error"
            )

    async def _next(self) -> bytes:
        """The next piece of the response body; ``b""`` at the end."""
        assert self.source is not None
        while data := await self.source.read(READ_SIZE):
            if self.wav is None:
                return data
            try:
                pcm = self.wav.feed(data)
            except WavFormatError as exc:
                raise GatewayError(500, f"espeak-ng wrote no WAV: {exc}", type="server_error") from None
            if not pcm:
                continue
            if not self.header_done:  # the first samples: the rate is known now
                self.header_done = True
                rate = self.engine.opts.sample_rate
                if self.wav.sample_rate != rate:
                    self.resampler = LinearResampler(self.wav.sample_rate, rate)
                if self.req.response_format == "wav":
                    return stream_header(rate) + self._resample(pcm)
            out = self._resample(pcm)
            if out:
                return out
        return b""

    def _resample(self, pcm: bytes) -> bytes:
        return self.resampler.feed(pcm) if self.resampler is not None else pcm

    async def _failure(self) -> str | None:
        """What went wrong, once the processes ended: the first one that failed, and its stderr."""
        for proc in self.procs:
            rc = await proc.wait()
            if rc != 0:
                err = b""
                if proc.stderr is not None:
                    err = await proc.stderr.read(2000)
                name = "espeak-ng" if proc is self.procs[0] else "the encoder"
                return f"{name} failed (exit {rc}): {err.decode('utf-8', 'replace').strip()}"
        return None

    async def chunks(self) -> AsyncIterator[bytes]:
        watch = IdleWatch(self.engine.cfg.idle_timeout)
        try:
            data = self.first
            while data:
                yield data
                watch.reading()
                data = await self._next()
                watch.read()
            failure = await self._failure()
            if failure is not None:
                raise RuntimeError(failure)
        except asyncio.CancelledError:
            if not watch.stalled():
                raise
            raise RuntimeError(f"espeak-ng wrote nothing for {self.engine.cfg.idle_timeout:g} s") from None
        finally:
            watch.stop()
            await self.close()

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.counted:
            self.engine.active -= 1
        for proc in self.procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        for proc in self.procs:
            await proc.wait()
