"""Anthropic Messages in (the anthropic SDK, both auth styles) and out (the ``anthropic`` provider)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Any

import anthropic
import openai
import pytest
from tests.conftest import ROOT, Server, raw_post

LEGACY_SDK = ROOT / ".venv" / "legacy" / "anthropic-1.17.0"
TEXT = "alpha beta gamma delta"
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Weather for a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}


@pytest.fixture
def claude(gateway: Server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.url, api_key="unused", max_retries=0, timeout=30)


def sse_events(body: bytes) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for block in body.split(b"\n\n"):
        lines = dict(line.split(b": ", 1) for line in block.split(b"\n") if b": " in line)
        if b"event" in lines:
            out.append((lines[b"event"].decode(), json.loads(lines[b"data"])))
    return out


@pytest.mark.parametrize("model", ["demo", "gpt", "claude"])
def test_sdk_stream_text_and_final_message(claude: anthropic.Anthropic, model: str) -> None:
    with claude.messages.stream(
        model=model,
        max_tokens=100,
        system="Be brief.",
        messages=[{"role": "user", "content": "Say the words"}],
        extra_body={"mock": {"text": TEXT}},
    ) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(pieces) == TEXT
    assert len(pieces) == 4  # token by token, not one block at the end
    assert final.id.startswith("msg_")
    assert final.stop_reason == "end_turn"
    assert [b.type for b in final.content] == ["text"]
    assert final.content[0].text == TEXT  # type: ignore[union-attr]
    assert final.usage.output_tokens == 4
    assert final.usage.input_tokens > 0


@pytest.mark.parametrize("model", ["demo", "gpt", "claude"])
def test_sdk_tool_use_streams_input_json(claude: anthropic.Anthropic, model: str) -> None:
    args = {"city": "Paris", "unit": "celsius"}
    with claude.messages.stream(
        model=model,
        max_tokens=100,
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        messages=[{"role": "user", "content": "Weather?"}],
        extra_body={
            "mock": {"text": "Let me check.", "tool_calls": [{"name": "get_weather", "arguments": args}]}
        },
    ) as stream:
        partials = [e.partial_json for e in stream if e.type == "input_json"]  # type: ignore[union-attr]
        final = stream.get_final_message()
    assert len(partials) > 1  # arguments arrive in fragments
    assert final.stop_reason == "tool_use"
    assert [b.type for b in final.content] == ["text", "tool_use"]
    tool = final.content[1]
    assert tool.type == "tool_use" and tool.name == "get_weather" and tool.input == args
    assert tool.id


def test_non_stream_message(claude: anthropic.Anthropic) -> None:
    msg = claude.messages.create(
        model="demo",
        max_tokens=50,
        messages=[{"role": "user", "content": "hi"}],
        extra_body={"mock": {"text": TEXT}},
    )
    assert msg.type == "message" and msg.role == "assistant"
    assert msg.content[0].text == TEXT  # type: ignore[union-attr]
    assert msg.stop_reason == "end_turn"


def test_event_order_and_block_indices(gateway: Server) -> None:
    body = {
        "model": "demo",
        "max_tokens": 50,
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [WEATHER_TOOL],
        "mock": {
            "text": "one two",
            "tool_calls": [
                {"name": "get_weather", "arguments": {"city": "Oslo"}},
                {"name": "get_weather", "arguments": {"city": "Rome"}},
            ],
        },
    }
    resp = raw_post(gateway.port, "/anthropic/v1/messages", body, {"anthropic-version": "2099-01-01"})
    assert resp.status == 200 and resp.headers["content-type"].startswith("text/event-stream")
    events = sse_events(resp.body)
    assert all(name == data["type"] for name, data in events)
    names = [n for n, _ in events if n != "ping"]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    starts = [d for n, d in events if n == "content_block_start"]
    assert [s["index"] for s in starts] == [0, 1, 2]
    assert [s["content_block"]["type"] for s in starts] == ["text", "tool_use", "tool_use"]
    # every block closes before the next opens
    open_block = None
    for name, data in events:
        if name == "content_block_start":
            assert open_block is None
            open_block = data["index"]
        elif name == "content_block_delta":
            assert data["index"] == open_block
        elif name == "content_block_stop":
            assert data["index"] == open_block
            open_block = None
    delta = next(d for n, d in events if n == "message_delta")
    assert delta["delta"]["stop_reason"] == "tool_use"
    assert delta["usage"]["output_tokens"] > 0


def test_keepalive_is_a_ping_event_after_message_start(gateway: Server) -> None:
    body = {
        "model": "slow",
        "max_tokens": 10,
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
    }
    events = sse_events(raw_post(gateway.port, "/v1/messages", body).body)
    names = [n for n, _ in events]
    assert names[0] == "message_start"
    assert names[1] == "ping"  # the first token is 1.6 s away; keep-alives every 0.5 s
    assert names[-1] == "message_stop"


def test_errors_before_the_stream_use_anthropic_bodies(claude: anthropic.Anthropic, gateway: Server) -> None:
    with pytest.raises(anthropic.NotFoundError) as info:
        claude.messages.create(model="nope", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert info.value.body["type"] == "error"  # type: ignore[index]
    assert info.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]

    resp = raw_post(
        gateway.port, "/v1/messages", {"model": "demo", "messages": [{"role": "user", "content": "x"}]}
    )
    assert resp.status == 400
    err = resp.json()
    assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in err["error"]["message"] and err["error"]["param"] == "max_tokens"

    resp = raw_post(
        gateway.port,
        "/v1/messages",
        {"model": "demo", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "text"}]}]},
    )
    assert resp.status == 400 and resp.json()["error"]["param"] == "messages[0].content[0].text"

    overloaded = {"mock": {"error_status": 529, "error_message": "busy"}}
    with pytest.raises(anthropic.OverloadedError):  # the mock model's own status
        claude.messages.create(
            model="demo", max_tokens=5, messages=[{"role": "user", "content": "hi"}], extra_body=overloaded
        )
    with pytest.raises(anthropic.InternalServerError) as info2:  # an upstream's 529 is our 503
        claude.messages.create(
            model="claude", max_tokens=5, messages=[{"role": "user", "content": "hi"}], extra_body=overloaded
        )
    assert info2.value.status_code == 503
    assert info2.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]


def test_error_mid_stream_is_an_error_event(claude: anthropic.Anthropic) -> None:
    got: list[str] = []
    with (
        pytest.raises(anthropic.APIStatusError) as info,
        claude.messages.stream(
            model="demo",
            max_tokens=50,
            messages=[{"role": "user", "content": "hi"}],
            extra_body={"mock": {"text": TEXT, "cut_after": 2}},
        ) as stream,
    ):
        for text in stream.text_stream:
            got.append(text)
    assert got == ["alpha ", "beta "]  # what came before the failure, then the error
    assert info.value.body["error"]["type"] == "api_error"  # type: ignore[index]
    assert "before it finished" in info.value.body["error"]["message"]  # type: ignore[index]


def test_legacy_sdk_with_x_api_key(gateway: Server) -> None:
    """anthropic 1.x sends x-api-key and anthropic-version 2023-06-01 (2.x sends Bearer)."""
    script = textwrap.dedent(
        f"""
        import anthropic, json
        assert anthropic.__version__ == "1.17.0", anthropic.__version__
        c = anthropic.Anthropic(base_url="{gateway.url}", api_key="k", max_retries=0)
        with c.messages.stream(model="claude", max_tokens=20, messages=[{{"role": "user", "content": "hi"}}],
                               extra_body={{"mock": {{"text": "{TEXT}"}}}}) as s:
            text = "".join(s.text_stream)
            final = s.get_final_message()
        print(json.dumps({{"text": text, "stop": final.stop_reason}}))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(LEGACY_SDK)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"text": TEXT, "stop": "end_turn"}


