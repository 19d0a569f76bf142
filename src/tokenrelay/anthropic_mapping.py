"""OpenAI Chat <-> Anthropic Messages: the one place where the two vocabularies meet.

Both directions of every mapping live here, side by side, so they stay each other's inverse:
requests (roles and system prompt, tools and tool results, tool_choice, stop sequences), stop reasons
and finish reasons, usage (Anthropic's ``input_tokens`` excludes cached tokens; OpenAI's
``prompt_tokens`` includes them), and error types by status. The inbound Anthropic protocol and the
``anthropic`` upstream provider both call into it; neither has its own conditionals.
"""

from __future__ import annotations

from typing import Any

import msgspec

from tokenrelay.anthropic_wire import (
    DocumentBlock,
    ImageBlock,
    MessagesRequest,
    RedactedThinkingBlock,
    TextBlock,
    ThinkingBlock,
    ToolResultBlock,
    ToolUseBlock,
)
from tokenrelay.errors import invalid
from tokenrelay.events import Usage
from tokenrelay.openai_wire import (
    AssistantMessage,
    DeveloperMessage,
    FunctionCall,
    FunctionDef,
    FunctionMessage,
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
from tokenrelay.request import ChatRequest

# ------------------------------------------------------------------------------------ stop reasons

STOP_TO_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
FINISH_TO_STOP = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "content_filter": "refusal",
}


def finish_reason(stop_reason: str | None) -> str:
    return STOP_TO_FINISH.get(stop_reason or "end_turn", "stop")


def stop_reason(finish: str | None) -> str:
    return FINISH_TO_STOP.get(finish or "stop", "end_turn")


# ------------------------------------------------------------------------------------------- usage


def usage_from_anthropic(
    input_tokens: int, output_tokens: int, cache_creation: int = 0, cache_read: int = 0
) -> Usage:
    return Usage(
        prompt_tokens=input_tokens + cache_creation + cache_read,
        completion_tokens=output_tokens,
        cached_tokens=cache_read,
    )


def usage_to_anthropic(usage: Usage) -> dict[str, int]:
    return {
        "input_tokens": max(0, usage.prompt_tokens - usage.cached_tokens),
        "output_tokens": usage.completion_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": usage.cached_tokens,
    }


# ------------------------------------------------------------------------------------------ errors

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def error_type(status: int) -> str:
    if status in ERROR_TYPES:
        return ERROR_TYPES[status]
    return "api_error" if status >= 500 else "invalid_request_error"


def error_body(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type(status), "message": message}}


# ---------------------------------------------------------------------- requests: Anthropic -> OpenAI


def _text(content: str | list[TextBlock] | list[TextPart]) -> str:
    if isinstance(content, str):
        return content
    return "\n\n".join(block.text for block in content)


def _image_url(block: ImageBlock) -> str:
    src = block.source
    if src.type == "url":
        return src.url or ""
    return f"data:{src.media_type or 'image/png'};base64,{src.data or ''}"


def _tool_result_text(block: ToolResultBlock) -> str:
    content = block.content
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    else:
        text = "\n\n".join(b.text for b in content if isinstance(b, TextBlock))
    return f"Error: {text}" if block.is_error else text


