"""Failover: one stream's attempts across its deployments, spliced into one stream for the client.

Before the first byte reaches the client, a failed attempt is retried on the same deployment (exponential
backoff with full jitter, honouring the upstream's ``Retry-After``), then the next deployment of the chain
is tried. After text went out, the stream continues on the next deployment: the request is sent again with
the text so far as a trailing assistant message (a prefix to continue), and the new text is spliced on, so
the client sees one stream with one role chunk, no repeated or missing text and one finish.

Tool calls are never spliced: when the chain has somewhere to fail over to, tool-call fragments are held
until the upstream finishes and then released together, so a call cut in half is regenerated whole by the
next deployment instead of being sent as two halves.

First-token and stall timeouts are measured here, for every provider, by one self-re-arming watchdog per
attempt (no timer per read). Time the stream spends paused by backpressure does not count as a stall.

Batches a provider pushes straight to the session (the push lane, ``providers/base.py``) get the same
splicing and stall bookkeeping in ``lane()`` as the ones it yields; only terminal batches, which decide
about failover, always come up through this loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import msgspec

from tokenrelay.errors import GatewayError
from tokenrelay.events import Error, Event, Finish, ReasoningDelta, TextDelta, ToolCallDelta, Usage
from tokenrelay.openai_wire import AssistantMessage

if TYPE_CHECKING:
    from tokenrelay.providers.base import Push
    from tokenrelay.request import ChatRequest
    from tokenrelay.router import Deployment, Route

RETRY_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
# an upstream that refuses this request for its own reasons (no such model, key not allowed there):
# not worth a retry on it, but another deployment may well serve the request
FALLBACK_STATUSES = RETRY_STATUSES | {401, 403, 404}


def retryable(err: GatewayError) -> bool:
    return err.status in RETRY_STATUSES or err.type == "timeout"


def can_fall_back(err: GatewayError) -> bool:
    return err.status in FALLBACK_STATUSES or err.type == "timeout"


def fails_over(ev: Error) -> bool:
    """A mid-stream error that another deployment can repair (not a cancel, not our own bug)."""
    return ev.type not in ("cancelled", "internal_error") and (ev.status >= 500 or ev.status in (408, 429))


def backoff(cfg_base: float, cfg_max: float, attempt: int, retry_after: float | None) -> float | None:
    """Seconds to wait before retry number ``attempt`` (0-based); ``None``: the upstream asked for a longer
    wait than we will make the client sit through, so fall back instead."""
    delay = random.uniform(0, min(cfg_max, cfg_base * 2**attempt))
    if retry_after is not None:
        if retry_after > cfg_max:
            return None
        delay = max(delay, retry_after)
    return delay


def continuation(req: ChatRequest, prefix: str, tokens_sent: int) -> ChatRequest:
    """The request again, with the text the client already has as an assistant prefix to continue.
    Trailing whitespace is left off the prefix (Anthropic rejects it, and models continue a word better
    without it); the splice drops the continuation's leading whitespace to match."""
    max_tokens = req.max_tokens
    if max_tokens is not None:
        max_tokens = max(1, max_tokens - tokens_sent)
    messages = [*req.messages, AssistantMessage(content=prefix.rstrip())]
    return msgspec.structs.replace(req, messages=messages, max_tokens=max_tokens)


