"""What every client protocol provides to the transports: a decoder, a stream encoder and error bodies.

A ``WireProtocol`` turns the client's request body into the one internal ``ChatRequest`` and renders the
internal event stream back in the client's own format: a streaming encoder (SSE or NDJSON, one byte
string per event batch), a non-streaming response body, and error bodies with the protocol's own
status and type conventions. Transports pick the protocol by endpoint and never look inside it.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

from tokenrelay.errors import GatewayError
from tokenrelay.events import (
    Error,
    Event,
    Finish,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    Usage,
)
from tokenrelay.request import ChatRequest

SSE_MEDIA = b"text/event-stream; charset=utf-8"
NDJSON_MEDIA = b"application/x-ndjson"


class StreamEncoder(abc.ABC):
    """Events -> bytes for one stream. ``finished`` turns true once a terminal event was encoded."""

    keepalive: bytes | None = b": keep-alive\n\n"

    def __init__(self) -> None:
        self.finished = False

    def open(self) -> bytes:
        """Bytes that go out right after the response headers (before the first token)."""
        return b""

    @abc.abstractmethod
    def encode(self, batch: list[Event]) -> bytes: ...


class StreamInfo:
    """What an encoder needs to know about the stream it renders."""

    __slots__ = ("created", "id", "model", "request")

    def __init__(self, stream_id: str, model: str, created: int, request: ChatRequest) -> None:
        self.id = stream_id
        self.model = model
        self.created = created
        self.request = request


class WireProtocol(abc.ABC):
    name: ClassVar[str]
    id_prefix: ClassVar[str] = "chatcmpl-"
    media_type: ClassVar[bytes] = SSE_MEDIA

    @abc.abstractmethod
    def decode(self, body: bytes) -> ChatRequest:
        """The internal request, or ``GatewayError`` (400 naming the field)."""

    @abc.abstractmethod
    def encoder(self, info: StreamInfo) -> StreamEncoder: ...

    @abc.abstractmethod
    def complete(self, info: StreamInfo, events: list[Event]) -> dict[str, Any]:
        """The non-streaming response body for a finished stream (its error, if any, is raised)."""

    @abc.abstractmethod
    def error_body(self, err: GatewayError) -> dict[str, Any]: ...

    def error_status(self, err: GatewayError) -> int:
        return err.status


class Collected:
    """Events folded into one answer: the common ground of every non-streaming body."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.reasoning: list[str] = []
        self.tools: dict[int, dict[str, str]] = {}
        self.usage = Usage(0, 0)
        self.finish: str | None = None
        self.error: Error | None = None

    def add(self, batch: list[Event]) -> Collected:
        for ev in batch:
            if type(ev) is TextDelta:
                self.text.append(ev.text)
            elif type(ev) is ToolCallDelta:
                call = self.tools.setdefault(ev.index, {"id": "", "name": "", "arguments": ""})
                if ev.id:
                    call["id"] = ev.id
                if ev.name:
                    call["name"] = ev.name
                call["arguments"] += ev.arguments
            elif type(ev) is ReasoningDelta:
                self.reasoning.append(ev.text)
            elif type(ev) is Usage:
                self.usage = ev
            elif type(ev) is Finish:
                self.finish = ev.reason
            elif type(ev) is Error:
                self.error = ev
        return self

    def raise_error(self) -> None:
        if self.error is not None:
            raise GatewayError.from_event(self.error)

    def tool_calls(self) -> list[dict[str, str]]:
        return [self.tools[i] for i in sorted(self.tools)]
