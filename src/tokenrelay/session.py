"""Stream sessions: one model stream, its sequenced event log, and the clients following it.

The provider runs in the session's own task (one per stream, never one per chunk) and appends each
batch to ``events``; an event's sequence number is its position + 1. A provider that can also hands its
non-terminal batches to ``push()`` from inside its socket callback, while the task stays parked in it: no
task step and no generator chain per chunk (``providers/base.py``). Readers (``Follower``) keep a
cursor into that log, so the client that started the stream, a client resuming it and a slow client all
read the same log at their own pace, and the model is never blocked by a reader. A follower wakes on
new events, on its keep-alive timer (one self-re-arming timer per follower, not one per chunk) and on
its client's disconnect. A follower whose transport can write without waiting (``Follower.writer``) is
written to directly when a batch arrives while it is parked and caught up, so its task is not woken
either; a terminal batch, a full socket or a lagging cursor always go through the task.

Backpressure: the log absorbs a slow reader's lag up to ``max_buffered`` events; beyond that the session
stops pulling from the provider (so the upstream socket fills and TCP pushes back on the model) until the
reader catches up to half of that. A reader that makes no progress for ``stall_limit`` seconds while the
stream waits on it is dropped (``Follower.stalled``): its transport ends its response with a resumable
error, and the stream goes on for the disconnect grace period so the client can resume.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from tokenrelay.errors import GatewayError
from tokenrelay.events import TERMINAL, Error, Event
from tokenrelay.request import ChatRequest
from tokenrelay.router import Route

_TERMINAL_TYPES = frozenset(TERMINAL)

if TYPE_CHECKING:
    from tokenrelay.admission import Principal
    from tokenrelay.metrics import GapCounts
    from tokenrelay.queueing import PriorityGate

# where a session's batches go besides its own log (a shared store): (session, index of first, batch)
Sink = Callable[["StreamSession", int, list[Event]], None]

log = logging.getLogger("tokenrelay.session")


def _wake_all(waiters: list[asyncio.Future[None]]) -> None:
    for fut in waiters:
        if not fut.done():
            fut.set_result(None)


class StreamSession:
    def __init__(
        self,
        stream_id: str,
        request: ChatRequest,
        route: Route,
        source: AsyncIterator[list[Event]],
        protocol: str = "openai",
        owner: str | None = None,
        events: list[Event] | None = None,
        sink: Sink | None = None,
        max_buffered: int = 4096,
        stall_limit: float = 30.0,
    ) -> None:
        self.id = stream_id
        self.request = request
        self.route = route
        self.protocol = protocol  # the wire protocol that opened it: a resume answers in the same one
        self.owner = owner  # a digest of the credential that opened it: only that one may resume it
        self.created = int(time.time())
        self.started_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.events: list[Event] = [] if events is None else events
        self.sink = sink
        self.principal: Principal | None = None  # the admitted caller, released when the stream ends
        self.gate: PriorityGate | None = None  # the model's concurrency slot it holds, if capped
        self.batch_gaps: GapCounts | None = None  # the time between batches, for its histogram
        self.accepted = False
        self.done = False
        self.pre_error: GatewayError | None = None
        self.readers: set[Follower] = set()
        self.max_buffered = max_buffered
        self.stall_limit = stall_limit
        self.paused: asyncio.Future[None] | None = None
        self._grace: asyncio.TimerHandle | None = None
        self._waiters: list[asyncio.Future[None]] = []
        self._parked: list[Follower] = []  # followers waiting in next_batch()
        self._last_batch = 0.0
        # batches that took the push lane, and batches a follower got without a wake-up (GET /stats)
        self.pushed = 0
        self.written_direct = 0
        self._loop = asyncio.get_running_loop()
        route.push = self.push
        self.task = self._loop.create_task(self._run(source), name=f"stream {stream_id}")

    @property
    def deployment(self) -> str:
        return self.route.deployment

    def _wake(self, start: int = -1) -> None:
        """Wake whoever waits for new events. ``start``: where a non-terminal batch begins, so a parked,
        caught-up follower with a writer gets it written now instead of a wake-up."""
        if self._waiters:
            waiters, self._waiters = self._waiters, []
            _wake_all(waiters)
        parked = self._parked
        if parked:
            self._parked = still = []
            for follower in parked:
                if start >= 0 and follower.writer is not None and follower.write_now(start):
                    still.append(follower)
                else:
                    follower.listed = False
                    follower._poke()

    def _publish(self, batch: list[Event]) -> None:
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
        elif self.batch_gaps is not None:
            self.batch_gaps.observe(now - self._last_batch)
        self._last_batch = now
        start = self._append(batch)
        self._wake(-1 if type(batch[-1]) in _TERMINAL_TYPES else start)

    def _append(self, batch: list[Event]) -> int:
        """Add ``batch`` to the log (and the shared store); returns the index of its first event."""
        start = len(self.events)
        self.events.extend(batch)
        if self.sink is not None:
            self.sink(self, start, batch)
        return start

    def push(self, batch: list[Event]) -> bool:
        """A provider's non-terminal batch, from its socket callback while this session's task waits inside
        the provider. ``False``: a reader is too far behind, so the provider stops pushing and yields
        ``[]``, and the task applies backpressure."""
        self.pushed += 1
        self._publish(batch)
        return not self._must_wait()

    def _must_wait(self) -> bool:
        """A reader is more than ``max_buffered`` events behind."""
        limit = len(self.events) - self.max_buffered
        return limit > 0 and any(f.cursor < limit for f in self.readers)

    async def _run(self, source: AsyncIterator[list[Event]]) -> None:
        events = self.events
        try:
            async for batch in source:
                self.accepted = True
                # no break after the last batch: the source returns by itself next, so every generator
                # under it finishes in place (an abandoned async generator is closed later by a task the
                # event loop creates for it, tens of microseconds per stream)
                if batch:
                    self._publish(batch)
                else:
                    self._wake()  # accepted; or a provider stopped pushing for the backpressure below
                if self._must_wait():
                    await self._backpressure()
            else:
                if not events or not isinstance(events[-1], TERMINAL):
                    self._append(
                        [Error(type="upstream_disconnect", message="the model's stream ended unfinished")]
                    )
        except GatewayError as exc:
            if self.accepted:
                self._append([exc.to_event()])
            else:
                self.pre_error = exc
        except asyncio.CancelledError:
            self._append([Error(type="cancelled", message="the stream was cancelled", status=499)])
        except Exception:
            log.exception("stream %s failed inside the gateway", self.id)
            self._append([Error(type="internal_error", message="internal error in the gateway", status=500)])
        finally:
            self.done = True
            if self.batch_gaps is not None:
                self.batch_gaps.flush()
            if self._grace is not None:
                self._grace.cancel()
            self._wake()
            aclose = getattr(source, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except Exception:
                    log.exception("closing the provider stream of %s failed", self.id)

    def _lagging(self) -> list[Follower]:
        limit = len(self.events) - self.max_buffered
        return [f for f in self.readers if f.cursor < limit]

    async def _backpressure(self) -> None:
        """Stop pulling from the provider while a reader is too far behind; drop it if it stalls."""
        while lagging := self._lagging():
            fut = self.paused = self._loop.create_future()
            handle = self._loop.call_later(self.stall_limit, _wake_all, [fut])
            try:
                await fut
            finally:
                handle.cancel()
                self.paused = None
            now = self._loop.time()
            for follower in lagging:
                if follower in self.readers and now - follower.progress_at >= self.stall_limit:
                    follower.evict()

    def reader_progress(self) -> None:
        """A reader took events: resume the provider once every reader is within half the buffer."""
        fut = self.paused
        if fut is not None and not fut.done():
            limit = len(self.events) - self.max_buffered // 2
            if all(f.cursor >= limit for f in self.readers):
                fut.set_result(None)

    def cancel(self) -> None:
        """Stop the model now (its provider sees the cancellation at its next await)."""
        if not self.done:
            self.task.cancel()

    def client_left(self, policy: str, grace: float) -> None:
        """A client stopped reading. With no reader left, ``cancel`` stops the model now and ``continue``
        lets it run for ``grace`` seconds, so a resume gets everything; a reader that comes back in time
        keeps it going."""
        if self.readers or self.done:
            return
        if policy == "cancel" or grace <= 0:
            self.cancel()
        elif self._grace is None:
            self._grace = self._loop.call_later(grace, self._grace_over)

    def _grace_over(self) -> None:
        self._grace = None
        if not self.readers:
            self.cancel()

    async def wait_started(self, patience: float) -> None:
        """Until the provider accepted (or failed), or ``patience`` seconds pass."""
        if self.accepted or self.done:
            return
        fut: asyncio.Future[None] = self._loop.create_future()
        self._waiters.append(fut)
        handle = self._loop.call_later(patience, _wake_all, [fut])
        try:
            await fut
        finally:
            handle.cancel()

    def follow(self, after: int = 0, keepalive: float | None = None) -> Follower:
        return Follower(self, after, keepalive)


class Follower:
    """One client's read position in a session."""

    __slots__ = (
        "_fut",
        "_loop",
        "_timer",
        "cursor",
        "gone",
        "keepalive",
        "last_write",
        "listed",
        "on_evict",
        "progress_at",
        "session",
        "stalled",
        "writer",
    )

    def __init__(self, session: StreamSession, after: int, keepalive: float | None) -> None:
        self.session = session
        self.cursor = after
        self.gone = False
        self.stalled = False
        self.on_evict: Callable[[], object] | None = None  # the transport's way to stop a blocked write
        # the transport's synchronous lane: write events[start:] now and return True, or return False having
        # written nothing and touched no state (no room, the client left), so the task takes the batch
        self.writer: Callable[[list[Event], int], bool] | None = None
        self.listed = False  # in the session's parked list
        self.keepalive = keepalive
        self._loop = session._loop
        self.last_write = self.progress_at = self._loop.time()
        self._fut: asyncio.Future[None] | None = None
        self._timer = self._loop.call_at(self.last_write + keepalive, self._tick) if keepalive else None
        session.readers.add(self)

    def _tick(self) -> None:
        assert self.keepalive
        now = self._loop.time()
        if now - self.last_write >= self.keepalive:
            self._poke()
            due = now + self.keepalive
        else:
            due = self.last_write + self.keepalive
        self._timer = self._loop.call_at(due, self._tick)

    def _poke(self) -> None:
        if self._fut is not None and not self._fut.done():
            self._fut.set_result(None)

    def disconnect(self) -> None:
        self.gone = True
        self._poke()

    def evict(self) -> None:
        """Too slow for too long: stop waiting for this reader (its transport ends the response)."""
        self.stalled = True
        self.session.readers.discard(self)
        self.disconnect()
        if self.on_evict is not None:
            self.on_evict()

    def wrote(self) -> None:
        self.last_write = self._loop.time()

    def write_now(self, start: int) -> bool:
        """Write the batch that begins at ``start`` through ``writer``, if this follower's task is parked in
        ``next_batch`` with every earlier event sent (so nothing it holds can be overtaken)."""
        fut = self._fut
        if fut is None or fut.done() or self.cursor != start or self.gone:
            return False
        events = self.session.events
        try:
            if not self.writer(events[start:], start):  # type: ignore[misc]
                return False
        except Exception:
            log.exception("writing to a client of %s failed; its task takes over", self.session.id)
            self.writer = None
            return False
        self.cursor = len(events)
        self.progress_at = self.last_write = self._loop.time()
        session = self.session
        session.written_direct += 1
        if session.paused is not None:
            session.reader_progress()
        return True

    async def next_batch(self) -> list[Event] | None:
        """New events after the cursor; ``[]`` when a keep-alive is due; ``None`` at the end or once the
        client left."""
        session = self.session
        while True:
            events = session.events
            n = len(events)
            if n > self.cursor:
                batch = events[self.cursor : n]
                self.cursor = n
                self.progress_at = self._loop.time()
                if session.paused is not None:
                    session.reader_progress()
                return batch
            if session.done or self.gone:
                return None
            if self.keepalive and self._loop.time() - self.last_write >= self.keepalive:
                return []
            fut = self._fut = self._loop.create_future()
            if not self.listed:
                self.listed = True
                session._parked.append(self)
            await fut

    def close(self) -> None:
        self.writer = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        session = self.session
        session.readers.discard(self)
        if self.listed:
            self.listed = False
            session._parked.remove(self)
        if session.paused is not None:
            session.reader_progress()