class _Watch:
    """The attempt's timing and its self-re-arming watchdog: one timer per attempt, not one per read.
    A class rather than closures: a closure that re-arms itself is a reference cycle, left to the cyclic
    collector once per request (15 objects each); ``stop()`` drops the handle and nothing is cyclic."""

    __slots__ = (
        "deadline",
        "first",
        "first_limit",
        "idle_limit",
        "loop",
        "read_at",
        "reading",
        "started",
        "timer",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, first_limit: float, idle_limit: float) -> None:
        self.loop = loop
        self.started = self.read_at = loop.time()
        self.first_limit = first_limit
        self.idle_limit = idle_limit
        self.reading = False
        self.first = False
        self.deadline: asyncio.Timeout | None = None
        self.timer: asyncio.TimerHandle | None = None

    def start(self, deadline: asyncio.Timeout) -> None:
        self.deadline = deadline
        self.timer = self.loop.call_at(self.started + self.first_limit, self.fire)

    def fire(self) -> None:
        now = self.loop.time()
        if not self.reading:  # the stream is paused by its reader, not stalled
            self.read_at = now
        due = self.read_at + self.idle_limit if self.first else self.started + self.first_limit
        if self.reading and now >= due:
            self.timer = None
            self.deadline.reschedule(now)  # type: ignore[union-attr]  # TimeoutError in the attempt
        else:
            self.timer = self.loop.call_at(max(due, now + 0.001), self.fire)

    def first_content(self) -> None:
        self.first = True  # from now on the stall limit applies, from the next read
        if self.timer is not None:
            self.timer.cancel()
            self.timer = self.loop.call_at(self.loop.time() + self.idle_limit, self.fire)

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.deadline = None


class _Failed(Exception):
    """An attempt failed after being accepted: ``error`` says how."""

    def __init__(self, error: Error) -> None:
        self.error = error


async def _attempt(
    dep: Deployment,
    req: ChatRequest,
    hold_tools: bool,
    held: list[ToolCallDelta],
    trim_first: bool,
    drop_reasoning: bool,
    credit: tuple[int, int],
    push: Push | None = None,
) -> AsyncIterator[list[Event]]:
    """One deployment's stream, watched for first-token and stall timeouts. Raises ``GatewayError`` if it
    fails before any content, ``_Failed`` if it fails with an error another deployment could repair."""
    cfg = dep.cfg
    loop = asyncio.get_running_loop()
    watch = _Watch(loop, cfg.first_token_timeout, cfg.idle_timeout)
    splicing = hold_tools or trim_first or drop_reasoning or credit[0] or credit[1]

    def shape(batch: list[Event]) -> list[Event]:
        nonlocal trim_first
        batch = _splice(batch, hold_tools, held, trim_first, drop_reasoning, credit)
        if trim_first and any(type(ev) is TextDelta for ev in batch):
            trim_first = False
        return batch

    lane: Push | None = None
    if push is not None:
        session_push = push

        def lane(batch: list[Event]) -> bool:
            if not watch.first:
                watch.first_content()
            watch.read_at = loop.time()
            if splicing:
                batch = shape(batch)
                if not batch:
                    return True
            return session_push(batch)

    source = dep.provider.stream(req, lane)
    try:
        async with asyncio.timeout(None) as scope:
            watch.start(scope)
            try:
                while True:
                    watch.read_at = loop.time()
                    watch.reading = True
                    try:
                        batch = await source.__anext__()
                    except StopAsyncIteration:
                        break
                    watch.reading = False
                    if not batch:
                        yield batch
                        continue
                    if not watch.first:
                        watch.first_content()
                    last = batch[-1]
                    failed = type(last) is Error and fails_over(last)
                    if failed:
                        batch = batch[:-1]  # what came before the error still reaches the client
                    if splicing:
                        batch = shape(batch)
                    if batch:
                        yield batch
                    if failed:
                        raise _Failed(last)  # type: ignore[arg-type]
                    if type(last) in (Finish, Error):
                        # let the provider end in place (each one returns after its last batch) rather
                        # than abandon it mid-generator, which costs an event-loop task to finalize it
                        with contextlib.suppress(StopAsyncIteration):
                            await source.__anext__()
                        return
            finally:
                watch.stop()
        raise _Failed(Error(type="upstream_disconnect", message="the model's stream ended unfinished"))
    except TimeoutError:
        what, limit = (
            ("idle timeout", cfg.idle_timeout)
            if watch.first
            else ("first-token timeout", cfg.first_token_timeout)
        )
        raise _Failed(
            Error(type="timeout", message=f"{dep.name}: {what} after {limit:g} s", status=504)
        ) from None
    finally:
        await source.aclose()  # type: ignore[attr-defined]


