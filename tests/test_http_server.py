"""The built-in HTTP/1.1 server (transport/server.py, ``--server builtin``) on raw sockets: what SDKs rarely
send but clients and proxies do (chunked bodies, 100-continue, pipelining, HTTP/1.0), and what it refuses."""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import Server, serving
from websockets.sync.client import connect


@pytest.fixture(scope="module")
def gateway(mock_upstream: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    config = {
        "models": [
            {"name": "demo", "provider": "mock"},
            {"name": "up", "provider": "openai", "base_url": f"http://127.0.0.1:{mock_upstream.port}/v1"},
        ]
    }
    tmp: Path = tmp_path_factory.mktemp("builtin")
    with serving(tmp, config, args=("--server", "builtin")) as server:
        yield server


MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]


def chat_body(**extra: Any) -> bytes:
    return json.dumps({"model": "demo", "messages": MESSAGES, **extra}).encode()


def read_response(sock: socket.socket, buf: bytearray) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """One response from ``sock`` (content-length or chunked), leaving what follows it in ``buf``."""

    def fill() -> None:
        data = sock.recv(65536)
        assert data, "connection closed early"
        buf.extend(data)

    while b"\r\n\r\n" not in buf:
        fill()
    end = buf.index(b"\r\n\r\n")
    head = bytes(buf[:end]).split(b"\r\n")
    del buf[: end + 4]
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(b":") for line in head[1:])}
    body = bytearray()
    if b"content-length" in headers:
        n = int(headers[b"content-length"])
        while len(buf) < n:
            fill()
        body += buf[:n]
        del buf[:n]
    elif headers.get(b"transfer-encoding") == b"chunked":
        while True:
            while b"\r\n" not in buf:
                fill()
            line_end = buf.index(b"\r\n")
            size = int(bytes(buf[:line_end]), 16)
            while len(buf) < line_end + 2 + size + 2:
                fill()
            body += buf[line_end + 2 : line_end + 2 + size]
            del buf[: line_end + 2 + size + 2]
            if size == 0:
                break
    return head[0], headers, bytes(body)


def connection(gateway: Server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", gateway.port), timeout=10)


def test_chunked_request_body(gateway: Server) -> None:
    body = chat_body()
    pieces = [body[:7], body[7:30], body[30:]]
    chunked = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\nx-trailer: 1\r\n\r\n"
    with connection(gateway) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"transfer-encoding: chunked\r\n\r\n" + chunked
        )
        status, _, answer = read_response(sock, bytearray())
    assert status == b"HTTP/1.1 200 OK"
    assert json.loads(answer)["choices"][0]["message"]["content"]


def test_expect_100_continue(gateway: Server) -> None:
    body = chat_body()
    with connection(gateway) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"expect: 100-continue\r\ncontent-length: %d\r\n\r\n" % len(body)
        )
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"  # before the body is sent
        sock.sendall(body)
        status, _, answer = read_response(sock, bytearray())
    assert status == b"HTTP/1.1 200 OK" and json.loads(answer)["object"] == "chat.completion"


def test_pipelined_requests_answer_in_order(gateway: Server) -> None:
    one = chat_body(mock={"text": "first answer"})
    two = chat_body(mock={"text": "second answer"}, stream=True)
    request = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s"
    with connection(gateway) as sock:
        sock.sendall(request % (len(one), one) + request % (len(two), two) + b"GET /healthz HTTP/1.1\r\n\r\n")
        buf = bytearray()
        _, _, first = read_response(sock, buf)
        _, headers, second = read_response(sock, buf)
        _, _, third = read_response(sock, buf)
    assert json.loads(first)["choices"][0]["message"]["content"] == "first answer"
    assert headers[b"content-type"].startswith(b"text/event-stream")
    text = "".join(
        c["delta"].get("content") or ""
        for line in second.split(b"\n")
        if line.startswith(b"data: {")
        for c in json.loads(line[6:])["choices"]
    )
    assert text == "second answer" and second.rstrip().endswith(b"data: [DONE]")
    assert json.loads(third) == {"status": "ok"}


def test_http10_closes_after_the_answer(gateway: Server) -> None:
    with connection(gateway) as sock:
        sock.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        status, headers, _body = read_response(sock, bytearray())
        assert status == b"HTTP/1.1 200 OK" and headers[b"connection"] == b"close"
        assert sock.recv(10) == b""  # closed by the server


def test_unparseable_requests_get_a_json_error_and_a_close(gateway: Server) -> None:
    cases = [
        (b"NONSENSE\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nbad header line\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nx-big: " + b"a" * 70_000 + b"\r\n\r\n", b"431"),
        (b"POST /v1/chat/completions HTTP/1.1\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n", b"400"),
    ]
    for raw, code in cases:
        with connection(gateway) as sock:
            sock.sendall(raw)
            status, _headers, body = read_response(sock, bytearray())
            assert status.split(b" ")[1] == code, (raw[:40], status)
            assert json.loads(body)["error"]["type"] == "invalid_request_error"
            assert sock.recv(10) == b""
    # and the server goes on serving
    with connection(gateway) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")
        assert read_response(sock, bytearray())[0] == b"HTTP/1.1 200 OK"


