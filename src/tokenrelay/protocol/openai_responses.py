"""OpenAI Responses (``POST /v1/responses``): wire JSON -> ``ChatRequest``; events -> Responses SSE.

Stream shape (what the openai SDK's ``responses.stream`` helper checks): ``response.created`` then
``response.in_progress`` with the headers; each output item (reasoning, message, function call) opened
with ``response.output_item.added``, filled with deltas, closed with its ``.done`` events before the next
opens, ``output_index`` counting items in order; finally ``response.completed`` (``response.incomplete``
when the length limit cut the answer) carrying the whole response and usage, or ``error`` followed by
``response.failed``. Every event has an ``event:`` line and an increasing ``sequence_number``.
Stateless: ``previous_response_id`` and stored responses are not supported (a clear 400).
"""

from __future__ import annotations

import re
import time
from typing import Any, Literal

import msgspec
from msgspec import Struct

from tokenrelay.errors import GatewayError, invalid
from tokenrelay.events import Error, Event, Finish, ReasoningDelta, TextDelta, ToolCallDelta, Usage
from tokenrelay.openai_wire import (
    AssistantMessage,
    DeveloperMessage,
    FunctionCall,
    FunctionDef,
    ImagePart,
    ImageURL,
    Message,
    NamedFunction,
    NamedToolChoice,
    SystemMessage,
    TextPart,
    Tool,
    ToolCall,
    ToolMessage,
    UserMessage,
    UserPart,
)
from tokenrelay.protocol import openai_chat
from tokenrelay.protocol.base import Collected, StreamEncoder, StreamInfo, WireProtocol
from tokenrelay.protocol.padding import obfuscation_field
from tokenrelay.protocol.validation import Renames, decode_body, field_error, wire_param
from tokenrelay.request import ChatRequest

_encode = msgspec.json.encode

# ---------------------------------------------------------------------------------------------- request


class _Typed(Struct, tag_field="type", forbid_unknown_fields=False, omit_defaults=True):
    pass


class InputText(_Typed, tag="input_text"):
    text: str


class OutputText(_Typed, tag="output_text"):
    text: str


class InputImage(_Typed, tag="input_image"):
    image_url: str | None = None
    file_id: str | None = None
    detail: str | None = None


class InputFile(_Typed, tag="input_file"):
    file_id: str | None = None


class Refusal(_Typed, tag="refusal"):
    refusal: str


ContentPart = InputText | OutputText | InputImage | InputFile | Refusal


class MessageItem(Struct, forbid_unknown_fields=False):
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPart]
    type: Literal["message"] = "message"


class FunctionCallItem(Struct, forbid_unknown_fields=False):
    call_id: str
    name: str
    arguments: str
    type: Literal["function_call"] = "function_call"


class FunctionCallOutputItem(Struct, forbid_unknown_fields=False):
    call_id: str
    output: str | list[InputText]
    type: Literal["function_call_output"] = "function_call_output"


class FunctionTool(Struct, forbid_unknown_fields=False):
    type: str
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedChoice(Struct, forbid_unknown_fields=False):
    type: str
    name: str | None = None


class TextFormat(Struct, forbid_unknown_fields=False):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None
    description: str | None = None


class TextConfig(Struct, forbid_unknown_fields=False):
    format: TextFormat | None = None


class Reasoning(Struct, forbid_unknown_fields=False):
    effort: str | None = None
    summary: str | None = None


class ResponsesStreamOptions(Struct, forbid_unknown_fields=False):
    include_obfuscation: bool | None = None


class ResponsesRequest(Struct, forbid_unknown_fields=False):
    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    stream: bool | None = False
    max_output_tokens: int | None = msgspec.field(default=None)
    temperature: float | None = None
    top_p: float | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: str | NamedChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    reasoning: Reasoning | None = None
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    store: bool | None = None
    stream_options: ResponsesStreamOptions | None = None
    mock: dict[str, Any] | None = None  # tokenrelay extension, as on the other endpoints