# --------------------------------------------------------------------------- the anthropic provider


def test_provider_translates_the_request(gateway: Server, mock_upstream: Server) -> None:
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)
    client.chat.completions.create(
        model="claude",
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    },
                    {
                        "id": "c2",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            {"role": "tool", "tool_call_id": "c2", "content": "rain"},
        ],
        tools=[
            {
                "type": "function",
                "function": {"name": "get_weather", "parameters": WEATHER_TOOL["input_schema"]},
            }
        ],
        tool_choice="required",
        parallel_tool_calls=False,
        stop=["END"],
        temperature=1.5,
        extra_body={"mock": {"text": "ok"}},
    )
    seen = mock_upstream.get_json("/mock/stats")["last_request"]
    assert seen["protocol"] == "anthropic"
    assert seen["x-api-key"] == "sk-ant-test" and seen["anthropic-version"] == "2023-06-01"
    body = seen["body"]
    assert body["model"] == "claude-test" and body["stream"] is True
    assert body["max_tokens"] == 333  # the deployment's default: Anthropic requires one
    assert body["system"] == "You are terse."
    assert [t["role"] for t in body["messages"]] == ["user", "assistant", "user"]
    assert body["messages"][1]["content"] == [
        {"type": "tool_use", "id": "c1", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "c2", "name": "get_weather", "input": {"city": "Rome"}},
    ]
    assert body["messages"][2]["content"] == [  # parallel results share one user turn
        {"type": "tool_result", "tool_use_id": "c1", "content": "sunny"},
        {"type": "tool_result", "tool_use_id": "c2", "content": "rain"},
    ]
    assert body["tools"] == [{"name": "get_weather", "input_schema": WEATHER_TOOL["input_schema"]}]
    assert body["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    assert body["stop_sequences"] == ["END"]
    assert body["temperature"] == 1.0  # clamped to Anthropic's range


def test_provider_stream_through_openai_sdk(gateway: Server) -> None:
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)
    chunks = list(
        client.chat.completions.create(
            model="claude",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"mock": {"text": TEXT, "tool_calls": [{"name": "f", "arguments": {"x": 1}}]}},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == TEXT
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert calls[0].function.name == "f" and calls[0].id
    assert json.loads("".join(tc.function.arguments or "" for tc in calls)) == {"x": 1}
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["tool_calls"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


@pytest.mark.parametrize(
    ("mock", "error_type"),
    [({"cut_after": 2}, "upstream_disconnect"), ({"malformed_after": 1}, "upstream_error")],
)
def test_provider_upstream_faults_mid_stream(gateway: Server, mock: dict[str, Any], error_type: str) -> None:
    body = {"model": "claude", "messages": [{"role": "user", "content": "hi"}], "stream": True, "mock": mock}
    resp = raw_post(gateway.port, "/v1/chat/completions", body)
    data = resp.sse_data()
    assert data[-1] == b"[DONE]"
    assert json.loads(data[-2])["error"]["type"] == error_type


def test_provider_upstream_error_status(gateway: Server) -> None:
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(
            model="claude",
            messages=[{"role": "user", "content": "hi"}],
            extra_body={"mock": {"error_status": 429, "error_message": "slow down", "retry_after": 3}},
        )
    assert "slow down" in str(info.value)
    assert info.value.response.headers["retry-after"] == "3"


@pytest.mark.parametrize("model", ["demo", "gpt", "claude"])
def test_thinking_blocks_pass_through(claude: anthropic.Anthropic, model: str) -> None:
    with claude.messages.stream(
        model=model,
        max_tokens=100,
        messages=[{"role": "user", "content": "hi"}],
        extra_body={"mock": {"reasoning": "first I think", "text": TEXT}},
    ) as stream:
        thinking = [e.thinking for e in stream if e.type == "thinking"]  # type: ignore[union-attr]
        final = stream.get_final_message()
    assert "".join(thinking) == "first I think"
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == "first I think"  # type: ignore[union-attr]
    assert final.content[1].text == TEXT  # type: ignore[union-attr]
