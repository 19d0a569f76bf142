"""Speech (``POST /v1/audio/speech``): the request, the engine contract, and the OpenAI-compatible upstream.

An engine checks a request (voice, format, length) before anything runs, then ``open()`` starts the
synthesis and returns a ``SpeechStream`` once the engine has accepted it (the first audio is there, or
the upstream answered 200): failures before that are ``GatewayError``s, so the client gets a real status.
The stream's ``chunks`` are the response body, in the client's format, as they are produced.

``stream_format: "sse"`` (OpenAI's newer form) wraps the audio in ``speech.audio.delta`` events (base64)
and ends with ``speech.audio.done`` and its usage; an upstream that speaks it is relayed as it is.
"""

from __future__ import annotations

import abc
import asyncio
import base64
import os
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, ClassVar, Literal

import msgspec

from tokenrelay.config import AudioModelConfig
from tokenrelay.errors import GatewayError, invalid
from tokenrelay.protocol.validation import decode_body, field_error
from tokenrelay.providers.upstream_errors import upstream_status_error
from tokenrelay.upstream_http import HttpPool, UpstreamConnectionError, UpstreamResponse

_encode = msgspec.json.encode

Format = Literal["mp3", "opus", "aac", "flac", "wav", "pcm"]


class VoiceId(msgspec.Struct, forbid_unknown_fields=True):
    """A custom voice by id (``{"id": "voice_1234"}``), for upstreams that have them."""

    id: str


class SpeechWire(msgspec.Struct, kw_only=True):
    model: str
    input: str
    voice: str | VoiceId
    instructions: str | None = None
    response_format: Format = "mp3"
    speed: Annotated[float, msgspec.Meta(ge=0.25, le=4.0)] = 1.0
    stream_format: Literal["audio", "sse"] = "audio"


_speech = msgspec.json.Decoder(SpeechWire)
_FIELDS = frozenset(SpeechWire.__struct_fields__)


class SpeechRequest(msgspec.Struct, kw_only=True):
    model: str
    input: str
    voice: str | VoiceId
    instructions: str | None = None
    response_format: Format = "mp3"
    speed: float = 1.0
    stream_format: Literal["audio", "sse"] = "audio"
    extra: dict[str, Any] = msgspec.field(default_factory=dict)  # fields passed to upstreams untouched


def decode_speech(body: bytes) -> SpeechRequest:
    """Validate an OpenAI speech request; every failure is a 400 naming the field."""
    top, wire = decode_body(_speech, body)
    return speech_request(wire, {k: msgspec.json.decode(v) for k, v in top.items() if k not in _FIELDS})


def convert_speech(data: dict[str, Any], prefix: str) -> SpeechRequest:
    """The same request from an already decoded object (the voice WebSocket's ``speech``)."""
    try:
        wire = msgspec.convert(data, SpeechWire)
    except msgspec.ValidationError as exc:
        raise field_error(exc, prefix) from None
    return speech_request(wire, {}, prefix + ".")


def speech_request(wire: SpeechWire, extra: dict[str, Any], prefix: str = "") -> SpeechRequest:
    if not wire.input.strip():
        raise invalid("'input' must contain some text to speak.", param=f"{prefix}input")
    if not wire.model:
        raise invalid("'model' must name a speech model.", param=f"{prefix}model")
    return SpeechRequest(
        model=wire.model,
        input=wire.input,
        voice=wire.voice,
        instructions=wire.instructions,
        response_format=wire.response_format,
        speed=wire.speed,
        stream_format=wire.stream_format,
        extra=extra,
    )


