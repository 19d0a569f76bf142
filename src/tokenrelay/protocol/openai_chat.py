"""OpenAI Chat Completions: wire JSON -> ``ChatRequest``, and events -> SSE chunks or one completion.

The stream encoder builds each chunk from byte templates fixed at stream start, so a text delta costs
one JSON string encode and a join. Wire rules it keeps (see docs/protocols.md): ``role`` once, no ``id:``
or ``retry:`` lines (they crash openai-python), ``"usage": null`` on every chunk when usage was asked for,
an error mid-stream as ``data: {"error": {...}}`` followed by ``[DONE]``.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from tokenrelay.errors import GatewayError, invalid
from tokenrelay.events import (
    Error,
    Event,
    Finish,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    Usage,
)
from tokenrelay.openai_wire import REQUEST_FIELDS, ChatCompletionRequest, Message, TextPart, UserMessage
from tokenrelay.protocol.base import Collected, StreamEncoder, StreamInfo, WireProtocol
from tokenrelay.protocol.padding import obfuscation_field
from tokenrelay.protocol.validation import decode_body
from tokenrelay.request import ChatRequest

_encode = msgspec.json.encode
_request = msgspec.json.Decoder(ChatCompletionRequest)

DONE = b"data: [DONE]\n\n"


def decode_request(body: bytes) -> ChatRequest:
    """Validate an OpenAI chat request; every failure is a 400 naming the field."""
    top, wire = decode_body(_request, body)
    extra = {k: msgspec.json.decode(v) for k, v in top.items() if k not in REQUEST_FIELDS}
    return to_internal(wire, extra)


def media_params(messages: list[Message]) -> list[str]:
    """Where the non-text parts (images, audio, files) of these Chat messages sit, for ``media_params``."""
    return [
        f"messages[{i}].content[{j}]"
        for i, msg in enumerate(messages)
        if type(msg) is UserMessage and isinstance(msg.content, list)
        for j, part in enumerate(msg.content)
        if type(part) is not TextPart
    ]


def to_internal(wire: ChatCompletionRequest, extra: dict[str, Any]) -> ChatRequest:
    if wire.n is not None and wire.n != 1:
        raise invalid("Only n=1 is supported.", param="n", code="unsupported_value")
    if (
        wire.tool_choice is not None
        and wire.tool_choice != "none"
        and wire.tool_choice != "auto"
        and not wire.tools
    ):
        raise invalid("'tool_choice' needs 'tools'.", param="tool_choice")
    stop = [wire.stop] if isinstance(wire.stop, str) else wire.stop
    if stop is not None and any(not s for s in stop):
        raise invalid("Stop sequences must not be empty.", param="stop")
    opts = wire.stream_options
    return ChatRequest(
        model=wire.model,
        messages=wire.messages,
        stream=bool(wire.stream),
        max_tokens=wire.max_completion_tokens or wire.max_tokens,
        temperature=wire.temperature,
        top_p=wire.top_p,
        stop=stop or None,
        seed=wire.seed,
        presence_penalty=wire.presence_penalty,
        frequency_penalty=wire.frequency_penalty,
        tools=wire.tools,
        tool_choice=wire.tool_choice,
        parallel_tool_calls=wire.parallel_tool_calls,
        response_format=wire.response_format,
        user=wire.user,
        media_params=media_params(wire.messages),
        include_usage=bool(opts and opts.include_usage),
        on_disconnect=opts.on_disconnect if opts else None,
        obfuscation=opts.include_obfuscation if opts else None,
        extra=extra,
        mock=wire.mock,
    )


def error_body(err: GatewayError | Error) -> dict[str, Any]:
    return {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}


def usage_body(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
    }


class ChatStreamEncoder(StreamEncoder):
    """Events -> ``data:`` lines of ``chat.completion.chunk`` objects, one byte string per batch."""

    def __init__(
        self, stream_id: str, model: str, created: int, include_usage: bool, obfuscate: bool = False
    ) -> None:
        super().__init__()
        common = (
            b'data: {"id":'
            + _encode(stream_id)
            + b',"object":"chat.completion.chunk","created":'
            + str(created).encode()
            + b',"model":'
            + _encode(model)
        )
        self._head = common + b',"choices":[{"index":0,"delta":'
        self._open = b',"logprobs":null,"finish_reason":'
        self._tail = b"}]" + (b',"usage":null' if include_usage else b"") + b"}\n\n"
        self._pad_tail = self._tail[:-3]  # before the closing brace: room for "obfuscation"
        self.obfuscate = obfuscate
        self._usage_head = common + b',"choices":[],"usage":'
        self.include_usage = include_usage
        self.role_sent = False
        self._usage: Usage | None = None

    def _chunk(self, delta: bytes, finish: bytes = b"null") -> bytes:
        if self.obfuscate:
            return (
                self._head
                + delta
                + self._open
                + finish
                + self._pad_tail
                + obfuscation_field(len(delta))
                + b"}\n\n"
            )
        return self._head + delta + self._open + finish + self._tail

    def _role(self) -> bytes:
        if self.role_sent:
            return b""
        self.role_sent = True
        return b'"role":"assistant",'

    def encode(self, batch: list[Event]) -> bytes:
        out: list[bytes] = []
        for ev in batch:
            if type(ev) is TextDelta:
                out.append(self._chunk(b"{" + self._role() + b'"content":' + _encode(ev.text) + b"}"))
            elif type(ev) is ToolCallDelta:
                call: dict[str, Any] = {"index": ev.index}
                if ev.id is not None:
                    call["id"] = ev.id
                    call["type"] = "function"
                fn: dict[str, Any] = {"arguments": ev.arguments}
                if ev.name is not None:
                    fn["name"] = ev.name
                call["function"] = fn
                role = self._role()
                content = b'"content":null,' if role else b""
                out.append(self._chunk(b"{" + role + content + b'"tool_calls":[' + _encode(call) + b"]}"))
            elif type(ev) is ReasoningDelta:
                out.append(
                    self._chunk(b"{" + self._role() + b'"reasoning_content":' + _encode(ev.text) + b"}")
                )
            elif type(ev) is Usage:
                self._usage = ev
            elif type(ev) is Finish:
                if not self.role_sent:
                    out.append(self._chunk(b"{" + self._role() + b'"content":""}'))
                out.append(self._chunk(b"{}", b'"' + ev.reason.encode() + b'"'))
                if self.include_usage and self._usage is not None:
                    out.append(self._usage_head + _encode(usage_body(self._usage)) + b"}\n\n")
                out.append(DONE)
                self.finished = True
            elif type(ev) is Error:
                out.append(b"data: " + _encode(error_body(ev)) + b"\n\n" + DONE)
                self.finished = True
        return b"".join(out)


class ChatCompletionBuilder(Collected):
    """Events -> one non-streaming ``chat.completion`` object."""

    def __init__(self, stream_id: str, model: str, created: int | None = None) -> None:
        super().__init__()
        self.stream_id = stream_id
        self.model = model
        self.created = created or int(time.time())

    def body(self) -> dict[str, Any]:
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(self.text) if self.text or not self.tools else None,
            "refusal": None,
        }
        if self.tools:
            message["tool_calls"] = [
                {
                    "id": c["id"],
                    "type": "function",
                    "function": {"name": c["name"], "arguments": c["arguments"]},
                }
                for c in self.tool_calls()
            ]
        if self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        return {
            "id": self.stream_id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": self.finish or "stop"}
            ],
            "usage": usage_body(self.usage),
        }


class OpenAIChat(WireProtocol):
    """``POST /v1/chat/completions``."""

    name = "openai"

    def decode(self, body: bytes) -> ChatRequest:
        return decode_request(body)

    def encoder(self, info: StreamInfo) -> ChatStreamEncoder:
        req = info.request
        return ChatStreamEncoder(
            info.id, info.model, info.created, req.include_usage, req.obfuscation is not False
        )

    def complete(self, info: StreamInfo, events: list[Event]) -> dict[str, Any]:
        builder = ChatCompletionBuilder(info.id, info.model, info.created)
        builder.add(events)
        builder.raise_error()
        return builder.body()

    def error_body(self, err: GatewayError) -> dict[str, Any]:
        return error_body(err)
