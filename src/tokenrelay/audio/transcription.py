"""Transcription (``POST /v1/audio/transcriptions``): the form, and the OpenAI-compatible upstream relay.

The client's ``multipart/form-data`` is checked here (the file and model are there, ``stream`` and
``response_format`` are valid values, the file is within the model's size limit) and sent on with the
model renamed and every other field as it came. The upstream's answer is relayed as each read brings
it: with ``stream=true`` its SSE events (``transcript.text.delta`` ... ``transcript.text.done``) reach
the client as they arrive; without, its body, whatever ``response_format`` made it (JSON, text, SRT,
VTT). The usage the upstream reports (in ``transcript.text.done`` or the JSON body) is kept for the
usage records.
"""

from __future__ import annotations

import abc
import math
import os
from collections.abc import AsyncIterator, Callable
from typing import Any, ClassVar

import msgspec

from tokenrelay.audio import multipart
from tokenrelay.audio.multipart import Part
from tokenrelay.audio.speech import relay, upstream_request
from tokenrelay.config import AudioModelConfig
from tokenrelay.errors import GatewayError, invalid
from tokenrelay.sse import SSEError, SSEParser
from tokenrelay.upstream_http import HttpPool

RESPONSE_FORMATS = ("json", "text", "srt", "verbose_json", "vtt", "diarized_json")
DEFAULT_MAX_FILE_BYTES = 25 * 1024 * 1024  # OpenAI's limit


class TranscriptionForm:
    """A validated transcription request: the file, the model, and every field to pass on."""

    __slots__ = ("fields", "file", "model", "params", "response_format", "stream")

    def __init__(
        self, model: str, file: Part, stream: bool, response_format: str, fields: list[tuple[str, str]]
    ) -> None:
        self.model = model
        self.file = file
        self.stream = stream
        self.response_format = response_format
        self.fields = fields  # (name, value) of the other text fields, in order
        # what the client calls a field, where it is not the form's own name (the voice socket's
        # "audio.data" for "file"), so that errors name what the client sent
        self.params: dict[str, str] = {}

    def param(self, name: str) -> str:
        return self.params.get(name, name)

    def field(self, name: str) -> str | None:
        """The last value of a text field, or None."""
        for key, value in reversed(self.fields):
            if key == name:
                return value
        return None


def parse_form(parts: list[Part]) -> TranscriptionForm:
    files = [p for p in parts if p.name == "file"]
    if not files or files[0].filename is None:
        raise invalid(
            "Missing required parameter: 'file' (the audio, as a file part).",
            param="file",
            code="missing_required_parameter",
        )
    if len(files) > 1:
        raise invalid("Send one 'file'.", param="file")
    if not files[0].data:
        raise invalid("'file' is empty.", param="file")
    values: dict[str, str] = {}
    fields: list[tuple[str, str]] = []
    for part in parts:
        if part.filename is not None:
            if part.name != "file":
                raise invalid(f"Only 'file' may be a file; '{part.name}' is one.", param=part.name)
            continue
        text = part.text()
        values[part.name] = text
        if part.name not in ("model", "stream"):
            fields.append((part.name, text))
    model = values.get("model", "")
    if not model:
        raise invalid(
            "Missing required parameter: 'model'.", param="model", code="missing_required_parameter"
        )
    stream_text = values.get("stream", "false").strip().lower()
    if stream_text not in ("true", "false"):
        raise invalid("'stream' must be true or false.", param="stream", code="invalid_value")
    response_format = values.get("response_format", "json")
    if response_format not in RESPONSE_FORMATS:
        raise invalid(
            f"Invalid value for 'response_format': expected one of {', '.join(RESPONSE_FORMATS)}.",
            param="response_format",
            code="invalid_value",
        )
    if "temperature" in values:
        try:
            temperature = float(values["temperature"])
        except ValueError:
            temperature = -1.0
        if not 0.0 <= temperature <= 1.0:
            raise invalid("'temperature' must be a number from 0 to 1.", param="temperature")
    return TranscriptionForm(model, files[0], stream_text == "true", response_format, fields)


class TranscriptUsage(msgspec.Struct):
    type: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    seconds: float | None = None


class TranscriptEvent(msgspec.Struct):
    """The one SSE event whose contents matter to the gateway; the rest pass through untouched."""

    type: str = ""
    text: str | None = None
    usage: TranscriptUsage | None = None


class TranscriptBody(msgspec.Struct):
    text: str | None = None
    usage: TranscriptUsage | None = None


_event = msgspec.json.Decoder(TranscriptEvent)
_body = msgspec.json.Decoder(TranscriptBody)


