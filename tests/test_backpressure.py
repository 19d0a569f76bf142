"""A client that stops reading: the stream stops pulling from the model, the client is dropped with a
resumable error once it stalls too long, and it can pick the stream up again where its bytes ended.
Both ways a model's batches reach a session: yielded by the in-process mock, and pushed from the socket
callback by the ``openai`` provider (``flood-up``, the mock served over HTTP)."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.conftest import Server, raw_post, serving, wait_for
from tests.test_resume import chat_text, events, get

FLOOD = {"tokens": 40000, "tokens_per_second": 20000}
BODY = {"model": "flood", "stream": True, "messages": [{"role": "user", "content": "flood me"}]}


@pytest.fixture(scope="module")
def gateway_bp(mock_upstream: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("backpressure")
    config = {
        "server": {
            "max_buffered_events": 200,
            "client_stall_seconds": 4,
            "disconnect_grace_seconds": 30,
        },
        "models": [
            {"name": "flood", "provider": "mock", "options": FLOOD},
            {
                "name": "flood-up",
                "provider": "openai",
                "base_url": f"http://127.0.0.1:{mock_upstream.port}/v1",
                "options": {"body": {"mock": FLOOD}},
            },
            {"name": "demo", "provider": "mock", "options": {"tokens": 12}},
        ],
    }
    with serving(tmp, config) as server:
        yield server


def stats(server: Server) -> dict[str, int]:
    return server.get_json("/stats")  # type: ignore[no-any-return]


@pytest.mark.parametrize("model", ["flood", "flood-up"])
def test_slow_reader_pauses_the_model_then_is_dropped_resumably(
    gateway_bp: Server, tmp_path: Path, model: str
) -> None:
    wait_for(lambda: stats(gateway_bp)["paused_streams"] == 0, timeout=10)  # an earlier case's stream
    evicted = stats(gateway_bp)["evicted_readers"]
    logged = stats(gateway_bp)["log_events"]  # earlier cases' finished streams stay until they expire
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: the server's writes block
    sock.connect(("127.0.0.1", gateway_bp.port))
    body = json.dumps({**BODY, "model": model}).encode()
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body
    )
    # the reader is not reading: once it is 200 events behind, the model is no longer pulled
    wait_for(lambda: stats(gateway_bp)["paused_streams"] == 1, timeout=10)
    # the kernel may still grow the socket's send buffer for a moment (autotuning) and take a little more;
    # then the log stops growing: nothing more is generated while the client does not read
    readings = [stats(gateway_bp)["log_events"]]

    def settled() -> bool:
        time.sleep(0.5)
        readings.append(stats(gateway_bp)["log_events"])
        return readings[-1] == readings[-2]

    wait_for(settled, timeout=15)
    assert readings[-1] - logged < FLOOD["tokens"]  # bounded, far from the whole answer
    assert stats(gateway_bp)["paused_streams"] == 1
    # other streams are not held up by it: one runs to its end while the slow one is still paused
    other = raw_post(gateway_bp.port, "/v1/chat/completions", {**BODY, "model": "demo"})
    assert other.sse_data()[-1] == b"[DONE]"
    assert stats(gateway_bp)["paused_streams"] == 1 and stats(gateway_bp)["evicted_readers"] == evicted
    # stalled for client_stall_seconds: dropped, and the model goes on for the grace period
    wait_for(lambda: stats(gateway_bp)["evicted_readers"] == evicted + 1, timeout=10)
    received = b""
    sock.settimeout(10)
    while not received.endswith(b"0\r\n\r\n"):
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        received += chunk
    sock.close()
    head, _, chunked = received.partition(b"\r\n\r\n")
    stream_id = re.search(rb"x-stream-id: (\S+)", head, re.I).group(1).decode()  # type: ignore[union-attr]
    payload = re.sub(rb"\r\n[0-9a-fA-F]+\r\n", b"", b"\r\n" + chunked)  # undo the chunked framing
    data = [e[b"data"] for e in events(payload)]
    assert data[-1] == b"[DONE]"
    error = json.loads(data[-2])["error"]
    assert error["type"] == "client_too_slow" and error["code"] == "resumable"
    after = int(re.search(r"after=(\d+)", error["message"]).group(1))  # type: ignore[union-attr]
    assert after == len(data) - 2  # one chunk per event before the error
    status, _, rest = get(gateway_bp.port, f"/v1/streams/{stream_id}?after={after}")
    assert status == 200
    whole = raw_post(
        gateway_bp.port, "/v1/chat/completions", {**BODY, "model": model, "stream": False}
    ).json()
    assert (
        chat_text(data[:-2]) + chat_text([e[b"data"] for e in events(rest)])
        == (whole["choices"][0]["message"]["content"])
    )