_request = msgspec.json.Decoder(ResponsesRequest)
# internal field names a provider's 400 may carry -> where the field sits in a Responses request
_PARAMS: Renames = (
    (re.compile(r"^response_format\.json_schema\.schema"), "text.format.schema"),
    (re.compile(r"^response_format"), "text.format"),
    (re.compile(r"^(tools\[\d+\])\.function\."), r"\1."),
    (re.compile(r"^tool_choice\.function\.name"), "tool_choice.name"),
)


def _convert(obj: Any, typ: type[Any], where: str) -> Any:
    """``msgspec.convert`` whose 400s name the field inside ``where`` (an item of ``input``)."""
    try:
        return msgspec.convert(obj, typ)
    except msgspec.ValidationError as exc:
        raise field_error(exc, where) from exc


def _user_parts(content: list[ContentPart], where: str, media: list[str]) -> str | list[UserPart]:
    parts: list[UserPart] = []
    for j, part in enumerate(content):
        if isinstance(part, InputText | OutputText):
            parts.append(TextPart(text=part.text))
        elif isinstance(part, InputImage) and part.image_url:
            parts.append(ImagePart(image_url=ImageURL(url=part.image_url, detail=part.detail)))
            media.append(f"{where}.content[{j}]")
        else:
            raise invalid("Only text and image_url parts are supported here.", param=f"{where}.content[{j}]")
    if len(parts) == 1 and isinstance(parts[0], TextPart):
        return parts[0].text
    return parts


def _text_of(content: str | list[Any]) -> str:
    if isinstance(content, str):
        return content
    return "".join(getattr(p, "text", "") or getattr(p, "refusal", "") for p in content)


def _messages(wire: ResponsesRequest, media: list[str]) -> list[Message]:
    """The conversation in Chat terms; where each image sits in ``input`` is appended to ``media``."""
    messages: list[Message] = []
    if wire.instructions:
        messages.append(SystemMessage(content=wire.instructions))
    if isinstance(wire.input, str):
        messages.append(UserMessage(content=wire.input))
        return messages
    if not wire.input:
        raise invalid("'input' must not be empty.", param="input")
    for i, item in enumerate(wire.input):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            msg = _convert(item, MessageItem, where)
            if msg.role == "user":
                content = (
                    msg.content if isinstance(msg.content, str) else _user_parts(msg.content, where, media)
                )
                messages.append(UserMessage(content=content))
            elif msg.role == "assistant":
                messages.append(AssistantMessage(content=_text_of(msg.content)))
            elif msg.role == "system":
                messages.append(SystemMessage(content=_text_of(msg.content)))
            else:
                messages.append(DeveloperMessage(content=_text_of(msg.content)))
        elif kind == "function_call":
            call = _convert(item, FunctionCallItem, where)
            tool_call = ToolCall(
                id=call.call_id, function=FunctionCall(name=call.name, arguments=call.arguments)
            )
            last = messages[-1] if messages else None
            # consecutive calls (and the text before them) form one assistant turn in Chat terms
            if isinstance(last, AssistantMessage):
                last.tool_calls = [*(last.tool_calls or []), tool_call]
            else:
                messages.append(AssistantMessage(tool_calls=[tool_call]))
        elif kind == "function_call_output":
            out = _convert(item, FunctionCallOutputItem, where)
            messages.append(ToolMessage(content=_text_of(out.output), tool_call_id=out.call_id))
        elif kind == "reasoning":
            continue  # reasoning items from earlier turns are the model's own notes; nothing to replay
        else:
            raise invalid(f"Input items of type '{kind}' are not supported.", param=f"{where}.type")
    return messages


def _tools(wire: ResponsesRequest) -> list[Tool] | None:
    if not wire.tools:
        return None
    tools: list[Tool] = []
    for i, tool in enumerate(wire.tools):
        if tool.type != "function":
            raise invalid(
                f"Tool type '{tool.type}' is not supported; use function tools.", param=f"tools[{i}].type"
            )
        if not tool.name:
            raise invalid("Function tools need a 'name'.", param=f"tools[{i}].name")
        tools.append(
            Tool(
                function=FunctionDef(
                    name=tool.name,
                    description=tool.description,
                    parameters=tool.parameters,
                    strict=tool.strict,
                )
            )
        )
    return tools