def request_to_internal(wire: MessagesRequest) -> ChatRequest:
    """An inbound Anthropic request as the internal (OpenAI-shaped) request; 400s name the field."""
    messages: list[Message] = []
    media: list[str] = []  # where each image block sits, for providers that take text only
    if wire.system:
        messages.append(SystemMessage(content=_text(wire.system)))
    for i, msg in enumerate(wire.messages):
        content = msg.content
        if isinstance(content, str):
            messages.append(UserMessage(content=content) if msg.role == "user" else AssistantMessage(content))
            continue
        if msg.role == "user":
            parts: list[UserPart] = []
            for j, block in enumerate(content):
                if isinstance(block, ToolResultBlock):
                    # tool results must directly follow the assistant's tool calls in OpenAI's order
                    messages.append(
                        ToolMessage(content=_tool_result_text(block), tool_call_id=block.tool_use_id)
                    )
                elif isinstance(block, TextBlock):
                    parts.append(TextPart(text=block.text))
                elif isinstance(block, ImageBlock):
                    parts.append(ImagePart(image_url=ImageURL(url=_image_url(block))))
                    media.append(f"messages[{i}].content[{j}]")
                elif isinstance(block, DocumentBlock):
                    raise invalid(
                        "Document blocks are not supported by this gateway.",
                        param=f"messages[{i}].content[{j}]",
                    )
                else:
                    raise invalid(
                        f"A user message cannot hold a '{type(block).__name__}' block.",
                        param=f"messages[{i}].content[{j}].type",
                    )
            if len(parts) == 1 and isinstance(parts[0], TextPart):
                messages.append(UserMessage(content=parts[0].text))
            elif parts:
                messages.append(UserMessage(content=parts))
            continue
        texts: list[str] = []
        thinking: list[str] = []
        calls: list[ToolCall] = []
        for j, block in enumerate(content):
            if isinstance(block, TextBlock):
                texts.append(block.text)
            elif isinstance(block, ToolUseBlock):
                calls.append(
                    ToolCall(
                        id=block.id,
                        function=FunctionCall(
                            name=block.name, arguments=msgspec.json.encode(block.input).decode()
                        ),
                    )
                )
            elif isinstance(block, ThinkingBlock):
                thinking.append(block.thinking)
            elif isinstance(block, RedactedThinkingBlock):
                continue
            else:
                raise invalid(
                    f"An assistant message cannot hold a '{type(block).__name__}' block.",
                    param=f"messages[{i}].content[{j}].type",
                )
        messages.append(
            AssistantMessage(
                content="".join(texts) if texts else None,
                tool_calls=calls or None,
                reasoning_content="".join(thinking) if thinking else None,
            )
        )

    tools: list[Tool] | None = None
    if wire.tools:
        tools = []
        for i, tool in enumerate(wire.tools):
            if tool.type not in (None, "custom"):
                raise invalid(
                    f"Server tool '{tool.type}' is not supported by this gateway.", param=f"tools[{i}].type"
                )
            tools.append(
                Tool(
                    function=FunctionDef(
                        name=tool.name, description=tool.description, parameters=tool.input_schema
                    )
                )
            )
    tool_choice: str | NamedToolChoice | None = None
    parallel: bool | None = None
    if wire.tool_choice is not None:
        choice = wire.tool_choice
        if choice.type == "tool":
            if not choice.name:
                raise invalid("tool_choice of type 'tool' needs a 'name'.", param="tool_choice.name")
            tool_choice = NamedToolChoice(function=NamedFunction(name=choice.name))
        else:
            tool_choice = {"auto": "auto", "any": "required", "none": "none"}[choice.type]
        if choice.disable_parallel_tool_use:
            parallel = False
    if tool_choice not in (None, "auto", "none") and not tools:
        raise invalid("'tool_choice' needs 'tools'.", param="tool_choice")
    if wire.stop_sequences is not None and any(not s for s in wire.stop_sequences):
        raise invalid("Stop sequences must not be empty.", param="stop_sequences")
    return ChatRequest(
        model=wire.model,
        messages=messages,
        stream=bool(wire.stream),
        max_tokens=wire.max_tokens,
        temperature=wire.temperature,
        top_p=wire.top_p,
        top_k=wire.top_k,
        stop=wire.stop_sequences or None,
        tools=tools,
        tool_choice=tool_choice,
        parallel_tool_calls=parallel,
        user=wire.metadata.user_id if wire.metadata else None,
        thinking=wire.thinking,
        media_params=media,
        include_usage=True,
        mock=wire.mock,
    )


# ---------------------------------------------------------------------- requests: OpenAI -> Anthropic


