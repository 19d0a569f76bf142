"""Internal stream events: what every provider yields and every protocol encoder consumes.

Providers never know the client's protocol and encoders never know the provider; this module is the
contract between them. Events are small tagged ``msgspec.Struct``s so they are cheap to create on the hot
path and serialise compactly (for the resume log) without any per-type code.

A provider yields *batches* (``list[Event]``): everything one upstream read produced. The stream session
turns one batch into one write to the client, so a burst of tokens costs one syscall, not one per token.
"""

from __future__ import annotations

from typing import Literal

import msgspec

FinishReason = Literal["stop", "length", "tool_calls", "content_filter"]


class TextDelta(msgspec.Struct, tag_field="kind", tag="text", frozen=True):
    """A piece of the assistant's visible text."""

    text: str


class ReasoningDelta(msgspec.Struct, tag_field="kind", tag="reasoning", frozen=True):
    """A piece of the model's reasoning ("thinking") text, kept apart from the answer."""

    text: str


class ToolCallDelta(msgspec.Struct, tag_field="kind", tag="tool", frozen=True):
    """A fragment of one tool call. ``id`` and ``name`` come once, on the call's first fragment."""

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None


class Usage(msgspec.Struct, tag_field="kind", tag="usage", frozen=True):
    """Token counts for the whole request; sent once, near the end."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Finish(msgspec.Struct, tag_field="kind", tag="finish", frozen=True):
    """The model finished normally; always the last event of a successful stream."""

    reason: FinishReason


class Error(msgspec.Struct, tag_field="kind", tag="error", frozen=True):
    """The stream failed; always the last event of a failed stream.

    ``type`` is machine-readable (``upstream_error``, ``upstream_disconnect``, ``timeout``, ``cancelled``,
    ``invalid_request_error`` ...); ``status`` is the HTTP status the error would have had before the stream.
    """

    type: str
    message: str
    status: int = 502
    code: str | None = None
    param: str | None = None


Event = TextDelta | ReasoningDelta | ToolCallDelta | Usage | Finish | Error

TERMINAL = (Finish, Error)
