"""Anthropic Messages wire types, shared by the inbound protocol and the upstream provider.

Request types are strict (client input; every violation names its field), the upstream stream event
types are lenient (unknown fields and event types never fail a stream).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

# ---------------------------------------------------------------------------------------------- request


class _Block(Struct, tag_field="type", forbid_unknown_fields=False, omit_defaults=True):
    pass


class TextBlock(_Block, tag="text"):
    text: str


class ImageSource(Struct, forbid_unknown_fields=False, omit_defaults=True):
    type: Literal["base64", "url"]
    media_type: str | None = None
    data: str | None = None
    url: str | None = None


class ImageBlock(_Block, tag="image"):
    source: ImageSource


class DocumentBlock(_Block, tag="document"):
    source: dict[str, Any]


class ToolUseBlock(_Block, tag="tool_use"):
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(_Block, tag="tool_result"):
    tool_use_id: str
    content: str | list[TextBlock | ImageBlock] | None = None
    is_error: bool | None = None


class ThinkingBlock(_Block, tag="thinking"):
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(_Block, tag="redacted_thinking"):
    data: str


Block = (
    TextBlock
    | ImageBlock
    | DocumentBlock
    | ToolUseBlock
    | ToolResultBlock
    | ThinkingBlock
    | RedactedThinkingBlock
)


class AnthropicMessage(Struct, forbid_unknown_fields=False):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class AnthropicTool(Struct, forbid_unknown_fields=False, omit_defaults=True):
    name: Annotated[str, Meta(min_length=1, max_length=128)]
    input_schema: dict[str, Any] | None = None
    description: str | None = None
    type: str | None = None  # "custom"; server tools (web_search_...) have other types


class AnthropicToolChoice(Struct, forbid_unknown_fields=False, omit_defaults=True):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class Metadata(Struct, forbid_unknown_fields=False):
    user_id: str | None = None


class MessagesRequest(Struct, forbid_unknown_fields=False):
    model: Annotated[str, Meta(min_length=1)]
    max_tokens: Annotated[int, Meta(ge=1)]
    messages: Annotated[list[AnthropicMessage], Meta(min_length=1)]
    system: str | list[TextBlock] | None = None
    stream: bool | None = False
    stop_sequences: list[str] | None = None
    temperature: Annotated[float, Meta(ge=0, le=1)] | None = None
    top_p: Annotated[float, Meta(ge=0, le=1)] | None = None
    top_k: Annotated[int, Meta(ge=0)] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    metadata: Metadata | None = None
    thinking: dict[str, Any] | None = None
    mock: dict[str, Any] | None = None  # tokenrelay extension, as on the OpenAI endpoint


MESSAGES_FIELDS = frozenset(MessagesRequest.__struct_fields__)

# ---------------------------------------------------------------------------------- upstream stream


class UpContentBlock(Struct):
    type: str = "text"
    id: str | None = None
    name: str | None = None
    text: str | None = None
    thinking: str | None = None
    input: dict[str, Any] | None = None


class UpBlockDelta(Struct):
    type: str = ""
    text: str | None = None
    thinking: str | None = None
    partial_json: str | None = None


class UpUsage(Struct):
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None


class UpMessage(Struct):
    usage: UpUsage | None = None


class UpMessageDelta(Struct):
    stop_reason: str | None = None
    stop_sequence: str | None = None


class UpErr(Struct):
    type: str | None = None
    message: str | None = None


class UpStartEvent(Struct):
    message: UpMessage | None = None


class UpBlockStartEvent(Struct):
    index: int = 0
    content_block: UpContentBlock | None = None


class UpDeltaEvent(Struct):
    index: int = 0
    delta: UpBlockDelta | None = None


class UpMessageDeltaEvent(Struct):
    delta: UpMessageDelta | None = None
    usage: UpUsage | None = None


class UpErrorEvent(Struct):
    error: UpErr | None = None


class UpTyped(Struct):
    type: str = ""


up_type_decoder = msgspec.json.Decoder(UpTyped)
up_start_decoder = msgspec.json.Decoder(UpStartEvent)
up_block_start_decoder = msgspec.json.Decoder(UpBlockStartEvent)
up_delta_decoder = msgspec.json.Decoder(UpDeltaEvent)
up_message_delta_decoder = msgspec.json.Decoder(UpMessageDeltaEvent)
up_error_event_decoder = msgspec.json.Decoder(UpErrorEvent)
