"""Priority admission: a model capped at one stream, a queue in front of it ordered by plan priority."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from tests.conftest import Server, raw_post, serving, wait_for
from tests.test_keys import ADMIN, new_key

MESSAGES: list[Any] = [{"role": "user", "content": "queue me"}]


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("queue")
    slow = {"tokens": 10, "tokens_per_second": 25}  # 0.4 s a stream
    config = {
        "plans": {"low": {}, "high": {"priority": 2}},
        "models": [
            {"name": "capped", "provider": "mock", "options": slow, "max_concurrent": 1},
            {
                "name": "impatient",
                "provider": "mock",
                "options": slow,
                "max_concurrent": 1,
                "max_queue_wait_seconds": 0.2,
            },
        ],
    }
    with serving(tmp, config, {"TOKENRELAY_ADMIN_KEY": ADMIN}) as server:
        yield server


def test_waiters_are_served_by_priority_then_arrival(capped: Server) -> None:
    low, high = new_key(capped, "low"), new_key(capped, "high")
    finished: list[str] = []

    def call(name: str, key: str) -> None:
        resp = raw_post(
            capped.port, "/v1/chat/completions", {"model": "capped", "messages": MESSAGES},
            {"authorization": f"Bearer {key}"},
        )  # fmt: skip
        assert resp.status == 200
        finished.append(name)

    def queue_length() -> int:
        return int(capped.get_json("/stats")["models"]["capped"]["queue"]["waiting"])

    first = threading.Thread(target=call, args=("holder", low))
    first.start()
    wait_for(lambda: capped.get_json("/stats")["models"]["capped"]["queue"]["active"] == 1)
    threads = []
    for name, key in (("low-1", low), ("low-2", low), ("high", high)):
        t = threading.Thread(target=call, args=(name, key))
        t.start()
        threads.append(t)
        waiting = len(threads)
        wait_for(lambda: queue_length() == waiting)  # noqa: B023 - arrival order is the order started
    for t in [first, *threads]:
        t.join(timeout=30)
    assert finished == ["holder", "high", "low-1", "low-2"]
    stats = capped.get_json("/stats")["models"]["capped"]["queue"]
    assert stats["admitted_after_waiting"] == 3 and stats["max_wait_ms"] > 300


def test_waiting_too_long_is_503_with_retry_after(capped: Server) -> None:
    key = new_key(capped, "low")
    auth = {"authorization": f"Bearer {key}"}
    holder = threading.Thread(
        target=raw_post,
        args=(capped.port, "/v1/chat/completions", {"model": "impatient", "messages": MESSAGES}, auth),
    )
    holder.start()
    wait_for(lambda: capped.get_json("/stats")["models"]["impatient"]["queue"]["active"] == 1)
    t0 = time.monotonic()
    refused = raw_post(
        capped.port, "/v1/chat/completions", {"model": "impatient", "messages": MESSAGES}, auth
    )
    assert refused.status == 503 and 0.15 < time.monotonic() - t0 < 2
    assert refused.json()["error"]["code"] == "queue_full" and int(refused.headers["retry-after"]) >= 1
    holder.join(timeout=10)
    assert capped.get_json("/stats")["models"]["impatient"]["queue"]["refused"] == 1
