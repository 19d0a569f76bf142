"""HTTP transport: a thin ASGI app (no framework middleware on the streaming path).

Per streaming request: read and size-check the body, decode it with the client's protocol, open a stream
session, then write what a ``Follower`` hands over: one ASGI send per batch, SSE comment keep-alives while
the model is quiet (from before the first token), and an error event rather than a silent end if the
stream fails. A second task per request waits on ``receive()`` for ``http.disconnect``, because granian
(like uvicorn) does not report a vanished client through ``send()``; a client that leaves cancels its
stream at once unless the request asked for ``on_disconnect: continue``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import logging
import os
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import msgspec

from tokenrelay import logs, records
from tokenrelay.admission import bearer
from tokenrelay.audio.voice import VoiceSocket
from tokenrelay.errors import GatewayError, invalid
from tokenrelay.events import Error, Event
from tokenrelay.gateway import Gateway
from tokenrelay.protocol.anthropic_messages import AnthropicMessages
from tokenrelay.protocol.base import SSE_MEDIA, StreamEncoder, StreamInfo, WireProtocol
from tokenrelay.protocol.ollama import OllamaChat, OllamaGenerate
from tokenrelay.protocol.openai_chat import OpenAIChat
from tokenrelay.protocol.openai_responses import OpenAIResponses
from tokenrelay.protocol.validation import decode_body
from tokenrelay.providers.mock import MockProvider
from tokenrelay.session import StreamSession
from tokenrelay.transport.credentials import credential, credential_digest, header
from tokenrelay.transport.server import SYNC_RESPONSE
from tokenrelay.transport.websocket import serve_websocket

if TYPE_CHECKING:
    from tokenrelay.transport.grpc_server import GrpcServer

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Handler = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger("tokenrelay.http")
access_log = logging.getLogger("tokenrelay.access")

_encode = msgspec.json.encode
DRAIN_CAP = 64 * 1024 * 1024
STREAM_HEADERS = [
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


STARTED = "tokenrelay.started"
ARRIVED = "tokenrelay.arrived"  # perf_counter() when the request reached the app
OVERHEAD = "tokenrelay.overhead"  # seconds the gateway spent on the request before the model was asked
PROTOCOL = "tokenrelay.protocol"
COMMON_HEADERS = "tokenrelay.headers"


def _since(scope: Scope) -> float:
    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("since")
    try:
        return float(values[-1]) if values else 0.0
    except ValueError:
        raise invalid("'since' must be a Unix time in seconds.", param="since") from None


class NewKey(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``POST /admin/keys``."""

    plan: str
    models: list[str] | None = None
    budget: float | None = None
    name: str | None = None
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)


new_key_decoder = msgspec.json.Decoder(NewKey)


class ClientGone(Exception):
    """The client disconnected before its request body arrived."""


def choice_header(scope: Scope, name: str, allowed: tuple[str, str]) -> str | None:
    """A header that must be one of two words, or None when absent; anything else is a 400 naming it."""
    raw = header(scope, name.encode())
    if raw is None:
        return None
    value = raw.decode("latin-1")
    if value not in allowed:
        raise invalid(f"{name} must be '{allowed[0]}' or '{allowed[1]}'.", param=name)
    return value


def resume_point(scope: Scope) -> int:
    """Where to resume: after ``Last-Event-ID`` (an EventSource reconnecting), else after ``after``."""
    raw = header(scope, b"last-event-id")
    param = "Last-Event-ID"
    if raw is None:
        values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("after")
        raw = values[-1].encode() if values else b"0"
        param = "after"
    if not raw.strip().isdigit():
        raise invalid(f"'{param}' must be a non-negative integer (an event's sequence number).", param=param)
    return int(raw)


def encode_numbered(encoder: StreamEncoder, batch: list[Event], before: int) -> bytes:
    """SSE for a batch with ``id: N`` (the event's sequence number) on the last SSE event each event makes,
    so a reconnect with ``Last-Event-ID: N`` continues after everything event N produced."""
    out: list[bytes] = []
    for i, ev in enumerate(batch):
        data = encoder.encode([ev])
        if data:
            k = data.rfind(b"\n\n", 0, len(data) - 2)
            cut = 0 if k < 0 else k + 2
            out.append(data[:cut] + b"id: %d\n" % (before + i + 1) + data[cut:])
    return b"".join(out)


