"""Retries, fallbacks, breakers, timeouts and mid-stream failover, through the openai SDK.

The deployments come from ``resilience_models`` in conftest: each faulty one falls back to one that gives
the same text for the same prompt, so a spliced stream must equal the whole answer exactly.
"""

from __future__ import annotations

import json
import time
from typing import Any

import openai
import pytest
from tests.conftest import Server, raw_post, wait_for

MESSAGES: list[Any] = [{"role": "user", "content": "Tell me about failover."}]


def stream_text(client: openai.OpenAI, model: str, **kw: Any) -> tuple[str, list[Any]]:
    chunks = list(client.chat.completions.create(model=model, messages=MESSAGES, stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def mock_stats(gateway: Server, model: str) -> dict[str, Any]:
    return gateway.get_json("/mock/stats")[model]  # type: ignore[no-any-return]


@pytest.fixture
def client(gateway: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="sk-test", max_retries=0)


def test_cut_midstream_continues_on_fallback_with_exact_text(client: openai.OpenAI, gateway: Server) -> None:
    whole, _ = stream_text(client, "steady")
    failed_before = mock_stats(gateway, "flaky")["failed"]
    text, chunks = stream_text(client, "flaky", stream_options={"include_usage": True})
    assert text == whole
    assert mock_stats(gateway, "flaky")["failed"] == failed_before + 1
    roles = [c for c in chunks if c.choices and c.choices[0].delta.role]
    finishes = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(roles) == 1 and len(finishes) == 1
    assert finishes[0].choices[0].finish_reason == "stop"
    assert len({c.id for c in chunks}) == 1
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 20  # 5 before the cut, 15 after
    # the fallback was asked to continue the text the client already had
    last = mock_stats(gateway, "steady")["last_request"]
    assert last["messages"][-1]["role"] == "assistant"
    assert whole.startswith(last["messages"][-1]["content"])
    assert len(last["messages"][-1]["content"].split()) == 5


def test_failover_across_provider_kinds(
    client: openai.OpenAI, gateway: Server, mock_upstream: Server
) -> None:
    """In-process mock (cut after 3) -> OpenAI-compatible upstream (3 more) -> Anthropic upstream."""
    whole, _ = stream_text(client, "gpt", extra_body={"mock": {"tokens": 16}})
    text, chunks = stream_text(client, "flaky-chain")
    assert text == whole
    assert sum(1 for c in chunks if c.choices and c.choices[0].finish_reason) == 1
    seen = mock_upstream.get_json("/mock/stats")["last_request"]
    assert seen["protocol"] == "anthropic"
    prefill = seen["body"]["messages"][-1]
    assert prefill["role"] == "assistant"
    assert len(json.dumps(prefill["content"]).split()) >= 6


def test_tool_call_cut_in_half_is_regenerated_whole(client: openai.OpenAI, gateway: Server) -> None:
    chunks = list(client.chat.completions.create(model="flaky-tools", messages=MESSAGES, stream=True))
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    starts = [tc for tc in calls if tc.id]
    assert len(starts) == 1 and starts[0].function.name == "get_weather"
    arguments = "".join(tc.function.arguments or "" for tc in calls)
    assert json.loads(arguments) == {"city": "Paris", "unit": "celsius"}
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole, _ = stream_text(client, "steady-tools")
    assert text == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "tool_calls"
    ]


def test_cut_with_no_fallback_ends_in_a_typed_error(gateway: Server) -> None:
    resp = raw_post(
        gateway.port, "/v1/chat/completions", {"model": "flaky-alone", "messages": MESSAGES, "stream": True}
    )
    data = resp.sse_data()
    assert data[-1] == b"[DONE]"  # the SDKs stop reading there; the error just before it is what they raise
    err = json.loads(data[-2])["error"]
    assert err["type"] == "upstream_disconnect"
    chunks = [json.loads(d) for d in data[:-2]]
    assert not any(c["choices"][0].get("finish_reason") for c in chunks)  # never a clean-looking end
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert len(text.split()) == 5


def test_stall_times_out_and_fails_over(client: openai.OpenAI, gateway: Server) -> None:
    whole, _ = stream_text(client, "steady")
    t0 = time.monotonic()
    text, _ = stream_text(client, "stalled")
    assert text == whole
    assert time.monotonic() - t0 < 3  # the stall would last until cancelled


def test_first_token_timeout_fails_over(client: openai.OpenAI, gateway: Server) -> None:
    whole, _ = stream_text(client, "steady")
    t0 = time.monotonic()
    text, _ = stream_text(client, "sleepy")
    assert text == whole
    assert time.monotonic() - t0 < 3  # its first token would come after 5 s
    wait_for(lambda: mock_stats(gateway, "sleepy")["active"] == 0)
    assert mock_stats(gateway, "sleepy")["cancelled"] >= 1  # the slow attempt was stopped


def test_error_before_first_byte_is_retried_then_falls_back(client: openai.OpenAI, gateway: Server) -> None:
    before = mock_stats(gateway, "down")["failed"]
    whole, _ = stream_text(client, "steady")
    text, _ = stream_text(client, "down")
    assert text == whole
    assert mock_stats(gateway, "down")["failed"] == before + 3  # the first try and 2 retries


def test_retry_after_is_honoured(client: openai.OpenAI, gateway: Server) -> None:
    before = mock_stats(gateway, "busy")["failed"]
    t0 = time.monotonic()
    stream_text(client, "busy")
    elapsed = time.monotonic() - t0
    assert mock_stats(gateway, "busy")["failed"] == before + 2
    assert elapsed >= 0.4


def test_retry_after_longer_than_allowed_falls_back_at_once(client: openai.OpenAI, gateway: Server) -> None:
    before = mock_stats(gateway, "busy-long")["failed"]
    t0 = time.monotonic()
    text, _ = stream_text(client, "busy-long")
    assert text
    assert time.monotonic() - t0 < 2
    assert mock_stats(gateway, "busy-long")["failed"] == before + 1


def test_bad_request_is_not_retried_nor_sent_elsewhere(client: openai.OpenAI, gateway: Server) -> None:
    before = mock_stats(gateway, "refused")["failed"]
    with pytest.raises(openai.BadRequestError):
        stream_text(client, "refused")
    assert mock_stats(gateway, "refused")["failed"] == before + 1


def test_breaker_opens_skips_then_probes(client: openai.OpenAI, gateway: Server) -> None:
    def failed() -> int:
        return int(mock_stats(gateway, "broken")["failed"])

    def state() -> str:
        return str(gateway.get_json("/stats")["models"]["broken"]["breaker"]["state"])

    start = failed()
    for _ in range(2):
        assert stream_text(client, "broken")[0]
    assert failed() == start + 2
    assert state() == "open"
    assert stream_text(client, "broken")[0]  # served by the fallback without trying the open breaker
    assert failed() == start + 2
    time.sleep(0.7)  # the cool-down
    assert stream_text(client, "broken")[0]  # a half-open probe, which fails and opens it again
    assert failed() == start + 3
    assert state() == "open"
