"""The circuit breaker's state machine, on a clock the test moves."""

from __future__ import annotations

from tokenrelay.breaker import CircuitBreaker
from tokenrelay.config import BreakerConfig


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_opens_on_consecutive_failures_and_probes_after_cooldown() -> None:
    clock = Clock()
    b = CircuitBreaker(BreakerConfig(failures=3, cooldown_seconds=10), clock)
    for _ in range(2):
        assert b.allow()
        b.failure()
    assert b.state == "closed"
    b.success()  # a success resets the run
    for _ in range(3):
        assert b.allow()
        b.failure()
    assert b.state == "open" and not b.allow()
    clock.now = 9.9
    assert not b.allow()
    clock.now = 10.0
    assert b.allow()  # the one probe
    assert b.state == "half-open" and not b.allow()  # nobody else while it runs
    b.success()
    assert b.state == "closed" and b.allow()


def test_a_failed_probe_reopens_and_an_abandoned_one_frees_the_slot() -> None:
    clock = Clock()
    b = CircuitBreaker(BreakerConfig(failures=1, cooldown_seconds=5), clock)
    b.failure()
    clock.now = 5
    assert b.allow()
    b.release()  # the probe's request was cancelled: no verdict
    assert b.allow()
    b.failure()
    assert b.state == "open" and b.opens == 2
    clock.now = 9
    assert not b.allow()


def test_opens_on_error_rate_over_the_window() -> None:
    b = CircuitBreaker(BreakerConfig(failures=100, error_rate=0.5, window=10), Clock())
    for i in range(9):  # alternating: never more than one failure in a row
        b.failure() if i % 2 else b.success()
    assert b.state == "closed"  # 4 of 9: the window is not full yet
    b.failure()  # 5 of 10
    assert b.state == "open"


def test_disabled_never_skips() -> None:
    b = CircuitBreaker(BreakerConfig(enabled=False, failures=1), Clock())
    b.failure()
    b.failure()
    assert b.allow()
