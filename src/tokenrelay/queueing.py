"""Priority admission: a concurrency cap per model (deployment), with a priority queue in front of it.

When a model's ``max_concurrent`` streams are running, a new request waits: higher plan ``priority`` first,
first come first served within a priority. A freed slot is handed straight to the next waiter (no
thundering herd). A request that waits longer than ``max_queue_wait_seconds``, or finds ``max_queue``
others already waiting, is refused with 503 and a ``Retry-After``. ``GET /stats`` shows each queue.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Any

from tokenrelay.errors import GatewayError


class PriorityGate:
    def __init__(self, model: str, limit: int, max_wait: float, max_queue: int) -> None:
        self.model = model
        self.limit = limit
        self.max_wait = max_wait
        self.max_queue = max_queue
        self.active = 0
        self.waiting: list[tuple[int, int, asyncio.Future[None]]] = []  # (-priority, arrival, future)
        self.order = itertools.count()
        self.admitted_after_wait = 0
        self.refused = 0
        self.wait_total = 0.0
        self.wait_max = 0.0

    async def acquire(self, priority: int) -> None:
        if self.active < self.limit and not self.waiting:
            self.active += 1
            return
        if len(self.waiting) >= self.max_queue:
            self.refused += 1
            raise self._refusal(f"{len(self.waiting)} requests are already waiting")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self.waiting, (-priority, next(self.order), fut))
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(self.max_wait):
                await fut
        except TimeoutError:
            self.refused += 1
            raise self._refusal(f"waited {self.max_wait:g} s for a free slot") from None
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release()  # the slot was handed over just as the waiter left: pass it on
            raise
        finally:
            if not fut.done():
                fut.cancel()  # left behind in the heap; skipped when a slot frees
        waited = time.monotonic() - t0
        self.admitted_after_wait += 1
        self.wait_total += waited
        self.wait_max = max(self.wait_max, waited)

    def release(self) -> None:
        """A stream ended: its slot goes to the best waiter, if any."""
        while self.waiting:
            _, _, fut = heapq.heappop(self.waiting)
            if not fut.done():
                fut.set_result(None)  # the slot moves over; active stays the same
                return
        self.active -= 1

    def _refusal(self, why: str) -> GatewayError:
        return GatewayError(
            503,
            f"Model '{self.model}' is at its limit of {self.limit} concurrent streams and {why}.",
            type="overloaded_error",
            code="queue_full",
            retry_after=max(1.0, self.max_wait / 2),
        )

    def stats(self) -> dict[str, Any]:
        waiting = sum(1 for _, _, fut in self.waiting if not fut.done())
        admitted = self.admitted_after_wait
        return {
            "limit": self.limit,
            "active": self.active,
            "waiting": waiting,
            "admitted_after_waiting": admitted,
            "refused": self.refused,
            "mean_wait_ms": round(self.wait_total / admitted * 1000, 2) if admitted else 0.0,
            "max_wait_ms": round(self.wait_max * 1000, 2),
        }
