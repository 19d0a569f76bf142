"""Several replicas sharing one Redis: resume anywhere, and survive a replica killed mid-stream.

Each test's replicas are real ``tokenrelay serve`` processes with ``redis_url`` set; the Redis is the
machine's (or one ``redis_server`` started for the run). Killing uses SIGKILL: no shutdown code runs.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from tests.conftest import Server, free_port, raw_post, start, stop, wait_http
from tests.test_resume import chat_text, events, get, start_and_drop

STORY = {"tokens": 40, "tokens_per_second": 25}


def replica_config(redis_url: str, prefix: str) -> dict[str, Any]:
    return {
        "server": {
            "redis_url": redis_url,
            "redis_prefix": prefix,
            "replica_lease_seconds": 1.0,
            "on_disconnect": "continue",
            "keepalive_seconds": 0.5,
        },
        "models": [{"name": "demo", "provider": "mock", "options": {"tokens": 12}}],
    }


class Replicas:
    def __init__(self, tmp: Path, redis_url: str) -> None:
        self.tmp = tmp
        self.cfg = tmp / "tokenrelay.yaml"
        self.cfg.write_text(yaml.safe_dump(replica_config(redis_url, f"test-{secrets.token_hex(4)}")))
        self.servers: list[Server] = []

    def add(self) -> Server:
        port = free_port()
        log = self.tmp / f"replica-{len(self.servers)}.log"
        proc = start(["serve", "--config", str(self.cfg), "--port", str(port)], log)
        wait_http("127.0.0.1", port, "/readyz", proc, 60)
        server = Server(port, proc, log)
        self.servers.append(server)
        return server

    def close(self) -> None:
        for server in self.servers:
            if server.proc.poll() is None:
                stop(server.proc)


@pytest.fixture
def replicas(tmp_path: Path, redis_url: str) -> Iterator[Replicas]:
    group = Replicas(tmp_path, redis_url)
    try:
        yield group
    finally:
        group.close()


def kill_replica(server: Server) -> None:
    """SIGKILL the whole replica: the serve process and its granian workers (a worker outlives a killed
    parent, and would go on renewing the stream's lease)."""
    parent = psutil.Process(server.proc.pid)
    procs = [*parent.children(recursive=True), parent]
    for proc in procs:
        proc.kill()
    server.proc.wait()
    psutil.wait_procs(procs, timeout=5)


def body(**extra: Any) -> dict[str, Any]:
    return {
        "model": "demo",
        "stream": True,
        "messages": [{"role": "user", "content": "a story across replicas"}],
        "mock": STORY,
        **extra,
    }


def whole_text(server: Server) -> str:
    reply = raw_post(server.port, "/v1/chat/completions", {**body(), "stream": False}).json()
    return str(reply["choices"][0]["message"]["content"])


def check_resumed(first: list[bytes], rest: bytes, expected: str) -> None:
    resumed = events(rest)
    ids = [int(e[b"id"]) for e in resumed if b"id" in e]
    # numbered on from where the client was (an event that writes nothing, like usage, has no id line)
    assert ids[0] == len(first) + 1 and ids == sorted(set(ids))
    assert resumed[-1][b"data"] == b"[DONE]"
    payloads = [e[b"data"] for e in resumed]
    finishes = [
        p for p in payloads if p.startswith(b"{") and json.loads(p)["choices"][0].get("finish_reason")
    ]
    assert len(finishes) == 1
    assert chat_text(first) + chat_text(payloads) == expected


def test_stream_started_on_one_replica_resumes_on_another(replicas: Replicas) -> None:
    a, b = replicas.add(), replicas.add()
    stream_id, first = start_and_drop(a.port, "/v1/chat/completions", body(), keep=5)
    status, _, rest = get(b.port, f"/v1/streams/{stream_id}", {"Last-Event-ID": str(len(first))})
    assert status == 200
    check_resumed(first, rest, whole_text(b))
    assert a.get_json("/stats")["active_streams"] == 0  # the model ran on A to the end


def test_replica_killed_mid_stream_is_finished_by_another(replicas: Replicas) -> None:
    a, b = replicas.add(), replicas.add()
    stream_id, first = start_and_drop(a.port, "/v1/chat/completions", body(), keep=5)
    kill_replica(a)
    status, _, rest = get(b.port, f"/v1/streams/{stream_id}?after={len(first)}")
    assert status == 200
    # B generated the rest itself: its model was asked to continue the text in the log
    continued = b.get_json("/mock/stats")["demo"]["last_request"]["messages"][-1]
    assert continued["role"] == "assistant" and len(continued["content"].split()) >= 5
    check_resumed(first, rest, whole_text(b))
    # the finished answer is in the log: a third replica replays it whole
    c = replicas.add()
    status, _, replay = get(c.port, f"/v1/streams/{stream_id}")
    assert status == 200
    assert chat_text([e[b"data"] for e in events(replay)]) == whole_text(c)


def test_other_credentials_and_unknown_ids_are_404_on_every_replica(replicas: Replicas) -> None:
    a, b = replicas.add(), replicas.add()
    mine = {"authorization": "Bearer alice"}
    resp = raw_post(a.port, "/v1/chat/completions", {**body(), "mock": {"tokens": 3}}, mine)
    stream_id = resp.headers["x-stream-id"]
    assert get(b.port, f"/v1/streams/{stream_id}", {"authorization": "Bearer mallory"})[0] == 404
    assert get(b.port, "/v1/streams/chatcmpl-unknown", mine)[0] == 404
    status, _, replay = get(b.port, f"/v1/streams/{stream_id}", mine)
    assert status == 200 and chat_text([e[b"data"] for e in events(replay)]) == chat_text(resp.sse_data())
