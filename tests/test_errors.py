"""Errors before the stream (HTTP status + OpenAI error body naming the field) and during it (error event)."""

from __future__ import annotations

import json
import threading
from typing import Any

import openai
import pytest
from tests.conftest import Server, raw_post, validator

MESSAGES: list[Any] = [{"role": "user", "content": "hello"}]


@pytest.fixture
def client(gateway: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=30)


def error_of(resp: Any) -> dict[str, Any]:
    body = resp.json()
    validator("error_response").validate(body)
    assert "Traceback" not in resp.body.decode()
    return dict(body["error"])


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        ({"messages": MESSAGES}, 400, "model"),
        ({"model": "demo"}, 400, "messages"),
        ({"model": "demo", "messages": []}, 400, "messages"),
        ({"model": "demo", "messages": "hi"}, 400, "messages"),
        ({"model": "demo", "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
        ({"model": "demo", "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
        ({"model": "demo", "messages": [{"role": "user"}]}, 400, "messages[0].content"),
        ({"model": "demo", "messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].tool_call_id"),
        ({"model": "demo", "messages": MESSAGES, "temperature": 5}, 400, "temperature"),
        ({"model": "demo", "messages": MESSAGES, "top_p": -0.1}, 400, "top_p"),
        ({"model": "demo", "messages": MESSAGES, "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "demo", "messages": MESSAGES, "stream": "yes"}, 400, "stream"),
        ({"model": "demo", "messages": MESSAGES, "n": 2}, 400, "n"),
        ({"model": "demo", "messages": MESSAGES, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"model": "demo", "messages": MESSAGES, "tool_choice": "required"}, 400, "tool_choice"),
        ({"model": "demo", "messages": MESSAGES, "mock": {"tokens": "many"}}, 400, "mock.tokens"),
        ({"model": "no-such-model", "messages": MESSAGES}, 404, "model"),
    ],
)
def test_bad_requests_name_the_field(gateway: Server, body: Any, status: int, param: str | None) -> None:
    for stream in (False, True):
        if isinstance(body, dict):
            body = {**body, "stream": body.get("stream", stream)}
        resp = raw_post(gateway.port, "/v1/chat/completions", body)
        assert resp.status == status, resp.body
        err = error_of(resp)
        assert err["param"] == param
        assert err["message"]
        assert err["type"] == "invalid_request_error"
        if param:
            assert param.split(".")[-1].split("[")[0] in err["message"]


def test_body_over_limit_is_413(gateway: Server, client: openai.OpenAI) -> None:
    huge = {"model": "demo", "messages": [{"role": "user", "content": "x" * 1_200_000}]}
    for _ in range(3):  # the client is still sending when the gateway decides: it must see the 413
        resp = raw_post(gateway.port, "/v1/chat/completions", huge)
        assert resp.status == 413
        assert error_of(resp)["code"] == "request_too_large"
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="demo", messages=huge["messages"], stream=True)  # type: ignore[arg-type]
    assert info.value.status_code == 413


def test_unknown_path_and_method(gateway: Server) -> None:
    assert raw_post(gateway.port, "/v1/nothing", {}).status == 404
    assert raw_post(gateway.port, "/v1/models", {}).status == 405


def test_sdk_sees_status_errors_before_the_stream(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="nope", messages=MESSAGES, stream=True)
    assert nf.value.code == "model_not_found" and nf.value.param == "model"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="demo", messages=MESSAGES, stream=True, temperature=9)
    assert bad.value.param == "temperature"


@pytest.mark.parametrize("model", ["demo", "gpt"])
@pytest.mark.parametrize(
    ("status", "exc"),
    [(503, openai.InternalServerError), (429, openai.RateLimitError), (400, openai.BadRequestError)],
)
def test_upstream_http_errors_keep_their_meaning(
    client: openai.OpenAI, model: str, status: int, exc: type[Exception]
) -> None:
    mock = {"error_status": status, "error_message": "injected failure", "retry_after": 7}
    with pytest.raises(exc) as info:
        client.chat.completions.create(model=model, messages=MESSAGES, stream=True, extra_body={"mock": mock})
    err: Any = info.value
    assert err.status_code == status
    assert "injected failure" in err.message
    if status == 429:
        assert err.response.headers["retry-after"] == "7"


def test_upstream_auth_failure_is_a_gateway_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(
            model="gpt", messages=MESSAGES, extra_body={"mock": {"error_status": 401}}
        )
    assert info.value.status_code == 502  # the client's own key was fine; the gateway's upstream key was not
    assert info.value.type == "upstream_auth_error"  # type: ignore[attr-defined]


def test_unreachable_upstream_is_502(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="nowhere", messages=MESSAGES, stream=True)
    assert info.value.status_code == 502
    assert info.value.type == "upstream_unavailable"  # type: ignore[attr-defined]


@pytest.mark.parametrize("model", ["demo", "gpt"])
@pytest.mark.parametrize(
    ("fault", "etype"), [("cut_after", "upstream_disconnect"), ("malformed_after", "upstream_error")]
)
def test_errors_during_the_stream(client: openai.OpenAI, model: str, fault: str, etype: str) -> None:
    stream = client.chat.completions.create(
        model=model, messages=MESSAGES, stream=True, extra_body={"mock": {fault: 3, "tokens_per_second": 200}}
    )
    got = []
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            got.append(chunk.choices[0].delta.content)
    assert len(got) == 3  # the tokens before the fault arrived, then a machine-readable error
    assert info.value.type == etype
    assert not isinstance(info.value, openai.APIStatusError)


def test_mid_stream_error_wire_format(gateway: Server) -> None:
    body = {"model": "gpt", "messages": MESSAGES, "stream": True, "mock": {"cut_after": 2}}
    resp = raw_post(gateway.port, "/v1/chat/completions", body)
    assert resp.status == 200
    payloads = resp.sse_data()
    assert payloads[-1] == b"[DONE]"
    err = json.loads(payloads[-2])
    validator("error_response").validate(err)
    assert err["error"]["type"] == "upstream_disconnect"
    assert not any(b'finish_reason":"stop' in p for p in payloads)  # never a clean-looking end


def test_truncated_upstream_is_not_success(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="gpt", messages=MESSAGES, stream=True, extra_body={"mock": {"no_done": True}}
    )
    with pytest.raises(openai.APIError) as info:
        list(stream)
    assert info.value.type == "upstream_disconnect"
    assert "[DONE]" in info.value.message


def test_first_token_timeout(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="gpt-timeout", messages=MESSAGES, stream=True, extra_body={"mock": {"first_token_ms": 5000}}
    )
    with pytest.raises(openai.APIError) as info:
        list(stream)
    assert info.value.type == "timeout" and "first-token" in info.value.message


def test_idle_timeout(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="gpt-timeout",
        messages=MESSAGES,
        stream=True,
        extra_body={"mock": {"stall_after": 2, "stall_ms": 5000, "tokens_per_second": 100}},
    )
    got = []
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            got.append(chunk.choices[0].delta.content)
    assert len(got) == 2
    assert info.value.type == "timeout" and "idle" in info.value.message


def test_bad_requests_do_not_harm_other_streams(gateway: Server, client: openai.OpenAI) -> None:
    expected = (
        client.chat.completions.create(model="demo", messages=MESSAGES, extra_body={"mock": {"tokens": 40}})
        .choices[0]
        .message.content
    )
    result: dict[str, str] = {}

    def long_stream() -> None:
        chunks = client.chat.completions.create(
            model="demo",
            messages=MESSAGES,
            stream=True,
            extra_body={"mock": {"tokens": 40, "tokens_per_second": 40}},
        )
        result["text"] = "".join(c.choices[0].delta.content or "" for c in chunks)

    worker = threading.Thread(target=long_stream)
    worker.start()
    garbage: list[Any] = [
        b"\x00\xff" * 100,
        b"{" * 10000,
        {"model": "demo", "messages": [{"role": "user"}]},
        {"model": "demo", "messages": MESSAGES, "mock": {"error_status": 500}},
    ]
    for _ in range(5):
        for body in garbage:
            assert raw_post(gateway.port, "/v1/chat/completions", body).status >= 400
    worker.join(30)
    assert result["text"] == expected
    assert gateway.proc.poll() is None
