"""WebSocket transport (``/v1/ws/chat``): many chat streams multiplexed on one socket.

Client -> server, one JSON text message each:
``{"type": "request", "id": "r1", "body": {<chat completion request>}}``, ``{"type": "cancel", "id": "r1"}``,
``{"type": "ping"}``. Server -> client: ``token`` (``text``), ``reasoning`` (``text``), ``tool_call``
(``index``, ``call_id``, ``name``, ``arguments`` fragment), ``done`` (``finish_reason``, ``usage``) and
``error`` (``error: {message, type, code, param}``), each with the request's ``id``; ``pong``.

One task per request (never per token) follows that request's stream session; what one upstream read
brought goes out as one message per kind (tokens of a batch are joined). A cancel stops the model within
one token while the socket's other requests go on. A malformed message gets an ``error`` with the
field at fault and the socket stays open; binary frames close it with 1003. When the socket closes,
its streams are cancelled unless they asked for ``on_disconnect: continue``. Outgoing messages wait on a
bounded queue per socket, so a client that stops reading stalls its own streams' writers (the model
keeps generating into the stream log, which is bounded by the answer's length), never the process.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol
from urllib.parse import parse_qs

import msgspec

from tokenrelay.errors import GatewayError, invalid
from tokenrelay.events import Error, Event, Finish, ReasoningDelta, TextDelta, ToolCallDelta, Usage
from tokenrelay.gateway import Gateway
from tokenrelay.protocol import openai_chat
from tokenrelay.protocol.padding import obfuscation_field
from tokenrelay.session import StreamSession
from tokenrelay.transport.credentials import credential

log = logging.getLogger("tokenrelay.websocket")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_encode = msgspec.json.encode
MAX_IN_FLIGHT = 64


def check_new_id(rid: str | int | None, in_flight: Mapping[str | int, object]) -> str | int:
    """A new request's id on a socket: present, not in flight already, and with room for it."""
    if rid is None or rid == "":
        raise invalid("A request needs an 'id'.", param="id")
    if rid in in_flight:
        raise invalid(f"Request id {rid!r} is already in flight.", param="id")
    if len(in_flight) >= MAX_IN_FLIGHT:
        raise GatewayError(429, f"At most {MAX_IN_FLIGHT} requests may be in flight on one socket.")
    return rid


SEND_QUEUE = 256


class ClientMessage(msgspec.Struct, forbid_unknown_fields=False):
    type: str
    id: str | int | None = None
    body: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)  # empty when absent


_client_message = msgspec.json.Decoder(ClientMessage)


def error_message(request_id: str | int | None, err: GatewayError | Error) -> bytes:
    return _encode({"type": "error", "id": request_id, **openai_chat.error_body(err)})


def encode_batch(request_id: str | int, batch: list[Event], pad: bool = False) -> list[bytes]:
    """One stream's event batch as WebSocket messages (adjacent text of one kind joined into one); with
    ``pad``, text messages carry an ``obfuscation`` field (asked with stream_options.include_obfuscation)."""
    rid = _encode(request_id)
    out: list[bytes] = []
    text: list[str] = []
    kind = b""

    def flush() -> None:
        if text:
            joined = _encode("".join(text))
            tail = obfuscation_field(len(joined)) + b"}" if pad else b"}"
            out.append(b'{"type":"' + kind + b'","id":' + rid + b',"text":' + joined + tail)
            text.clear()

    usage: Usage | None = None
    for ev in batch:
        if type(ev) is TextDelta or type(ev) is ReasoningDelta:
            k = b"token" if type(ev) is TextDelta else b"reasoning"
            if k != kind:
                flush()
                kind = k
            text.append(ev.text)
            continue
        flush()
        kind = b""
        if type(ev) is ToolCallDelta:
            out.append(
                _encode(
                    {
                        "type": "tool_call",
                        "id": request_id,
                        "index": ev.index,
                        "call_id": ev.id,
                        "name": ev.name,
                        "arguments": ev.arguments,
                    }
                )
            )
        elif type(ev) is Usage:
            usage = ev
        elif type(ev) is Finish:
            body: dict[str, Any] = {"type": "done", "id": request_id, "finish_reason": ev.reason}
            body["usage"] = openai_chat.usage_body(usage) if usage is not None else None
            out.append(_encode(body))
        elif type(ev) is Error:
            out.append(error_message(request_id, ev))
    flush()
    return out


