"""Low-overhead load generator for streaming OpenAI Chat Completions endpoints.

Opens ``--concurrency`` connections with raw asyncio ``Protocol`` sockets (uvloop when
available), in batches (``--ramp-batch`` connections every ``--ramp-interval-ms``) so a
large N does not arrive as one SYN flood. Each connection sends ``POST --path`` with
``"stream": true`` and reads the SSE stream; with ``--rounds R`` it sends R requests one
after another (keep-alive, reconnecting if the server closed the connection).

Per stream it records, against ``time.perf_counter()``:

* TTFT: from the request write to the first ``data:`` event whose ``delta.content`` is
  non-empty (the role chunk with ``"content":""`` does not count);
* every inter-event gap: time between successive ``data:`` events (events, not socket
  reads: events that arrive in the same read get a gap of 0);
* the number of ``data:`` events other than ``[DONE]`` ("chunks"), whether ``[DONE]``
  arrived, and any error (connect, HTTP status, reset, timeout, malformed framing).

Prints one JSON object to stdout: p50/p90/p99/max TTFT, p50/p99/max gap, chunks, complete
and incomplete streams, errors (counted by kind, with a few samples), wall time and the
load generator's own CPU seconds (``time.process_time``).

Protocols (``--protocol``): ``openai`` (Chat Completions SSE, ends with ``data: [DONE]``),
``anthropic`` (``POST /v1/messages``, Messages SSE; text in ``content_block_delta`` events, ends with
``message_stop``) and ``ws`` (tokenrelay's ``/v1/ws/chat`` WebSocket: one socket per connection, one
request message per round; each ``token`` message is a chunk, ``done`` ends the stream). For every
protocol, "content chunks" are the events that carry answer text, the figure to compare across them.

``--raw`` adds every TTFT and gap sample (ms) to the JSON, so a harness can merge several load
generator processes into one set of percentiles. The process raises its own open-file limit to the hard
limit (10,000 streams are 10,000 sockets).

Run: ``python benchmarks/loadgen.py --port 8000 --concurrency 100 [--rounds 1] [--tokens 50]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import resource
import sys
import time
from array import array
from typing import Any

try:
    import uvloop
except ImportError:  # pragma: no cover - the benchmark venv has uvloop
    uvloop = None  # type: ignore[assignment]

_now = time.perf_counter
_CONTENT_RE = re.compile(rb'"content"\s*:\s*"(?!")')
_ANTHROPIC_TEXT = b'"text_delta"'
_ANTHROPIC_STOP = b'"message_stop"'


class StreamResult:
    """Measurements of one request/response stream."""

    __slots__ = ("chunks", "content", "done", "error", "status", "t_headers", "t_write", "ttft")

    def __init__(self) -> None:
        self.t_write = 0.0
        self.t_headers = -1.0
        self.ttft = -1.0
        self.chunks = 0
        self.content = 0  # chunks carrying answer text
        self.done = False
        self.error: str | None = None
        self.status = 0


class Client(asyncio.Protocol):
    """One HTTP/1.1 client connection reading SSE over chunked / length / close-delimited bodies."""

    def __init__(self, gaps: array, anthropic: bool = False) -> None:
        self.gaps = gaps
        self.anthropic = anthropic
        self.transport: asyncio.Transport | None = None
        self.result: StreamResult | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.server_closes = False
        self._reset_parser()

    def _reset_parser(self) -> None:
        self.raw = bytearray()  # undecoded bytes (headers, chunk framing)
        self.sse = bytearray()  # decoded body bytes not yet split into events
        self.in_headers = True
        self.body_mode = "close"  # chunked | length | close
        self.remaining = 0  # bytes left in the current chunk / the length-delimited body
        self.body_done = False
        self.last_event = 0.0
        self.error_body = bytearray()

    # -- asyncio callbacks ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        res = self.result
        if res is not None and not self.body_done:
            if self.body_mode == "close" and not self.in_headers:
                self._finish()
            else:
                self._fail(f"connection lost: {exc!r}" if exc else "connection closed mid-response")

    def data_received(self, data: bytes) -> None:
        if self.result is None:
            return
        now = _now()
        if self.in_headers:
            self.raw += data
            end = self.raw.find(b"\r\n\r\n")
            if end < 0:
                if len(self.raw) > 65536:
                    self._fail("response headers too large")
                return
            if not self._parse_headers(bytes(self.raw[:end]), now):
                return
            data = bytes(self.raw[end + 4 :])
            self.raw = bytearray()
            if not data:
                if self.body_mode == "length" and self.remaining == 0:
                    self._finish()
                return
        if self.result.status != 200:
            self._collect_error(data)
            return
        if self.body_mode == "chunked":
            self._dechunk(data)
        elif self.body_mode == "length":
            take = data[: self.remaining]
            self.remaining -= len(take)
            self.sse += take
            if self.remaining == 0:
                self.body_done = True
        else:
            self.sse += data
        if self.sse:
            self._events(now)
        if self.body_done and self.result is not None:
            self._finish()

    # -- parsing ---------------------------------------------------------------------------------
    def _parse_headers(self, head: bytes, now: float) -> bool:
        res = self.result
        assert res is not None
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        try:
            res.status = int(parts[1])
        except (IndexError, ValueError):
            self._fail(f"bad status line {lines[0][:80]!r}")
            return False
        res.t_headers = now - res.t_write
        self.in_headers = False
        self.server_closes = parts[0] == b"HTTP/1.0"
        self.body_mode = "close"
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            value = value.strip().lower()
            if name == b"transfer-encoding" and b"chunked" in value:
                self.body_mode = "chunked"
            elif name == b"content-length" and self.body_mode != "chunked":
                self.body_mode = "length"
                self.remaining = int(value)
            elif name == b"connection":
                if b"close" in value:
                    self.server_closes = True
                elif b"keep-alive" in value:
                    self.server_closes = False
        return True

    def _dechunk(self, data: bytes) -> None:
        """Decode chunked transfer-encoding into ``self.sse``.

        ``self.remaining``: > 0 bytes of chunk data still to read, -1 the CRLF after a chunk's
        data, 0 a chunk-size line.
        """
        raw = self.raw
        raw += data
        pos = 0
        n = len(raw)
        while pos < n:
            rem = self.remaining
            if rem > 0:
                take = min(rem, n - pos)
                self.sse += raw[pos : pos + take]
                pos += take
                rem -= take
                self.remaining = rem if rem else -1
            elif rem < 0:
                if n - pos < 2:
                    break
                pos += 2
                self.remaining = 0
            else:
                eol = raw.find(b"\r\n", pos)
                if eol < 0:
                    break
                size_field = raw[pos:eol].split(b";", 1)[0].strip()
                try:
                    size = int(size_field, 16)
                except ValueError:
                    self._fail(f"bad chunk size {bytes(size_field[:20])!r}")
                    return
                pos = eol + 2
                if size == 0:
                    self.body_done = True  # trailers, if any, are ignored
                    pos = n
                    break
                self.remaining = size
        del raw[:pos]

    def _events(self, now: float) -> None:
        sse = self.sse
        res = self.result
        assert res is not None
        if b"\r" in sse:
            sse[:] = sse.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        start = 0
        while True:
            end = sse.find(b"\n\n", start)
            if end < 0:
                break
            block = bytes(sse[start:end])
            start = end + 2
            data = None
            for line in block.split(b"\n"):
                if line.startswith(b"data:"):
                    part = line[5:]
                    if part[:1] == b" ":
                        part = part[1:]
                    data = part if data is None else data + b"\n" + part
            if data is None:
                continue  # comment / keep-alive
            if self.last_event:
                self.gaps.append(now - self.last_event)
            self.last_event = now
            if self.anthropic:
                if _ANTHROPIC_STOP in data:
                    res.done = True
                    continue
                res.chunks += 1
                if _ANTHROPIC_TEXT in data:
                    res.content += 1
                    if res.ttft < 0:
                        res.ttft = now - res.t_write
                elif b'"type":"error"' in data and res.error is None:
                    res.error = "stream error event: " + data[:200].decode("utf-8", "replace")
                continue
            if data == b"[DONE]":
                res.done = True
                continue
            res.chunks += 1
            if _CONTENT_RE.search(data):
                res.content += 1
                if res.ttft < 0:
                    res.ttft = now - res.t_write
            if data[:9] == b'{"error":' and res.error is None:
                res.error = "stream error event: " + data[:200].decode("utf-8", "replace")
        if start:
            del sse[:start]

    def _collect_error(self, data: bytes) -> None:
        self.error_body += data[:512]
        res = self.result
        assert res is not None
        if self.body_mode == "length":
            self.remaining -= len(data)
            if self.remaining <= 0:
                self._fail(f"HTTP {res.status}: {bytes(self.error_body[:200])!r}")
        elif self.body_mode == "chunked" and b"0\r\n\r\n" in data:
            self._fail(f"HTTP {res.status}: {bytes(self.error_body[:200])!r}")

    # -- completion ------------------------------------------------------------------------------
    def _finish(self) -> None:
        res = self.result
        if res is None:
            return
        if res.status != 200 and res.error is None:
            res.error = f"HTTP {res.status}: {bytes(self.error_body[:200])!r}"
        elif not res.done and res.error is None:
            res.error = "body ended without [DONE]"
        self._wake()

    def _fail(self, msg: str) -> None:
        res = self.result
        if res is not None and res.error is None:
            res.error = msg
        self.server_closes = True
        if self.transport is not None and not self.closed:
            self.transport.close()
        self._wake()

    def _wake(self) -> None:
        self.result = None
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def start(self, request: bytes, res: StreamResult) -> asyncio.Future[None]:
        """Send ``request`` and return a future resolved when its response ends."""
        assert self.transport is not None
        self._reset_parser()
        self.result = res
        self.waiter = asyncio.get_running_loop().create_future()
        res.t_write = _now()
        self.transport.write(request)
        return self.waiter


class WsClient(asyncio.Protocol):
    """One WebSocket connection to tokenrelay's ``/v1/ws/chat``, one stream at a time on it.

    Client frames are masked with an all-zero key (legal, and the payload needs no XOR); server frames
    are unmasked text frames holding one JSON message each, recognised by their ``"type"`` bytes.
    """

    def __init__(self, gaps: array) -> None:
        self.gaps = gaps
        self.transport: asyncio.Transport | None = None
        self.result: StreamResult | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.handshaken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed = False
        self.server_closes = False
        self.buf = bytearray()
        self.frag = bytearray()
        self.last_event = 0.0
        self.counter = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server_closes = True
        if not self.handshaken.done():
            self.handshaken.set_exception(ConnectionError(f"closed during the handshake: {exc!r}"))
        self._fail(f"connection lost: {exc!r}" if exc else "connection closed mid-stream")

    def handshake(self, host: str, port: int, path: str, extra_headers: list[str]) -> asyncio.Future[None]:
        assert self.transport is not None
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host: {host}:{port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version: 13",
            *extra_headers,
        ]
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        return self.handshaken

    def data_received(self, data: bytes) -> None:
        now = _now()
        buf = self.buf
        buf += data
        if not self.handshaken.done():
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(buf[: buf.find(b"\r\n")])
            del buf[: end + 4]
            if b" 101 " not in status + b" ":
                self.handshaken.set_exception(ConnectionError(f"handshake refused: {status[:100]!r}"))
                self.server_closes = True
                return
            self.handshaken.set_result(None)
        pos = 0
        n = len(buf)
        while n - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            length = b1 & 0x7F
            head = 2
            if length == 126:
                if n - pos < 4:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                head = 4
            elif length == 127:
                if n - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                head = 10
            if n - pos < head + length:
                break
            payload = bytes(buf[pos + head : pos + head + length])
            pos += head + length
            opcode = b0 & 0x0F
            if opcode in (1, 0):
                if not b0 & 0x80:
                    self.frag += payload
                    continue
                if self.frag:
                    payload = bytes(self.frag) + payload
                    self.frag.clear()
                self._message(payload, now)
            elif opcode == 9:  # ping: answer with a (zero-masked) pong
                self._send(0x8A, payload)
            elif opcode == 8:
                self.server_closes = True
                self._fail(f"server closed the socket: {payload[:100]!r}")
        del buf[:pos]

    def _message(self, msg: bytes, now: float) -> None:
        res = self.result
        if res is None:
            return
        if self.last_event:
            self.gaps.append(now - self.last_event)
        self.last_event = now
        if b'"type":"token"' in msg:
            res.chunks += 1
            if b'"text":""' not in msg:
                res.content += 1
                if res.ttft < 0:
                    res.ttft = now - res.t_write
        elif b'"type":"done"' in msg:
            res.done = True
            self._wake()
        elif b'"type":"error"' in msg:
            self._fail("stream error message: " + msg[:200].decode("utf-8", "replace"))
        else:
            res.chunks += 1

    def _send(self, first: int, payload: bytes) -> None:
        assert self.transport is not None
        n = len(payload)
        if n < 126:
            head = bytes((first, 0x80 | n))
        elif n < 65536:
            head = bytes((first, 0x80 | 126)) + n.to_bytes(2, "big")
        else:
            head = bytes((first, 0x80 | 127)) + n.to_bytes(8, "big")
        self.transport.write(head + b"\0\0\0\0" + payload)

    def _fail(self, msg: str) -> None:
        res = self.result
        if res is not None and res.error is None:
            res.error = msg
        self._wake()

    def _wake(self) -> None:
        self.result = None
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def start(self, body: bytes, res: StreamResult) -> asyncio.Future[None]:
        """Send one request message for ``body`` (a Chat Completions request); resolve when it ends."""
        self.counter += 1
        self.result = res
        self.last_event = 0.0
        self.waiter = asyncio.get_running_loop().create_future()
        msg = b'{"type":"request","id":"r%d","body":%s}' % (self.counter, body)
        res.t_write = _now()
        self._send(0x81, msg)
        return self.waiter


def _build_request(host: str, port: int, path: str, body: bytes, extra_headers: list[str]) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Content-Type: application/json",
        "Accept: text/event-stream",
        f"Content-Length: {len(body)}",
        *extra_headers,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _worker(
    idx: int,
    args: argparse.Namespace,
    request: bytes,
    t0: float,
    results: list[StreamResult],
    gaps: array,
) -> None:
    loop = asyncio.get_running_loop()
    delay = t0 + (idx // args.ramp_batch) * args.ramp_interval_ms / 1000.0 - loop.time()
    if delay > 0:
        await asyncio.sleep(delay)
    ws = args.protocol == "ws"
    anthropic = args.protocol == "anthropic"
    client: Client | WsClient | None = None
    for _ in range(args.rounds):
        res = StreamResult()
        results.append(res)
        try:
            if client is None or client.closed or client.server_closes:
                if client is not None and client.transport is not None:
                    client.transport.close()
                if ws:
                    _, client = await asyncio.wait_for(
                        loop.create_connection(lambda: WsClient(gaps), args.host, args.port),
                        args.connect_timeout,
                    )
                    await asyncio.wait_for(
                        client.handshake(args.host, args.port, args.path, args.header or []),
                        args.connect_timeout,
                    )
                else:
                    _, client = await asyncio.wait_for(
                        loop.create_connection(lambda: Client(gaps, anthropic), args.host, args.port),
                        args.connect_timeout,
                    )
            fut = client.start(request, res)
            await asyncio.wait_for(fut, args.timeout)
        except TimeoutError:
            res.error = res.error or ("timeout" if res.t_write else "connect timeout")
            if client is not None:
                client.result = None
                client.server_closes = True
        except OSError as exc:  # ConnectionError (a refused WebSocket handshake) included
            res.error = res.error or f"connect: {exc.__class__.__name__}: {exc}"
            if client is not None and client.transport is not None:
                client.transport.close()
            client = None
    if client is not None and client.transport is not None:
        client.transport.close()


def _pct(values: list[float] | array, q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q / 100.0 * (len(s) - 1))))
    return s[k]


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000.0, 3)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the load and return the summary dict."""
    payload: dict[str, Any] = {
        "model": args.model,
        "stream": True,
        "messages": [{"role": "user", "content": args.prompt}],
    }
    if args.tokens:
        payload["max_tokens"] = args.tokens
    elif args.protocol == "anthropic":
        payload["max_tokens"] = 1024  # required by the Messages API
    if args.protocol == "ws":
        del payload["stream"]  # implied on the socket
    body = json.dumps(payload, separators=(",", ":")).encode()
    if args.protocol == "ws":
        request = body
    else:
        headers = list(args.header or [])
        if args.protocol == "anthropic":
            headers.append("anthropic-version: 2023-06-01")
        request = _build_request(args.host, args.port, args.path, body, headers)
    results: list[StreamResult] = []
    gaps: array = array("d")
    loop = asyncio.get_running_loop()
    cpu0 = time.process_time()
    w0 = _now()
    t0 = loop.time() + 0.005
    tasks = [
        asyncio.ensure_future(_worker(i, args, request, t0, results, gaps)) for i in range(args.concurrency)
    ]
    try:
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
    wall = _now() - w0
    cpu = time.process_time() - cpu0

    ttfts = [r.ttft for r in results if r.ttft >= 0]
    headers = [r.t_headers for r in results if r.t_headers >= 0]
    errors: dict[str, int] = {}
    samples: list[str] = []
    for r in results:
        if r.error:
            kind = r.error.split(":", 1)[0][:60]
            errors[kind] = errors.get(kind, 0) + 1
            if len(samples) < 5:
                samples.append(r.error[:300])
    complete = sum(1 for r in results if r.done and r.error is None)
    return {
        "target": f"{args.host}:{args.port}{args.path}",
        "concurrency": args.concurrency,
        "rounds": args.rounds,
        "streams": len(results),
        "complete": complete,
        "incomplete": len(results) - complete,
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "error_samples": samples,
        "chunks": sum(r.chunks for r in results),
        "content_chunks": sum(r.content for r in results),
        "ttft_ms": {
            "n": len(ttfts),
            "p50": _ms(_pct(ttfts, 50)),
            "p90": _ms(_pct(ttfts, 90)),
            "p99": _ms(_pct(ttfts, 99)),
            "max": _ms(max(ttfts) if ttfts else None),
        },
        "headers_ms": {"p50": _ms(_pct(headers, 50)), "p99": _ms(_pct(headers, 99))},
        "gap_ms": {
            "n": len(gaps),
            "p50": _ms(_pct(gaps, 50)),
            "p99": _ms(_pct(gaps, 99)),
            "max": _ms(max(gaps) if gaps else None),
        },
        "wall_s": round(wall, 3),
        "loadgen_cpu_s": round(cpu, 3),
        "loadgen_cpu_share": round(cpu / wall, 4) if wall > 0 else None,
        "loop": "uvloop" if uvloop is not None and not args.no_uvloop else "asyncio",
        "protocol": args.protocol,
        **(
            {"raw": {"ttft_ms": [_ms(v) for v in ttfts], "gap_ms": [_ms(v) for v in gaps]}}
            if args.raw
            else {}
        ),
    }


