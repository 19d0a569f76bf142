"""Following a stream whose model runs on another replica, and taking it over if that replica dies.

The resumed session's source: first everything the log holds (one batch, so a resume's ``after`` lands
inside it), then new entries as the owner writes them. When no entry comes and the owner's lease has
lapsed, the owner is gone: one replica claims the stream, reads what the owner wrote last, and finishes
the answer through mid-stream failover from the text in the log, writing on to the same log.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from tokenrelay.events import TERMINAL, Error, Event

if TYPE_CHECKING:
    from tokenrelay.router import Router
    from tokenrelay.session import StreamSession
    from tokenrelay.streamlog import RedisStreamLog


class RemoteStream:
    def __init__(self, log: RedisStreamLog, router: Router, stream_id: str) -> None:
        self.log = log
        self.router = router
        self.id = stream_id
        self.session: StreamSession | None = None  # set right after the session is made
        self.last_entry = "0-0"

    async def _entries(self, block_ms: int | None) -> tuple[list[Event], bool]:
        """New log entries as one batch, and whether the stream ended there."""
        assert self.session is not None
        out: list[Event] = []
        expected = len(self.session.events)
        while True:
            entries = await self.log.read(self.id, self.last_entry, block_ms)
            for entry_id, start, batch in entries:
                self.last_entry = entry_id
                if start != expected:  # the log was trimmed below what this reader needs
                    out.append(
                        Error(
                            type="resume_unavailable",
                            message="this stream's log no longer holds every event; it cannot be resumed",
                            status=410,
                        )
                    )
                    return out, True
                out.extend(batch)
                expected += len(batch)
                if isinstance(batch[-1], TERMINAL):
                    return out, True
            if len(entries) < 1000:
                return out, False
            block_ms = None  # more is waiting: read it now

    async def stream(self) -> AsyncIterator[list[Event]]:
        session = self.session
        assert session is not None
        log = self.log
        block = max(50, min(1000, log.lease_ms // 2))
        batch, ended = await self._entries(None)
        yield batch  # everything so far, or [] (accepted)
        while not ended:
            batch, ended = await self._entries(block)
            if batch:
                yield batch
                continue
            if ended or await log.owner_alive(self.id) or not await log.claim(self.id):
                continue
            # the owner died: what it wrote last, then the rest of the answer from here
            batch, ended = await self._entries(None)
            if batch:
                yield batch
            if ended:
                return
            log.own(session)
            async for batch in self.router.stream(session.request, session.events, session.route):
                yield batch
            return