def route_headers(scope: Scope, session: StreamSession) -> list[tuple[bytes, bytes]]:
    """Which deployment serves the stream."""
    return [(b"x-tokenrelay-deployment", session.deployment.encode())]


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The request body, or 413 if it is over ``limit``. An oversized body is still read (and dropped) up to
    ``DRAIN_CAP``: a client that is still sending when the server answers and closes gets a broken pipe
    instead of the 413."""
    declared = header(scope, b"content-length")
    size_hint = int(declared) if declared is not None and declared.isdigit() else 0
    too_big = size_hint > limit
    parts: list[bytes] = []
    size = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise ClientGone
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            too_big = True
        if chunk and not too_big:
            parts.append(chunk)
        if not msg.get("more_body", False) or (too_big and size > DRAIN_CAP):
            break
    if too_big:
        raise GatewayError(
            413,
            f"Request body is {max(size, size_hint)} bytes; the limit is {limit}.",
            code="request_too_large",
        )
    return b"".join(parts)


async def start_response(scope: Scope, send: Send, status: int, headers: list[tuple[bytes, bytes]]) -> None:
    """Every response starts here: it adds the app's common headers (CORS) and the gateway's own time on
    the request (``x-tokenrelay-overhead-ms``: for model requests, up to asking the model; for the rest, up
    to the answer), and marks the response started."""
    scope[STARTED] = True
    overhead = scope.get(OVERHEAD)
    if overhead is None:
        overhead = time.perf_counter() - scope[ARRIVED]
    headers = [*headers, (b"x-tokenrelay-overhead-ms", b"%.3f" % (overhead * 1000)), *scope[COMMON_HEADERS]]
    await send({"type": "http.response.start", "status": status, "headers": headers})


async def send_json(
    scope: Scope, send: Send, status: int, body: Any, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    data = _encode(body)
    await start_response(
        scope,
        send,
        status,
        [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(data)).encode()),
            *(headers or []),
        ],
    )
    await send({"type": "http.response.body", "body": data})


def error_headers(err: GatewayError) -> list[tuple[bytes, bytes]]:
    if err.retry_after is not None:
        return [(b"retry-after", str(max(0, round(err.retry_after))).encode()), *err.headers]
    return err.headers


def _direct_writer(direct: Any, encoder: StreamEncoder, numbered: bool) -> Callable[[list[Event], int], bool]:
    """The follower's synchronous lane on a server that offers one (``server.SYNC_RESPONSE``): a batch that
    arrives while the handler waits is encoded and written from the upstream's socket callback, with no
    wake-up of the handler's task. Refuses (touching nothing) when the socket has no room."""
    writable = direct.writable
    write_body = direct.write_body

    def write(batch: list[Event], start: int) -> bool:
        if not writable():
            return False
        write_body(encode_numbered(encoder, batch, start) if numbered else encoder.encode(batch))
        return True

    return write


def _absorb(batch: list[Event], start: int) -> bool:
    return True


def on_disconnect(scope: Scope, receive: Receive, on_gone: Callable[[], None]) -> Callable[[], object]:
    """Call ``on_gone`` when the client leaves; returns the way to stop watching. The built-in server
    calls it from the connection (``server.SYNC_RESPONSE``); elsewhere a task waits on ``receive()``."""
    sync = scope.get("extensions", {}).get(SYNC_RESPONSE)
    if sync is not None:
        return sync.watch_disconnect(on_gone)  # type: ignore[no-any-return]
    return asyncio.get_running_loop().create_task(watch_disconnect(receive, on_gone)).cancel


async def watch_disconnect(receive: Receive, on_gone: Callable[[], None]) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            on_gone()
            return


