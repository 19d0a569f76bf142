"""Prometheus metrics at /metrics, and the routing headers on every model response."""

from __future__ import annotations

import http.client
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import openai
from prometheus_client.parser import text_string_to_metric_families
from tests.conftest import Server, raw_post, serving, wait_for

MESSAGES: list[Any] = [{"role": "user", "content": "measure me"}]


def scrape(gateway: Server) -> dict[str, list[Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    conn.request("GET", "/metrics")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("content-type", "").startswith("text/plain")
    text = resp.read().decode()
    conn.close()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def value(samples: list[Any], name: str, **labels: str) -> float:
    return sum(
        s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_requests_latency_and_failovers_are_counted(gateway: Server) -> None:
    before = scrape(gateway)
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="k", max_retries=0)
    list(client.chat.completions.create(model="demo", messages=MESSAGES, stream=True))
    list(client.chat.completions.create(model="flaky", messages=MESSAGES, stream=True))  # one failover
    raw_post(
        gateway.port,
        "/v1/chat/completions",
        {"model": "demo", "messages": MESSAGES, "mock": {"error_status": 503}},
    )
    after = scrape(gateway)

    def delta(family: str, name: str, **labels: str) -> float:
        return value(after[family], name, **labels) - value(before.get(family, []), name, **labels)

    ok = {"model": "demo", "deployment": "demo", "protocol": "openai", "status": "200"}
    assert delta("tokenrelay_requests", "tokenrelay_requests_total", **ok) == 1
    assert delta("tokenrelay_requests", "tokenrelay_requests_total", model="demo", status="503") == 1
    assert delta("tokenrelay_first_token_seconds", "tokenrelay_first_token_seconds_count", model="demo") == 1
    assert delta("tokenrelay_inter_token_seconds", "tokenrelay_inter_token_seconds_count", model="demo") >= 1
    assert delta("tokenrelay_failovers", "tokenrelay_failovers_total", model="flaky") == 1
    assert delta("tokenrelay_stream_errors", "tokenrelay_stream_errors_total", model="demo") == 1
    assert delta("tokenrelay_overhead_seconds", "tokenrelay_overhead_seconds_count", protocol="openai") == 3
    states = {
        s.labels["state"]: s.value
        for s in after["tokenrelay_breaker_state"]
        if s.labels["deployment"] == "demo"
    }
    assert states == {"closed": 1.0, "half-open": 0.0, "open": 0.0}
    assert value(after["tokenrelay_active_streams"], "tokenrelay_active_streams", model="demo") == 0


def test_every_model_response_names_its_deployment_and_overhead(gateway: Server) -> None:
    # streaming: the deployment serving when the headers went out; non-streaming: the one that finished
    for body, deployment in (
        ({"model": "demo", "messages": MESSAGES, "stream": True}, "demo"),
        ({"model": "flaky", "messages": MESSAGES}, "steady"),
    ):
        resp = raw_post(gateway.port, "/v1/chat/completions", body)
        assert resp.status == 200
        assert resp.headers["x-tokenrelay-deployment"] == deployment
        assert 0 <= float(resp.headers["x-tokenrelay-overhead-ms"]) < 1000


def test_every_response_has_the_overhead_header(gateway: Server) -> None:
    for path in ("/healthz", "/v1/models", "/nope"):
        conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        assert float(resp.getheader("x-tokenrelay-overhead-ms") or "-1") >= 0, path
        conn.close()


def test_one_json_log_line_per_request_with_its_ids(gateway: Server) -> None:
    import json as jsonlib

    before = gateway.log.read_bytes().count(b"\n")
    resp = raw_post(
        gateway.port,
        "/v1/chat/completions",
        {"model": "flaky", "messages": MESSAGES, "stream": True},
        {"x-request-id": "req-abc-123"},
    )
    stream_id = resp.headers["x-stream-id"]

    def mine() -> list[Any]:
        lines = gateway.log.read_bytes().splitlines()[before:]
        return [jsonlib.loads(ln) for ln in lines if b"req-abc-123" in ln]

    # access lines are gathered and written together, at most 0.1 s after the request
    wait_for(mine, timeout=2)
    time.sleep(0.3)
    assert len(mine()) == 1  # one line for the request, none per chunk
    entry = mine()[0]
    assert entry["stream_id"] == stream_id and entry["request_id"] == "req-abc-123"
    assert entry["model"] == "flaky" and entry["deployment"] == "steady" and entry["failovers"] == 1
    assert entry["status"] == 200 and entry["ttft_ms"] is not None


def ready_on_fresh_connection(gw: Server) -> tuple[int, int]:
    """On one new connection (so one worker): that worker's pid (``/stats``) and its ``/readyz`` status."""
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    try:
        conn.request("GET", "/stats")
        stats = conn.getresponse()
        pid = json.loads(stats.read())["worker_pid"]
        conn.request("GET", "/readyz")
        ready = conn.getresponse()
        ready.read()
        return pid, ready.status
    finally:
        conn.close()


def test_workers_add_up_in_every_scrape(tmp_path: Path) -> None:
    """With ``--workers 2`` each request lands on one worker (SO_REUSEPORT spreads connections), yet
    every scrape, whichever worker answers it, counts all of them: the workers share their counters and
    histograms through prometheus_client's multiprocess files, which the server removes when it stops."""
    config = {"models": [{"name": "demo", "provider": "mock", "options": {"tokens": 3}}]}
    requests = 24
    shared_before = set(Path(tempfile.gettempdir()).glob("tokenrelay-metrics-*"))
    with serving(tmp_path, config, args=("--workers", "2")) as gw:
        # serving() saw one worker ready; the other may still be starting (and answer 503 meanwhile):
        # wait until each worker, known by its pid, has said it is ready
        ready_pids: set[int] = set()

        def both_ready() -> bool:
            pid, status = ready_on_fresh_connection(gw)
            if status == 200:
                ready_pids.add(pid)
            return len(ready_pids) == 2

        wait_for(both_ready, timeout=30)
        for _ in range(requests):  # raw_post opens a new connection each time
            resp = raw_post(gw.port, "/v1/chat/completions", {"model": "demo", "messages": MESSAGES})
            assert resp.status == 200
        pids = set()
        for _ in range(16):  # fresh connections again: the scrapes reach both workers
            families = scrape(gw)
            ok = {"model": "demo", "status": "200"}
            assert value(families["tokenrelay_requests"], "tokenrelay_requests_total", **ok) == requests
            first = families["tokenrelay_first_token_seconds"]
            assert value(first, "tokenrelay_first_token_seconds_count", model="demo") == requests
            pids.add(gw.get_json("/stats")["worker_pid"])
        assert len(pids) == 2
        shared = set(Path(tempfile.gettempdir()).glob("tokenrelay-metrics-*")) - shared_before
        assert len(shared) == 1 and any(next(iter(shared)).iterdir())
    assert not next(iter(shared)).exists()