class Cancellable(Protocol):
    def cancel(self) -> None: ...


class WebSocketChat:
    """One connected socket."""

    decoder: msgspec.json.Decoder[Any] = _client_message  # a subclass may read more fields (audio/voice.py)

    def __init__(self, gateway: Gateway, send: Send, credential: bytes | None = None) -> None:
        self.gateway = gateway
        self.credential = credential
        self._send = send
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(SEND_QUEUE)
        # request id -> (what a cancel stops: its stream session, or a voice request; its task)
        self.streams: dict[str | int, tuple[Cancellable, asyncio.Task[None]]] = {}
        self.closed = False

    async def put(self, data: bytes) -> None:
        if not self.closed:
            await self.queue.put(data)

    async def writer(self) -> None:
        while True:
            data = await self.queue.get()
            try:
                await self._send({"type": "websocket.send", "text": data.decode()})
            except OSError:
                self.closed = True
                return

    async def follow(self, request_id: str | int, session: StreamSession) -> None:
        follower = session.follow()
        pad = session.request.obfuscation is True
        try:
            while (batch := await follower.next_batch()) is not None:
                for message in encode_batch(request_id, batch, pad):
                    await self.put(message)
            if session.pre_error is not None:
                await self.put(error_message(request_id, session.pre_error))
        finally:
            follower.close()
            self.streams.pop(request_id, None)
            if self.closed:  # the socket went away under this stream
                self.gateway.client_left(session)

    async def handle(self, raw: str | bytes) -> None:
        try:
            msg = self.decoder.decode(raw)
        except msgspec.DecodeError as exc:
            await self.put(error_message(None, invalid(f"Malformed message: {exc}", code="invalid_message")))
            return
        if msg.type == "ping":
            await self.put(b'{"type":"pong"}')
        elif msg.type == "request":
            await self.start(msg)
        elif msg.type == "cancel":
            entry = self.streams.get(msg.id) if msg.id is not None else None
            if entry is None:
                await self.put(
                    error_message(msg.id, invalid(f"No request {msg.id!r} is in flight.", param="id"))
                )
            else:
                entry[0].cancel()
        else:
            await self.put(
                error_message(
                    msg.id,
                    invalid(f"Unknown message type {msg.type!r}.", param="type", code="invalid_message"),
                )
            )

    async def start(self, msg: ClientMessage) -> None:
        rid = msg.id
        try:
            rid = check_new_id(msg.id, self.streams)
            if not msg.body:
                raise invalid("A request needs a 'body'.", param="body")
            req = openai_chat.decode_request(bytes(msg.body))
            req.stream = True
            session = await self.gateway.start_stream(req, self.credential)
        except GatewayError as err:
            await self.put(error_message(rid, err))
            return
        task = asyncio.get_running_loop().create_task(self.follow(rid, session))
        self.streams[rid] = (session, task)

    def close(self) -> None:
        self.closed = True
        for _session, task in list(self.streams.values()):
            task.cancel()  # its follower closes, then the stream's disconnect policy applies


async def serve_websocket(
    gateway: Gateway,
    scope: Scope,
    receive: Receive,
    send: Send,
    socket_class: type[WebSocketChat] = WebSocketChat,
) -> None:
    first = await receive()
    if first["type"] != "websocket.connect":
        return
    # browsers cannot set headers on a WebSocket: a key may come as ?api_key= instead
    key = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("api_key")
    raw = credential(scope) or (key[-1].encode() if key else None)
    try:
        gateway.admission.authenticate(raw)
    except GatewayError as err:
        await send({"type": "websocket.close", "code": 1008, "reason": err.message[:120]})
        return
    await send({"type": "websocket.accept"})
    conn = socket_class(gateway, send, raw)
    writer = asyncio.get_running_loop().create_task(conn.writer())
    try:
        while True:
            msg = await receive()
            kind = msg["type"]
            if kind == "websocket.disconnect":
                break
            if kind != "websocket.receive":
                continue
            text = msg.get("text")
            if text is None:
                await send({"type": "websocket.close", "code": 1003, "reason": "only JSON text messages"})
                break
            await conn.handle(text)
    except OSError:
        pass
    finally:
        conn.close()
        writer.cancel()
