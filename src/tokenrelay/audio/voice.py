"""The voice pipeline (``/v1/ws/voice``): a question in (text, or audio to transcribe), the chat model's
answer out as text tokens and, sentence by sentence, synthesized audio, interleaved on one WebSocket.

Per request: one task follows the chat stream, sends its tokens and cuts the text into sentences (on
``.``, ``!`` or ``?`` followed by white space, or a newline, once a sentence has ``MIN_SENTENCE_CHARS``);
each sentence goes on a queue that one synthesis task per request works through, so sentence k is
spoken while the model writes sentence k+1, and the first audio leaves long before the answer ends. The
protocol (docs/audio.md) is the chat WebSocket's (``/v1/ws/chat``), plus ``transcript``, ``sentence``,
``audio`` (base64 in JSON, so many requests can share a socket) and ``audio_done`` messages; ``done``
comes after the last sentence's audio.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
from typing import Any

import msgspec

from tokenrelay.audio.models import AudioModels, Grant, admit
from tokenrelay.audio.multipart import Part
from tokenrelay.audio.speech import Format, SpeechEngine, SpeechRequest, VoiceId
from tokenrelay.audio.transcription import TranscriptionForm
from tokenrelay.errors import GatewayError, invalid
from tokenrelay.events import Error, Event, Finish, TextDelta, Usage
from tokenrelay.protocol import openai_chat
from tokenrelay.protocol.validation import field_error
from tokenrelay.session import StreamSession
from tokenrelay.transport.websocket import (
    ClientMessage,
    WebSocketChat,
    check_new_id,
    encode_batch,
    error_message,
)

log = logging.getLogger("tokenrelay.voice")

_encode = msgspec.json.encode
MIN_SENTENCE_CHARS = 20
MAX_SENTENCE_CHARS = 400
_TERMINATORS = ".!?"
_CLOSERS = "\"')]\u201d\u2019*_"


class SentenceSplitter:
    """Text in as it streams, whole sentences out (see the module notes). A terminator is only a sentence
    end once the white space after it has arrived, so ``3.14`` and a ``.`` at the end of a chunk wait for
    more; a sentence shorter than ``min_chars`` runs on into the next; text with no end for
    ``max_chars`` is cut at its last space, so a run-on answer still starts speaking."""

    __slots__ = ("_buf", "_scan", "max_chars", "min_chars")

    def __init__(self, min_chars: int = MIN_SENTENCE_CHARS, max_chars: int = MAX_SENTENCE_CHARS) -> None:
        self.min_chars = min_chars
        self.max_chars = max_chars
        self._buf = ""
        self._scan = 0  # where the next look for an end starts (everything before has none)

    def feed(self, text: str) -> list[str]:
        self._buf += text
        out: list[str] = []
        while (cut := self._boundary()) is not None:
            sentence = self._buf[:cut].strip()
            self._buf = self._buf[cut:]
            self._scan = 0
            if sentence:
                out.append(sentence)
        return out

    def flush(self) -> str:
        rest = self._buf.strip()
        self._buf = ""
        self._scan = 0
        return rest

    def _boundary(self) -> int | None:
        buf = self._buf
        n = len(buf)
        i = self._scan
        while i < n:
            c = buf[i]
            if c == "\n":
                if len(buf[:i].strip()) >= self.min_chars:
                    return i + 1
            elif c in _TERMINATORS:
                j = i + 1
                while j < n and (buf[j] in _TERMINATORS or buf[j] in _CLOSERS):
                    j += 1
                if j == n:  # what follows has not arrived yet
                    self._scan = i
                    return None
                if buf[j].isspace() and len(buf[:j].strip()) >= self.min_chars:
                    return j
                i = j
                continue
            i += 1
        self._scan = n
        if n >= self.max_chars:
            cut = buf.rfind(" ", 0, self.max_chars)
            return cut + 1 if cut > 0 else self.max_chars
        return None


class VoiceMessage(ClientMessage):
    """A ``/v1/ws/voice`` message: the chat socket's, plus the voice fields (decoded when a request
    starts, so a wrong one gets an error naming it, with the request's id)."""

    text: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)
    audio: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)
    speech: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)


