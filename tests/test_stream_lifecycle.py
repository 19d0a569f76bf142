"""Keep-alives before the first token, cancelling the model when the client leaves, upstream framing."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import openai
import pytest
from tests.conftest import Server, wait_for

MESSAGES: list[Any] = [{"role": "user", "content": "hello"}]


def open_stream(port: int, body: dict[str, Any]) -> socket.socket:
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    return sock


def read_until(sock: socket.socket, marker: bytes, limit: float = 10) -> bytes:
    buf = b""
    deadline = time.monotonic() + limit
    while marker not in buf:
        assert time.monotonic() < deadline, f"no {marker!r} in {buf[-500:]!r}"
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before {marker!r}"
        buf += chunk
    return buf


def test_keepalive_comment_before_slow_first_token(gateway: Server) -> None:
    # "slow" waits 1.6 s for its first token; the test gateway sends keep-alives every 0.5 s
    sock = open_stream(gateway.port, {"model": "slow", "messages": MESSAGES, "stream": True})
    t0 = time.monotonic()
    head = read_until(sock, b": keep-alive")
    assert b"200 OK" in head.split(b"\r\n")[0]
    assert b"data: {" not in head  # the comment came before any token
    assert time.monotonic() - t0 < 1.4
    rest = read_until(sock, b"data: [DONE]")
    assert rest.count(b'"content"') == 3
    sock.close()


def test_sdk_ignores_keepalives(gateway: Server) -> None:
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0)
    chunks = list(client.chat.completions.create(model="slow", messages=MESSAGES, stream=True))
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) == 3


@pytest.mark.parametrize("model", ["demo", "gpt"])
def test_client_disconnect_cancels_the_model(gateway: Server, mock_upstream: Server, model: str) -> None:
    observer = gateway if model == "demo" else mock_upstream
    path = "/mock/stats"

    def cancelled() -> int:
        stats = observer.get_json(path)
        return int((stats[model] if model == "demo" else stats)["cancelled"])

    before = cancelled()
    sock = open_stream(
        gateway.port,
        {
            "model": model,
            "messages": MESSAGES,
            "stream": True,
            "mock": {"tokens": 200, "tokens_per_second": 20},
        },
    )
    read_until(sock, b'"content"')
    sock.close()
    t0 = time.monotonic()
    wait_for(lambda: cancelled() > before, timeout=5)
    assert time.monotonic() - t0 < 2
    stats = observer.get_json(path)
    recent = (stats[model] if model == "demo" else stats)["recent"]
    cancelled_run = [r for r in recent if r["outcome"] == "cancelled"][-1]
    assert cancelled_run["tokens"] < 60  # stopped long before the 200 tokens


def test_disconnect_while_waiting_for_first_token(gateway: Server) -> None:
    before = gateway.get_json("/mock/stats")["slow"]["cancelled"]
    sock = open_stream(gateway.port, {"model": "slow", "messages": MESSAGES, "stream": True})
    time.sleep(0.2)
    sock.close()
    wait_for(lambda: gateway.get_json("/mock/stats")["slow"]["cancelled"] > before, timeout=3)


@pytest.mark.parametrize(
    "wire",
    [{"crlf": True}, {"comments": True}, {"big_event_bytes": 300_000}, {"crlf": True, "comments": True}],
)
def test_upstream_framing_variants(gateway: Server, wire: dict[str, Any]) -> None:
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0)
    plain = client.chat.completions.create(model="gpt", messages=MESSAGES).choices[0].message.content
    chunks = list(
        client.chat.completions.create(model="gpt", messages=MESSAGES, stream=True, extra_body={"mock": wire})
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == plain
    assert chunks[-1].choices[0].finish_reason == "stop"
