"""Circuit breaker: one per deployment, so a failing upstream is skipped instead of being retried by
every request.

States: *closed* (requests pass, outcomes are counted), *open* (requests skip this deployment until the
cool-down ends), *half-open* (one probe passes; its success closes the breaker, its failure opens it again).
Kept per process: each replica learns about an upstream from its own traffic, which needs no coordination
and reacts as fast.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from tokenrelay.config import BreakerConfig


class CircuitBreaker:
    def __init__(self, cfg: BreakerConfig, clock: Any = time.monotonic) -> None:
        self.cfg = cfg
        self.clock = clock
        self.state = "closed"
        self.consecutive = 0
        self.outcomes: deque[bool] = deque(maxlen=max(1, cfg.window))  # True: failure
        self.opened_at = 0.0
        self.probing = False
        self.opens = 0

    def allow(self) -> bool:
        """May a request go to this deployment now? In half-open state only one probe at a time."""
        if self.state == "closed" or not self.cfg.enabled:
            return True
        if self.state == "open":
            if self.clock() - self.opened_at < self.cfg.cooldown_seconds:
                return False
            self.state = "half-open"
            self.probing = False
        if self.probing:
            return False
        self.probing = True
        return True

    def success(self) -> None:
        self.consecutive = 0
        self.outcomes.append(False)
        if self.state != "closed":
            self.state = "closed"
            self.probing = False
            self.outcomes.clear()

    def failure(self) -> None:
        self.consecutive += 1
        self.outcomes.append(True)
        if self.state == "half-open":
            self._open()
            return
        window = self.outcomes
        rate_hit = len(window) >= self.cfg.window and sum(window) / len(window) >= self.cfg.error_rate
        if self.state == "closed" and (self.consecutive >= self.cfg.failures or rate_hit):
            self._open()

    def release(self) -> None:
        """An allowed request ended with no verdict on the deployment (cancelled, or a bad request):
        let the next request probe instead."""
        self.probing = False

    def _open(self) -> None:
        self.state = "open"
        self.opened_at = self.clock()
        self.probing = False
        self.opens += 1

    def stats(self) -> dict[str, Any]:
        return {"state": self.state, "consecutive_failures": self.consecutive, "opens": self.opens}
