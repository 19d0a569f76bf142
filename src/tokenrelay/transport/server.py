"""tokenrelay's own HTTP/1.1 + WebSocket server for the ASGI app: one thread, one uvloop loop per worker.

The default server of ``tokenrelay serve`` (``--server granian`` runs granian instead). Why it exists
(docs/performance.md): granian does its socket I/O on Rust threads and hands every request, body read and
response write across threads to the Python loop, and on a VM each hand-off that wakes an idle vCPU costs
hundreds of microseconds. Measured on the same machine and app, sequential requests: first-token time p50
1.35-1.45 ms here against 2.0-3.0 ms under granian (direct to the upstream: 0.42 ms), p90 1.6-1.8 against
3.5-6.7 ms. What it does not do: HTTP/2 (served by granian).

Per connection an ``asyncio.Protocol``: the request head is parsed at once, the body is handed to the app
as it arrives (reading pauses while more than ``BODY_HIGH`` bytes wait), the response goes out with one
``transport.write`` per ``send`` (a streamed answer's head in the loop pass the app starts it, since
clients start their first-token timers there, together with the first body part when that follows in the
same pass), chunked unless the app set a length, and a ``send`` waits only while the socket's write buffer
is over its high-water mark. The ASGI extension
``tokenrelay.sync_response`` (``SYNC_RESPONSE``) is the response's synchronous side: the app may write a
streamed body part from a callback when a ``send`` would not wait, and have a callback run when the client
disconnects (transport/http.py uses both: no task wake-up per chunk, no watcher task per request). A
client that disconnects turns ``receive()`` into ``http.disconnect`` and later writes into no-ops.
WebSocket upgrades go through the ``websockets`` package's sans-I/O protocol. Keep-alive, ``Expect:
100-continue``, TLS (ALPN ``http/1.1``) and lifespan events are supported; pipelined requests wait their
turn.

With ``--workers N`` the parent forks N processes, each with its own ``SO_REUSEPORT`` listening socket
(the kernel spreads connections), restarts a worker that dies and stops them all on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import ssl
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote

import msgspec
import uvloop
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.server import ServerProtocol

log = logging.getLogger("tokenrelay.server")

Scope = dict[str, Any]
Message = dict[str, Any]

# scope["extensions"][SYNC_RESPONSE]: the response's synchronous side (``_Cycle.writable``, ``write_body``,
# ``watch_disconnect``), for an app that writes stream chunks and learns of a client leaving from callbacks,
# without a task switch (transport/http.py does)
SYNC_RESPONSE = "tokenrelay.sync_response"
App = Callable[
    [Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]
]

MAX_HEAD = 64 * 1024
IDLE_SECONDS = 60.0  # a connection with no request in progress is closed after this long
BODY_HIGH = 1 << 20  # request body bytes waiting for the app before reading pauses
WRITE_HIGH = 256 * 1024  # a send waits while more than this is queued for the socket
REASONS = {
    100: "Continue", 101: "Switching Protocols", 200: "OK", 201: "Created", 204: "No Content",
    304: "Not Modified", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict", 413: "Payload Too Large",
    415: "Unsupported Media Type", 422: "Unprocessable Entity", 429: "Too Many Requests",
    431: "Request Header Fields Too Large", 499: "Client Closed Request", 500: "Internal Server Error",
    501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout",
}  # fmt: skip
_DISCONNECT: Message = {"type": "http.disconnect"}


class _BadRequest(Exception):
    def __init__(self, status: int, text: str) -> None:
        self.status = status
        self.text = text


def _chunk(body: bytes) -> bytes:
    """``body`` framed as one chunk of a chunked response."""
    return b"%x\r\n%s\r\n" % (len(body), body)


def _status_line(status: int) -> bytes:
    return b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, "Status").encode())


class _Cycle:
    """One request and its response on a connection."""

    __slots__ = (
        "body",
        "body_done",
        "body_queued",
        "chunked_out",
        "conn",
        "final_sent",
        "head_only",
        "headers",
        "keep_alive",
        "on_gone",
        "pending_head",
        "response_done",
        "started",
        "status",
        "waiter",
    )

    def __init__(self, conn: HttpConnection, keep_alive: bool, head_only: bool) -> None:
        self.conn = conn
        self.body: deque[bytes] = deque()
        self.body_queued = 0
        self.body_done = False
        self.keep_alive = keep_alive
        self.head_only = head_only
        self.started = False  # the response head went out
        self.response_done = False
        self.chunked_out = False
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.final_sent = False
        self.waiter: asyncio.Future[None] | None = None
        self.on_gone: Callable[[], None] | None = None
        self.pending_head = b""  # a streamed answer's head, until the first body part or the next loop pass

    def watch_disconnect(self, on_gone: Callable[[], None]) -> Callable[[], None]:
        """Call ``on_gone`` once the client's connection closes (now, if it has); returns the way to stop
        watching. What a task waiting on ``receive()`` for ``http.disconnect`` would learn, without one."""
        if self.conn.closed:
            on_gone()
        else:
            self.on_gone = on_gone
        return self._unwatch

    def _unwatch(self) -> None:
        self.on_gone = None

    def gone(self) -> None:
        """The connection closed: wake a ``receive()`` and tell a watcher."""
        self.wake()
        on_gone, self.on_gone = self.on_gone, None
        if on_gone is not None:
            on_gone()

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def receive(self) -> Message:
        conn = self.conn
        while True:
            if self.body:
                data = self.body.popleft()
                self.body_queued -= len(data)
                if conn.reading_paused and self.body_queued < BODY_HIGH // 2:
                    conn.resume()
                return {
                    "type": "http.request",
                    "body": data,
                    "more_body": bool(self.body) or not self.body_done,
                }
            if self.body_done and not self.final_sent:
                self.final_sent = True  # the empty last message, once
                return {"type": "http.request", "body": b"", "more_body": False}
            if conn.closed or self.response_done:
                return _DISCONNECT
            self.waiter = conn.loop.create_future()
            await self.waiter
            self.waiter = None

    async def send(self, message: Message) -> None:
        conn = self.conn
        kind = message["type"]
        if kind == "http.response.start":
            if self.started or self.status:
                raise RuntimeError("http.response.start sent twice")
            self.status = message["status"]
            self.headers = list(message.get("headers", ()))
            if not any(name.lower() == b"content-length" for name, _ in self.headers) and not conn.closed:
                # a streamed answer: its head goes out before the first token (a client's first-token timer
                # starts at the head), as granian does, but not with a write of its own when the first body
                # part follows in the same loop pass (a stream whose first token is already here): then
                # both go in one write and the client wakes once. ``flush_head`` writes it alone otherwise.
                # One with a length waits for its body.
                self.pending_head = self._head(None)
                self.started = True
                conn.loop.call_soon(self.flush_head)
            return
        if kind != "http.response.body":
            raise RuntimeError(f"unexpected ASGI message {kind!r}")
        if self.response_done:
            raise RuntimeError("http.response.body after the response ended")
        if conn.write_paused is not None:
            # wait for room first, then write: a send that returns has handed its bytes over, and one
            # that is cancelled while it waits (a stalled reader) has not (the resume point relies on it)
            await asyncio.shield(conn.write_paused)
        if conn.closed:
            return  # the client left: the app learns it from receive()
        body = message.get("body", b"")
        more = message.get("more_body", False)
        out = self.pending_head
        self.pending_head = b""
        if not self.started:
            out = self._head(len(body) if not more else None)
            self.started = True
        if not self.head_only:
            if self.chunked_out:
                if body:
                    out += _chunk(body)
                if not more:
                    out += b"0\r\n\r\n"
            else:
                out += body
        if out:
            conn.transport.write(out)
        if not more:
            self.response_done = True
            conn.response_finished(self)

    def writable(self) -> bool:
        """Whether ``write_body`` may be used now: a chunked response under way with room in the socket's
        buffer (exactly when a ``send`` would write at once)."""
        return (
            self.chunked_out
            and not self.response_done
            and self.conn.write_paused is None
            and not self.conn.closed
            and not self.head_only
        )

    def write_body(self, body: bytes) -> None:
        """One more part of a streamed body, written now; only after ``writable()`` said yes."""
        if body:
            head, self.pending_head = self.pending_head, b""  # b"" + chunk is the chunk itself, no copy
            self.conn.transport.write(head + _chunk(body))

    def flush_head(self) -> None:
        """Write a streamed answer's head that no body part took along."""
        if self.pending_head:
            if not self.conn.closed:
                self.conn.transport.write(self.pending_head)
            self.pending_head = b""

    def _head(self, length: int | None) -> bytes:
        if not self.status:
            raise RuntimeError("http.response.body before http.response.start")
        lines = [_status_line(self.status)]
        has_length = False
        for name, value in self.headers:
            lname = name.lower()
            if lname == b"content-length":
                has_length = True
            elif lname == b"connection":
                if value.lower() == b"close":
                    self.keep_alive = False
                continue
            elif lname == b"transfer-encoding":
                continue
            lines.append(name + b": " + value + b"\r\n")
        no_body = self.status < 200 or self.status in (204, 304)
        if not has_length and not no_body:
            if length is None:
                self.chunked_out = True
                lines.append(b"transfer-encoding: chunked\r\n")
            else:
                lines.append(b"content-length: %d\r\n" % length)
        if not self.keep_alive:
            lines.append(b"connection: close\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)


class HttpConnection(asyncio.Protocol):
    """One client connection: HTTP/1.1 requests one after another, or a WebSocket after an upgrade."""

    def __init__(self, app: App, state: ServerState) -> None:
        self.app = app
        self.state = state
        self.loop = state.loop
        self.buf = bytearray()
        self.closed = False
        self.cycle: _Cycle | None = None
        self.reading_paused = False
        self.write_paused: asyncio.Future[None] | None = None
        self.task: asyncio.Task[None] | None = None
        self.body_left = 0
        self.body_chunked = False
        self.chunk_left = 0  # bytes left of the current request chunk
        self.chunk_state = "size"  # size, data, crlf, trailer
        self.ws: WebSocketSession | None = None
        self.idle_timer: asyncio.TimerHandle | None = None

    # -- asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.transport.set_write_buffer_limits(high=WRITE_HIGH)
        peer = transport.get_extra_info("peername")
        self.client = (peer[0], peer[1]) if isinstance(peer, tuple) else None
        sock = transport.get_extra_info("sockname")
        self.sockname = (sock[0], sock[1]) if isinstance(sock, tuple) else None
        self.scheme = "https" if transport.get_extra_info("sslcontext") else "http"
        self.state.connections.add(self)
        self._arm_idle()

    def _arm_idle(self) -> None:
        """Close a connection that brings no complete request head for ``IDLE_SECONDS`` (an idle keep-alive
        connection, or a client that trickles its head: neither may hold a descriptor for ever)."""
        self.idle_timer = self.loop.call_later(IDLE_SECONDS, self._idle_over)

    def _idle_over(self) -> None:
        if self.idle() and not self.closed:
            self.transport.close()
            self.closed = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        self.state.closed_one(self)
        if self.cycle is not None:
            self.cycle.gone()
        if self.ws is not None:
            self.ws.lost()
        if self.write_paused is not None and not self.write_paused.done():
            self.write_paused.set_result(None)

    def pause_writing(self) -> None:
        if self.write_paused is None:
            self.write_paused = self.loop.create_future()

    def resume_writing(self) -> None:
        fut, self.write_paused = self.write_paused, None
        if fut is not None and not fut.done():
            fut.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return  # refused or finished, closing: whatever else the client sends is not read
        if self.ws is not None:
            self.ws.data(data)
            return
        self.buf += data
        self._parse()

    # -- parsing
    def _parse(self) -> None:
        try:
            self._feed()
        except _BadRequest as exc:
            self._refuse(exc.status, exc.text)

    def _feed(self) -> None:
        cycle = self.cycle
        if cycle is None:
            self._start_request()
            return
        if not cycle.body_done:
            self._read_body(cycle)
        elif len(self.buf) > MAX_HEAD and not self.reading_paused:
            self.pause()  # a pipelined client far ahead of us: wait for the current answer

    def _start_request(self) -> None:
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0 or end > MAX_HEAD:
            if len(buf) > MAX_HEAD:
                raise _BadRequest(431, "request head too large")
            return
        raw_head = bytes(buf[: end + 4])
        del buf[: end + 4]
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        lines = raw_head[:-4].split(b"\r\n")
        try:
            method, target, version = lines[0].split(b" ")
        except ValueError:
            raise _BadRequest(400, "malformed request line") from None
        if not version.startswith(b"HTTP/1."):
            raise _BadRequest(505 if version.startswith(b"HTTP/") else 400, "HTTP/1.x only")
        headers: list[tuple[bytes, bytes]] = []
        length: int | None = None
        chunked = False
        connection = b""
        upgrade = b""
        expect = False
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or name != name.strip():
                raise _BadRequest(400, "malformed header line")
            lname = name.lower()
            value = value.strip()
            headers.append((lname, value))
            if lname == b"content-length":
                if not value.isdigit() or (length is not None and length != int(value)):
                    raise _BadRequest(400, "bad content-length")
                length = int(value)
            elif lname == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
                if not chunked:
                    raise _BadRequest(501, "unsupported transfer-encoding")
            elif lname == b"connection":
                connection = value.lower()
            elif lname == b"upgrade":
                upgrade = value.lower()
            elif lname == b"expect" and value.lower() == b"100-continue":
                expect = True
        if chunked and length is not None:
            raise _BadRequest(400, "both content-length and transfer-encoding")
        http11 = version == b"HTTP/1.1"
        keep_alive = b"close" not in connection if http11 else b"keep-alive" in connection
        path_b, _, query = target.partition(b"?")
        try:
            path = path_b.decode("ascii")
        except UnicodeDecodeError:
            raise _BadRequest(400, "non-ASCII request target") from None
        if "%" in path:
            path = unquote(path)
        scope: Scope = {
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1" if http11 else "1.0",
            "path": path,
            "raw_path": path_b,
            "query_string": query,
            "root_path": "",
            "headers": headers,
            "client": self.client,
            "server": self.sockname,
        }
        if upgrade == b"websocket" and b"upgrade" in connection:
            scope["type"] = "websocket"
            scope["scheme"] = "wss" if self.scheme == "https" else "ws"
            scope["subprotocols"] = [
                p.strip().decode("latin-1")
                for name, value in headers
                if name == b"sec-websocket-protocol"
                for p in value.split(b",")
                if p.strip()
            ]
            self.ws = WebSocketSession(self, raw_head, bytes(buf))
            buf.clear()
            self.task = self.loop.create_task(self.ws.run(scope))
            return
        scope["type"] = "http"
        scope["method"] = method.decode("ascii", "replace")
        scope["scheme"] = self.scheme
        cycle = self.cycle = _Cycle(self, keep_alive, method == b"HEAD")
        scope["extensions"] = {SYNC_RESPONSE: cycle}
        self.body_chunked = chunked
        self.chunk_state = "size"
        self.body_left = length or 0
        if not chunked and not self.body_left:
            cycle.body_done = True
        elif expect:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if not cycle.body_done:
            self._read_body(cycle)
        self.task = self.loop.create_task(self._run(scope, cycle))

    def _read_body(self, cycle: _Cycle) -> None:
        buf = self.buf
        if not self.body_chunked:
            take = min(self.body_left, len(buf))
            if take:
                cycle.body.append(bytes(buf[:take]))
                cycle.body_queued += take
                del buf[:take]
                self.body_left -= take
            if not self.body_left:
                cycle.body_done = True
        else:
            self._read_chunked(cycle)
        if cycle.body_queued > BODY_HIGH:
            self.pause()
        cycle.wake()

    def _read_chunked(self, cycle: _Cycle) -> None:
        buf = self.buf
        while buf and not cycle.body_done:
            state = self.chunk_state
            if state == "size" or state == "trailer":
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > 4096:
                        raise _BadRequest(400, "chunk size line too long")
                    return
                line = bytes(buf[:end])
                del buf[: end + 2]
                if state == "trailer":
                    if not line:
                        cycle.body_done = True  # the empty line after the (ignored) trailers
                    continue
                try:
                    self.chunk_left = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise _BadRequest(400, "bad chunk size") from None
                self.chunk_state = "data" if self.chunk_left else "trailer"
            elif state == "data":
                take = min(self.chunk_left, len(buf))
                cycle.body.append(bytes(buf[:take]))
                cycle.body_queued += take
                del buf[:take]
                self.chunk_left -= take
                if not self.chunk_left:
                    self.chunk_state = "crlf"
            else:  # the CRLF after a chunk's data
                if len(buf) < 2:
                    return
                if buf[:2] != b"\r\n":
                    raise _BadRequest(400, "missing CRLF after a chunk")
                del buf[:2]
                self.chunk_state = "size"

    def pause(self) -> None:
        if not self.reading_paused and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.reading_paused and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    def _refuse(self, status: int, text: str) -> None:
        """A request we cannot parse: a plain answer, then close (the stream's framing is lost)."""
        error = {"message": text, "type": "invalid_request_error", "param": None, "code": None}
        body = msgspec.json.encode({"error": error})
        if self.cycle is None or not self.cycle.started:
            self.transport.write(
                _status_line(status)
                + b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
                % len(body)
                + body
            )
        self.transport.close()
        self.closed = True

    # -- the app
    async def _run(self, scope: Scope, cycle: _Cycle) -> None:
        failed = False
        try:
            await self.app(scope, cycle.receive, cycle.send)
        except Exception:
            failed = True
            log.exception("the app failed on %s %s", scope.get("method"), scope.get("path"))
        if cycle.response_done or self.closed:
            return
        if cycle.started:
            cycle.flush_head()
            self.transport.close()  # a response cut short: the client must not take it as whole
            self.closed = True
            return
        # no answer at all (or one whose head had not gone out): a plain 500, never a traceback
        cycle.status = 0
        cycle.keep_alive = False
        body = b"Internal Server Error" if failed else b""
        await cycle.send(
            {"type": "http.response.start", "status": 500, "headers": [(b"content-type", b"text/plain")]}
        )
        await cycle.send({"type": "http.response.body", "body": body})

    def response_finished(self, cycle: _Cycle) -> None:
        """The last byte of a response is queued: reuse the connection for the next request, or close."""
        cycle.wake()  # a receive() waiting on this request now says http.disconnect
        if not cycle.body_done:
            cycle.keep_alive = False  # the rest of the request's body is still coming: not worth reading
        if not cycle.keep_alive or self.state.stopping:
            self.transport.close()
            self.closed = True
            return
        self.cycle = None
        self.resume()
        self._arm_idle()
        if self.buf:
            self.loop.call_soon(self._next)

    def _next(self) -> None:
        if self.cycle is None and not self.closed:
            self._parse()

    def idle(self) -> bool:
        return self.cycle is None and self.ws is None


class WebSocketSession:
    """An upgraded connection: the ``websockets`` sans-I/O protocol between the socket and ASGI."""

    def __init__(self, conn: HttpConnection, raw_head: bytes, rest: bytes) -> None:
        self.conn = conn
        self.proto = ServerProtocol(max_size=16 * 1024 * 1024)
        self.proto.receive_data(raw_head)
        events = self.proto.events_received()
        self.request = events[0] if events and isinstance(events[0], Request) else None
        self.pending = rest
        self.inbox: deque[Message] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.accepted = False
        self.closed = False
        self.fragments: list[bytes] = []
        self.fragment_text = False
        self.connect_sent = False

    def _flush(self) -> None:
        out = self.proto.data_to_send()
        if out and not self.conn.closed:
            data = b"".join(out)
            if data:
                self.conn.transport.write(data)
            if b"" in out:  # the protocol is done with the TCP connection (after the close handshake)
                self.conn.transport.close()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def data(self, data: bytes) -> None:
        if not self.accepted:
            self.pending += data
            return
        self._take(data)

    def _take(self, data: bytes) -> None:
        self.proto.receive_data(data)
        for frame in self.proto.events_received():
            if not isinstance(frame, Frame):
                continue
            op = frame.opcode
            if op in (Opcode.TEXT, Opcode.BINARY):
                self.fragment_text = op is Opcode.TEXT
                self.fragments = [bytes(frame.data)]
            elif op is Opcode.CONT:
                self.fragments.append(bytes(frame.data))
            elif op is Opcode.CLOSE:
                self.closed = True
                code = self.proto.close_code or 1005
                self.inbox.append({"type": "websocket.disconnect", "code": code})
                continue
            else:
                continue  # ping (answered by the protocol) and pong
            if frame.fin:
                payload = b"".join(self.fragments)
                self.fragments = []
                if self.fragment_text:
                    self.inbox.append(
                        {"type": "websocket.receive", "text": payload.decode("utf-8", "replace")}
                    )
                else:
                    self.inbox.append({"type": "websocket.receive", "bytes": payload})
        self._flush()
        self._wake()

    def lost(self) -> None:
        if not self.closed:
            self.closed = True
            self.inbox.append({"type": "websocket.disconnect", "code": 1006})
        self._wake()

    async def receive(self) -> Message:
        if not self.connect_sent:
            self.connect_sent = True
            return {"type": "websocket.connect"}
        while not self.inbox:
            if self.conn.closed and not self.closed:
                self.lost()
                break
            self.waiter = self.conn.loop.create_future()
            await self.waiter
            self.waiter = None
        return self.inbox.popleft()

    async def send(self, message: Message) -> None:
        kind = message["type"]
        proto = self.proto
        if kind == "websocket.accept":
            assert self.request is not None
            response = proto.accept(self.request)
            sub = message.get("subprotocol")
            if sub:
                response.headers["Sec-WebSocket-Protocol"] = sub
            for name, value in message.get("headers", ()):
                response.headers[name.decode("latin-1")] = value.decode("latin-1")
            proto.send_response(response)
            self.accepted = True
            self._flush()
            if self.pending:
                data, self.pending = self.pending, b""
                self._take(data)
            return
        if kind == "websocket.close":
            if not self.accepted:
                response = proto.reject(403, message.get("reason") or "Forbidden")
                proto.send_response(response)
                self._flush()
                self.conn.transport.close()
            elif not self.closed and not self.conn.closed:
                proto.send_close(message.get("code", 1000), message.get("reason") or "")
                self._flush()
            self.closed = True
            return
        if kind == "websocket.send":
            if self.conn.write_paused is not None:
                await asyncio.shield(self.conn.write_paused)  # room first, as for HTTP bodies
            if self.closed or self.conn.closed:
                raise ConnectionResetError("the WebSocket is closed")
            text = message.get("text")
            if text is not None:
                proto.send_text(text.encode())
            else:
                proto.send_binary(message.get("bytes") or b"")
            self._flush()
            return
        raise RuntimeError(f"unexpected ASGI message {kind!r}")

    async def run(self, scope: Scope) -> None:
        if self.request is None:
            self.conn._refuse(400, "bad WebSocket handshake")
            return
        try:
            await self.conn.app(scope, self.receive, self.send)
        except Exception:
            log.exception("the app failed on WebSocket %s", scope.get("path"))
        finally:
            if not self.accepted and not self.conn.closed:
                self.proto.send_response(self.proto.reject(500, "Internal Server Error"))
                self._flush()
                self.conn.transport.close()
            elif not self.closed and not self.conn.closed:
                self.proto.send_close(1000, "")
                self._flush()
                self.conn.transport.close()
            if not self.conn.closed:
                # a client that never answers our close frame does not keep the socket for ever
                self.conn.loop.call_later(5.0, self.conn.transport.close)


class ServerState:
    def __init__(self, loop: asyncio.AbstractEventLoop, max_connections: int) -> None:
        self.loop = loop
        self.connections: set[HttpConnection] = set()
        self.stopping = False
        self.max_connections = max_connections
        self.acceptor: Acceptor | None = None

    def closed_one(self, conn: HttpConnection) -> None:
        self.connections.discard(conn)
        acceptor = self.acceptor
        if acceptor is not None and not acceptor.reading:
            acceptor.start()  # a descriptor is free again


class Acceptor:
    """Accepts connections while there are descriptors for them: at ``max_connections`` it stops reading
    the listening socket, so new ones wait in the kernel's accept queue (as granian's backpressure does)
    instead of failing with EMFILE.

    A readable listening socket is drained in one callback (up to ``BATCH`` connections), each new one set
    up in its own task: a loop busy with thousands of streams still takes a burst of connections in one
    turn. (An ``await sock_accept()`` loop took one connection per one or two turns of a busy loop, and
    1,000 streams arriving at once waited about a second for their first token.)"""

    BATCH = 256

    def __init__(
        self, sock: socket.socket, state: ServerState, app: App, ssl_ctx: ssl.SSLContext | None
    ) -> None:
        self.sock = sock
        self.state = state
        self.app = app
        self.ssl_ctx = ssl_ctx
        self.loop = state.loop
        self.opening = 0  # accepted, transport not made yet
        self.reading = False
        state.acceptor = self

    def start(self) -> None:
        if not self.reading and not self.state.stopping:
            self.reading = True
            self.loop.add_reader(self.sock.fileno(), self._ready)

    def stop(self) -> None:
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.sock.fileno())

    def _full(self) -> bool:
        return len(self.state.connections) + self.opening >= self.state.max_connections

    def _ready(self) -> None:
        for _ in range(self.BATCH):
            if self._full():
                self.stop()  # closed_one() starts it again
                return
            try:
                client, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends despite the cap: wait a little, never spin
                log.warning("accept failed: %s", exc)
                self.stop()
                self.loop.call_later(0.1, self.start)
                return
            client.setblocking(False)
            self.opening += 1
            self.loop.create_task(self._attach(client))

    async def _attach(self, client: socket.socket) -> None:
        try:
            made = self.loop.connect_accepted_socket(
                lambda: HttpConnection(self.app, self.state), client, ssl=self.ssl_ctx
            )
            # a TLS handshake has its own time limit, so a slow client holds a descriptor for 30 s at most
            await (asyncio.wait_for(made, 30) if self.ssl_ctx is not None else made)
        except (OSError, ssl.SSLError, TimeoutError):
            client.close()
        finally:
            self.opening -= 1
            if not self.reading and not self._full():
                self.start()  # stopped at the cap by connections that then never opened


