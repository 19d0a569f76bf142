"""Fast fake OpenAI-compatible upstream for streaming benchmarks.

A raw asyncio ``Protocol`` HTTP/1.1 server (uvloop when available) that answers
``POST /v1/chat/completions``. With ``"stream": true`` it streams ``--tokens`` chunks
(or the request's ``max_tokens``) ``--interval-ms`` apart as Server-Sent Events in
OpenAI's ``chat.completion.chunk`` shape, framed with chunked transfer-encoding:

* at request time: the role chunk (``delta.role = "assistant"``) and the first token;
* then one token chunk per interval;
* with the last token: the ``finish_reason: "stop"`` chunk, an optional usage chunk
  (``stream_options.include_usage``) and ``data: [DONE]``.

A request whose ``model`` starts with ``paced`` is streamed ``--paced-interval-ms`` apart instead
(default 1,000: one token per second, the "paced" profile of the scale benchmark), so one upstream
serves the fast and the paced profiles through every relay unchanged.

Non-stream requests get a small JSON completion. Keep-alive and pipelined requests are
supported (requests on one connection are answered in order). ``GET /health``,
``/readyz`` and ``/v1/models`` exist for readiness probes.

Timing modes (``--mode``), measured in benchmarks/README.md:

* ``wheel`` (default): one timer per distinct millisecond of due time; every stream due
  in that millisecond is written by the same callback (a coalescing timer wheel);
* ``timer``: one ``loop.call_at`` per stream and chunk;
* ``coro``: one coroutine per stream sleeping with ``asyncio.sleep``.

Run: ``python benchmarks/fake_upstream.py --port 9000 [--tokens 50 --interval-ms 20]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import resource
import signal
import socket
import sys
import time
from typing import Any

try:
    import uvloop
except ImportError:  # pragma: no cover - the benchmark venv has uvloop
    uvloop = None  # type: ignore[assignment]

MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 16 * 1024 * 1024

_STATUS_TEXT = {
    200: b"OK",
    400: b"Bad Request",
    404: b"Not Found",
    405: b"Method Not Allowed",
    413: b"Payload Too Large",
    431: b"Request Header Fields Too Large",
    501: b"Not Implemented",
}


def _frame(payload: bytes) -> bytes:
    """Wrap one SSE payload (``data: ...\\n\\n``) as an HTTP chunk."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


class Config:
    """Server-wide settings shared by every connection."""

    def __init__(
        self, tokens: int, interval_s: float, mode: str, token_text: str, paced_interval_s: float = 1.0
    ) -> None:
        self.tokens = tokens
        self.interval_s = interval_s
        self.paced_interval_s = paced_interval_s
        self.mode = mode
        self.token_text = token_text
        self.counter = 0
        self.streams_started = 0
        self.streams_finished = 0
        self.chunks_sent = 0


class Stream:
    """One streaming response in flight on a connection."""

    __slots__ = ("closed", "conn", "interval_s", "next_due", "remaining", "tail", "token_chunk")

    def __init__(
        self, conn: Conn, remaining: int, next_due: float, token_chunk: bytes, tail: bytes, interval_s: float
    ) -> None:
        self.conn = conn
        self.interval_s = interval_s
        self.remaining = remaining  # token chunks still to send
        self.next_due = next_due
        self.token_chunk = token_chunk  # framed chunk for one token
        self.tail = tail  # framed finish (+usage) chunk, [DONE] and the last chunk
        self.closed = False


