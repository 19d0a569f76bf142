"""Transparent resume for the official openai SDK: httpx transports to hand to ``OpenAI`` / ``AsyncOpenAI``.

    import httpx, openai
    from tokenrelay.client import ResumingTransport

    client = openai.OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="tr-...",
                           http_client=httpx.Client(transport=ResumingTransport()))

A streaming Chat Completions request is sent with ``x-tokenrelay-on-disconnect: continue``. When tokenrelay
answers it (an ``x-stream-id`` header), the response body the SDK reads is the stream's SSE events; if the
connection drops, the transport reopens ``GET /v1/streams/{id}`` with ``Last-Event-ID`` and carries on, so
the SDK sees one unbroken stream (the resume endpoint's ``id:`` lines, which openai-python cannot parse, are
not handed on, and neither is a replayed finish or usage chunk). Everything else passes through untouched.
Closing a stream early (``stream.close()``, leaving its ``with``) cancels the generation on the server.
"""

from __future__ import annotations

import random
from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterator
from typing import Any

import httpx
import msgspec

from tokenrelay.client.aio import AsyncIO, adrive
from tokenrelay.client.engine import (
    ON_DISCONNECT_HEADER,
    ChatState,
    Retry,
    StreamConfig,
    Timeouts,
    run_relay,
)
from tokenrelay.client.errors import StreamInterrupted
from tokenrelay.client.sync import SyncIO, drive

_CHAT_PATH = "/chat/completions"
# what a resume request carries over from the original one: the credential
_AUTH_HEADERS = ("authorization", "x-api-key", "api-key", "cookie")


class _StreamFlag(msgspec.Struct):
    stream: bool = False


def _is_chat_stream(request: httpx.Request) -> bool:
    if request.method != "POST" or not request.url.path.endswith(_CHAT_PATH):
        return False
    try:
        return msgspec.json.decode(request.read(), type=_StreamFlag).stream
    except (msgspec.DecodeError, msgspec.ValidationError):
        return False


def _relay_state(
    request: httpx.Request, response: httpx.Response, retry: Retry, rng: random.Random
) -> tuple[StreamConfig, ChatState]:
    base = str(request.url.copy_with(query=None))[: -len(_CHAT_PATH)]
    headers = {k: v for k, v in request.headers.items() if k.lower() in _AUTH_HEADERS}
    limits: dict[str, Any] = request.extensions.get("timeout") or {}
    timeouts = Timeouts(connect=limits.get("connect", 10.0), first_token=None, idle=None)
    state = ChatState()
    state.opened(response.headers)
    return StreamConfig(base, headers, timeouts, retry, rng), state


class _RelayStream(httpx.SyncByteStream):
    def __init__(
        self, chunks: Generator[bytes, None, None], io: SyncIO, cfg: StreamConfig, state: ChatState
    ) -> None:
        self._chunks, self._io, self._cfg, self._state = chunks, io, cfg, state

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._chunks
        except StreamInterrupted as exc:
            raise httpx.RemoteProtocolError(str(exc)) from exc

    def close(self) -> None:
        self._chunks.close()
        self._io.close()
        self._io.cancel(self._state, self._cfg)


class ResumingTransport(httpx.BaseTransport):
    """Wraps ``transport`` (default: a plain ``httpx.HTTPTransport``) to resume dropped chat streams."""

    def __init__(
        self,
        transport: httpx.BaseTransport | None = None,
        *,
        retry: Retry | None = None,
        seed: int | None = None,
    ) -> None:
        self._inner = transport or httpx.HTTPTransport()
        self._retry = retry or Retry()
        self._rng = random.Random(seed)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        streaming = _is_chat_stream(request)
        if streaming:
            request.headers[ON_DISCONNECT_HEADER] = "continue"
        response = self._inner.handle_request(request)
        if not streaming or response.status_code != 200 or "x-stream-id" not in response.headers:
            return response
        cfg, state = _relay_state(request, response, self._retry, self._rng)
        io = SyncIO(self._inner.handle_request)
        io.adopt(response)
        body = _RelayStream(drive(run_relay(cfg, state), io), io, cfg, state)
        return httpx.Response(200, headers=response.headers, stream=body, extensions=response.extensions)

    def close(self) -> None:
        self._inner.close()


class _AsyncRelayStream(httpx.AsyncByteStream):
    def __init__(
        self, chunks: AsyncGenerator[bytes, None], io: AsyncIO, cfg: StreamConfig, state: ChatState
    ) -> None:
        self._chunks, self._io, self._cfg, self._state = chunks, io, cfg, state

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._chunks:
                yield chunk
        except StreamInterrupted as exc:
            raise httpx.RemoteProtocolError(str(exc)) from exc

    async def aclose(self) -> None:
        await self._chunks.aclose()
        await self._io.close()
        await self._io.cancel(self._state, self._cfg)


class AsyncResumingTransport(httpx.AsyncBaseTransport):
    """The asyncio twin of ``ResumingTransport``, for ``openai.AsyncOpenAI``."""

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport | None = None,
        *,
        retry: Retry | None = None,
        seed: int | None = None,
    ) -> None:
        self._inner = transport or httpx.AsyncHTTPTransport()
        self._retry = retry or Retry()
        self._rng = random.Random(seed)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        streaming = _is_chat_stream(request)
        if streaming:
            request.headers[ON_DISCONNECT_HEADER] = "continue"
        response = await self._inner.handle_async_request(request)
        if not streaming or response.status_code != 200 or "x-stream-id" not in response.headers:
            return response
        cfg, state = _relay_state(request, response, self._retry, self._rng)
        io = AsyncIO(self._inner.handle_async_request)
        io.adopt(response)
        body = _AsyncRelayStream(adrive(run_relay(cfg, state), io), io, cfg, state)
        return httpx.Response(200, headers=response.headers, stream=body, extensions=response.extensions)

    async def aclose(self) -> None:
        await self._inner.aclose()