class HttpApp:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.server = gateway.config.server
        self.grpc: GrpcServer | None = None
        self.default_protocol = OpenAIChat()
        self.protocols: dict[str, WireProtocol] = {
            p.name: p
            for p in (
                self.default_protocol,
                AnthropicMessages(),
                OpenAIResponses(),
                OllamaChat(),
                OllamaGenerate(),
            )
        }
        chat = self.endpoint(self.default_protocol)
        from tokenrelay.audio.endpoints import AudioEndpoints  # it imports this module's helpers

        audio = AudioEndpoints(gateway)
        messages = self.endpoint(self.protocols["anthropic"])
        responses = self.endpoint(self.protocols["responses"])
        self.routes: dict[tuple[str, str], Handler] = {
            ("POST", "/v1/chat/completions"): chat,
            ("POST", "/chat/completions"): chat,
            ("POST", "/v1/auto/route"): self.auto_route,
            ("POST", "/v1/messages"): messages,
            ("POST", "/anthropic/v1/messages"): messages,
            ("POST", "/v1/responses"): responses,
            ("POST", "/responses"): responses,
            ("POST", "/api/chat"): self.endpoint(self.protocols["ollama-chat"]),
            ("POST", "/api/generate"): self.endpoint(self.protocols["ollama-generate"]),
            ("POST", "/v1/audio/speech"): audio.speech,
            ("POST", "/v1/audio/transcriptions"): audio.transcriptions,
            ("GET", "/api/tags"): self.ollama_tags,
            ("GET", "/api/version"): self.ollama_version,
            ("GET", "/v1/models"): self.models,
            ("GET", "/healthz"): self.healthz,
            ("GET", "/readyz"): self.readyz,
            ("GET", "/mock/stats"): self.mock_stats,
            ("GET", "/stats"): self.stats,
            ("GET", "/metrics"): self.metrics,
            ("GET", "/ui/playground"): self.static("playground.html", b"text/html; charset=utf-8"),
            ("GET", "/ui/dashboard"): self.static("dashboard.html", b"text/html; charset=utf-8"),
            ("GET", "/sdk/tokenrelay.js"): self.static("tokenrelay.js", b"text/javascript; charset=utf-8"),
            ("GET", "/ui/events"): self.ui_events,
            ("GET", "/v1/usage"): self.usage,
            ("GET", "/admin/usage"): self.admin_usage,
            ("GET", "/admin/keys"): self.admin_keys,
            ("POST", "/admin/keys"): self.admin_create_key,
        }
        self.paths = {path for _, path in self.routes}
        self.cors_any = "*" in self.server.cors_origins
        self.cors_origins = {o.encode() for o in self.server.cors_origins}
        self.common_headers: list[tuple[bytes, bytes]] = (
            [
                (b"access-control-allow-origin", b"*"),
                (
                    b"access-control-expose-headers",
                    b"x-stream-id, retry-after, x-tokenrelay-deployment, x-tokenrelay-overhead-ms",
                ),
            ]
            if self.cors_any
            else []
        )

    async def preflight(self, scope: Scope, send: Send) -> None:
        """CORS preflight, so pages on other origins can ``fetch`` streams."""
        await start_response(
            scope,
            send,
            204,
            [
                (b"access-control-allow-methods", b"GET, POST, DELETE, OPTIONS"),
                # the SDKs send their own headers (x-stainless-*, anthropic-beta ...): allow what is asked
                (
                    b"access-control-allow-headers",
                    header(scope, b"access-control-request-headers")
                    or b"authorization, content-type, x-api-key, anthropic-version",
                ),
                (b"access-control-max-age", b"600"),
            ],
        )
        await send({"type": "http.response.body", "body": b""})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self.http(scope, receive, send)
        elif kind == "lifespan":
            await self.lifespan(receive, send)
        elif kind == "websocket":
            if scope["path"] == "/v1/ws/chat":
                await serve_websocket(self.gateway, scope, receive, send)
            elif scope["path"] == "/v1/ws/voice":
                await serve_websocket(self.gateway, scope, receive, send, VoiceSocket)
            else:
                await send(
                    {"type": "websocket.close", "code": 1008, "reason": "no WebSocket endpoint at this path"}
                )

    async def lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                logs.bind_loop(asyncio.get_running_loop())
                self.gateway.start()
                if self.server.grpc_port:
                    from tokenrelay.transport.grpc_server import GrpcServer  # grpcio loads only when used

                    self.grpc = GrpcServer(self.gateway, self.server.host, self.server.grpc_port)
                    await self.grpc.start()
                # everything imported so far (SQLAlchemy, grpcio, ...) lives as long as the process: keep
                # it out of the cyclic collector, whose full passes otherwise walk it all (stalls of
                # milliseconds under load)
                gc.collect()
                gc.freeze()
                # a young-generation pass walks every container still alive, and under load those are mostly
                # the open streams' own: at the default 700 allocations it ran every few requests (3-4 % of
                # the CPU at 100 streams, passes of 0.5 ms); at 10,000 it runs a tenth as often for about
                # the same work per pass plus a few milliseconds (docs/performance.md)
                gc.set_threshold(10_000, 10, 10)
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                if self.grpc is not None:
                    await self.grpc.stop()
                await self.gateway.close()
                logs.flush()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[ARRIVED] = time.perf_counter()
        path = scope["path"]
        handler = self.routes.get((scope["method"], path))
        if handler is None and scope["method"] == "GET":
            if path.startswith("/v1/models/"):
                handler = self.model
            elif path.startswith("/v1/streams/"):
                handler = self.resume
        elif handler is None and scope["method"] == "DELETE" and path.startswith("/admin/keys/"):
            handler = self.admin_revoke_key
        elif handler is None and scope["method"] == "DELETE" and path.startswith("/v1/streams/"):
            handler = self.cancel_stream
        scope[COMMON_HEADERS] = self.common_headers
        if self.cors_origins and not self.cors_any:
            origin = header(scope, b"origin")
            if origin in self.cors_origins:
                scope[COMMON_HEADERS] = [(b"access-control-allow-origin", origin), (b"vary", b"origin")]
        if scope["method"] == "OPTIONS" and scope[COMMON_HEADERS]:
            await self.preflight(scope, send)
            return
        try:
            if handler is None:
                if path in self.paths:
                    raise GatewayError(405, f"Method {scope['method']} is not allowed on {path}.")
                raise GatewayError(404, f"No endpoint {scope['method']} {path}.", code="unknown_url")
            await handler(scope, receive, send)
        except GatewayError as err:
            if not scope.get(STARTED):
                protocol = scope.get(PROTOCOL, self.default_protocol)
                await send_json(
                    scope, send, protocol.error_status(err), protocol.error_body(err), error_headers(err)
                )
        except ClientGone:
            pass
        except Exception:
            log.exception("unhandled error on %s %s", scope["method"], path)
            if not scope.get(STARTED):
                internal = GatewayError(500, "Internal error in the gateway.", type="server_error")
                protocol = scope.get(PROTOCOL, self.default_protocol)
                await send_json(scope, send, 500, protocol.error_body(internal))

    # ------------------------------------------------------------------------------ small endpoints

    async def healthz(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_json(scope, send, 200, {"status": "ok"})

    async def readyz(self, scope: Scope, receive: Receive, send: Send) -> None:
        gw = self.gateway
        models = {
            n: ("ready" if p.ready else "failed" if n in gw.startup_errors else "loading")
            for n, p in {**gw.providers, **gw.audio.engines()}.items()
        }
        body: dict[str, Any] = {"status": "ready" if gw.ready else "not ready", "models": models}
        if gw.startup_errors:
            body["errors"] = gw.startup_errors
        await send_json(scope, send, 200 if gw.ready else 503, body)

    def _model_card(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self.gateway.started_at, "owned_by": "tokenrelay"}

    def _model_names(self) -> list[str]:
        """Chat models and routers, then speech and transcription models."""
        return [*self.gateway.router.names(), *self.gateway.audio.engines()]

    async def models(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.gateway.admission.authenticate(credential(scope))
        await send_json(
            scope,
            send,
            200,
            {"object": "list", "data": [self._model_card(n) for n in self._model_names()]},
        )

    async def model(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.gateway.admission.authenticate(credential(scope))
        name = scope["path"][len("/v1/models/") :]
        if name not in self.gateway.model_names and name not in self.gateway.audio.engines():
            raise GatewayError(
                404, f"The model '{name}' does not exist.", param="model", code="model_not_found"
            )
        await send_json(scope, send, 200, self._model_card(name))

    async def ollama_tags(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[PROTOCOL] = self.protocols["ollama-chat"]
        self.gateway.admission.authenticate(credential(scope))
        stamp = datetime.fromtimestamp(self.gateway.started_at, UTC).isoformat().replace("+00:00", "Z")
        models = [
            {
                "name": name,
                "model": name,
                "modified_at": stamp,
                "size": 0,
                "digest": "",
                "details": {"format": "", "family": p.kind, "parameter_size": "", "quantization_level": ""},
            }
            for name, p in self.gateway.providers.items()
        ]
        await send_json(scope, send, 200, {"models": models})

    async def ollama_version(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_json(scope, send, 200, {"version": "0.12.0"})

    async def mock_stats(self, scope: Scope, receive: Receive, send: Send) -> None:
        stats = {n: p.stats() for n, p in self.gateway.providers.items() if isinstance(p, MockProvider)}
        if not stats:
            raise GatewayError(404, "No mock models are configured.", code="unknown_url")
        await send_json(scope, send, 200, stats)

    def static(self, name: str, media_type: bytes) -> Handler:
        """A page or script shipped in the package (``tokenrelay/ui``), read once."""
        data = (resources.files("tokenrelay") / "ui" / name).read_bytes()

        async def handler(scope: Scope, receive: Receive, send: Send) -> None:
            await start_response(
                scope,
                send,
                200,
                [
                    (b"content-type", media_type),
                    (b"content-length", str(len(data)).encode()),
                    (b"cache-control", b"no-cache"),
                ],
            )
            await send({"type": "http.response.body", "body": data})

        return handler

    async def ui_events(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The dashboard's numbers once a second, as SSE, until the page goes away."""
        await start_response(scope, send, 200, [(b"content-type", SSE_MEDIA), *STREAM_HEADERS])
        gone = asyncio.Event()
        watcher = asyncio.get_running_loop().create_task(watch_disconnect(receive, gone.set))
        try:
            while not gone.is_set():
                data = b"data: " + _encode(self.gateway.dashboard()) + b"\n\n"
                await send({"type": "http.response.body", "body": data, "more_body": True})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(gone.wait(), 1.0)
        except OSError:
            pass
        finally:
            watcher.cancel()

    async def cancel_stream(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``DELETE /v1/streams/{id}``: stop a stream's model now (the browser SDK's stop button)."""
        session = await self._callers_stream(scope)
        already_done = session.done
        session.cancel()
        await send_json(scope, send, 200, {"id": session.id, "cancelled": not already_done})

    async def metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        from tokenrelay.metrics import CONTENT_TYPE

        data = self.gateway.metrics.render()
        await start_response(
            scope,
            send,
            200,
            [(b"content-type", CONTENT_TYPE.encode()), (b"content-length", str(len(data)).encode())],
        )
        await send({"type": "http.response.body", "body": data})

    async def stats(self, scope: Scope, receive: Receive, send: Send) -> None:
        gw = self.gateway
        await send_json(
            scope,
            send,
            200,
            {
                "worker_pid": os.getpid(),  # with --workers N: which worker answered
                "active_streams": len(gw.streams),
                # backpressure: streams waiting on a slow reader, and the events live streams hold
                "paused_streams": sum(1 for st in gw.streams.values() if st.paused is not None),
                "log_events": sum(len(st.events) for st in gw.streams.values()),
                # the fast lanes since start: batches pushed from the upstream socket's callback, and
                # batches a client got without its handler waking up
                "pushed_batches": gw.pushed_batches + sum(st.pushed for st in gw.streams.values()),
                "direct_writes": gw.direct_writes + sum(st.written_direct for st in gw.streams.values()),
                "evicted_readers": gw.evicted,
                "models": {
                    n: {
                        **p.stats(),
                        "breaker": gw.router.deployments[n].breaker.stats(),
                        **({"queue": gw.gates[n].stats()} if n in gw.gates else {}),
                    }
                    for n, p in gw.providers.items()
                },
                "audio_models": {n: e.stats() for n, e in gw.audio.engines().items()},
            },
        )

    # ------------------------------------------------------------------------------ admin API

    def _admin(self, scope: Scope) -> None:
        """The admin API answers only to the credential in ``$TOKENRELAY_ADMIN_KEY`` (or the variable
        ``server.admin_key_env`` names); with it unset the API is off."""
        expected = os.environ.get(self.server.admin_key_env)
        if not expected:
            raise GatewayError(
                403,
                f"The admin API is off: set {self.server.admin_key_env} to enable it.",
                type="permission_error",
            )
        given = bearer(credential(scope)) or b""
        if not hmac.compare_digest(given, expected.encode()):
            raise GatewayError(401, "The admin credential is missing or wrong.", type="authentication_error")

    async def usage(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``GET /v1/usage``: the calling key's requests, tokens and cost (by model, and the latest)."""
        key = self.gateway.admission.authenticate(credential(scope))
        await self.gateway.records.flush()  # include what is still queued in this process
        body = await records.usage(self.gateway.store, key.id if key else None, _since(scope))
        if key is not None:
            body["budget"] = key.budget
        await send_json(scope, send, 200, body)

    async def admin_usage(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``GET /admin/usage?key_id=...``: one key's usage, or everyone's without ``key_id``."""
        self._admin(scope)
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        await self.gateway.records.flush()
        key_id = query.get("key_id", [None])[-1]
        await send_json(scope, send, 200, await records.usage(self.gateway.store, key_id, _since(scope)))

    async def admin_keys(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._admin(scope)
        keys = await self.gateway.store.keys()
        await send_json(scope, send, 200, {"object": "list", "data": [k.public() for k in keys]})

    async def admin_create_key(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._admin(scope)
        _, body = decode_body(new_key_decoder, await read_body(scope, receive, self.server.max_body_bytes))
        gw = self.gateway
        if body.plan not in gw.config.plans:
            raise invalid(f"Unknown plan '{body.plan}'. Plans: {', '.join(gw.config.plans)}.", param="plan")
        for i, model in enumerate(body.models or []):
            if model not in gw.providers and model not in gw.audio.engines():
                raise invalid(f"Unknown model '{model}'.", param=f"models[{i}]")
        key, secret = await gw.store.create_key(body.plan, body.models, body.budget, body.name, body.metadata)
        await gw.admission.refresh()
        await send_json(scope, send, 201, {**key.public(), "key": secret})

    async def admin_revoke_key(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._admin(scope)
        key_id = scope["path"][len("/admin/keys/") :]
        if not await self.gateway.store.revoke(key_id):
            raise GatewayError(404, f"No active key '{key_id}'.", param="id", code="key_not_found")
        await self.gateway.admission.refresh()
        await send_json(scope, send, 200, {"id": key_id, "revoked": True})

    # ------------------------------------------------------------------------------ model streams

    def endpoint(self, protocol: WireProtocol) -> Handler:
        async def handler(scope: Scope, receive: Receive, send: Send) -> None:
            scope[PROTOCOL] = protocol
            t0 = time.perf_counter()
            body = await read_body(scope, receive, self.server.max_body_bytes)
            req = protocol.decode(body)
            # any protocol can ask, even those without stream_options (Anthropic, Responses, Ollama)
            policy = choice_header(scope, "x-tokenrelay-on-disconnect", ("cancel", "continue"))
            if policy is not None:
                req.on_disconnect = policy
            padding = choice_header(scope, "x-tokenrelay-obfuscation", ("on", "off"))
            if padding is not None:
                req.obfuscation = padding == "on"
            session = await self.gateway.start_stream(
                req, credential(scope), protocol.id_prefix, protocol.name
            )
            overhead = time.perf_counter() - t0
            scope[OVERHEAD] = overhead
            metrics = self.gateway.metrics
            metrics.child(metrics.overhead, protocol.name).observe(overhead)
            status = 200
            try:
                if req.stream:
                    status = await self._stream(scope, protocol, session, receive, send)
                else:
                    status = await self._complete(scope, protocol, session, receive, send)
            except GatewayError as err:
                status = err.status
                raise
            finally:
                self._log(session, protocol, status, t0, scope)

        return handler

    async def auto_route(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``POST /v1/auto/route``: a Chat Completions body for a router model, answered whole, with the
        routing decision (the chosen deployment, every candidate and its score)."""
        protocol = scope[PROTOCOL] = self.default_protocol
        t0 = time.perf_counter()
        req = protocol.decode(await read_body(scope, receive, self.server.max_body_bytes))
        if req.model not in self.gateway.router.routers:
            names = ", ".join(self.gateway.router.routers)
            raise invalid(f"'{req.model}' is not a router model. Routers here: {names}.", param="model")
        req.stream = False
        session = await self.gateway.start_stream(req, credential(scope), protocol.id_prefix, protocol.name)
        scope[OVERHEAD] = time.perf_counter() - t0
        status = 200
        try:
            status = await self._complete(scope, protocol, session, receive, send, with_routing=True)
        except GatewayError as err:
            status = err.status
            raise
        finally:
            self._log(session, protocol, status, t0, scope)

    async def _callers_stream(self, scope: Scope) -> StreamSession:
        """The stream ``/v1/streams/{id}`` names, if the caller's credential opened it (a revoked key has
        none). Else 404, the same answer, in the same (default) protocol, for a stream that never was and
        one opened with another credential: nothing tells a caller that a foreign stream exists."""
        self.gateway.admission.authenticate(credential(scope))
        stream_id = scope["path"][len("/v1/streams/") :]
        session = await self.gateway.find(stream_id, credential_digest(scope))
        if session is None:
            raise GatewayError(
                404,
                f"No stream '{stream_id}': unknown, expired, or opened with another credential.",
                param="id",
                code="stream_not_found",
            )
        return session

    async def resume(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``GET /v1/streams/{id}?after=N``: the events after N, then the live stream, in its own protocol."""
        t0 = time.perf_counter()
        session = await self._callers_stream(scope)
        scope[OVERHEAD] = time.perf_counter() - t0
        protocol = scope[PROTOCOL] = self.protocols[session.protocol]
        after = resume_point(scope)
        self.gateway.metrics.resumes.inc()
        status = 200
        try:
            status = await self._stream(scope, protocol, session, receive, send, after=after, resume=True)
        finally:
            self._log(session, protocol, status, t0, scope)

    async def _stream(
        self,
        scope: Scope,
        protocol: WireProtocol,
        session: StreamSession,
        receive: Receive,
        send: Send,
        after: int = 0,
        resume: bool = False,
    ) -> int:
        follower = session.follow(after=after, keepalive=self.server.keepalive_seconds)
        unwatch = on_disconnect(scope, receive, follower.disconnect)
        handler_task = asyncio.current_task()
        assert handler_task is not None
        follower.on_evict = handler_task.cancel  # a write stuck on a client that stopped reading
        status = 200
        encoder: StreamEncoder | None = None
        delivered = after  # events the client has been sent in full
        try:
            await session.wait_started(self.server.keepalive_seconds)
            if session.pre_error is not None:
                raise session.pre_error
            if follower.gone:
                return 499
            await start_response(
                scope,
                send,
                200,
                [
                    (b"content-type", protocol.media_type),
                    *STREAM_HEADERS,
                    (b"x-stream-id", session.id.encode()),
                    *route_headers(scope, session),
                ],
            )
            req = session.request
            encoder = protocol.encoder(StreamInfo(session.id, req.model, session.created, req))
            keepalive = encoder.keepalive
            opening = encoder.open()
            if after:
                encoder.encode(session.events[:after])  # the encoder's state; the client has these
                opening = b""
            if opening:
                await send({"type": "http.response.body", "body": opening, "more_body": True})
            numbered = resume and protocol.media_type == SSE_MEDIA
            direct = scope.get("extensions", {}).get(SYNC_RESPONSE)
            if direct is not None:
                follower.writer = _direct_writer(direct, encoder, numbered)
            final = b""
            while (batch := await follower.next_batch()) is not None:
                # what came before this batch went out (sent here, or written by the direct lane)
                delivered = follower.cursor - len(batch)
                if not batch:
                    data = keepalive
                elif numbered:
                    data = encode_numbered(encoder, batch, delivered)
                else:
                    data = encoder.encode(batch)
                if encoder.finished:
                    # the response's last bytes go out with its end below: one write, not two
                    final = data or b""
                    delivered = follower.cursor
                    break
                if data:
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                    follower.wrote()
                elif not batch:
                    # a keep-alive was due but this protocol has none (NDJSON): re-arm it, or next_batch
                    # returns [] at once, forever, and the loop never runs the model's events in
                    follower.wrote()
                delivered = follower.cursor
            if follower.gone:
                return 499
            if not encoder.finished:
                # failed after the headers went out (for example a slow pre-stream error)
                err_event = (
                    session.pre_error.to_event()
                    if session.pre_error
                    else Error(type="internal_error", message="the stream ended unexpectedly", status=500)
                )
                await send(
                    {"type": "http.response.body", "body": encoder.encode([err_event]), "more_body": True}
                )
            last = session.events[-1] if session.events else None
            if isinstance(last, Error):
                status = last.status
            await send({"type": "http.response.body", "body": final, "more_body": False})
            return status
        except OSError:
            follower.gone = True  # the socket broke under a write
            return 499
        except asyncio.CancelledError:
            if not follower.stalled:
                raise
            handler_task.uncancel()
            self.gateway.evicted += 1
            await self._drop_stalled(session, delivered, encoder, send)
            return 408
        finally:
            unwatch()
            follower.close()
            if follower.stalled:
                session.client_left("continue", self.server.disconnect_grace_seconds)
            elif follower.gone:
                self.gateway.client_left(session)

    async def _drop_stalled(
        self, session: StreamSession, delivered: int, encoder: StreamEncoder | None, send: Send
    ) -> None:
        """A client too slow for too long: end its response with a resumable error (if the socket takes
        it within a few seconds) and let the stream run on for the grace period, so it can resume."""
        if encoder is None:
            return
        error = Error(
            type="client_too_slow",
            message=(
                f"the client read too slowly; resume with GET /v1/streams/{session.id}?after={delivered}"
            ),
            status=408,
            code="resumable",
        )
        try:
            async with asyncio.timeout(5.0):
                await send(
                    {"type": "http.response.body", "body": encoder.encode([error]), "more_body": False}
                )
        except Exception:
            pass

    async def _complete(
        self,
        scope: Scope,
        protocol: WireProtocol,
        session: StreamSession,
        receive: Receive,
        send: Send,
        with_routing: bool = False,
    ) -> int:
        follower = session.follow()
        follower.writer = _absorb  # the answer is built from the log at the end: no wake-up per chunk
        unwatch = on_disconnect(scope, receive, follower.disconnect)
        try:
            while await follower.next_batch() is not None:
                pass
        finally:
            unwatch()
            follower.close()
        if follower.gone:
            self.gateway.client_left(session)
            return 499
        if session.pre_error is not None:
            raise session.pre_error
        req = session.request
        body = protocol.complete(StreamInfo(session.id, req.model, session.created, req), session.events)
        headers = [(b"x-stream-id", session.id.encode()), *route_headers(scope, session)]
        decision = session.route.decision
        if with_routing and decision is not None:
            body = {"response": body, "routing": decision.body(session.deployment)}
        await send_json(scope, send, 200, body, headers)
        return 200

    def _log(
        self,
        session: StreamSession,
        protocol: WireProtocol,
        status: int,
        t0: float,
        scope: Scope,
    ) -> None:
        """One JSON line per request, at its end (none per chunk)."""
        if not access_log.isEnabledFor(logging.INFO):
            return
        given = header(scope, b"x-request-id")
        request_id = given.decode("latin-1")[:128] if given else session.id
        ttft = (session.first_token_at - session.started_at) * 1000 if session.first_token_at else None
        logs.info_line(
            access_log,
            "request",
            {
                "request_id": request_id,
                "stream_id": session.id,
                "model": session.request.model,
                "protocol": protocol.name,
                "deployment": session.deployment,
                "stream": session.request.stream,
                "status": status,
                "events": len(session.events),
                "attempts": session.route.attempts,
                "failovers": session.route.failovers,
                "ttft_ms": round(ttft, 2) if ttft is not None else None,
                "duration_ms": round((time.perf_counter() - t0) * 1000, 2),
            },
        )