def test_websocket_fragmented_message(gateway: Server) -> None:
    with connect(f"ws://127.0.0.1:{gateway.port}/v1/ws/chat") as ws:
        ws.send(['{"type":', ' "ping"}'])  # one text message in two frames
        assert json.loads(ws.recv(timeout=5)) == {"type": "pong"}


def test_upstream_stream_takes_the_push_lane_and_direct_writes(gateway: Server) -> None:
    """From an ``openai`` upstream, chunks after the first go from the upstream socket's callback into the
    session and on to the client's socket with no task wake-up (providers/base.py, session.py); the
    client gets the same stream as the whole answer, in order, on one keep-alive connection."""
    before = gateway.get_json("/stats")
    mock = {"tokens": 40, "tokens_per_second": 100}  # one chunk per upstream read, even on a busy machine
    streamed = json.dumps({"model": "up", "messages": MESSAGES, "stream": True, "mock": mock}).encode()
    whole = json.dumps({"model": "up", "messages": MESSAGES, "mock": mock}).encode()
    request = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s"
    with connection(gateway) as sock:
        buf = bytearray()
        sock.sendall(request % (len(streamed), streamed))
        _, _, stream = read_response(sock, buf)
        sock.sendall(request % (len(whole), whole))
        _, _, answer = read_response(sock, buf)
    chunks = [json.loads(line[6:]) for line in stream.split(b"\n") if line.startswith(b"data: {")]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == json.loads(answer)["choices"][0]["message"]["content"] and text
    assert stream.rstrip().endswith(b"data: [DONE]")
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    after = gateway.get_json("/stats")
    pushed = after["pushed_batches"] - before["pushed_batches"]
    direct = after["direct_writes"] - before["direct_writes"]
    # both requests' later chunks were pushed; the streamed one's went straight to the socket, the whole
    # one's were absorbed until the end (80 chunks in all; a busy machine may bring two in one read)
    assert pushed >= 40 and direct >= 20, (pushed, direct)


def test_connections_past_the_descriptor_cap_wait_in_the_accept_queue(tmp_path: Path) -> None:
    """With 300 open files the server takes (300 - 256) / 2 = 22 connections at once; the rest wait in
    the kernel's accept queue and are served as streams finish: every one completes, none fails, and
    most of them wait at least one half-second stream for their response to start."""
    import resource
    import subprocess
    import sys
    import threading
    import time

    from tests.conftest import free_port, stop, wait_http

    config = {
        "server": {"backlog": 16},
        "models": [{"name": "demo", "provider": "mock", "options": {"tokens": 8, "tokens_per_second": 16}}],
    }
    cfg = tmp_path / "capped.yaml"
    cfg.write_text(json.dumps(config))
    port = free_port()

    def low_nofile() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (300, 300))

    log = (tmp_path / "capped.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenrelay", "serve", "--config", str(cfg), "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={
            **__import__("os").environ,
            "TOKENRELAY_HTTP_SERVER": "builtin",
            "TOKENRELAY_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'capped.db'}",
        },
        preexec_fn=low_nofile,
    )
    try:
        wait_http("127.0.0.1", port, "/readyz", proc, 60)
        body = json.dumps({"model": "demo", "messages": MESSAGES, "stream": True}).encode()
        results: list[tuple[float, bytes]] = []

        def one() -> None:
            t0 = time.perf_counter()  # before connecting: past the accept queue, the SYN itself waits
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                sock.sendall(
                    b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s"
                    % (len(body), body)
                )
                first = sock.recv(65536)
                waited = time.perf_counter() - t0
                _, _, stream = read_response(sock, bytearray(first))
                results.append((waited, stream))

        threads = [threading.Thread(target=one) for _ in range(60)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        stop(proc)
        log.close()
    assert len(results) == 60
    assert all(stream.rstrip().endswith(b"data: [DONE]") for _, stream in results)
    queued = sum(1 for waited, _ in results if waited > 0.4)
    assert queued >= 30, sorted(round(w, 2) for w, _ in results)


def data_segments_in(sock: socket.socket) -> int:
    """Segments with data this socket has received (Linux ``tcp_info.tcpi_data_segs_in``, since 4.6)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return int.from_bytes(info[152:156], "little")


def test_a_streamed_head_goes_with_a_first_token_that_is_ready_and_alone_when_it_is_not(
    gateway: Server,
) -> None:
    """A stream whose first token is already there when its head is sent: head and token in one write (one
    segment: the client wakes once); a slow first token: the head goes out at once, on its own (a client's
    first-token timer starts at the head)."""
    import time

    def first_segments(first_token_ms: int) -> tuple[int, bytes, float]:
        body = chat_body(stream=True, mock={"first_token_ms": first_token_ms, "tokens_per_second": 2})
        with socket.create_connection(("127.0.0.1", gateway.port)) as sock:
            t0 = time.monotonic()
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(body), body)
            )
            first = sock.recv(65536)
            waited = time.monotonic() - t0
            time.sleep(0.2)  # the second token is 500 ms away: anything more now came as its own write
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                first += sock.recv(65536)
            return data_segments_in(sock), first, waited

    segments, data, _ = first_segments(0)
    assert data.startswith(b"HTTP/1.1 200") and b'"content":' in data, data
    assert segments == 1, segments
    segments, data, waited = first_segments(1500)
    assert data.startswith(b"HTTP/1.1 200") and b"data:" not in data and waited < 1.0, (data, waited)
    assert segments == 1, segments
