"""Router models: strategies over deployments, learned latency, breakers, and POST /v1/auto/route."""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from tests.conftest import Server, raw_post, serving, wait_for

MESSAGES: list[Any] = [{"role": "user", "content": "route me"}]


@pytest.fixture(scope="module")
def routed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("router")
    mock = {"tokens": 6, "tokens_per_second": 100}
    dear, low = {"input": 5, "output": 15}, {"input": 0.1, "output": 0.4}
    config = {
        "models": [
            {"name": "sluggish", "provider": "mock", "options": {**mock, "first_token_ms": 1000}},
            {"name": "quick", "provider": "mock", "options": {**mock, "first_token_ms": 10}},
            {"name": "pricey", "provider": "mock", "options": mock, "price": dear},
            {"name": "cheap", "provider": "mock", "options": mock, "price": low},
            {"name": "long", "provider": "mock", "options": {"tokens": 40, "tokens_per_second": 20}},
            {"name": "broken", "provider": "mock", "options": {"error_status": 500}, "retries": 0,
             "breaker": {"failures": 1, "cooldown_seconds": 60}},
        ],
        "routers": [
            {"name": "fastest", "deployments": ["sluggish", "quick"], "strategy": "latency"},
            {"name": "cheapest", "deployments": ["pricey", "cheap"], "strategy": "cost"},
            {"name": "spread", "deployments": ["long", "quick"], "strategy": "least_busy"},
            {"name": "mostly", "deployments": ["pricey", "cheap"], "strategy": "weighted",
             "weights": {"pricey": 0.000001, "cheap": 1}},
            {"name": "ordered", "deployments": ["broken", "quick"], "strategy": "priority"},
        ],
    }  # fmt: skip
    with serving(tmp, config) as server:
        yield server


def served_by(server: Server, model: str, **extra: Any) -> str:
    resp = raw_post(server.port, "/v1/chat/completions", {"model": model, "messages": MESSAGES, **extra})
    assert resp.status == 200, resp.body
    return resp.headers["x-tokenrelay-deployment"]


def auto_route(server: Server, model: str) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("POST", "/v1/auto/route", json.dumps({"model": model, "messages": MESSAGES}))
    resp = conn.getresponse()
    body = json.loads(resp.read())
    assert resp.status == 200, body
    return body  # type: ignore[no-any-return]


def test_latency_is_learned_from_traffic(routed: Server) -> None:
    # with nothing learned, each deployment is tried once; then the faster one wins every time (1 s apart in
    # first-token time: one sample of "quick" slowed by a busy machine must not make it the slower one)
    first = [served_by(routed, "fastest") for _ in range(2)]
    assert sorted(first) == ["quick", "sluggish"]
    assert [served_by(routed, "fastest") for _ in range(4)] == ["quick"] * 4
    routing = auto_route(routed, "fastest")["routing"]
    scores = {c["deployment"]: c for c in routing["candidates"]}
    assert routing["chosen"] == "quick" and routing["strategy"] == "latency"
    assert scores["quick"]["first_token_ms"] < 150 < scores["sluggish"]["first_token_ms"]
    assert scores["quick"]["tokens_per_second"] > 0
    assert scores["quick"]["score"] < scores["sluggish"]["score"]


def test_cost_weighted_and_the_sdk(routed: Server) -> None:
    assert {served_by(routed, "cheapest") for _ in range(3)} == {"cheap"}
    assert {served_by(routed, "mostly") for _ in range(5)} == {"cheap"}
    client = openai.OpenAI(base_url=f"{routed.url}/v1", api_key="k", max_retries=0)
    names = [m.id for m in client.models.list()]
    assert {"fastest", "cheapest", "router"} <= set(names)
    reply = client.chat.completions.with_raw_response.create(model="router", messages=MESSAGES)
    assert reply.headers["x-tokenrelay-deployment"] in names
    assert reply.parse().choices[0].message.content


def test_least_busy_avoids_a_deployment_that_is_streaming(routed: Server) -> None:
    def long_stream() -> None:
        raw_post(routed.port, "/v1/chat/completions", {"model": "long", "messages": MESSAGES, "stream": True})

    busy = threading.Thread(target=long_stream)
    busy.start()
    wait_for(lambda: routed.get_json("/stats")["active_streams"] >= 1)
    assert served_by(routed, "spread") == "quick"
    busy.join(timeout=10)


def test_open_breakers_are_left_out(routed: Server) -> None:
    assert served_by(routed, "ordered") == "quick"  # broken failed first, its breaker opened
    routing = auto_route(routed, "ordered")["routing"]
    broken = next(c for c in routing["candidates"] if c["deployment"] == "broken")
    assert broken["healthy"] is False and routing["chosen"] == "quick"


def test_auto_route_needs_a_router(routed: Server) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", routed.port, timeout=10)
    conn.request("POST", "/v1/auto/route", json.dumps({"model": "quick", "messages": MESSAGES}))
    resp = conn.getresponse()
    assert resp.status == 400 and json.loads(resp.read())["error"]["param"] == "model"