def raise_nofile() -> int:
    """Raise the open-file soft limit to the hard limit (one socket per stream)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


def main(argv: list[str] | None = None) -> None:
    """Parse flags, run the load, print JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--protocol", choices=("openai", "anthropic", "ws"), default="openai")
    p.add_argument("--path", default=None, help="default: the protocol's endpoint")
    p.add_argument("--api-key", default=None, help="sent as Authorization: Bearer")
    p.add_argument("--raw", action="store_true", help="include every TTFT and gap sample in the JSON")
    p.add_argument("--model", default="bench")
    p.add_argument("--prompt", default="Say something.")
    p.add_argument("--tokens", type=int, default=0, help="max_tokens to request (0: server default)")
    p.add_argument("--concurrency", "-c", type=int, default=100)
    p.add_argument("--rounds", type=int, default=1, help="requests per connection, one after another")
    p.add_argument("--ramp-batch", type=int, default=100, help="connections opened per ramp step")
    p.add_argument("--ramp-interval-ms", type=float, default=10.0, help="delay between ramp steps")
    p.add_argument("--timeout", type=float, default=60.0, help="per-request timeout, seconds")
    p.add_argument("--connect-timeout", type=float, default=10.0)
    p.add_argument("--header", action="append", help="extra request header, 'Name: value' (repeatable)")
    p.add_argument("--no-uvloop", action="store_true")
    p.add_argument("--indent", type=int, default=None)
    args = p.parse_args(argv)
    if args.ramp_batch < 1:
        p.error("--ramp-batch must be >= 1")
    if args.path is None:
        args.path = {"openai": "/v1/chat/completions", "anthropic": "/v1/messages", "ws": "/v1/ws/chat"}[
            args.protocol
        ]
    if args.api_key:
        args.header = [*(args.header or []), f"Authorization: Bearer {args.api_key}"]
    raise_nofile()
    if uvloop is not None and not args.no_uvloop:
        uvloop.install()
    summary = asyncio.run(run(args))
    json.dump(summary, sys.stdout, indent=args.indent)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
