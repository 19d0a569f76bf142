"""Ollama's NDJSON API through the gateway with the official ``ollama`` client."""

from __future__ import annotations

import json

import ollama
import pytest
from tests.conftest import Server, raw_post

TEXT = "alpha beta gamma delta"


@pytest.fixture
def client(gateway: Server) -> ollama.Client:
    return ollama.Client(host=gateway.url, timeout=30)


@pytest.mark.parametrize("model", ["demo", "gpt", "claude"])
def test_chat_stream(client: ollama.Client, model: str) -> None:
    parts = list(
        client.chat(
            model=model, messages=[{"role": "user", "content": "hi"}], stream=True, options={"seed": 1}
        )
    )
    # the client sends only Ollama's fields; the mock's default script is deterministic per prompt
    reference = client.chat(model=model, messages=[{"role": "user", "content": "hi"}])
    text = "".join(p.message.content or "" for p in parts)
    assert text == reference.message.content and len(parts) > 3
    assert all(not p.done for p in parts[:-1])
    last = parts[-1]
    assert last.done and last.done_reason == "stop"
    assert last.eval_count == len(text.split()) and last.prompt_eval_count and last.total_duration


def test_ndjson_framing_and_tool_calls(gateway: Server) -> None:
    body = {
        "model": "gpt",
        "messages": [{"role": "user", "content": "hi"}],
        "mock": {"text": TEXT, "tool_calls": [{"name": "f", "arguments": {"a": [1, 2]}}]},
    }
    resp = raw_post(gateway.port, "/api/chat", body)
    assert resp.status == 200 and resp.headers["content-type"] == "application/x-ndjson"
    assert resp.headers["transfer-encoding"] == "chunked"
    lines = [json.loads(line) for line in resp.body.split(b"\n") if line]
    assert resp.body.endswith(b"\n")
    assert "".join(obj["message"]["content"] for obj in lines) == TEXT
    calls = [c for obj in lines for c in obj["message"].get("tool_calls", [])]
    assert [c["function"] for c in calls] == [
        {"name": "f", "arguments": {"a": [1, 2]}}
    ]  # whole, as an object
    assert lines[-1]["done"] is True and all(obj["done"] is False for obj in lines[:-1])


def test_generate_and_non_stream(client: ollama.Client) -> None:
    streamed = "".join(p.response for p in client.generate(model="demo", prompt="hi", stream=True))
    whole = client.generate(model="demo", prompt="hi")
    assert streamed == whole.response and whole.done


def test_list_models(client: ollama.Client) -> None:
    names = [m.model for m in client.list().models]
    assert {"demo", "gpt", "claude", "tiny"} <= set(names)


def test_errors(client: ollama.Client, gateway: Server) -> None:
    with pytest.raises(ollama.ResponseError) as info:
        client.chat(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 404 and "nope" in info.value.error
    body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "mock": {"cut_after": 2}}
    lines = [json.loads(line) for line in raw_post(gateway.port, "/api/chat", body).body.split(b"\n") if line]
    assert len(lines) == 3 and "error" in lines[-1]  # two tokens, then the error line


def test_a_first_token_slower_than_the_keepalive_interval(client: ollama.Client, gateway: Server) -> None:
    """NDJSON has no keep-alive line: a due keep-alive must re-arm, not spin the event loop (it did, and the
    model's tokens never came in)."""
    parts = list(client.chat(model="slow", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert parts[-1].done and "".join(p.message.content or "" for p in parts).strip()
    assert gateway.get_json("/healthz") == {"status": "ok"}
