"""Chat Completions through the gateway with the official openai SDK: stream, non-stream, usage, tools."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from tests.conftest import RawResponse, Server, raw_post, validator

MESSAGES: list[Any] = [{"role": "user", "content": "Tell me about streams"}]


@pytest.fixture
def client(gateway: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=30)


def stream_text(client: openai.OpenAI, model: str, **kwargs: Any) -> tuple[str, list[Any]]:
    chunks = list(client.chat.completions.create(model=model, messages=MESSAGES, stream=True, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


@pytest.mark.parametrize("model", ["demo", "gpt"])
def test_stream_matches_non_stream(client: openai.OpenAI, model: str) -> None:
    text, chunks = stream_text(client, model)
    full = client.chat.completions.create(model=model, messages=MESSAGES)
    assert text == full.choices[0].message.content
    assert len(text.split()) == 12 if model == "demo" else 16
    roles = [c.choices[0].delta.role for c in chunks if c.choices and c.choices[0].delta.role]
    assert roles == ["assistant"]
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].id.startswith("chatcmpl-") and chunks[0].id != full.id  # one id per stream
    assert all(c.model == model for c in chunks)
    assert full.usage is not None and full.usage.completion_tokens == len(text.split())


def test_streamed_tokens_arrive_one_chunk_each(client: openai.OpenAI) -> None:
    text, chunks = stream_text(client, "demo", extra_body={"mock": {"tokens": 5, "tokens_per_second": 200}})
    contents = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(contents) == 5
    assert "".join(contents) == text


@pytest.mark.parametrize("model", ["demo", "gpt"])
def test_every_chunk_matches_openai_schema(gateway: Server, model: str) -> None:
    chunk_schema = validator("chat_completion_chunk")
    body = {
        "model": model,
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
        "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}],
        "mock": {"tool_calls": [{"name": "lookup", "arguments": {"q": "streams"}}]},
    }
    resp = raw_post(gateway.port, "/v1/chat/completions", body)
    assert resp.status == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert resp.headers["cache-control"] == "no-cache"
    assert resp.headers["x-accel-buffering"] == "no"
    assert resp.headers.get("transfer-encoding") == "chunked"
    assert "content-length" not in resp.headers
    for line in resp.body.split(b"\n"):
        assert line == b"" or line.startswith((b"data: ", b": ")), line  # no id:, retry: or event: lines
    payloads = resp.sse_data()
    assert payloads[-1] == b"[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    for chunk in chunks:
        chunk_schema.validate(chunk)
        assert chunk["usage"] is None or chunk is chunks[-1]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"


def test_non_stream_matches_openai_schema(gateway: Server) -> None:
    resp = raw_post(gateway.port, "/v1/chat/completions", {"model": "demo", "messages": MESSAGES})
    assert resp.status == 200
    assert resp.headers["content-type"] == "application/json"
    validator("chat_completion").validate(resp.json())


def test_include_usage(client: openai.OpenAI) -> None:
    _, chunks = stream_text(client, "gpt", stream_options={"include_usage": True})
    assert chunks[-1].choices == []
    usage = chunks[-1].usage
    assert usage is not None
    assert usage.completion_tokens == 16
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    _, plain = stream_text(client, "gpt")
    assert all(c.usage is None for c in plain) and plain[-1].choices


@pytest.mark.parametrize("model", ["demo", "gpt"])
def test_tool_calls_stream_through_sdk_helper(client: openai.OpenAI, model: str) -> None:
    tools: Any = [
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
        {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
    ]
    calls = [
        {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}},
        {"name": "get_time", "arguments": {"zone": "Europe/Paris"}},
    ]
    with client.chat.completions.stream(
        model=model, messages=MESSAGES, tools=tools, extra_body={"mock": {"tokens": 2, "tool_calls": calls}}
    ) as stream:
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    got = choice.message.tool_calls
    assert got is not None
    assert [c.function.name for c in got] == ["get_weather", "get_time"]  # type: ignore[union-attr]
    assert json.loads(got[0].function.arguments) == calls[0]["arguments"]  # type: ignore[union-attr]
    assert json.loads(got[1].function.arguments) == calls[1]["arguments"]  # type: ignore[union-attr]
    assert all(c.id and c.id.startswith("call_") for c in got)


def test_tool_call_fragments_are_streamed(gateway: Server) -> None:
    body = {
        "model": "demo",
        "messages": MESSAGES,
        "stream": True,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "tool_choice": "required",
        "mock": {
            "tokens": 0,
            "tool_calls": [{"name": "f", "arguments": '{"text": "a long argument value"}'}],
            "tool_chunk_chars": 5,
        },
    }
    chunks = [json.loads(p) for p in raw_post(gateway.port, "/v1/chat/completions", body).sse_data()[:-1]]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    first = deltas[0]["tool_calls"][0]
    assert first["id"] and first["function"]["name"] == "f" and first["function"]["arguments"] == ""
    assert deltas[0]["role"] == "assistant"
    pieces = [d["tool_calls"][0]["function"]["arguments"] for d in deltas[1:] if "tool_calls" in d]
    assert len(pieces) > 3 and all("id" not in d["tool_calls"][0] for d in deltas[1:] if "tool_calls" in d)
    assert "".join(pieces) == '{"text": "a long argument value"}'


def test_max_tokens_gives_length(client: openai.OpenAI) -> None:
    text, chunks = stream_text(client, "demo", max_tokens=3)
    assert len(text.split()) == 3
    assert chunks[-1].choices[0].finish_reason == "length"


def test_models_and_health(gateway: Server, client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids[:3] == ["tiny", "demo", "slow"] and ids[-5:-1] == ["gpt", "gpt-timeout", "claude", "nowhere"]
    assert ids[-1] == "router"  # the router over every model comes after the deployments
    assert "flaky" in ids and len(ids) == len(set(ids))
    validator("list_models").validate(gateway.get_json("/v1/models"))
    assert client.models.retrieve("demo").id == "demo"
    assert gateway.get_json("/healthz") == {"status": "ok"}
    ready = gateway.get_json("/readyz")
    assert ready["status"] == "ready" and ready["models"]["tiny"] == "ready"


def test_upstream_request_shape(gateway: Server, mock_upstream: Server) -> None:
    resp: RawResponse = raw_post(
        gateway.port,
        "/v1/chat/completions",
        {"model": "gpt", "messages": MESSAGES, "temperature": 0.5, "logprobs": False},
    )
    assert resp.status == 200 and resp.json()["model"] == "gpt"
    seen = mock_upstream.get_json("/mock/stats")["last_request"]
    assert seen["model"] == "gpt-4o-mini"  # upstream_model from the config
    assert seen["authorization"] == "Bearer sk-test"  # key from api_key_env
    assert seen["stream"] is True and seen["include_usage"] is True  # always streamed from upstream
    assert seen["temperature"] == 0.5
    assert seen["extra"] == {"logprobs": False}  # unmodelled fields pass through


def test_cors_lets_browser_pages_fetch_streams(gateway: Server) -> None:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    conn.request(
        "OPTIONS",
        "/v1/chat/completions",
        headers={
            "origin": "http://example.test",
            "access-control-request-method": "POST",
            "access-control-request-headers": "content-type, authorization, x-stainless-os, anthropic-beta",
        },
    )
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 204
    assert resp.getheader("access-control-allow-origin") == "*"
    assert "POST" in (resp.getheader("access-control-allow-methods") or "")
    assert "x-stainless-os, anthropic-beta" in (resp.getheader("access-control-allow-headers") or "")
    conn.close()
    streamed = raw_post(
        gateway.port,
        "/v1/chat/completions",
        {"model": "demo", "messages": MESSAGES, "stream": True},
        {"origin": "http://example.test"},
    )
    assert streamed.headers["access-control-allow-origin"] == "*"
    assert "x-stream-id" in streamed.headers["access-control-expose-headers"]


def test_mock_upstream_serves_the_openai_sdk_directly(mock_upstream: Server, chunk_validator: Any) -> None:
    import time

    client = openai.OpenAI(base_url=f"{mock_upstream.url}/v1", api_key="x", max_retries=0)
    chunks = list(
        client.chat.completions.create(
            model="m", messages=MESSAGES, stream=True, extra_body={"mock": {"text": "one two three"}}
        )
    )
    for chunk in chunks:
        chunk_validator.validate(chunk.model_dump(exclude_unset=True))
        assert abs(chunk.created - time.time()) < 60
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "one two three"