def _listen(host: str, port: int, backlog: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def _ssl_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(certfile, keyfile)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


class Lifespan:
    """The app's lifespan protocol: one task for start-up and shut-down, as the ASGI spec runs it."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.inbox: asyncio.Queue[Message] = asyncio.Queue()
        self.answers: asyncio.Queue[Message] = asyncio.Queue()
        self.task: asyncio.Future[None] | None = None

    async def _send(self, message: Message) -> None:
        await self.answers.put(message)

    async def event(self, kind: str) -> None:
        """Send ``lifespan.<kind>`` and wait for the app's answer; raise if it failed."""
        if self.task is None:
            scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}}
            self.task = asyncio.ensure_future(self.app(scope, self.inbox.get, self._send))
        await self.inbox.put({"type": f"lifespan.{kind}"})
        answer = asyncio.ensure_future(self.answers.get())
        await asyncio.wait([answer, self.task], return_when=asyncio.FIRST_COMPLETED)  # type: ignore[type-var]
        if not answer.done():
            answer.cancel()
            self.task.result()  # the app failed: its error
            raise RuntimeError(f"the app ended without answering lifespan.{kind}")
        message = answer.result()
        if message["type"].endswith(".failed"):
            raise RuntimeError(f"lifespan {kind} failed: {message.get('message', '')}")