class TranscriptionResult:
    """What a transcription produced, for the usage record: input units (the upstream's input tokens,
    or seconds of audio when it bills by duration), output units (its output tokens, else the
    transcript's length / 4), and the text when it was seen whole."""

    __slots__ = ("input_units", "output_units", "text")

    def __init__(self) -> None:
        self.text: str | None = None
        self.input_units = 0
        self.output_units = 0

    def take(self, text: str | None, usage: TranscriptUsage | None) -> None:
        if text is not None:
            self.text = text
            self.output_units = math.ceil(len(text) / 4)
        if usage is not None:
            if usage.input_tokens is not None:
                self.input_units = usage.input_tokens
            elif usage.seconds is not None:
                self.input_units = math.ceil(usage.seconds)
            if usage.output_tokens is not None:
                self.output_units = usage.output_tokens


class TranscriptionStream:
    """An accepted transcription: the response's media type, then its body as it comes. ``close()``
    stops the work (drops the upstream connection, stops the decoding) whether or not the chunks were
    read to the end."""

    def __init__(
        self,
        media_type: str,
        chunks: AsyncIterator[bytes],
        close: Callable[[], None],
        result: TranscriptionResult | None = None,
    ) -> None:
        self.media_type = media_type
        self.chunks = chunks
        self.result = result or TranscriptionResult()
        self._close = close

    async def close(self) -> None:
        self._close()


class TranscriptionEngine(abc.ABC):
    kind: ClassVar[str] = "transcription"
    provider: ClassVar[str]

    def __init__(self, cfg: AudioModelConfig) -> None:
        self.cfg = cfg
        self.ready = False
        self.max_file_bytes = int(cfg.options.get("max_file_bytes", DEFAULT_MAX_FILE_BYTES))
        self.requests = 0

    async def start(self) -> None:
        self.ready = True

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    def check(self, form: TranscriptionForm, param: str = "file") -> None:
        """Raise the error a request gets before it is admitted (the engine adds its own checks)."""
        size = len(form.file.data)
        if size > self.max_file_bytes:
            raise GatewayError(
                413,
                f"'{param}' is {size} bytes; the limit for '{self.cfg.name}' is {self.max_file_bytes}.",
                param=param,
                code="file_too_large",
            )

    @abc.abstractmethod
    async def open(self, form: TranscriptionForm) -> TranscriptionStream:
        """Send the request; return once it was accepted (else raise ``GatewayError``)."""

    async def transcribe(self, form: TranscriptionForm) -> TranscriptionResult:
        """The whole transcript as text (the voice pipeline's use)."""
        form.stream = False
        form.response_format = "json"
        form.fields = [(k, v) for k, v in form.fields if k != "response_format"]
        form.fields.append(("response_format", "json"))
        stream = await self.open(form)
        try:
            async for _ in stream.chunks:
                pass
        finally:
            await stream.close()
        return stream.result

    def stats(self) -> dict[str, Any]:
        return {
            "kind": "transcription",
            "provider": self.provider,
            "ready": self.ready,
            "requests": self.requests,
        }


class OpenAITranscription(TranscriptionEngine):
    provider = "openai"

    def __init__(self, cfg: AudioModelConfig, pool: HttpPool) -> None:
        super().__init__(cfg)
        assert cfg.base_url is not None
        self.url = cfg.base_url.rstrip("/") + "/audio/transcriptions"
        self.pool = pool
        self.headers = dict(cfg.headers)
        if cfg.api_key_env and os.environ.get(cfg.api_key_env):
            self.headers["authorization"] = f"Bearer {os.environ[cfg.api_key_env]}"

    async def open(self, form: TranscriptionForm) -> TranscriptionStream:
        fields = [("model", self.cfg.upstream_model or self.cfg.name), *form.fields]
        if form.stream:
            fields.append(("stream", "true"))
        body, content_type = multipart.encode(fields, [form.file])
        headers = {**self.headers, "content-type": content_type}
        resp = await upstream_request(self.pool, self.cfg, self.url, headers, body)
        self.requests += 1
        media = resp.headers.get("content-type", "application/json")
        chunks = relay(resp, self.cfg.idle_timeout)
        stream = TranscriptionStream(media, chunks, resp.release)
        if media.startswith("text/event-stream"):
            stream.chunks = _watch_events(chunks, stream.result)
        elif media.startswith("application/json"):
            stream.chunks = _watch_body(chunks, stream.result)
        return stream


async def _watch_events(chunks: AsyncIterator[bytes], result: TranscriptionResult) -> AsyncIterator[bytes]:
    """Relay each read as it is, reading the usage out of ``transcript.text.done`` on the way."""
    parser = SSEParser()
    async for data in chunks:
        yield data
        try:
            events = parser.feed(data)
        except SSEError:
            continue
        for ev in events:
            if b'"transcript.text.done"' in ev.data:
                try:
                    done = _event.decode(ev.data)
                except msgspec.DecodeError:
                    continue
                result.take(done.text, done.usage)


async def _watch_body(chunks: AsyncIterator[bytes], result: TranscriptionResult) -> AsyncIterator[bytes]:
    """A JSON answer is small: relay it as it comes and read its text and usage at the end."""
    parts: list[bytes] = []
    async for data in chunks:
        parts.append(data)
        yield data
    try:
        body = _body.decode(b"".join(parts))
    except msgspec.DecodeError:
        return
    result.take(body.text, body.usage)