def _splice(
    batch: list[Event],
    hold_tools: bool,
    held: list[ToolCallDelta],
    trim_first: bool,
    drop_reasoning: bool,
    credit: tuple[int, int],
) -> list[Event]:
    """The batch as the client should see it: tool fragments held back until the upstream finishes, the
    continuation's leading whitespace trimmed, repeated reasoning dropped, usage counted across attempts."""
    out: list[Event] = []
    for ev in batch:
        kind = type(ev)
        if kind is TextDelta:
            if trim_first:
                text = ev.text.lstrip()  # type: ignore[union-attr]
                if not text:
                    continue
                trim_first = False
                ev = TextDelta(text)
        elif kind is ToolCallDelta and hold_tools:
            held.append(ev)  # type: ignore[arg-type]
            continue
        elif kind is ReasoningDelta and drop_reasoning:
            continue
        elif kind is Usage:
            out.extend(held)  # tool calls come before usage and finish
            held.clear()
            prompt_less, completion_more = credit
            ev = msgspec.structs.replace(
                ev,
                prompt_tokens=max(0, ev.prompt_tokens - prompt_less),  # type: ignore[union-attr]
                completion_tokens=ev.completion_tokens + completion_more,  # type: ignore[union-attr]
            )
        elif kind is Finish:
            out.extend(held)
            held.clear()
        elif kind is Error:
            held.clear()  # a call cut in half is never sent
        out.append(ev)
    return out


async def failover_stream(
    chain: list[Deployment], req: ChatRequest, sent: list[Event], route: Route
) -> AsyncIterator[list[Event]]:
    """The provider contract (``providers/base.py``) over the whole chain. ``sent`` is the session's log:
    what the client has been sent, possibly by a replica that died (then this continues its stream)."""
    hold_tools = len(chain) > 1
    held: list[ToolCallDelta] = []
    accepted = bool(sent)
    last_error: GatewayError | None = None
    tries = 0
    for dep in chain:
        attempt = 0  # retries on this deployment
        while True:
            if not dep.breaker.allow():
                last_error = last_error or GatewayError(
                    503, f"deployment {dep.name} is unavailable (circuit open)", type="service_unavailable"
                )
                break
            route.deployment = dep.name
            route.attempts += 1
            dep.active += 1
            if sent and tries:
                route.failovers += 1
            tries += 1
            text = [ev.text for ev in sent if type(ev) is TextDelta]
            prefix = "".join(text)
            attempt_req = continuation(req, prefix, len(text)) if prefix else req
            credit = (len(prefix) // 4, len(text)) if prefix else (0, 0)
            drop_reasoning = any(type(ev) is ReasoningDelta for ev in sent)
            trim_first = prefix != prefix.rstrip()
            settled = False
            try:
                async for batch in _attempt(
                    dep, attempt_req, hold_tools, held, trim_first, drop_reasoning, credit, route.push
                ):
                    # ``[]``: accepted, or a provider stopped pushing (the session checks for a slow reader)
                    accepted = True
                    yield batch
                settled = True
                dep.breaker.success()
                return
            except GatewayError as err:
                settled = True
                if not can_fall_back(err):
                    dep.breaker.release()  # the request itself is at fault, not the deployment
                    raise
                dep.breaker.failure()
                last_error = err
                wait = backoff(
                    dep.cfg.retry_backoff_seconds, dep.cfg.retry_max_wait_seconds, attempt, err.retry_after
                )
                if sent or not retryable(err) or attempt >= dep.cfg.retries or wait is None:
                    break
                attempt += 1
                await asyncio.sleep(wait)
            except _Failed as failed:
                settled = True
                dep.breaker.failure()
                held.clear()
                last_error = GatewayError.from_event(failed.error)
                # a timeout moves on to the next deployment; a failure before any text is retried here first
                if sent or failed.error.type == "timeout" or attempt >= dep.cfg.retries:
                    break
                wait = backoff(dep.cfg.retry_backoff_seconds, dep.cfg.retry_max_wait_seconds, attempt, None)
                attempt += 1
                await asyncio.sleep(wait or 0.0)
            finally:
                dep.active -= 1
                if not settled:
                    dep.breaker.release()  # cancelled mid-attempt: a half-open probe did not conclude
    assert last_error is not None
    if sent or accepted:
        yield [last_error.to_event()]
    else:
        raise last_error