def decode_request(body: bytes) -> ChatRequest:
    _, wire = decode_body(_request, body)
    if not wire.model:
        raise invalid("'model' must not be empty.", param="model")
    if wire.previous_response_id:
        raise invalid(
            "previous_response_id is not supported: this gateway stores no responses; send the whole input.",
            param="previous_response_id",
            code="unsupported_parameter",
        )
    if wire.max_output_tokens is not None and wire.max_output_tokens < 1:
        raise invalid("'max_output_tokens' must be at least 1.", param="max_output_tokens")
    if wire.temperature is not None and not 0 <= wire.temperature <= 2:
        raise invalid("'temperature' must be between 0 and 2.", param="temperature")
    if wire.top_p is not None and not 0 <= wire.top_p <= 1:
        raise invalid("'top_p' must be between 0 and 1.", param="top_p")
    tools = _tools(wire)
    choice: str | NamedToolChoice | None = None
    if isinstance(wire.tool_choice, NamedChoice):
        if wire.tool_choice.type != "function" or not wire.tool_choice.name:
            raise invalid("tool_choice must name a function.", param="tool_choice")
        choice = NamedToolChoice(function=NamedFunction(name=wire.tool_choice.name))
    elif wire.tool_choice is not None:
        if wire.tool_choice not in ("auto", "none", "required"):
            raise invalid("tool_choice must be 'auto', 'none' or 'required'.", param="tool_choice")
        choice = wire.tool_choice
    if choice not in (None, "auto", "none") and not tools:
        raise invalid("'tool_choice' needs 'tools'.", param="tool_choice")
    response_format: dict[str, Any] | None = None
    fmt = wire.text.format if wire.text else None
    if fmt is not None and fmt.type == "json_object":
        response_format = {"type": "json_object"}
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.schema is None:
            raise invalid("A json_schema format needs a 'schema'.", param="text.format.schema")
        spec: dict[str, Any] = {"name": fmt.name or "response", "schema": fmt.schema}
        if fmt.strict is not None:
            spec["strict"] = fmt.strict
        response_format = {"type": "json_schema", "json_schema": spec}
    extra: dict[str, Any] = {}
    if wire.reasoning is not None and wire.reasoning.effort:
        extra["reasoning_effort"] = wire.reasoning.effort
    media: list[str] = []
    messages = _messages(wire, media)
    return ChatRequest(
        model=wire.model,
        messages=messages,
        stream=bool(wire.stream),
        max_tokens=wire.max_output_tokens,
        temperature=wire.temperature,
        top_p=wire.top_p,
        tools=tools,
        tool_choice=choice,
        parallel_tool_calls=wire.parallel_tool_calls,
        response_format=response_format,
        user=wire.user,
        media_params=media,
        include_usage=True,
        obfuscation=wire.stream_options.include_obfuscation if wire.stream_options else None,
        extra=extra,
        mock=wire.mock,
    )


# ---------------------------------------------------------------------------------------------- response


def usage_body(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "total_tokens": usage.total_tokens,
    }