class Wheel:
    """Coalescing timer: one loop timer per due millisecond, serving every stream due then."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.buckets: dict[int, list[Stream]] = {}

    def schedule(self, stream: Stream) -> None:
        key = math.ceil(stream.next_due * 1000.0)
        bucket = self.buckets.get(key)
        if bucket is None:
            self.buckets[key] = [stream]
            self.loop.call_at(key / 1000.0, self._fire, key)
        else:
            bucket.append(stream)

    def _fire(self, key: int) -> None:
        streams = self.buckets.pop(key, ())
        for stream in streams:
            if stream.closed:
                continue
            if _emit(stream):
                stream.next_due += stream.interval_s
                self.schedule(stream)


def _emit(stream: Stream) -> bool:
    """Write the next token of ``stream``; return True while more tokens remain."""
    conn = stream.conn
    stream.remaining -= 1
    conn.cfg.chunks_sent += 1
    if stream.remaining > 0:
        conn.transport.write(stream.token_chunk)
        return True
    conn.transport.write(stream.token_chunk + stream.tail)
    stream.closed = True
    conn.finish_stream()
    return False


class Conn(asyncio.Protocol):
    """HTTP/1.1 server connection: Content-Length request bodies, chunked streaming responses."""

    def __init__(self, cfg: Config, wheel: Wheel) -> None:
        self.cfg = cfg
        self.wheel = wheel
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.buf = bytearray()
        self.stream: Stream | None = None
        self.keep_alive = True
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.stream is not None:
            self.stream.closed = True
            self.stream = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.stream is None:
            self._process()

    # -- request parsing -------------------------------------------------------------------------
    def _process(self) -> None:
        while self.stream is None and not self.lost:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > MAX_HEADER_BYTES:
                    self._simple(431, b'{"error":"headers too large"}', close=True)
                return
            head = bytes(self.buf[:end]).decode("latin-1")
            lines = head.split("\r\n")
            try:
                method, target, version = lines[0].split(" ", 2)
            except ValueError:
                self._simple(400, b'{"error":"bad request line"}', close=True)
                return
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            if "chunked" in headers.get("transfer-encoding", "").lower():
                self._simple(501, b'{"error":"chunked request bodies are not supported"}', close=True)
                return
            try:
                length = int(headers.get("content-length", "0"))
            except ValueError:
                self._simple(400, b'{"error":"bad content-length"}', close=True)
                return
            if length > MAX_BODY_BYTES:
                self._simple(413, b'{"error":"body too large"}', close=True)
                return
            if len(self.buf) < end + 4 + length:
                return
            body = bytes(self.buf[end + 4 : end + 4 + length])
            del self.buf[: end + 4 + length]
            connection = headers.get("connection", "").lower()
            if version == "HTTP/1.0":
                self.keep_alive = "keep-alive" in connection
            else:
                self.keep_alive = "close" not in connection
            self._handle(method, target.split("?", 1)[0], body)

    # -- responses -------------------------------------------------------------------------------
    def _simple(self, status: int, body: bytes, close: bool = False) -> None:
        if close:
            self.keep_alive = False
        head = b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n" % (
            status,
            _STATUS_TEXT.get(status, b"Unknown"),
            len(body),
            b"" if self.keep_alive else b"Connection: close\r\n",
        )
        self.transport.write(head + body)
        if not self.keep_alive:
            self.transport.close()
            self.lost = True

    def _handle(self, method: str, path: str, body: bytes) -> None:
        if path in ("/health", "/healthz", "/readyz"):
            self._simple(200, b'{"status":"ok"}')
            return
        if path == "/v1/models":
            self._simple(200, b'{"object":"list","data":[{"id":"bench","object":"model","owned_by":"fake"}]}')
            return
        if path != "/v1/chat/completions":
            self._simple(404, b'{"error":{"message":"not found","type":"invalid_request_error"}}')
            return
        if method != "POST":
            self._simple(405, b'{"error":{"message":"method not allowed","type":"invalid_request_error"}}')
            return
        try:
            req = json.loads(body) if body else {}
            if not isinstance(req, dict):
                raise ValueError("body is not an object")
        except ValueError:
            self._simple(400, b'{"error":{"message":"invalid JSON body","type":"invalid_request_error"}}')
            return
        cfg = self.cfg
        tokens = req.get("max_tokens") or req.get("max_completion_tokens") or cfg.tokens
        try:
            tokens = max(1, int(tokens))
        except (TypeError, ValueError):
            tokens = cfg.tokens
        model = str(req.get("model") or "bench")
        cfg.counter += 1
        cid = f"chatcmpl-{os.getpid()}-{cfg.counter}"
        created = int(time.time())
        if req.get("stream"):
            opts = req.get("stream_options")
            usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
            self._start_stream(cid, created, model, tokens, usage)
        else:
            self._complete(cid, created, model, tokens)

    def _complete(self, cid: str, created: int, model: str, tokens: int) -> None:
        text = self.cfg.token_text * tokens
        obj = {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": text,
                        "refusal": None,
                    },
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 9, "completion_tokens": tokens, "total_tokens": 9 + tokens},
        }
        self._simple(200, json.dumps(obj, separators=(",", ":")).encode())

    def _start_stream(self, cid: str, created: int, model: str, tokens: int, usage: bool) -> None:
        cfg = self.cfg
        base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}

        def chunk(delta: dict[str, Any], finish: str | None, **extra: Any) -> bytes:
            obj = dict(base, **extra)
            obj["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
            obj["usage"] = None
            return _sse(obj)

        role = chunk(
            {"role": "assistant", "content": "", "refusal": None}, None, system_fingerprint="fp_fake"
        )
        token_chunk = _frame(chunk({"content": cfg.token_text}, None))
        tail = chunk({}, "stop")
        if usage:
            tail += _sse(
                dict(
                    base,
                    choices=[],
                    usage={"prompt_tokens": 9, "completion_tokens": tokens, "total_tokens": 9 + tokens},
                )
            )
        tail = _frame(tail + b"data: [DONE]\n\n") + b"0\r\n\r\n"
        head = (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
            b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n%s\r\n"
            % (b"" if self.keep_alive else b"Connection: close\r\n")
        )
        loop = self.wheel.loop
        interval_s = cfg.paced_interval_s if model.startswith("paced") else cfg.interval_s
        stream = Stream(self, tokens, loop.time(), token_chunk, tail, interval_s)
        self.stream = stream
        cfg.streams_started += 1
        self.transport.write(head + _frame(role))
        # First token goes out with the headers (TTFT ~ relay overhead), the rest every interval.
        if not _emit(stream):
            return
        stream.next_due += interval_s
        if cfg.mode == "wheel":
            self.wheel.schedule(stream)
        elif cfg.mode == "timer":
            loop.call_at(stream.next_due, _timer_tick, stream, interval_s)
        else:
            loop.create_task(_coro_stream(stream, interval_s))

    def finish_stream(self) -> None:
        self.stream = None
        self.cfg.streams_finished += 1
        if not self.keep_alive:
            self.transport.close()
            self.lost = True
        elif self.buf:
            self.wheel.loop.call_soon(self._process)


def _timer_tick(stream: Stream, interval_s: float) -> None:
    if stream.closed:
        return
    if _emit(stream):
        stream.next_due += interval_s
        stream.conn.wheel.loop.call_at(stream.next_due, _timer_tick, stream, interval_s)


async def _coro_stream(stream: Stream, interval_s: float) -> None:
    loop = stream.conn.wheel.loop
    while not stream.closed:
        await asyncio.sleep(max(0.0, stream.next_due - loop.time()))
        if stream.closed or not _emit(stream):
            return
        stream.next_due += interval_s


async def serve(host: str, port: int, cfg: Config, backlog: int) -> None:
    """Run the server until SIGINT/SIGTERM."""
    loop = asyncio.get_running_loop()
    wheel = Wheel(loop)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = await loop.create_server(lambda: Conn(cfg, wheel), sock=sock, backlog=backlog)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(
        f"fake_upstream listening on http://{host}:{port} mode={cfg.mode} tokens={cfg.tokens} "
        f"interval_ms={cfg.interval_s * 1000:g}",
        file=sys.stderr,
        flush=True,
    )
    await stop.wait()
    server.close()
    print(
        f"fake_upstream: streams started={cfg.streams_started} finished={cfg.streams_finished} "
        f"token chunks={cfg.chunks_sent} cpu_s={time.process_time():.2f}",
        file=sys.stderr,
        flush=True,
    )


def raise_nofile() -> int:
    """Raise this process's open-file soft limit to its hard limit (10,000 streams need >10,000 sockets)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


def main(argv: list[str] | None = None) -> None:
    """Parse flags and run the server."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--tokens", type=int, default=50, help="token chunks per stream (max_tokens overrides)")
    p.add_argument("--interval-ms", type=float, default=20.0, help="delay between token chunks")
    p.add_argument(
        "--paced-interval-ms", type=float, default=1000.0, help="delay between chunks for models 'paced*'"
    )
    p.add_argument("--mode", choices=("wheel", "timer", "coro"), default="wheel", help="timing strategy")
    p.add_argument("--token-text", default="tok ", help="content of each token chunk")
    p.add_argument("--backlog", type=int, default=4096)
    args = p.parse_args(argv)
    raise_nofile()
    cfg = Config(
        args.tokens, args.interval_ms / 1000.0, args.mode, args.token_text, args.paced_interval_ms / 1000.0
    )
    if uvloop is not None:
        uvloop.install()
    asyncio.run(serve(args.host, args.port, cfg, args.backlog))


if __name__ == "__main__":
    main()
