"""Ollama's NDJSON API (``POST /api/chat``, ``POST /api/generate``): wire JSON <-> internal request/events.

Streams are on unless ``"stream": false``; each line is one JSON object ending in ``\\n``
(``application/x-ndjson``, chunked). Text arrives as ``message.content`` (chat) or ``response``
(generate); tool calls arrive whole, with ``arguments`` as an object, once the call's last fragment is in;
the final line has ``done: true``, ``done_reason`` and the counts and nanosecond durations. A failure is
a ``{"error": "..."}`` line (or the HTTP status with that body before the stream). NDJSON has no comment
syntax, so this protocol sends no keep-alives: the Ollama clients would try to parse them.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal

import msgspec
from msgspec import Struct

from tokenrelay.errors import GatewayError, invalid
from tokenrelay.events import Error, Event, Finish, ReasoningDelta, TextDelta, ToolCallDelta, Usage
from tokenrelay.openai_wire import (
    AssistantMessage,
    FunctionCall,
    FunctionDef,
    ImagePart,
    ImageURL,
    Message,
    NamedToolChoice,
    SystemMessage,
    TextPart,
    Tool,
    ToolCall,
    ToolMessage,
    UserMessage,
    UserPart,
)
from tokenrelay.protocol.base import NDJSON_MEDIA, Collected, StreamEncoder, StreamInfo, WireProtocol
from tokenrelay.protocol.padding import obfuscation_field
from tokenrelay.protocol.validation import decode_body
from tokenrelay.request import ChatRequest

_encode = msgspec.json.encode


class OllamaFunctionCall(Struct, forbid_unknown_fields=False):
    name: str
    arguments: dict[str, Any] | str = msgspec.field(default_factory=dict)


class OllamaToolCall(Struct, forbid_unknown_fields=False):
    function: OllamaFunctionCall
    id: str | None = None


class OllamaMessage(Struct, forbid_unknown_fields=False):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = ""
    images: list[str] | None = None
    tool_calls: list[OllamaToolCall] | None = None
    tool_name: str | None = None
    thinking: str | None = None


class OllamaOptions(Struct, forbid_unknown_fields=False):
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    num_predict: int | None = None
    stop: list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None


class OllamaTool(Struct, forbid_unknown_fields=False):
    function: FunctionDef
    type: str = "function"


class ChatBody(Struct, forbid_unknown_fields=False):
    model: str
    messages: list[OllamaMessage] = msgspec.field(default_factory=list)
    stream: bool = True
    tools: list[OllamaTool] | None = None
    format: str | dict[str, Any] | None = None
    options: OllamaOptions | None = None
    keep_alive: str | int | None = None
    think: bool | str | None = None
    # tokenrelay extension (Ollama has no such field): OpenAI's tool_choice, so that a client can make a
    # model that never picks a tool by itself (the embedded one) call one
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    mock: dict[str, Any] | None = None  # tokenrelay extension, as on the other endpoints


class GenerateBody(Struct, forbid_unknown_fields=False):
    model: str
    prompt: str = ""
    system: str | None = None
    images: list[str] | None = None
    stream: bool = True
    format: str | dict[str, Any] | None = None
    options: OllamaOptions | None = None
    keep_alive: str | int | None = None
    raw: bool | None = None
    think: bool | str | None = None
    mock: dict[str, Any] | None = None


_chat = msgspec.json.Decoder(ChatBody)
_generate = msgspec.json.Decoder(GenerateBody)

_IMAGE_MAGIC = (
    ("iVBOR", "image/png"),
    ("/9j/", "image/jpeg"),
    ("R0lGOD", "image/gif"),
    ("UklGR", "image/webp"),
)


def _image(data: str) -> ImagePart:
    media = next((m for prefix, m in _IMAGE_MAGIC if data.startswith(prefix)), "image/png")
    return ImagePart(image_url=ImageURL(url=f"data:{media};base64,{data}"))


def _user(content: str, images: list[str] | None, where: str, media: list[str]) -> UserMessage:
    """A user turn; where each of its images sits (``messages[i].images[k]``) is appended to ``media``."""
    if not images:
        return UserMessage(content=content)
    parts: list[UserPart] = [TextPart(text=content)] if content else []
    parts.extend(_image(img) for img in images)
    media.extend(f"{where}images[{k}]" for k in range(len(images)))
    return UserMessage(content=parts)


def _format(fmt: str | dict[str, Any] | None) -> dict[str, Any] | None:
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return {"type": "json_object"}
    if isinstance(fmt, dict):
        return {"type": "json_schema", "json_schema": {"name": "response", "schema": fmt}}
    raise invalid("'format' must be \"json\" or a JSON schema object.", param="format")


def _decode(decoder: msgspec.json.Decoder[Any], body: bytes) -> Any:
    _, wire = decode_body(decoder, body)
    if not wire.model:
        raise invalid("'model' must not be empty.", param="model")
    return wire


def _request(
    wire: ChatBody | GenerateBody, messages: list[Message], tools: list[Tool] | None, media: list[str]
) -> ChatRequest:
    opts = wire.options or OllamaOptions()
    return ChatRequest(
        model=wire.model,
        messages=messages,
        stream=wire.stream,
        max_tokens=opts.num_predict if opts.num_predict and opts.num_predict > 0 else None,
        temperature=opts.temperature,
        top_p=opts.top_p,
        top_k=opts.top_k,
        stop=opts.stop or None,
        seed=opts.seed,
        presence_penalty=opts.presence_penalty,
        frequency_penalty=opts.frequency_penalty,
        tools=tools,
        response_format=_format(wire.format),
        media_params=media,
        include_usage=True,
        mock=wire.mock,
    )


def decode_chat(body: bytes) -> ChatRequest:
    wire: ChatBody = _decode(_chat, body)
    if not wire.messages:
        raise invalid("'messages' must not be empty.", param="messages")
    messages: list[Message] = []
    media: list[str] = []
    pending: list[ToolCall] = []  # the last assistant turn's calls, answered in order by tool messages
    for i, msg in enumerate(wire.messages):
        content = msg.content or ""
        if msg.role == "system":
            messages.append(SystemMessage(content=content))
        elif msg.role == "user":
            messages.append(_user(content, msg.images, f"messages[{i}].", media))
        elif msg.role == "assistant":
            calls = [
                ToolCall(
                    id=call.id or f"call_{i}_{j}",
                    function=FunctionCall(
                        name=call.function.name,
                        arguments=call.function.arguments
                        if isinstance(call.function.arguments, str)
                        else _encode(call.function.arguments).decode(),
                    ),
                )
                for j, call in enumerate(msg.tool_calls or ())
            ]
            pending = list(calls)
            messages.append(
                AssistantMessage(
                    content=content or None, tool_calls=calls or None, reasoning_content=msg.thinking
                )
            )
        else:
            # Ollama's tool messages name the tool, not the call: answer the oldest open call of that name
            match = next((c for c in pending if msg.tool_name in (None, c.function.name)), None)
            if match is None:
                raise invalid(
                    "A tool message must follow an assistant message with tool_calls.", param=f"messages[{i}]"
                )
            pending.remove(match)
            messages.append(ToolMessage(content=content, tool_call_id=match.id))
    tools = [Tool(function=t.function) for t in wire.tools] if wire.tools else None
    if wire.tool_choice not in (None, "auto", "none") and not tools:
        raise invalid("'tool_choice' needs 'tools'.", param="tool_choice")
    req = _request(wire, messages, tools, media)
    req.tool_choice = wire.tool_choice
    return req


def decode_generate(body: bytes) -> ChatRequest:
    wire: GenerateBody = _decode(_generate, body)
    messages: list[Message] = []
    if wire.system:
        messages.append(SystemMessage(content=wire.system))
    media: list[str] = []
    messages.append(_user(wire.prompt, wire.images, "", media))
    return _request(wire, messages, None, media)


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _durations(started: int, first: int | None, usage: Usage) -> dict[str, Any]:
    now = time.perf_counter_ns()
    first = first or now
    return {
        "total_duration": now - started,
        "load_duration": 0,
        "prompt_eval_count": usage.prompt_tokens,
        "prompt_eval_duration": first - started,
        "eval_count": usage.completion_tokens,
        "eval_duration": now - first,
    }


def _tool_call(call: dict[str, str]) -> dict[str, Any]:
    try:
        args: Any = msgspec.json.decode(call["arguments"]) if call["arguments"] else {}
    except msgspec.DecodeError:
        args = call["arguments"]
    return {"id": call["id"], "function": {"name": call["name"], "arguments": args}}


class OllamaStreamEncoder(StreamEncoder):
    keepalive = None

    def __init__(self, info: StreamInfo, generate: bool) -> None:
        super().__init__()
        self.generate = generate
        self.started = time.perf_counter_ns()
        self.first: int | None = None
        self.tools = Collected()
        self._usage = Usage(0, 0)
        model = _encode(info.model)
        self._head = b'{"model":' + model + b',"created_at":"'
        self._text_key = b'","response":' if generate else b'","message":{"role":"assistant","content":'
        self.obfuscate = info.request.obfuscation is True  # opt-in: x-tokenrelay-obfuscation: on

    def _line(self, stamp: bytes, body: dict[str, Any]) -> bytes:
        return self._head + stamp + b'",' + _encode(body)[1:] + b"\n"

    def _flush_tools(self, stamp: bytes, out: list[bytes]) -> None:
        if self.tools.tools and not self.generate:
            calls = [_tool_call(c) for c in self.tools.tool_calls()]
            self.tools.tools.clear()
            out.append(
                self._line(
                    stamp,
                    {"message": {"role": "assistant", "content": "", "tool_calls": calls}, "done": False},
                )
            )

    def encode(self, batch: list[Event]) -> bytes:
        out: list[bytes] = []
        stamp = _now().encode()
        if self.first is None:
            self.first = time.perf_counter_ns()
        for ev in batch:
            if type(ev) is TextDelta:
                close = b',"done":false}\n' if self.generate else b'},"done":false}\n'
                text = _encode(ev.text)
                if self.obfuscate:  # an extra top-level field, which the ollama client ignores
                    close = close[:-2] + obfuscation_field(len(text)) + b"}\n"
                out.append(self._head + stamp + self._text_key + text + close)
            elif type(ev) is ToolCallDelta:
                if self.tools.tools and ev.index not in self.tools.tools:
                    self._flush_tools(stamp, out)  # the previous call is complete
                self.tools.add([ev])
            elif type(ev) is ReasoningDelta:
                if self.generate:
                    out.append(self._line(stamp, {"response": "", "thinking": ev.text, "done": False}))
                else:
                    out.append(
                        self._line(
                            stamp,
                            {
                                "message": {"role": "assistant", "content": "", "thinking": ev.text},
                                "done": False,
                            },
                        )
                    )
            elif type(ev) is Usage:
                self._usage = ev
            elif type(ev) is Finish:
                self._flush_tools(stamp, out)
                final: dict[str, Any] = (
                    {"response": ""} if self.generate else {"message": {"role": "assistant", "content": ""}}
                )
                final["done"] = True
                final["done_reason"] = "length" if ev.reason == "length" else "stop"
                final.update(_durations(self.started, self.first, self._usage))
                out.append(self._line(stamp, final))
                self.finished = True
            elif type(ev) is Error:
                out.append(_encode({"error": ev.message}) + b"\n")
                self.finished = True
        return b"".join(out)


class OllamaChat(WireProtocol):
    """``POST /api/chat``."""

    name = "ollama-chat"
    media_type = NDJSON_MEDIA
    generate: ClassVar[bool] = False

    def decode(self, body: bytes) -> ChatRequest:
        return decode_generate(body) if self.generate else decode_chat(body)

    def encoder(self, info: StreamInfo) -> OllamaStreamEncoder:
        return OllamaStreamEncoder(info, self.generate)

    def complete(self, info: StreamInfo, events: list[Event]) -> dict[str, Any]:
        got = Collected().add(events)
        got.raise_error()
        body: dict[str, Any] = {"model": info.model, "created_at": _now()}
        text = "".join(got.text)
        if self.generate:
            body["response"] = text
        else:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if got.tools:
                message["tool_calls"] = [_tool_call(c) for c in got.tool_calls()]
            if got.reasoning:
                message["thinking"] = "".join(got.reasoning)
            body["message"] = message
        body["done"] = True
        body["done_reason"] = "length" if got.finish == "length" else "stop"
        started = time.perf_counter_ns()
        body.update(_durations(started, started, got.usage))
        return body

    def error_body(self, err: GatewayError) -> dict[str, Any]:
        return {"error": err.message}


class OllamaGenerate(OllamaChat):
    """``POST /api/generate``."""

    name = "ollama-generate"
    generate = True
