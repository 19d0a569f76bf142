"""Anthropic Messages (``POST /v1/messages``): wire JSON -> ``ChatRequest``; events -> Anthropic SSE.

The stream keeps the order the anthropic SDK's accumulator depends on: ``message_start`` first (sent
with the headers, before the first token), content blocks with consecutive indices from 0, each closed
before the next opens (text, thinking, one ``tool_use`` block per tool call with ``input_json_delta``
fragments), then ``message_delta`` with the stop reason and cumulative usage, and ``message_stop``.
Every event carries an ``event:`` line equal to its ``type`` (the SDK dispatches on it); keep-alives are
``ping`` events. A failure mid-stream is ``event: error``.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from tokenrelay import anthropic_mapping as mapping
from tokenrelay.anthropic_wire import MessagesRequest
from tokenrelay.errors import GatewayError
from tokenrelay.events import Error, Event, Finish, ReasoningDelta, TextDelta, ToolCallDelta, Usage
from tokenrelay.protocol.base import Collected, StreamEncoder, StreamInfo, WireProtocol
from tokenrelay.protocol.padding import comment
from tokenrelay.protocol.validation import Renames, decode_body, wire_param
from tokenrelay.request import ChatRequest

_encode = msgspec.json.encode
_request = msgspec.json.Decoder(MessagesRequest)
# internal field names a provider's 400 may carry -> where the field sits in a Messages request
_PARAMS: Renames = (
    (re.compile(r"^(tools\[\d+\])\.function\.parameters"), r"\1.input_schema"),
    (re.compile(r"^tool_choice\.function\.name"), "tool_choice.name"),
)

PING = b'event: ping\ndata: {"type":"ping"}\n\n'
_STOP_EVENT = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'


def decode_request(body: bytes) -> ChatRequest:
    _, wire = decode_body(_request, body)
    return mapping.request_to_internal(wire)


def _event(name: bytes, payload: bytes) -> bytes:
    return b"event: " + name + b"\ndata: " + payload + b"\n\n"


def _tool_id(stream_id: str, index: int) -> str:
    return f"toolu_{stream_id[4:]}_{index}"


class MessagesStreamEncoder(StreamEncoder):
    keepalive = PING

    def __init__(self, info: StreamInfo) -> None:
        super().__init__()
        self.info = info
        self._index = -1  # index of the open block; -1 when none is open
        self._open_kind = ""  # "text", "thinking" or "tool"
        self._open_tool = -1  # the internal tool-call index the open tool_use block belongs to
        self._usage: Usage | None = None
        self.obfuscate = info.request.obfuscation is True  # opt-in here: x-tokenrelay-obfuscation: on

    def open(self) -> bytes:
        message: dict[str, Any] = {
            "id": self.info.id,
            "type": "message",
            "role": "assistant",
            "model": self.info.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            # the real counts come with message_delta (OpenAI-style upstreams report usage only at the end)
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        return _event(b"message_start", _encode({"type": "message_start", "message": message}))

    def _close(self, out: list[bytes]) -> None:
        if self._index >= 0 and self._open_kind:
            out.append(
                _event(b"content_block_stop", b'{"type":"content_block_stop","index":%d}' % self._index)
            )
            self._open_kind = ""

    def _start(self, out: list[bytes], kind: str, block: dict[str, Any]) -> None:
        self._close(out)
        self._index += 1
        self._open_kind = kind
        out.append(
            _event(
                b"content_block_start",
                _encode({"type": "content_block_start", "index": self._index, "content_block": block}),
            )
        )

    def _delta(self, delta: bytes) -> bytes:
        event = _event(
            b"content_block_delta",
            b'{"type":"content_block_delta","index":%d,"delta":%s}' % (self._index, delta),
        )
        return comment(len(delta)) + event if self.obfuscate else event

    def encode(self, batch: list[Event]) -> bytes:
        out: list[bytes] = []
        for ev in batch:
            if type(ev) is TextDelta:
                if self._open_kind != "text":
                    self._start(out, "text", {"type": "text", "text": ""})
                out.append(self._delta(b'{"type":"text_delta","text":' + _encode(ev.text) + b"}"))
            elif type(ev) is ReasoningDelta:
                if self._open_kind != "thinking":
                    self._start(out, "thinking", {"type": "thinking", "thinking": "", "signature": ""})
                out.append(self._delta(b'{"type":"thinking_delta","thinking":' + _encode(ev.text) + b"}"))
            elif type(ev) is ToolCallDelta:
                if self._open_kind != "tool" or self._open_tool != ev.index:
                    self._open_tool = ev.index
                    block = {
                        "type": "tool_use",
                        "id": ev.id or _tool_id(self.info.id, ev.index),
                        "name": ev.name or "",
                        "input": {},
                    }
                    self._start(out, "tool", block)
                if ev.arguments:
                    out.append(
                        self._delta(
                            b'{"type":"input_json_delta","partial_json":' + _encode(ev.arguments) + b"}"
                        )
                    )
            elif type(ev) is Usage:
                self._usage = ev
            elif type(ev) is Finish:
                self._close(out)
                usage = mapping.usage_to_anthropic(self._usage or Usage(0, 0))
                delta = {
                    "type": "message_delta",
                    "delta": {"stop_reason": mapping.stop_reason(ev.reason), "stop_sequence": None},
                    "usage": usage,
                }
                out.append(_event(b"message_delta", _encode(delta)))
                out.append(_STOP_EVENT)
                self.finished = True
            elif type(ev) is Error:
                out.append(_event(b"error", _encode(mapping.error_body(ev.status, ev.message))))
                self.finished = True
        return b"".join(out)


class AnthropicMessages(WireProtocol):
    """``POST /v1/messages`` and ``POST /anthropic/v1/messages``."""

    name = "anthropic"
    id_prefix = "msg_"

    def decode(self, body: bytes) -> ChatRequest:
        return decode_request(body)

    def encoder(self, info: StreamInfo) -> MessagesStreamEncoder:
        return MessagesStreamEncoder(info)

    def complete(self, info: StreamInfo, events: list[Event]) -> dict[str, Any]:
        got = Collected().add(events)
        got.raise_error()
        content: list[dict[str, Any]] = []
        if got.reasoning:
            content.append({"type": "thinking", "thinking": "".join(got.reasoning), "signature": ""})
        if got.text:
            content.append({"type": "text", "text": "".join(got.text)})
        for i, call in enumerate(got.tool_calls()):
            args = mapping.tool_input(call["arguments"])
            content.append(
                {
                    "type": "tool_use",
                    "id": call["id"] or _tool_id(info.id, i),
                    "name": call["name"],
                    "input": args,
                }
            )
        return {
            "id": info.id,
            "type": "message",
            "role": "assistant",
            "model": info.model,
            "content": content,
            "stop_reason": mapping.stop_reason(got.finish),
            "stop_sequence": None,
            "usage": mapping.usage_to_anthropic(got.usage),
        }

    def error_body(self, err: GatewayError) -> dict[str, Any]:
        body = mapping.error_body(err.status, err.message)
        if err.param:
            # not in Anthropic's schema, harmless, and names the field
            body["error"]["param"] = wire_param(err.param, _PARAMS)
        return body