def response_object(
    info: StreamInfo,
    status: str,
    output: list[dict[str, Any]],
    usage: Usage | None = None,
    error: Error | None = None,
) -> dict[str, Any]:
    req = info.request
    fmt: dict[str, Any] = {"type": "text"}
    if req.response_format:
        fmt = {"type": req.response_format.get("type", "text")}
        if fmt["type"] == "json_schema":
            fmt.update(req.response_format.get("json_schema", {}))
    tool_choice: Any = req.tool_choice or "auto"
    if isinstance(tool_choice, NamedToolChoice):
        tool_choice = {"type": "function", "name": tool_choice.function.name}
    return {
        "id": info.id,
        "object": "response",
        "created_at": info.created,
        "status": status,
        "background": False,
        "error": {"code": error.code or error.type, "message": error.message} if error else None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": None,
        "max_output_tokens": req.max_tokens,
        "model": info.model,
        "output": output,
        "parallel_tool_calls": req.parallel_tool_calls is not False,
        "previous_response_id": None,
        "reasoning": {"effort": req.extra.get("reasoning_effort"), "summary": None},
        "store": False,
        "temperature": req.temperature if req.temperature is not None else 1.0,
        "text": {"format": fmt},
        "tool_choice": tool_choice,
        "tools": [
            {
                "type": "function",
                "name": t.function.name,
                "description": t.function.description,
                "parameters": t.function.parameters,
                "strict": t.function.strict,
            }
            for t in req.tools or ()
        ],
        "top_p": req.top_p if req.top_p is not None else 1.0,
        "truncation": "disabled",
        "usage": usage_body(usage) if usage is not None else None,
        "user": req.user,
        "metadata": {},
    }


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
        if status != "in_progress"
        else [],
    }


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "function_call",
        "status": status,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
    }


def _reasoning_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    content = [{"type": "reasoning_text", "text": text}] if status != "in_progress" else []
    return {"id": item_id, "type": "reasoning", "summary": [], "content": content, "status": status}


class ResponsesStreamEncoder(StreamEncoder):
    def __init__(self, info: StreamInfo) -> None:
        super().__init__()
        self.info = info
        self.seq = 0
        self.obfuscate = info.request.obfuscation is not False  # on unless asked off, as OpenAI does
        self.output: list[dict[str, Any]] = []
        self._kind = ""  # the open item: "message", "call", "reasoning" or ""
        self._item_id = ""
        self._call_id = ""
        self._call_name = ""
        self._tool = -1
        self._parts: list[str] = []
        self._usage: Usage | None = None
        self._suffix = info.id[len("resp_") :]

    def _event(self, name: str, payload: dict[str, Any]) -> bytes:
        payload["sequence_number"] = self.seq
        self.seq += 1
        return b"event: " + name.encode() + b"\ndata: " + _encode({"type": name, **payload}) + b"\n\n"

    def open(self) -> bytes:
        response = response_object(self.info, "in_progress", [])
        return self._event("response.created", {"response": response}) + self._event(
            "response.in_progress", {"response": response}
        )

    def _delta_event(self, name: str, delta: str, content_index: bool) -> bytes:
        # built by hand: this is the one event per token
        head = b'event: %s\ndata: {"type":"%s","item_id":"%s","output_index":%d,' % (
            name.encode(),
            name.encode(),
            self._item_id.encode(),
            len(self.output),
        )
        tail = b'"content_index":0,"logprobs":[],' if content_index else b""
        self.seq += 1
        text = _encode(delta)
        pad = obfuscation_field(len(text)) if self.obfuscate else b""
        return head + tail + b'"delta":' + text + pad + b',"sequence_number":%d}\n\n' % (self.seq - 1)

    def _close(self, out: list[bytes]) -> None:
        kind, index = self._kind, len(self.output)
        if not kind:
            return
        text = "".join(self._parts)
        ids = {"item_id": self._item_id, "output_index": index}
        if kind == "message":
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            out.append(
                self._event(
                    "response.output_text.done", {**ids, "content_index": 0, "text": text, "logprobs": []}
                )
            )
            out.append(self._event("response.content_part.done", {**ids, "content_index": 0, "part": part}))
            item = _message_item(self._item_id, text, "completed")
        elif kind == "reasoning":
            out.append(self._event("response.reasoning_text.done", {**ids, "content_index": 0, "text": text}))
            item = _reasoning_item(self._item_id, text, "completed")
        else:
            out.append(
                self._event(
                    "response.function_call_arguments.done",
                    {**ids, "name": self._call_name, "arguments": text},
                )
            )
            item = _call_item(self._item_id, self._call_id, self._call_name, text, "completed")
        out.append(self._event("response.output_item.done", {"output_index": index, "item": item}))
        self.output.append(item)
        self._kind = ""
        self._parts = []

    def _start(self, out: list[bytes], kind: str, item: dict[str, Any]) -> None:
        self._kind = kind
        self._item_id = item["id"]
        out.append(
            self._event("response.output_item.added", {"output_index": len(self.output), "item": item})
        )

    def encode(self, batch: list[Event]) -> bytes:
        out: list[bytes] = []
        for ev in batch:
            if type(ev) is TextDelta:
                if self._kind != "message":
                    self._close(out)
                    item_id = f"msg_{self._suffix}_{len(self.output)}"
                    self._start(out, "message", _message_item(item_id, "", "in_progress"))
                    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
                    out.append(
                        self._event(
                            "response.content_part.added",
                            {
                                "item_id": item_id,
                                "output_index": len(self.output),
                                "content_index": 0,
                                "part": part,
                            },
                        )
                    )
                self._parts.append(ev.text)
                out.append(self._delta_event("response.output_text.delta", ev.text, True))
            elif type(ev) is ToolCallDelta:
                if self._kind != "call" or self._tool != ev.index:
                    self._close(out)
                    self._tool = ev.index
                    self._call_id = ev.id or f"call_{self._suffix}_{ev.index}"
                    self._call_name = ev.name or ""
                    item_id = f"fc_{self._suffix}_{len(self.output)}"
                    self._start(
                        out, "call", _call_item(item_id, self._call_id, self._call_name, "", "in_progress")
                    )
                if ev.arguments:
                    self._parts.append(ev.arguments)
                    out.append(
                        self._delta_event("response.function_call_arguments.delta", ev.arguments, False)
                    )
            elif type(ev) is ReasoningDelta:
                if self._kind != "reasoning":
                    self._close(out)
                    item_id = f"rs_{self._suffix}_{len(self.output)}"
                    self._start(out, "reasoning", _reasoning_item(item_id, "", "in_progress"))
                self._parts.append(ev.text)
                out.append(self._delta_event("response.reasoning_text.delta", ev.text, True))
            elif type(ev) is Usage:
                self._usage = ev
            elif type(ev) is Finish:
                self._close(out)
                status = "incomplete" if ev.reason == "length" else "completed"
                response = response_object(self.info, status, self.output, self._usage or Usage(0, 0))
                out.append(self._event(f"response.{status}", {"response": response}))
                self.finished = True
            elif type(ev) is Error:
                out.append(
                    self._event(
                        "error", {"code": ev.code or ev.type, "message": ev.message, "param": ev.param}
                    )
                )
                response = response_object(self.info, "failed", self.output, self._usage, ev)
                out.append(self._event("response.failed", {"response": response}))
                self.finished = True
        return b"".join(out)


