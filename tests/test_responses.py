"""OpenAI Responses through the gateway with the openai SDK's ``responses`` helpers."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from tests.conftest import Server, raw_post

TEXT = "alpha beta gamma delta"


@pytest.fixture
def client(gateway: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=30)


def events_of(body: bytes) -> list[dict[str, Any]]:
    out = []
    for block in body.split(b"\n\n"):
        lines = dict(line.split(b": ", 1) for line in block.split(b"\n") if b": " in line)
        if b"data" in lines:
            data = json.loads(lines[b"data"])
            assert lines[b"event"].decode() == data["type"]
            out.append(data)
    return out


@pytest.mark.parametrize("model", ["demo", "gpt", "claude"])
def test_stream_helper_and_final_response(client: openai.OpenAI, model: str) -> None:
    with client.responses.stream(
        model=model, input="Say the words", instructions="Be brief.", extra_body={"mock": {"text": TEXT}}
    ) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == TEXT and len(deltas) == 4
    assert final.status == "completed"
    assert final.id.startswith("resp_")
    assert final.output_text == TEXT
    assert final.usage is not None and final.usage.output_tokens == 4 and final.usage.input_tokens > 0


def test_function_call_items(client: openai.OpenAI) -> None:
    tools: Any = [{"type": "function", "name": "lookup", "parameters": {"type": "object"}}]
    with client.responses.stream(
        model="gpt",
        input="find it",
        tools=tools,
        extra_body={
            "mock": {"text": "Looking.", "tool_calls": [{"name": "lookup", "arguments": {"q": "x" * 30}}]}
        },
    ) as stream:
        arg_deltas = [e.delta for e in stream if e.type == "response.function_call_arguments.delta"]
        final = stream.get_final_response()
    assert len(arg_deltas) > 1
    assert [item.type for item in final.output] == ["message", "function_call"]
    call = final.output[1]
    assert call.type == "function_call" and call.name == "lookup"
    assert json.loads(call.arguments) == {"q": "x" * 30} and call.call_id


def test_sequence_numbers_and_lifecycle(gateway: Server) -> None:
    body = {
        "model": "demo",
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}],
        "stream": True,
        "mock": {"text": "one two", "tool_calls": [{"name": "f", "arguments": {}}]},
    }
    resp = raw_post(gateway.port, "/v1/responses", body)
    assert resp.status == 200
    events = events_of(resp.body)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    types = [e["type"] for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] == "response.completed"
    assert types[2:6] == [
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
    ]
    assert types[6:9] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ]
    added = [e["output_index"] for e in events if e["type"] == "response.output_item.added"]
    done = [e["output_index"] for e in events if e["type"] == "response.output_item.done"]
    assert added == done == [0, 1]


def test_non_stream(client: openai.OpenAI) -> None:
    resp = client.responses.create(model="claude", input="hi", extra_body={"mock": {"text": TEXT}})
    assert resp.object == "response" and resp.status == "completed"
    assert resp.output_text == TEXT


def test_multi_turn_input_with_function_results(client: openai.OpenAI, mock_upstream: Server) -> None:
    client.responses.create(
        model="gpt",
        input=[
            {"role": "user", "content": "weather?"},
            {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        ],
        extra_body={"mock": {"text": "ok"}},
    )
    sent = mock_upstream.get_json("/mock/stats")["last_request"]["body"]["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool"]
    assert sent[1]["tool_calls"][0]["id"] == "c1" and sent[2]["tool_call_id"] == "c1"


def test_length_limit_is_incomplete(gateway: Server) -> None:
    body = {"model": "demo", "input": "hi", "stream": True, "max_output_tokens": 3, "mock": {"tokens": 10}}
    events = events_of(raw_post(gateway.port, "/v1/responses", body).body)
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


def test_failure_mid_stream(client: openai.OpenAI, gateway: Server) -> None:
    body = {"model": "demo", "input": "hi", "stream": True, "mock": {"text": TEXT, "cut_after": 2}}
    events = events_of(raw_post(gateway.port, "/v1/responses", body).body)
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    assert events[-2]["code"] == "upstream_disconnect"
    assert events[-1]["response"]["status"] == "failed"
    with (
        pytest.raises(RuntimeError, match=r"response\.completed"),
        client.responses.stream(model="demo", input="hi", extra_body={"mock": body["mock"]}) as stream,
    ):
        stream.get_final_response()


def test_errors_before_the_stream(client: openai.OpenAI, gateway: Server) -> None:
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="nope", input="hi")
    resp = raw_post(
        gateway.port, "/v1/responses", {"model": "demo", "input": "hi", "previous_response_id": "r"}
    )
    assert resp.status == 400 and resp.json()["error"]["param"] == "previous_response_id"
    resp = raw_post(gateway.port, "/v1/responses", {"model": "demo", "input": [{"role": "user"}]})
    assert resp.status == 400 and resp.json()["error"]["param"] == "input[0].content"
    resp = raw_post(
        gateway.port, "/v1/responses", {"model": "demo", "input": "x", "tools": [{"type": "web_search"}]}
    )
    assert resp.status == 400 and resp.json()["error"]["param"] == "tools[0].type"
