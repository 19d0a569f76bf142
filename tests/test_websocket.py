"""The WebSocket protocol (``/v1/ws/chat``) with the ``websockets`` client: multiplexing, cancel, errors."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import pytest
from tests.conftest import Server
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect


def ws_url(gateway: Server) -> str:
    return f"ws://127.0.0.1:{gateway.port}/v1/ws/chat"


def request(rid: str, model: str, mock: dict[str, Any] | None = None) -> str:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    if mock is not None:
        body["mock"] = mock
    return json.dumps({"type": "request", "id": rid, "body": body})


def receive_until_done(ws: ClientConnection, ids: set[str]) -> dict[str, list[dict[str, Any]]]:
    got: dict[str, list[dict[str, Any]]] = defaultdict(list)
    open_ids = set(ids)
    while open_ids:
        msg = json.loads(ws.recv(timeout=15))
        got[msg["id"]].append(msg)
        if msg["type"] in ("done", "error"):
            open_ids.discard(msg["id"])
    return got


@pytest.mark.parametrize("model", ["demo", "gpt", "claude"])
def test_tokens_then_done_with_usage(gateway: Server, model: str) -> None:
    with connect(ws_url(gateway)) as ws:
        ws.send(request("r1", model, {"text": "alpha beta gamma"}))
        got = receive_until_done(ws, {"r1"})["r1"]
    assert "".join(m["text"] for m in got if m["type"] == "token") == "alpha beta gamma"
    assert got[-1]["type"] == "done" and got[-1]["finish_reason"] == "stop"
    assert got[-1]["usage"]["completion_tokens"] == 3


def test_interleaved_requests_and_a_cancel(gateway: Server) -> None:
    before = gateway.mock_cancelled()
    slow = {"tokens": 40, "tokens_per_second": 40}
    with connect(ws_url(gateway)) as ws:
        ws.send(request("a", "demo", slow))
        ws.send(request("b", "demo", {**slow, "tokens": 12}))
        seen: dict[str, list[dict[str, Any]]] = defaultdict(list)
        while len([m for m in seen["a"] if m["type"] == "token"]) < 3:
            msg = json.loads(ws.recv(timeout=10))
            seen[msg["id"]].append(msg)
        ws.send(json.dumps({"type": "cancel", "id": "a"}))
        rest = receive_until_done(ws, {"a", "b"})
    for rid, msgs in rest.items():
        seen[rid].extend(msgs)
    a, b = seen["a"], seen["b"]
    assert a[-1]["type"] == "error" and a[-1]["error"]["type"] == "cancelled"
    assert len([m for m in a if m["type"] == "token"]) < 10  # stopped well before its 40 tokens
    assert b[-1]["type"] == "done"
    assert len("".join(m["text"] for m in b if m["type"] == "token").split()) == 12  # b went on to the end
    gateway.wait_cancelled(before)


def test_tool_calls(gateway: Server) -> None:
    with connect(ws_url(gateway)) as ws:
        ws.send(request("t", "gpt", {"tool_calls": [{"name": "f", "arguments": {"k": "v" * 20}}]}))
        got = receive_until_done(ws, {"t"})["t"]
    calls = [m for m in got if m["type"] == "tool_call"]
    assert calls[0]["name"] == "f" and calls[0]["call_id"]
    assert json.loads("".join(c["arguments"] for c in calls)) == {"k": "v" * 20}
    assert got[-1]["finish_reason"] == "tool_calls"


def test_bad_messages_get_errors_and_the_socket_stays_open(gateway: Server) -> None:
    with connect(ws_url(gateway)) as ws:
        ws.send("{not json")
        err = json.loads(ws.recv(timeout=5))
        assert err["type"] == "error" and err["id"] is None and err["error"]["code"] == "invalid_message"
        ws.send(json.dumps({"type": "request", "id": "x", "body": {"model": "demo", "messages": []}}))
        err = json.loads(ws.recv(timeout=5))
        assert err["id"] == "x" and err["error"]["param"] == "messages"
        ws.send(request("y", "nope"))
        err = json.loads(ws.recv(timeout=5))
        assert err["id"] == "y" and err["error"]["code"] == "model_not_found"
        ws.send(json.dumps({"type": "cancel", "id": "never"}))
        assert json.loads(ws.recv(timeout=5))["error"]["param"] == "id"
        ws.send(json.dumps({"type": "ping"}))
        assert json.loads(ws.recv(timeout=5)) == {"type": "pong"}
        ws.send(request("z", "demo", {"text": "still here"}))
        got = receive_until_done(ws, {"z"})["z"]
        assert got[-1]["type"] == "done"
        ws.send(b"\x00binary")
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=5)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1003


def test_closing_the_socket_cancels_its_streams(gateway: Server) -> None:
    before = gateway.mock_cancelled()
    with connect(ws_url(gateway)) as ws:
        ws.send(request("a", "demo", {"tokens": 100, "tokens_per_second": 50}))
        json.loads(ws.recv(timeout=5))
    gateway.wait_cancelled(before)


def test_unknown_websocket_path_is_refused(gateway: Server) -> None:
    with pytest.raises(InvalidStatus) as info, connect(f"ws://127.0.0.1:{gateway.port}/nope"):
        pass
    assert info.value.response.status_code == 403  # ASGI: a close before accept refuses the handshake