class OpenAIResponses(WireProtocol):
    """``POST /v1/responses``."""

    name = "responses"
    id_prefix = "resp_"

    def decode(self, body: bytes) -> ChatRequest:
        return decode_request(body)

    def encoder(self, info: StreamInfo) -> ResponsesStreamEncoder:
        return ResponsesStreamEncoder(info)

    def complete(self, info: StreamInfo, events: list[Event]) -> dict[str, Any]:
        got = Collected().add(events)
        got.raise_error()
        suffix = info.id[len("resp_") :]
        output: list[dict[str, Any]] = []
        if got.reasoning:
            output.append(_reasoning_item(f"rs_{suffix}_0", "".join(got.reasoning), "completed"))
        if got.text:
            output.append(_message_item(f"msg_{suffix}_{len(output)}", "".join(got.text), "completed"))
        for i, call in enumerate(got.tool_calls()):
            output.append(
                _call_item(
                    f"fc_{suffix}_{len(output)}",
                    call["id"] or f"call_{suffix}_{i}",
                    call["name"],
                    call["arguments"],
                    "completed",
                )
            )
        status = "incomplete" if got.finish == "length" else "completed"
        body = response_object(info, status, output, got.usage)
        body["created_at"] = info.created or int(time.time())
        return body

    def error_body(self, err: GatewayError) -> dict[str, Any]:
        body = openai_chat.error_body(err)
        body["error"]["param"] = wire_param(err.param, _PARAMS)
        return body
