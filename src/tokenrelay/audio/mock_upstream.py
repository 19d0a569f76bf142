"""The audio endpoints of ``tokenrelay mock-upstream``: deterministic speech and transcripts, streamed.

* ``POST /v1/audio/speech``: a 440 Hz sine tone at 24 kHz, ``MS_PER_CHAR`` milliseconds of it per input
  character, as ``pcm`` or ``wav`` (a streaming header first), in chunks of ``chunk_ms`` with
  ``delay_ms`` between them; ``stream_format: "sse"`` sends ``speech.audio.delta`` events instead.
* ``POST /v1/audio/transcriptions``: ``mock_transcript(filename, size)``, as JSON, text, or with
  ``stream=true`` as ``transcript.text.delta`` events (one per word) and ``transcript.text.done``.

Faults and timing per request: the speech body's ``mock`` object (``chunk_ms``, ``delay_ms``,
``error_status``, ``cut_after`` chunks), the transcription form's ``mock_delay_ms``,
``mock_error_status`` and ``mock_cut_after`` (words) fields. What the last request of each kind looked
like is in ``GET /mock/stats`` under ``audio``.
"""

from __future__ import annotations

import array
import asyncio
import base64
import math
from typing import Any

import msgspec
from aiohttp import web

from tokenrelay.audio.wav import stream_header

AUDIO = web.AppKey("audio", dict)

RATE = 24000
MS_PER_CHAR = 60
_WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "bright",
    "stars",
    "watch",
    "the",
    "quiet",
    "river",
    "run",
    "toward",
    "an",
    "open",
    "sea",
]


def _tone() -> bytes:
    # one second of a 440 Hz sine: a whole number of cycles, so it loops without a click
    samples = array.array("h", (round(8000 * math.sin(2 * math.pi * 440 * i / RATE)) for i in range(RATE)))
    return samples.tobytes()


TONE = _tone()


def mock_transcript(filename: str, size: int) -> str:
    """The transcript the mock gives a file: the same name and size, the same words."""
    words = [_WORDS[(size + i) % len(_WORDS)] for i in range(6 + size % 6)]
    return f"Mock transcript of {filename}, {size} bytes: " + " ".join(words) + "."


def mock_pcm(characters: int) -> bytes:
    """The PCM the mock speaks for an input of ``characters``."""
    total = characters * MS_PER_CHAR * RATE // 1000 * 2
    reps = total // len(TONE) + 1
    return (TONE * reps)[:total]


def _error(status: int, message: str, param: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}}
    return web.json_response(body, status=status)


class MockSpeech(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    chunk_ms: int = 100
    delay_ms: float = 0.0
    error_status: int | None = None
    cut_after: int | None = None


async def speech(request: web.Request) -> web.StreamResponse:
    raw = await request.read()
    try:
        body = msgspec.json.decode(raw, type=dict[str, Any])
        opts = msgspec.convert(body.get("mock") or {}, MockSpeech)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return _error(400, f"bad request: {exc}")
    request.app[AUDIO]["speech"] = {
        "body": body,
        "authorization": request.headers.get("authorization"),
    }
    if opts.error_status:
        return _error(opts.error_status, "mock upstream error")
    text = body.get("input")
    if not isinstance(text, str) or not text:
        return _error(400, "Missing required parameter: 'input'.", "input")
    fmt = body.get("response_format", "mp3")
    if fmt not in ("pcm", "wav"):
        return _error(400, f"The mock upstream speaks pcm and wav, not {fmt}.", "response_format")
    sse = body.get("stream_format") == "sse"
    pcm = mock_pcm(len(text))
    step = max(2, RATE * opts.chunk_ms // 1000 * 2)
    chunks = [pcm[i : i + step] for i in range(0, len(pcm), step)]
    if fmt == "wav":
        chunks.insert(0, stream_header(RATE))
    media = "text/event-stream" if sse else ("audio/wav" if fmt == "wav" else "audio/pcm")
    resp = web.StreamResponse(headers={"content-type": media})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    for n, chunk in enumerate(chunks):
        if opts.cut_after is not None and n >= opts.cut_after:
            assert request.transport is not None
            request.transport.abort()
            return resp
        if sse:
            data = b'data: {"type":"speech.audio.delta","audio":"' + base64.b64encode(chunk) + b'"}\n\n'
        else:
            data = chunk
        await resp.write(data)
        if opts.delay_ms:
            await asyncio.sleep(opts.delay_ms / 1000)
    if sse:
        usage = {
            "input_tokens": len(text),
            "output_tokens": len(chunks),
            "total_tokens": len(text) + len(chunks),
        }
        await resp.write(
            b"data: " + msgspec.json.encode({"type": "speech.audio.done", "usage": usage}) + b"\n\n"
        )
    await resp.write_eof()
    return resp


async def transcriptions(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    upload = form.get("file")
    if not isinstance(upload, web.FileField):
        return _error(400, "Missing required parameter: 'file'.", "file")
    data = upload.file.read()
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    request.app[AUDIO]["transcription"] = {
        "fields": fields,
        "filename": upload.filename,
        "content_type": upload.content_type,
        "bytes": len(data),
        "authorization": request.headers.get("authorization"),
    }
    if not fields.get("model"):
        return _error(400, "Missing required parameter: 'model'.", "model")
    if fields.get("mock_error_status"):
        return _error(int(fields["mock_error_status"]), "mock upstream error")
    text = mock_transcript(upload.filename, len(data))
    tokens_in, tokens_out = len(data) // 100 + 1, len(text.split())
    usage = {
        "type": "tokens",
        "input_tokens": tokens_in,
        "output_tokens": tokens_out,
        "total_tokens": tokens_in + tokens_out,
    }
    if fields.get("stream", "false").lower() != "true":
        if fields.get("response_format") == "text":
            return web.Response(text=text + "\n", content_type="text/plain")
        return web.json_response({"text": text, "usage": usage})
    delay = float(fields.get("mock_delay_ms", "0")) / 1000
    cut_after = int(fields["mock_cut_after"]) if fields.get("mock_cut_after") else None
    resp = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    words = text.split(" ")
    for n, word in enumerate(words):
        if cut_after is not None and n >= cut_after:
            assert request.transport is not None
            request.transport.abort()
            return resp
        delta = word if n == 0 else " " + word
        await resp.write(
            b"data: " + msgspec.json.encode({"type": "transcript.text.delta", "delta": delta}) + b"\n\n"
        )
        if delay:
            await asyncio.sleep(delay)
    done = {"type": "transcript.text.done", "text": text, "usage": usage}
    await resp.write(b"data: " + msgspec.json.encode(done) + b"\n\n")
    await resp.write_eof()
    return resp


def add_routes(app: web.Application) -> None:
    app[AUDIO] = {}
    app.router.add_post("/v1/audio/speech", speech)
    app.router.add_post("/v1/audio/transcriptions", transcriptions)
