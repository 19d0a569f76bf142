"""``tokenrelay mock-upstream``: the mock model served as an OpenAI-compatible HTTP server.

Point any OpenAI client or a tokenrelay ``openai`` deployment at it to rehearse failures for real:
faults here are wire faults (an HTTP error status, a connection dropped mid-stream, a stall, a chunk
that is not JSON, CRLF framing, comment lines, an event over 128 KiB, a missing ``[DONE]``). It records
what it saw, including clients that went away, at ``GET /mock/stats`` (``POST /mock/reset`` clears it).
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
from aiohttp import web

from tokenrelay.errors import GatewayError
from tokenrelay.events import Event, TextDelta
from tokenrelay.mock import Fault, MockStats, parse_options, run_script
from tokenrelay.protocol import openai_chat
from tokenrelay.request import new_stream_id

STATS = web.AppKey("stats", MockStats)
DEFAULTS = web.AppKey("defaults", dict)


def _error(err: GatewayError) -> web.Response:
    headers = {"retry-after": f"{err.retry_after:g}"} if err.retry_after is not None else None
    return web.json_response(openai_chat.error_body(err), status=err.status, headers=headers)


async def chat(request: web.Request) -> web.StreamResponse:
    stats = request.app[STATS]
    try:
        req = openai_chat.decode_request(await request.read())
        opts = parse_options(request.app[DEFAULTS], req.mock)
    except GatewayError as err:
        return _error(err)
    stats.last_request = {
        "model": req.model,
        "stream": req.stream,
        "include_usage": req.include_usage,
        "temperature": req.temperature,
        "extra": req.extra,
        "authorization": request.headers.get("authorization"),
    }
    script = run_script(opts, req, stats)
    stream_id = new_stream_id()
    created = int(time.time())
    try:
        try:
            await anext(script)  # accepted, or the injected HTTP error
        except GatewayError as err:
            return _error(err)
        if not req.stream:
            builder = openai_chat.ChatCompletionBuilder(stream_id, req.model, created)
            async for item in script:
                if isinstance(item, Fault):
                    return _error(GatewayError(500, f"mock fault: {item.kind}"))
                builder.add(item)
            return web.json_response(builder.body())
        resp = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        encoder = openai_chat.ChatStreamEncoder(stream_id, req.model, created, req.include_usage)
        padded = opts.big_event_bytes <= 0
        async for item in script:
            if isinstance(item, Fault):
                if item.kind == "malformed":
                    await resp.write(b'data: {"id": "broken", "choices": [\n\n')
                    await resp.write_eof()
                else:  # cut: drop the connection without finishing the chunked body
                    assert request.transport is not None
                    request.transport.abort()
                return resp
            batch: list[Event] = item
            data = encoder.encode(batch)
            if not padded and batch and isinstance(batch[0], TextDelta):
                padded = True
                # a real chunk with a huge field: parsers with a 128 KiB line limit fail here
                pad = msgspec.json.encode("x" * opts.big_event_bytes)
                data = data.replace(b'"object":', b'"padding":' + pad + b',"object":', 1)
            if opts.no_done:
                data = data.replace(openai_chat.DONE, b"")
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
    return web.json_response(request.app[STATS].__dict__)


async def reset(request: web.Request) -> web.Response:
    request.app[STATS].__init__()  # type: ignore[misc]  # in place: app state is frozen once serving
    return web.json_response({"reset": True})


def make_app(defaults: dict[str, Any] | None = None) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[STATS] = MockStats()
    app[DEFAULTS] = defaults or {}
    parse_options(app[DEFAULTS], None)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
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
