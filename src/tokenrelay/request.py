"""The one internal chat request that every protocol decoder produces and every provider consumes.

Messages and tools use the OpenAI Chat shapes from ``openai_wire`` as the lingua franca: every other
protocol translates into them, and the OpenAI upstream path needs no conversion at all.
"""

from __future__ import annotations

import secrets
from typing import Any

import msgspec

from tokenrelay.openai_wire import Message, NamedToolChoice, TextPart, Tool


class ChatRequest(msgspec.Struct, kw_only=True):
    model: str
    messages: list[Message]
    stream: bool = False
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # Anthropic and llama.cpp only; OpenAI upstreams do not take it
    stop: list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    tools: list[Tool] | None = None
    tool_choice: str | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    user: str | None = None
    thinking: dict[str, Any] | None = None  # Anthropic's extended thinking, passed to Anthropic upstreams
    include_usage: bool = False
    on_disconnect: str | None = None
    obfuscation: bool | None = (
        None  # side-channel padding; None: the protocol's default (protocol/padding.py)
    )
    # Where each non-text input part (image, audio, file) sits in the client's own request, in order of
    # appearance ("messages[0].content[1]", "input[2].content[0]", "messages[1].images[0]"): the decoders
    # record it so a provider that takes text only names the client's field in its 400, whatever the protocol.
    media_params: list[str] = msgspec.field(default_factory=list)
    # Fields no stage models (logprobs, logit_bias, reasoning_effort ...), passed to OpenAI-compatible
    # upstreams untouched so new upstream features work without a gateway release.
    extra: dict[str, Any] = msgspec.field(default_factory=dict)
    mock: dict[str, Any] | None = None


def new_stream_id(prefix: str = "chatcmpl-") -> str:
    """An unguessable stream id (also the completion id the client sees)."""
    return prefix + secrets.token_urlsafe(18)


def estimate_prompt_tokens(req: ChatRequest) -> int:
    """A rough count (4 characters a token, 4 tokens of framing a message) for upstreams that report none."""
    chars = 0
    for msg in req.messages:
        content = msg.content
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            chars += sum(len(p.text) for p in content if isinstance(p, TextPart))
    return chars // 4 + 4 * len(req.messages)
