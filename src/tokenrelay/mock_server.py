"""``tokenrelay mock-upstream``: the mock model served as an OpenAI- and Anthropic-compatible HTTP server.

Point any OpenAI client or a tokenrelay ``openai`` deployment at it to rehearse failures for real:
faults here are wire faults (an HTTP error status, a connection dropped mid-stream, a stall, a chunk
that is not JSON, CRLF framing, comment lines, an event over 128 KiB, a missing ``[DONE]``). It records
what it saw, including clients that went away, at ``GET /mock/stats`` (``POST /mock/reset`` clears it).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

import msgspec
from aiohttp import web

from tokenrelay.audio.mock_upstream import AUDIO
from tokenrelay.audio.mock_upstream import add_routes as add_audio_routes
from tokenrelay.errors import GatewayError
from tokenrelay.events import Event, TextDelta
from tokenrelay.mock import Fault, MockStats, parse_options, run_script
from tokenrelay.protocol import openai_chat
from tokenrelay.protocol.anthropic_messages import AnthropicMessages
from tokenrelay.protocol.base import StreamInfo, WireProtocol
from tokenrelay.protocol.openai_chat import OpenAIChat
from tokenrelay.request import new_stream_id

STATS = web.AppKey("stats", MockStats)
DEFAULTS = web.AppKey("defaults", dict)


class Wire(NamedTuple):
    protocol: WireProtocol
    malformed: bytes  # a chunk that is not JSON
    done: bytes  # the end marker that ``no_done`` leaves out
    pad_anchor: bytes  # a key in the first text event, before which ``big_event_bytes`` pads


OPENAI = Wire(OpenAIChat(), b'data: {"id": "broken", "choices": [\n\n', openai_chat.DONE, b'"object":')
ANTHROPIC = Wire(
    AnthropicMessages(),
    b'event: content_block_delta\ndata: {"type": "content_block_delta", "delta": [\n\n',
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n',
    b'"index":',
)


def _error(wire: Wire, err: GatewayError) -> web.Response:
    headers = {"retry-after": f"{err.retry_after:g}"} if err.retry_after is not None else None
    return web.json_response(
        wire.protocol.error_body(err), status=wire.protocol.error_status(err), headers=headers
    )


def handler(wire: Wire) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        return await serve_stream(request, wire)

    return handle


async def serve_stream(request: web.Request, wire: Wire) -> web.StreamResponse:
    stats = request.app[STATS]
    raw = await request.read()
    try:
        req = wire.protocol.decode(raw)
        opts = parse_options(request.app[DEFAULTS], req.mock)
    except GatewayError as err:
        return _error(wire, err)
    stats.last_request = {
        "protocol": wire.protocol.name,
        "model": req.model,
        "stream": req.stream,
        "include_usage": req.include_usage,
        "temperature": req.temperature,
        "extra": req.extra,
        "authorization": request.headers.get("authorization"),
        "x-api-key": request.headers.get("x-api-key"),
        "anthropic-version": request.headers.get("anthropic-version"),
        "body": msgspec.json.decode(raw),
    }
    script = run_script(opts, req, stats)
    info = StreamInfo(new_stream_id(wire.protocol.id_prefix), req.model, int(time.time()), req)
    try:
        try:
            await anext(script)  # accepted, or the injected HTTP error
        except GatewayError as err:
            return _error(wire, err)
        if not req.stream:
            events: list[Event] = []
            async for item in script:
                if isinstance(item, Fault):
                    return _error(wire, GatewayError(500, f"mock fault: {item.kind}"))
                events.extend(item)
            return web.json_response(wire.protocol.complete(info, events))
        resp = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        encoder = wire.protocol.encoder(info)
        padded = opts.big_event_bytes <= 0
        pending = encoder.open()
        async for item in script:
            if isinstance(item, Fault):
                if item.kind == "malformed":
                    await resp.write(pending + wire.malformed)
                    await resp.write_eof()
                else:  # cut: drop the connection without finishing the chunked body
                    if pending:
                        await resp.write(pending)
                    assert request.transport is not None
                    request.transport.abort()
                return resp
            batch: list[Event] = item
            data = pending + encoder.encode(batch)
            pending = b""
            if not padded and batch and isinstance(batch[0], TextDelta):
                padded = True
                # a real event with a huge field: parsers with a 128 KiB line limit fail here
                pad = msgspec.json.encode("x" * opts.big_event_bytes)
                data = data.replace(wire.pad_anchor, b'"padding":' + pad + b"," + wire.pad_anchor, 1)
            if opts.no_done:
                data = data.replace(wire.done, b"")
            if opts.comments:
                data = b": mock comment\n\n" + data
            if opts.crlf:
                data = data.replace(b"\n", b"\r\n")
            if data:
                await resp.write(data)
        await resp.write_eof()
        return resp
    finally:
        await script.aclose()  # type: ignore[attr-defined]


async def models(request: web.Request) -> web.Response:
    return web.json_response(
        {
            "object": "list",
            "data": [{"id": "mock", "object": "model", "created": 0, "owned_by": "tokenrelay-mock"}],
        }
    )


async def stats(request: web.Request) -> web.Response:
    return web.json_response({**request.app[STATS].__dict__, "audio": request.app[AUDIO]})


async def reset(request: web.Request) -> web.Response:
    request.app[STATS].__init__()  # type: ignore[misc]  # in place: app state is frozen once serving
    request.app[AUDIO].clear()
    return web.json_response({"reset": True})


def make_app(defaults: dict[str, Any] | None = None) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[STATS] = MockStats()
    app[DEFAULTS] = defaults or {}
    parse_options(app[DEFAULTS], None)
    app.router.add_post("/v1/chat/completions", handler(OPENAI))
    app.router.add_post("/v1/messages", handler(ANTHROPIC))
    app.router.add_get("/v1/models", models)
    add_audio_routes(app)  # /v1/audio/speech, /v1/audio/transcriptions
    app.router.add_get("/mock/stats", stats)
    app.router.add_post("/mock/reset", reset)
    return app


def serve(host: str, port: int, defaults: dict[str, Any] | None = None) -> None:
    web.run_app(
        make_app(defaults),
        host=host,
        port=port,
        handler_cancellation=True,
        backlog=4096,
        access_log=None,
        print=None,
    )
