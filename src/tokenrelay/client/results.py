"""Typed results of tokenrelay.client: the deltas a chat stream yields and the ``ChatResult`` it ends with."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from tokenrelay.client.partial_json import parse_partial


@dataclass(frozen=True, slots=True)
class TextDelta:
    """A piece of the answer's text."""

    text: str


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    """A piece of the model's reasoning ("thinking"), apart from the answer."""

    text: str


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A fragment of tool call ``index``: ``arguments`` is this fragment, ``arguments_so_far`` all of them."""

    index: int
    arguments: str
    arguments_so_far: str
    id: str | None = None
    name: str | None = None

    @property
    def partial(self) -> Any:
        """The arguments parsed so far (see ``tokenrelay.client.partial_json``); None before any value."""
        return parse_partial(self.arguments_so_far)


Delta = TextDelta | ReasoningDelta | ToolCallDelta


@dataclass(slots=True)
class ToolCall:
    """One tool call, accumulated from its fragments."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    @property
    def partial(self) -> Any:
        """The arguments parsed so far; the whole object once the stream finished."""
        return parse_partial(self.arguments)

    def parsed(self) -> Any:
        """The complete arguments as JSON; ``ValueError`` if they are not (yet) a whole JSON document."""
        try:
            return msgspec.json.decode(self.arguments or "{}")
        except msgspec.DecodeError as exc:
            raise ValueError(f"tool call {self.index} arguments are not complete JSON: {exc}") from None


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


EndState = Literal["streaming", "finished", "error", "interrupted", "timeout", "cancelled"]


@dataclass(slots=True)
class ChatResult:
    """Everything a chat stream delivered, and how it ended.

    ``state``: ``finished`` (``finish_reason`` says why), ``error`` (an error event from the server),
    ``interrupted`` (the connection dropped and could not be resumed), ``timeout``, ``cancelled`` (closed by
    the caller before the end), or ``streaming`` while it runs.
    """

    text: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage | None = None
    state: EndState = "streaming"
    error: Exception | None = None
    stream_id: str | None = None
    model: str | None = None
    deployment: str | None = None
    resumable: bool = False
    resumes: int = 0
    retries: int = 0
