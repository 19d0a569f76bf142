"""OpenAI Chat Completions wire types, shared by the inbound protocol and the upstream provider.

Request types are strict (they validate what clients send, and every violation names its field through
msgspec's error path); upstream chunk types are lenient (servers that call themselves OpenAI-compatible
differ in what they omit), so one odd field from an upstream never fails a stream.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

# ---------------------------------------------------------------------------------------------- request


class _Part(Struct, tag_field="type", forbid_unknown_fields=False, omit_defaults=True):
    pass


class TextPart(_Part, tag="text"):
    text: str


class ImageURL(Struct, omit_defaults=True):
    url: str
    detail: str | None = None


class ImagePart(_Part, tag="image_url"):
    image_url: ImageURL


class InputAudio(Struct):
    data: str
    format: str


class AudioPart(_Part, tag="input_audio"):
    input_audio: InputAudio


class FilePart(_Part, tag="file"):
    file: dict[str, Any]


class RefusalPart(_Part, tag="refusal"):
    refusal: str


UserPart = TextPart | ImagePart | AudioPart | FilePart


class FunctionCall(Struct):
    name: str
    arguments: str


class ToolCall(Struct):
    id: str
    function: FunctionCall
    type: Literal["function"] = "function"


class _Message(Struct, tag_field="role", forbid_unknown_fields=False, omit_defaults=True):
    pass


class SystemMessage(_Message, tag="system"):
    content: str | list[TextPart]
    name: str | None = None


class DeveloperMessage(_Message, tag="developer"):
    content: str | list[TextPart]
    name: str | None = None


class UserMessage(_Message, tag="user"):
    content: str | list[UserPart]
    name: str | None = None


class AssistantMessage(_Message, tag="assistant"):
    content: str | list[TextPart | RefusalPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    refusal: str | None = None
    reasoning_content: str | None = None


class ToolMessage(_Message, tag="tool"):
    content: str | list[TextPart]
    tool_call_id: str


class FunctionMessage(_Message, tag="function"):
    content: str | None
    name: str


Message = SystemMessage | DeveloperMessage | UserMessage | AssistantMessage | ToolMessage | FunctionMessage


class FunctionDef(Struct, forbid_unknown_fields=False, omit_defaults=True):
    name: Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Struct, forbid_unknown_fields=False):
    function: FunctionDef
    type: Literal["function"] = "function"


class NamedFunction(Struct):
    name: str


class NamedToolChoice(Struct):
    function: NamedFunction
    type: Literal["function"] = "function"


class StreamOptions(Struct, forbid_unknown_fields=False):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None
    on_disconnect: Literal["cancel", "continue"] | None = None


Probability = Annotated[float, Meta(ge=0, le=1)]
Penalty = Annotated[float, Meta(ge=-2, le=2)]
PositiveInt = Annotated[int, Meta(ge=1)]


class ChatCompletionRequest(Struct, forbid_unknown_fields=False):
    model: Annotated[str, Meta(min_length=1)]
    messages: Annotated[list[Message], Meta(min_length=1)]
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    temperature: Annotated[float, Meta(ge=0, le=2)] | None = None
    top_p: Probability | None = None
    n: Annotated[int, Meta(ge=1, le=128)] | None = None
    stop: str | Annotated[list[str], Meta(max_length=4)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    seed: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    user: str | None = None
    mock: dict[str, Any] | None = None  # tokenrelay extension: per-request options for the mock provider


REQUEST_FIELDS = frozenset(ChatCompletionRequest.__struct_fields__)

# --------------------------------------------------------------------------------- upstream chunks


class UpFunction(Struct):
    name: str | None = None
    arguments: str | None = None


class UpToolCall(Struct):
    index: int = 0
    id: str | None = None
    type: str | None = None
    function: UpFunction | None = None


class UpDelta(Struct):
    role: str | None = None
    content: str | None = None
    refusal: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[UpToolCall] | None = None


class UpChoice(Struct):
    index: int = 0
    delta: UpDelta | None = None
    finish_reason: str | None = None


class UpPromptDetails(Struct):
    cached_tokens: int | None = 0


class UpCompletionDetails(Struct):
    reasoning_tokens: int | None = 0


class UpUsage(Struct):
    prompt_tokens: int | None = 0
    completion_tokens: int | None = 0
    prompt_tokens_details: UpPromptDetails | None = None
    completion_tokens_details: UpCompletionDetails | None = None


class UpError(Struct):
    message: str | None = None
    type: str | None = None
    code: str | int | None = None
    param: str | None = None


class UpChunk(Struct):
    choices: list[UpChoice] | None = None
    usage: UpUsage | None = None
    error: UpError | str | None = None


class UpErrorBody(Struct):
    """An upstream's error response body: ``{"error": {...}}`` or, from some servers, ``{"error": "..."}``."""

    error: UpError | str | None = None
    message: str | None = None


up_chunk_decoder = msgspec.json.Decoder(UpChunk)
up_error_decoder = msgspec.json.Decoder(UpErrorBody)
