"""The HTTP side of audio: ``POST /v1/audio/speech`` and ``POST /v1/audio/transcriptions``.

Same path as chat: body (size-checked) -> decoder (a 400 naming the field) -> admission -> engine ->
the response, each chunk written as the engine or upstream produced it (chunked transfer). A second
task per request waits for the client's disconnect and cancels the handler, which kills the synthesis
processes or drops the upstream connection at once. Raw audio has no in-band error: a failure after the
headers went out ends the response without its final chunk, so the client sees a truncated transfer
(an incomplete chunked body), never a short file that looks whole; SSE answers end with an error event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import msgspec

from tokenrelay.audio import multipart
from tokenrelay.audio.models import Grant, admit
from tokenrelay.audio.speech import decode_speech
from tokenrelay.audio.transcription import parse_form
from tokenrelay.errors import GatewayError
from tokenrelay.gateway import Gateway
from tokenrelay.protocol import openai_chat
from tokenrelay.transport.credentials import credential, header
from tokenrelay.transport.http import (
    OVERHEAD,
    STREAM_HEADERS,
    Receive,
    Scope,
    Send,
    read_body,
    start_response,
    watch_disconnect,
)

log = logging.getLogger("tokenrelay.audio")


class AudioEndpoints:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.server = gateway.config.server

    async def speech(self, scope: Scope, receive: Receive, send: Send) -> None:
        gw = self.gateway
        t0 = time.perf_counter()
        req = decode_speech(await read_body(scope, receive, self.server.max_body_bytes))
        engine = gw.audio.speech_model(req.model, gw.model_names)
        engine.check(req)
        grant = await admit(gw, credential(scope), req.model, "audio.speech")
        status = 500
        scope[OVERHEAD] = time.perf_counter() - t0  # up to asking the engine, as for chat
        try:
            stream = await engine.open(req)
            headers = [(b"content-type", stream.media_type.encode()), *STREAM_HEADERS, *stream.headers]
            sse = req.stream_format == "sse"
            status = await relay_response(
                scope, receive, send, headers, stream.chunks, stream.close, grant, sse
            )
        except GatewayError as err:
            status = err.status
            raise
        finally:
            grant.finish(status, len(req.input) if status == 200 else 0, 0, req)

    async def transcriptions(self, scope: Scope, receive: Receive, send: Send) -> None:
        gw = self.gateway
        t0 = time.perf_counter()
        boundary = multipart.boundary_of(header(scope, b"content-type"))
        limit = max(self.server.max_body_bytes, gw.audio.max_upload_bytes)
        form = parse_form(multipart.parse(await read_body(scope, receive, limit), boundary))
        engine = gw.audio.transcription_model(form.model, gw.model_names)
        engine.check(form)
        grant = await admit(gw, credential(scope), form.model, "audio.transcriptions")
        status = 500
        record = {
            "model": form.model,
            "file": {"filename": form.file.filename, "bytes": len(form.file.data)},
            "fields": dict(form.fields),
            "stream": form.stream,
        }
        result = None
        scope[OVERHEAD] = time.perf_counter() - t0
        try:
            stream = await engine.open(form)
            result = stream.result
            headers = [(b"content-type", stream.media_type.encode()), *STREAM_HEADERS]
            sse = stream.media_type.startswith("text/event-stream")
            status = await relay_response(
                scope, receive, send, headers, stream.chunks, stream.close, grant, sse
            )
        except GatewayError as err:
            status = err.status
            raise
        finally:
            units = (result.input_units, result.output_units) if result is not None else (0, 0)
            grant.finish(status, *units, record)


async def relay_response(
    scope: Scope,
    receive: Receive,
    send: Send,
    headers: list[tuple[bytes, bytes]],
    chunks: AsyncIterator[bytes],
    close: Callable[[], Awaitable[None]],
    grant: Grant,
    sse: bool,
) -> int:
    """Write the response as the chunks come; the status the request ended with (499: client left)."""
    task = asyncio.current_task()
    assert task is not None
    gone = False

    def left() -> None:
        nonlocal gone
        gone = True
        task.cancel()

    watcher = asyncio.get_running_loop().create_task(watch_disconnect(receive, left))
    try:
        await start_response(scope, send, 200, headers)
        async for chunk in chunks:
            grant.first_byte()
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return 200
    except asyncio.CancelledError:
        if not gone:
            raise
        task.uncancel()
        return 499
    except OSError:
        return 499
    except Exception as exc:  # the engine or the upstream failed after the headers went out
        log.warning("audio response for %s cut off: %s", grant.model, exc)
        if sse:
            err = GatewayError(502, f"the audio stream failed: {exc}", type="upstream_error")
            body = b"data: " + msgspec.json.encode(openai_chat.error_body(err)) + b"\n\n"
            with contextlib.suppress(OSError):
                await send({"type": "http.response.body", "body": body, "more_body": False})
        # else: no final chunk, so the client sees the transfer cut off rather than a short file
        return 502
    finally:
        watcher.cancel()
        await close()
