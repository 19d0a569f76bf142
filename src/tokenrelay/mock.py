"""The mock model: deterministic text, timing and fault injection, shared by two products.

* the ``mock`` provider runs it inside the gateway (``provider: mock``);
* ``tokenrelay mock-upstream`` serves it as an OpenAI-compatible HTTP server, where faults become real
  wire faults (a dropped connection, a malformed chunk, CRLF framing, comments, oversized events).

Options come from the model's ``options`` in the config and, per request, from the body field ``mock``
(``extra_body={"mock": {...}}`` in the openai SDK). The same prompt and options always give the same text.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import msgspec

from tokenrelay.errors import GatewayError
from tokenrelay.events import Event, Finish, ReasoningDelta, TextDelta, ToolCallDelta, Usage
from tokenrelay.openai_wire import AssistantMessage, TextPart, UserMessage
from tokenrelay.protocol.validation import field_error
from tokenrelay.request import ChatRequest, estimate_prompt_tokens

_TEXT = (
    "Tokens arrive one by one through the gateway, and every client reads each word as it is written. "
    "The model writes an answer while tokenrelay carries it with care, so nothing is lost or repeated. "
    "Every chunk keeps its order, and every stream ends in a state the client can read."
)
_WORDS = tuple(_TEXT.split(" "))


class MockToolCall(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    arguments: dict[str, Any] | str = msgspec.field(default_factory=dict)


class MockOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    first_token_ms: float = msgspec.field(default=0.0)
    tokens_per_second: float = 0.0  # 0: as fast as possible
    tokens: int = 16
    text: str | None = None  # stream exactly this text (split on spaces) instead of generated words
    reasoning: str | None = None  # "thinking" text streamed before the answer (reasoning deltas)
    echo: bool = False  # stream the last user message back
    seed: int = 0
    tool_calls: list[MockToolCall] | None = None
    tool_chunk_chars: int = 8
    usage: bool = True
    # faults
    error_status: int | None = None  # an HTTP error before the first byte
    error_message: str = "mock upstream error"
    error_type: str | None = None
    retry_after: float | None = None
    cut_after: int | None = None  # the upstream dies after N tokens (tool-call fragments count on)
    stall_after: int | None = None  # the upstream goes silent after N tokens ...
    stall_ms: float | None = None  # ... for this long (default: until cancelled)
    malformed_after: int | None = None  # a chunk that is not JSON after N tokens
    # wire-only faults (mock-upstream server)
    crlf: bool = False
    comments: bool = False
    big_event_bytes: int = 0
    no_done: bool = False


class Fault(msgspec.Struct, frozen=True):
    """A fault the mock script hands to its runner: ``cut`` or ``malformed``."""

    kind: str


def parse_options(base: dict[str, Any], override: dict[str, Any] | None) -> MockOptions:
    merged = {**base, **(override or {})}
    try:
        return msgspec.convert(merged, MockOptions, strict=False)
    except msgspec.ValidationError as exc:
        err = field_error(exc)
        err.param = f"mock.{err.param}" if err.param else "mock"
        err.message = err.message.replace("'", "'mock.", 1) if err.param != "mock" else err.message
        raise err from exc


def _prompt_text(req: ChatRequest) -> str:
    for msg in reversed(req.messages):
        if isinstance(msg, UserMessage):
            if isinstance(msg.content, str):
                return msg.content
            return " ".join(p.text for p in msg.content if isinstance(p, TextPart))
    return ""


def _split(text: str) -> list[str]:
    words = text.split(" ")
    return [w + " " for w in words[:-1]] + [words[-1]] if words else []


def mock_tokens(opts: MockOptions, req: ChatRequest) -> list[str]:
    """The deterministic token texts for this request."""
    if opts.text is not None:
        return _split(opts.text)
    if opts.echo:
        return _split(_prompt_text(req))
    # a readable passage, starting at a point fixed by the prompt and seed
    start = (zlib.crc32(_prompt_text(req).encode()) ^ opts.seed) % len(_WORDS)
    out = [_WORDS[(start + i) % len(_WORDS)] + " " for i in range(opts.tokens)]
    if out:
        out[-1] = out[-1].rstrip()
    return out


def continue_after(tokens: list[str], req: ChatRequest) -> list[str]:
    """The tokens left when the request ends with an assistant message that is a prefix of this text (a
    gateway failing over mid-stream sends the text so far that way); all of them otherwise."""
    last = req.messages[-1] if req.messages else None
    if not isinstance(last, AssistantMessage) or not last.content:
        return tokens
    prefix = (
        last.content
        if isinstance(last.content, str)
        else "".join(p.text for p in last.content if isinstance(p, TextPart))
    )
    if not "".join(tokens).startswith(prefix):
        return tokens
    seen = 0
    for i, token in enumerate(tokens):
        if seen + len(token) > len(prefix):
            rest, after = token[len(prefix) - seen :], tokens[i + 1 :]
            if after and not rest.strip():  # only the space the prefix lost: part of the next token
                return [rest + after[0], *after[1:]]
            return [rest, *after]
        seen += len(token)
    return []


@dataclass
class MockStats:
    """What the mock observed; tests and demos read it at ``GET /mock/stats``."""

    started: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    active: int = 0
    last_cancel_after_tokens: int | None = None
    last_request: dict[str, Any] | None = None
    recent: list[dict[str, Any]] = field(default_factory=list)

    def record(self, outcome: str, tokens: int) -> None:
        self.recent.append({"outcome": outcome, "tokens": tokens, "at": time.time()})
        del self.recent[:-50]


def _tool_events(opts: MockOptions, req: ChatRequest) -> list[list[Event]]:
    calls = list(opts.tool_calls or [])
    if not calls and req.tools and req.tool_choice not in (None, "none", "auto"):
        choice = req.tool_choice
        name = choice.function.name if not isinstance(choice, str) else req.tools[0].function.name
        calls = [MockToolCall(name=name, arguments={})]
    batches: list[list[Event]] = []
    for index, call in enumerate(calls):
        args = (
            call.arguments
            if isinstance(call.arguments, str)
            else msgspec.json.encode(call.arguments).decode()
        )
        call_id = f"call_{zlib.crc32(f'{index}:{call.name}:{args}'.encode()):08x}"
        batches.append([ToolCallDelta(index=index, id=call_id, name=call.name, arguments="")])
        step = max(1, opts.tool_chunk_chars)
        for start in range(0, len(args), step):
            batches.append([ToolCallDelta(index=index, arguments=args[start : start + step])])
    return batches


async def run_script(
    opts: MockOptions, req: ChatRequest, stats: MockStats
) -> AsyncIterator[list[Event] | Fault]:
    """The mock's stream: raises ``GatewayError`` for ``error_status``, yields ``[]`` once accepted,
    then event batches paced like a real upstream (tokens due at the same moment come in one batch)."""
    if opts.error_status is not None:
        stats.failed += 1
        raise GatewayError(
            opts.error_status,
            opts.error_message,
            type=opts.error_type,
            code="mock_error",
            retry_after=opts.retry_after,
        )
    stats.started += 1
    stats.active += 1
    sent = 0
    outcome = "cancelled"
    try:
        yield []
        if opts.reasoning:
            yield [ReasoningDelta(t) for t in _split(opts.reasoning)]
        tokens = continue_after(mock_tokens(opts, req), req)
        finish = "stop"
        if req.max_tokens is not None and len(tokens) > req.max_tokens:
            tokens, finish = tokens[: req.max_tokens], "length"
        loop = asyncio.get_running_loop()
        start = loop.time() + opts.first_token_ms / 1000
        interval = 1 / opts.tokens_per_second if opts.tokens_per_second > 0 else 0.0
        stalled = opts.stall_after is None
        while sent < len(tokens):
            for limit, fault in ((opts.cut_after, "cut"), (opts.malformed_after, "malformed")):
                if limit is not None and sent >= limit:
                    outcome = fault
                    stats.failed += 1
                    yield Fault(fault)
                    return
            if not stalled and opts.stall_after is not None and sent >= opts.stall_after:
                stalled = True
                if opts.stall_ms is None:
                    await asyncio.Future()  # silent until cancelled
                await asyncio.sleep((opts.stall_ms or 0) / 1000)
                start = loop.time() - sent * interval  # resume the schedule from now
            now = loop.time()
            due_at = start + sent * interval
            if due_at > now:
                await asyncio.sleep(due_at - now)
                now = loop.time()
            # every token already due goes out in one batch, as one upstream read would bring it
            stop_at = len(tokens) if interval == 0 else int((now - start) / interval) + 1
            stop_at = min(len(tokens), max(stop_at, sent + 1))
            stall_limit = None if stalled else opts.stall_after
            for limit in (opts.cut_after, opts.malformed_after, stall_limit):
                if limit is not None and sent < limit < stop_at:
                    stop_at = limit
            yield [TextDelta(t) for t in tokens[sent:stop_at]]
            sent = stop_at
        tool_batches = _tool_events(opts, req)
        for i, batch in enumerate(tool_batches):
            # a fault may strike in the middle of a tool call too: fragments count on from the text tokens
            if opts.cut_after is not None and sent + i >= opts.cut_after:
                outcome = "cut"
                stats.failed += 1
                yield Fault("cut")
                return
            yield batch
        if tool_batches:
            finish = "tool_calls"
        tail: list[Event] = []
        if opts.usage:
            tail.append(
                Usage(prompt_tokens=estimate_prompt_tokens(req), completion_tokens=sent + len(tool_batches))
            )
        tail.append(Finish(finish))  # type: ignore[arg-type]
        outcome = "completed"
        stats.completed += 1
        yield tail
    finally:
        stats.active -= 1
        if outcome == "cancelled":
            stats.cancelled += 1
            stats.last_cancel_after_tokens = sent
        stats.record(outcome, sent)