class SpeechStream:
    """An accepted synthesis: the response's media type and headers, then its body in chunks.

    ``close()`` stops the work (kills the engine's processes, drops the upstream connection) whether or not
    the chunks were read to the end; it is safe to call twice."""

    def __init__(
        self,
        media_type: str,
        chunks: AsyncIterator[bytes],
        close: Callable[[], Any],
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        self.media_type = media_type
        self.chunks = chunks
        self._close = close
        self.headers = headers or []

    async def close(self) -> None:
        result = self._close()
        if asyncio.iscoroutine(result):
            await result


class SpeechEngine(abc.ABC):
    """A speech model (``audio_models`` entry with ``kind: speech``)."""

    kind: ClassVar[str] = "speech"
    provider: ClassVar[str]

    def __init__(self, cfg: AudioModelConfig, max_input_chars: int) -> None:
        self.cfg = cfg
        self.ready = False
        self.max_input_chars = max_input_chars
        self.requests = 0
        self.characters = 0

    async def start(self) -> None:
        self.ready = True

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release processes and connections."""

    def check(self, req: SpeechRequest, prefix: str = "") -> None:
        """Raise the 400 a request gets before anything runs (the engine adds its own checks)."""
        if len(req.input) > self.max_input_chars:
            raise invalid(
                f"'input' is {len(req.input)} characters; the limit for '{self.cfg.name}' is "
                f"{self.max_input_chars}.",
                param=f"{prefix}input",
                code="string_above_max_length",
            )

    @abc.abstractmethod
    async def open(self, req: SpeechRequest) -> SpeechStream:
        """Start synthesizing; return once the engine accepted (else raise ``GatewayError``)."""

    def stats(self) -> dict[str, Any]:
        return {
            "kind": "speech",
            "provider": self.provider,
            "ready": self.ready,
            "requests": self.requests,
            "characters": self.characters,
        }


def sse_audio(chunks: AsyncIterator[bytes], characters: int) -> AsyncIterator[bytes]:
    """Audio chunks as OpenAI's speech SSE events: ``speech.audio.delta`` (base64) each, then
    ``speech.audio.done`` with the usage (input characters; the audio has no token count here)."""

    async def frames() -> AsyncIterator[bytes]:
        async for chunk in chunks:
            if chunk:
                yield (b'data: {"type":"speech.audio.delta","audio":"' + base64.b64encode(chunk) + b'"}\n\n')
        usage = {"input_tokens": characters, "output_tokens": 0, "total_tokens": characters}
        yield b"data: " + _encode({"type": "speech.audio.done", "usage": usage}) + b"\n\n"

    return frames()


class IdleWatch:
    """Cancels the task reading a stream when one read waits longer than ``seconds``. One self-re-arming
    timer per stream, not one per chunk: ``reading()`` and ``read()`` around each read only store a time.
    Time spent outside reads (writing to a slow client) does not count."""

    __slots__ = ("_handle", "_loop", "_task", "expired", "seconds", "since")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task[Any] | None = None
        self.since: float | None = None
        self.expired = False
        self._handle = self._loop.call_later(seconds, self._check)

    def reading(self) -> None:
        self.since = self._loop.time()
        self._task = asyncio.current_task()

    def read(self) -> None:
        self.since = None

    def _check(self) -> None:
        waited = self._loop.time() - self.since if self.since is not None else 0.0
        if waited >= self.seconds and self._task is not None:
            self.expired = True
            self._task.cancel()
            return
        self._handle = self._loop.call_later(self.seconds - waited, self._check)

    def stop(self) -> None:
        self._handle.cancel()

    def stalled(self) -> bool:
        """After a ``CancelledError``: whether this watch caused it (then the cancel is taken back)."""
        if not self.expired:
            return False
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        return True


class OpenAISpeech(SpeechEngine):
    """An OpenAI-compatible ``/audio/speech``: the request is passed on (model renamed), the upstream's
    bytes relayed as each read brings them, with its content type. Voices and formats are the
    upstream's to accept or refuse (its 400 reaches the client as it is)."""

    provider = "openai"

    def __init__(self, cfg: AudioModelConfig, pool: HttpPool) -> None:
        opts = cfg.options
        super().__init__(cfg, int(opts.get("max_input_chars", 4096)))
        assert cfg.base_url is not None
        self.url = cfg.base_url.rstrip("/") + "/audio/speech"
        self.pool = pool
        self.body_defaults: dict[str, Any] = dict(opts.get("body") or {})
        self.headers = {"content-type": "application/json", **cfg.headers}
        if cfg.api_key_env and os.environ.get(cfg.api_key_env):
            self.headers["authorization"] = f"Bearer {os.environ[cfg.api_key_env]}"

    def body(self, req: SpeechRequest) -> bytes:
        voice: Any = req.voice if isinstance(req.voice, str) else {"id": req.voice.id}
        body: dict[str, Any] = {
            **self.body_defaults,
            **req.extra,
            "model": self.cfg.upstream_model or self.cfg.name,
            "input": req.input,
            "voice": voice,
            "response_format": req.response_format,
            "speed": req.speed,
        }
        if req.instructions is not None:
            body["instructions"] = req.instructions
        if req.stream_format != "audio":
            body["stream_format"] = req.stream_format
        return _encode(body)

    async def open(self, req: SpeechRequest) -> SpeechStream:
        resp = await upstream_request(self.pool, self.cfg, self.url, self.headers, self.body(req))
        self.requests += 1
        self.characters += len(req.input)
        media = resp.headers.get("content-type", "application/octet-stream")
        return SpeechStream(media, relay(resp, self.cfg.idle_timeout), resp.release)


async def upstream_request(
    pool: HttpPool, cfg: AudioModelConfig, url: str, headers: dict[str, str], body: bytes
) -> UpstreamResponse:
    """One upstream request up to an accepted (200) response head; anything else a ``GatewayError``."""
    try:
        async with asyncio.timeout(cfg.connect_timeout + cfg.idle_timeout):
            resp = await pool.request("POST", url, headers, body, cfg.connect_timeout)
            if resp.status != 200:
                data = await resp.read(65536)
                resp.release()
                raise upstream_status_error(resp.status, data, resp.headers.get("retry-after"))
    except UpstreamConnectionError as exc:
        raise GatewayError(502, f"upstream {cfg.name}: {exc}", type="upstream_unavailable") from None
    except TimeoutError:
        raise GatewayError(504, f"upstream {cfg.name} did not answer in time", type="timeout") from None
    return resp


async def relay(resp: UpstreamResponse, idle_timeout: float) -> AsyncIterator[bytes]:
    """The upstream body, each read as it comes; a stall past ``idle_timeout`` or a broken connection
    raises ``UpstreamConnectionError`` (the response is then cut off: raw audio has no error frame)."""
    watch = IdleWatch(idle_timeout)
    try:
        while True:
            watch.reading()
            data = await resp.read_any()
            watch.read()
            if not data:
                return
            yield data
    except asyncio.CancelledError:
        if not watch.stalled():
            raise
        raise UpstreamConnectionError(f"no audio for {idle_timeout:g} s") from None
    finally:
        watch.stop()
        resp.release()