def _user_blocks(content: str | list[UserPart], where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    blocks: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        if isinstance(part, TextPart):
            blocks.append({"type": "text", "text": part.text})
        elif isinstance(part, ImagePart):
            url = part.image_url.url
            if url.startswith("data:") and ";base64," in url:
                media, data = url[5:].split(";base64,", 1)
                blocks.append(
                    {"type": "image", "source": {"type": "base64", "media_type": media, "data": data}}
                )
            else:
                blocks.append({"type": "image", "source": {"type": "url", "url": url}})
        else:
            raise invalid(
                f"Content part '{type(part).__name__}' cannot be sent to an Anthropic model.",
                param=f"{where}.content[{j}]",
            )
    return blocks


def tool_input(arguments: str) -> dict[str, Any]:
    """Tool-call arguments (JSON text) as the object Anthropic's ``input`` must be, even when they are not."""
    try:
        value = msgspec.json.decode(arguments) if arguments else {}
    except msgspec.DecodeError:
        return {"arguments": arguments}
    return value if isinstance(value, dict) else {"value": value}


def request_to_anthropic(req: ChatRequest, model: str, default_max_tokens: int) -> dict[str, Any]:
    """The body of a streaming Messages API call for the internal request."""
    system: list[str] = []
    turns: list[dict[str, Any]] = []

    def push(role: str, blocks: list[dict[str, Any]]) -> None:
        # consecutive turns of one role merge: tool results and the user's next words share a turn
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})

    for i, msg in enumerate(req.messages):
        if isinstance(msg, SystemMessage | DeveloperMessage):
            system.append(_text(msg.content))
        elif isinstance(msg, UserMessage):
            push("user", _user_blocks(msg.content, f"messages[{i}]"))
        elif isinstance(msg, AssistantMessage):
            blocks: list[dict[str, Any]] = []
            content = msg.content
            text = (
                content
                if isinstance(content, str)
                else "".join(getattr(p, "text", "") for p in content or ())
            )
            if text:
                blocks.append({"type": "text", "text": text})
            for call in msg.tool_calls or ():
                blocks.append(
                    {
                        "type": "tool_use",
                        "id": call.id,
                        "name": call.function.name,
                        "input": tool_input(call.function.arguments),
                    }
                )
            if blocks:  # Anthropic rejects an empty assistant turn
                push("assistant", blocks)
        elif isinstance(msg, ToolMessage):
            push(
                "user",
                [{"type": "tool_result", "tool_use_id": msg.tool_call_id, "content": _text(msg.content)}],
            )
        elif isinstance(msg, FunctionMessage):
            push("user", [{"type": "text", "text": f"{msg.name}: {msg.content or ''}"}])

    body: dict[str, Any] = {
        "model": model,
        "max_tokens": req.max_tokens or default_max_tokens,
        "messages": turns,
        "stream": True,
    }
    if system:
        body["system"] = "\n\n".join(system)
    if req.stop:
        body["stop_sequences"] = req.stop
    if req.temperature is not None:
        body["temperature"] = min(req.temperature, 1.0)  # OpenAI allows 0-2, Anthropic 0-1
    if req.top_p is not None:
        body["top_p"] = req.top_p
    if req.top_k is not None:
        body["top_k"] = req.top_k
    if req.thinking is not None:
        body["thinking"] = req.thinking
    if req.tools:
        body["tools"] = [
            {
                "name": t.function.name,
                **({"description": t.function.description} if t.function.description else {}),
                "input_schema": t.function.parameters or {"type": "object", "properties": {}},
            }
            for t in req.tools
        ]
    choice: dict[str, Any] | None = None
    if isinstance(req.tool_choice, NamedToolChoice):
        choice = {"type": "tool", "name": req.tool_choice.function.name}
    elif req.tool_choice is not None:
        choice = {"type": {"auto": "auto", "required": "any", "none": "none"}.get(req.tool_choice, "auto")}
    if req.parallel_tool_calls is False and req.tools:
        choice = choice or {"type": "auto"}
        choice["disable_parallel_tool_use"] = True
    if choice is not None and req.tools:
        body["tool_choice"] = choice
    if req.user:
        body["metadata"] = {"user_id": req.user}
    if req.mock is not None:
        body["mock"] = req.mock
    return body