class VoiceSpeech(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    model: str
    voice: str | VoiceId = "alloy"
    response_format: Format = "pcm"
    speed: float = msgspec.field(default=1.0)
    instructions: str | None = None


class VoiceAudio(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    data: str  # base64
    model: str
    filename: str = "audio.wav"
    content_type: str | None = None
    language: str | None = None
    prompt: str | None = None


def _convert(raw: msgspec.Raw, kind: type[Any], param: str) -> Any:
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.DecodeError as exc:
        raise field_error(exc, param) from None


class VoicePlan:
    """A validated voice request, before anything runs."""

    __slots__ = ("audio", "body", "engine", "speech", "text", "transcriber")

    def __init__(self) -> None:
        self.body: dict[str, Any] = {}
        self.text: str | None = None
        self.audio: TranscriptionForm | None = None
        self.transcriber: Any = None
        self.speech: VoiceSpeech | None = None
        self.engine: SpeechEngine | None = None


class VoiceRun:
    """One request on the socket: what a ``cancel`` stops."""

    __slots__ = ("cancelled", "session", "task")

    def __init__(self) -> None:
        self.task: asyncio.Task[None] | None = None
        self.session: StreamSession | None = None
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        if self.task is not None:
            self.task.cancel()


class Tally:
    __slots__ = ("audio_bytes", "characters", "sentences")

    def __init__(self) -> None:
        self.sentences = 0
        self.characters = 0
        self.audio_bytes = 0


class VoiceSocket(WebSocketChat):
    """One ``/v1/ws/voice`` socket (the chat socket's queueing, ping, cancel and close rules)."""

    decoder = msgspec.json.Decoder(VoiceMessage)

    @property
    def audio(self) -> AudioModels:
        return self.gateway.audio

    def plan(self, msg: VoiceMessage) -> VoicePlan:
        plan = VoicePlan()
        gw = self.gateway
        if msg.body:
            body = _convert(msg.body, dict[str, Any], "body")
            plan.body = body
        if msg.text:
            plan.text = _convert(msg.text, str, "text")
            if not plan.text.strip():
                raise invalid("'text' is empty.", param="text")
        if msg.audio:
            audio = _convert(msg.audio, VoiceAudio, "audio")
            try:
                data = base64.b64decode(audio.data, validate=True)
            except (binascii.Error, ValueError):
                raise invalid("'audio.data' is not valid base64.", param="audio.data") from None
            if not data:
                raise invalid("'audio.data' is empty.", param="audio.data")
            fields = [(k, v) for k, v in (("language", audio.language), ("prompt", audio.prompt)) if v]
            form = TranscriptionForm(
                audio.model, Part("file", data, audio.filename, audio.content_type), False, "json", fields
            )
            form.params = {"file": "audio.data", "language": "audio.language", "prompt": "audio.prompt"}
            plan.transcriber = self.audio.transcription_model(audio.model, gw.model_names, "audio.model")
            plan.transcriber.check(form, "audio.data")
            plan.audio = form
        if plan.text is not None and plan.audio is not None:
            raise invalid("Send 'text' or 'audio', not both.", param="audio")
        if plan.text is None and plan.audio is None and not plan.body.get("messages"):
            raise invalid(
                "A voice request needs 'text', 'audio' or 'body.messages'.",
                param="text",
                code="missing_required_parameter",
            )
        if not plan.body.get("model"):
            raise invalid(
                "Missing required parameter: 'body.model' (the chat model).",
                param="body.model",
                code="missing_required_parameter",
            )
        if not msg.speech:
            raise invalid(
                "Missing required parameter: 'speech' (its model, voice and response_format).",
                param="speech",
                code="missing_required_parameter",
            )
        speech = _convert(msg.speech, VoiceSpeech, "speech")
        if not 0.25 <= speech.speed <= 4.0:
            raise invalid("'speech.speed' must be from 0.25 to 4.0.", param="speech.speed")
        engine = self.audio.speech_model(speech.model, gw.model_names, "speech.model")
        engine.check(self.sentence_request(speech, "-"), "speech.")
        plan.speech, plan.engine = speech, engine
        return plan

    @staticmethod
    def sentence_request(speech: VoiceSpeech, text: str) -> SpeechRequest:
        return SpeechRequest(
            model=speech.model,
            input=text,
            voice=speech.voice,
            instructions=speech.instructions,
            response_format=speech.response_format,
            speed=speech.speed,
        )

    async def start(self, msg: ClientMessage) -> None:
        assert isinstance(msg, VoiceMessage)
        rid = msg.id
        try:
            rid = check_new_id(msg.id, self.streams)
            plan = self.plan(msg)
        except GatewayError as err:
            await self.put(error_message(rid, err))
            return
        run = VoiceRun()
        run.task = asyncio.get_running_loop().create_task(self.run(rid, plan, run))
        self.streams[rid] = (run, run.task)

    async def run(self, rid: str | int, plan: VoicePlan, run: VoiceRun) -> None:
        """The whole request: transcription, chat, the sentences' synthesis, then ``done``."""
        rid_json = _encode(rid)
        synth: asyncio.Task[None] | None = None
        speech_grant: Grant | None = None
        tally = Tally()
        status = 200
        try:
            body = dict(plan.body)
            messages = list(body.get("messages") or [])
            if plan.audio is not None:
                text = await self.transcribe(plan)
                await self.put(_encode({"type": "transcript", "id": rid, "text": text}))
                messages.append({"role": "user", "content": text})
            elif plan.text is not None:
                messages.append({"role": "user", "content": plan.text})
            body["messages"] = messages
            req = openai_chat.decode_request(_encode(body))
            req.stream = True
            session = run.session = await self.gateway.start_stream(req, self.credential)
            assert plan.speech is not None and plan.engine is not None
            speech_grant = await admit(self.gateway, self.credential, plan.speech.model, "voice.speech")
            sentences: asyncio.Queue[tuple[int, str] | None] = asyncio.Queue()
            synth = asyncio.get_running_loop().create_task(
                self.synthesize(rid_json, plan.engine, plan.speech, sentences, tally, speech_grant)
            )
            finish, usage, error = await self.follow_chat(rid, rid_json, session, sentences, synth)
            if error is not None:
                status = error.status
                await self.put(error_message(rid, error))
                return
            sentences.put_nowait(None)
            await synth  # the last sentence's audio, or its failure
            done: dict[str, Any] = {"type": "done", "id": rid, "finish_reason": finish}
            done["usage"] = {
                **(openai_chat.usage_body(usage) if usage is not None else {}),
                "speech_characters": tally.characters,
            }
            done["sentences"] = tally.sentences
            done["audio_bytes"] = tally.audio_bytes
            await self.put(_encode(done))
        except GatewayError as err:
            status = err.status
            await self.put(error_message(rid, err))
        except asyncio.CancelledError:
            status = 499
            if not run.cancelled:
                raise
            cancelled = Error(type="cancelled", message="the request was cancelled", status=499)
            await self.put(error_message(rid, cancelled))
        except Exception as exc:  # synthesis failed midway (an engine crash, an upstream cut)
            status = 502
            log.warning("voice request cut off: %s", exc)
            failed = GatewayError(502, f"speech synthesis failed: {exc}", type="upstream_error")
            await self.put(error_message(rid, failed))
        finally:
            if synth is not None and not synth.done():
                synth.cancel()
                with contextlib.suppress(BaseException):
                    await synth
            if run.session is not None and not run.session.done:
                if self.closed:
                    self.gateway.client_left(run.session)
                else:
                    run.session.cancel()
            if speech_grant is not None:
                speech_grant.finish(status, tally.characters, 0, {"speech": plan.speech, "rid": rid})
            self.streams.pop(rid, None)

    async def follow_chat(
        self,
        rid: str | int,
        rid_json: bytes,
        session: StreamSession,
        sentences: asyncio.Queue[tuple[int, str] | None],
        synth: asyncio.Task[None],
    ) -> tuple[str | None, Usage | None, Error | GatewayError | None]:
        """Send the chat stream's tokens and queue its sentences; (finish reason, usage, error)."""
        splitter = SentenceSplitter()
        follower = session.follow()
        finish: str | None = None
        usage: Usage | None = None
        error: Error | GatewayError | None = None
        index = 0
        pad = session.request.obfuscation is True
        try:
            while finish is None and error is None and (batch := await follower.next_batch()) is not None:
                if synth.done():
                    synth.result()  # synthesis failed: raise its error here, and stop the chat
                out: list[Event] = []
                ended: list[str] = []
                for ev in batch:
                    if type(ev) is Finish:
                        finish = ev.reason
                    elif type(ev) is Usage:
                        usage = ev
                    elif type(ev) is Error:
                        error = ev
                    else:
                        out.append(ev)
                        if type(ev) is TextDelta:
                            ended += splitter.feed(ev.text)
                # the batch's text goes out before the sentences it completed
                for message in encode_batch(rid, out, pad):  # never "done": Finish is held back
                    await self.put(message)
                for sentence in ended:
                    await self.queue_sentence(rid_json, index, sentence, sentences)
                    index += 1
            if finish is None and error is None:
                error = session.pre_error or Error(
                    type="internal_error", message="the stream ended unexpectedly", status=500
                )
        finally:
            follower.close()
        rest = splitter.flush()
        if rest and error is None:
            await self.queue_sentence(rid_json, index, rest, sentences)
        return finish, usage, error

    async def queue_sentence(
        self, rid_json: bytes, index: int, text: str, sentences: asyncio.Queue[tuple[int, str] | None]
    ) -> None:
        sentences.put_nowait((index, text))
        await self.put(
            b'{"type":"sentence","id":' + rid_json + b',"sentence":%d,"text":' % index + _encode(text) + b"}"
        )

    async def synthesize(
        self,
        rid_json: bytes,
        engine: SpeechEngine,
        speech: VoiceSpeech,
        sentences: asyncio.Queue[tuple[int, str] | None],
        tally: Tally,
        grant: Grant,
    ) -> None:
        """The request's one synthesis task: each sentence in turn, its audio sent as it comes."""
        while (item := await sentences.get()) is not None:
            index, text = item
            head = b'{"type":"audio","id":' + rid_json + b',"sentence":%d,"data":"' % index
            stream = await engine.open(self.sentence_request(speech, text))
            try:
                async for chunk in stream.chunks:
                    grant.first_byte()
                    tally.audio_bytes += len(chunk)
                    await self.put(head + base64.b64encode(chunk) + b'"}')
            finally:
                await stream.close()
            tally.sentences += 1
            tally.characters += len(text)
            await self.put(b'{"type":"audio_done","id":' + rid_json + b',"sentence":%d}' % index)

    async def transcribe(self, plan: VoicePlan) -> str:
        assert plan.audio is not None
        grant = await admit(self.gateway, self.credential, plan.audio.model, "voice.transcription")
        status = 500
        units = (0, 0)
        try:
            result = await plan.transcriber.transcribe(plan.audio)
            units = (result.input_units, result.output_units)
            if not result.text or not result.text.strip():
                raise GatewayError(
                    422, "The transcription of 'audio' is empty.", param="audio", code="empty_transcript"
                )
            status = 200
            return str(result.text)
        except GatewayError as err:
            status = err.status
            raise
        finally:
            record = {"model": plan.audio.model, "bytes": len(plan.audio.file.data)}
            grant.finish(status, *units, record)