async def serve_app(
    app: App,
    host: str,
    port: int,
    backlog: int,
    ssl_ctx: ssl.SSLContext | None,
    reuse_port: bool,
    max_connections: int,
) -> None:
    """One worker: start-up, serve until SIGTERM/SIGINT, shut down."""
    loop = asyncio.get_running_loop()
    state = ServerState(loop, max_connections)
    lifespan = Lifespan(app)
    await lifespan.event("startup")
    sock = _listen(host, port, backlog, reuse_port)
    acceptor = Acceptor(sock, state, app, ssl_ctx)
    acceptor.start()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _settle, stop)
    try:
        await stop
    finally:
        state.stopping = True
        acceptor.stop()
        sock.close()
        for conn in list(state.connections):
            if conn.idle():
                conn.transport.close()
        # streams in flight get a moment to finish, then are cut (their clients can resume elsewhere)
        busy = [c.task for c in state.connections if c.task is not None and not c.task.done()]
        if busy:
            await asyncio.wait(busy, timeout=2.0)
        for conn in list(state.connections):
            conn.transport.abort()
        await lifespan.event("shutdown")


def _settle(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _die_with_parent() -> None:
    """Linux: this process gets SIGTERM when its parent dies (a SIGKILLed server leaves no workers)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def run(
    factory: Callable[[], App],
    host: str,
    port: int,
    workers: int = 1,
    backlog: int = 4096,
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
    max_connections: int = 10_000,
) -> None:
    """Serve ``factory()`` (an ASGI app) until SIGTERM/SIGINT; ``workers`` > 1 forks that many processes,
    each holding at most ``max_connections`` client connections at once."""
    ssl_ctx = _ssl_context(ssl_certfile, ssl_keyfile) if ssl_certfile and ssl_keyfile else None

    def worker() -> None:
        uvloop.run(serve_app(factory(), host, port, backlog, ssl_ctx, workers > 1, max_connections))

    if workers <= 1:
        worker()
        return
    # fail here, in the parent, if the port is taken (the workers' own sockets then bind beside this one)
    probe = _listen(host, port, backlog, reuse_port=True)
    children: dict[int, int] = {}
    stopping = False

    def spawn(slot: int) -> None:
        pid = os.fork()
        if pid == 0:
            probe.close()
            _die_with_parent()
            code = 0
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                worker()
            except BaseException:
                log.exception("worker %d failed", slot)
                code = 1
            finally:
                logging.shutdown()
                os._exit(code)
        children[pid] = slot

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for slot in range(workers):
        spawn(slot)
    probe.close()
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        slot = children.pop(pid, -1)
        if slot >= 0 and not stopping:
            log.warning("worker %d (pid %d) exited (status %d): starting another", slot, pid, status)
            time.sleep(0.5)
            spawn(slot)
    sys.stdout.flush()
