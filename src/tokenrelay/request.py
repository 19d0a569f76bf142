"""The one internal chat request that every protocol decoder produces and every provider consumes.

Messages and tools use the OpenAI Chat shapes from ``openai_wire`` as the lingua franca: every other
protocol translates into them, and the OpenAI upstream path needs no conversion at all.
"""

from __future__ import annotations

import base64
import os
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


class _RandomBytes:
    """Bytes from the OS's CSPRNG, read 4 KiB at a time: ``secrets.token_urlsafe`` makes a getrandom()
    system call per id, which cost more than the rest of opening a stream's bookkeeping here."""

    __slots__ = ("buf", "pos")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.buf = b""
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.buf):
            self.buf, self.pos = os.urandom(4096), 0
        start = self.pos
        self.pos += n
        return self.buf[start : self.pos]


_random_bytes = _RandomBytes()
# a forked worker must not hand out the ids its parent (or a sibling worker) would
os.register_at_fork(after_in_child=_random_bytes.reset)


def new_stream_id(prefix: str = "chatcmpl-") -> str:
    """An unguessable stream id (also the completion id the client sees): 144 random bits."""
    return prefix + base64.urlsafe_b64encode(_random_bytes.take(18)).decode()


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
