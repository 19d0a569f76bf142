"""The asyncio client: ``AsyncClient`` and ``AsyncChatStream``, driving ``engine.run_chat`` with httpx.

    from tokenrelay.client import AsyncClient

    async with AsyncClient("http://127.0.0.1:8080") as client:
        async with client.stream(model="tiny", messages=[...]) as stream:
            async for text in stream.text_stream:
                print(text, end="", flush=True)

Unlike the blocking client, each read waits exactly until the stream's first-token or idle deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import httpx

from tokenrelay.client.engine import (
    ChatState,
    Emit,
    Engine,
    IOFailed,
    Open,
    Opened,
    Read,
    Retry,
    StreamConfig,
    Timeouts,
    run_chat,
)
from tokenrelay.client.results import ChatResult, Delta, TextDelta
from tokenrelay.client.sync import build_request, cancel_request, io_failure, stream_config


class AsyncIO:
    """Carries out an engine's operations with an async httpx ``send``; holds the open response."""

    def __init__(self, send: Callable[[httpx.Request], Awaitable[httpx.Response]]) -> None:
        self._send = send
        self.response: httpx.Response | None = None
        self._chunks: AsyncIterator[bytes] | None = None
        self.drop_requested = False

    def adopt(self, response: httpx.Response) -> None:
        """Read from an already open response (the openai transport opened it itself)."""
        self.response, self._chunks = response, response.aiter_raw()

    async def open(self, op: Open) -> Opened:
        await self.close()
        try:
            response = await self._send(build_request(op))
        except httpx.TransportError as exc:
            raise io_failure(exc) from None
        if response.status_code != 200:
            try:
                body = await response.aread()
            except httpx.TransportError:
                body = b""
            finally:
                await response.aclose()
            return Opened(response.status_code, response.headers, body)
        self.adopt(response)
        return Opened(200, response.headers, b"")

    async def read(self, limit: float | None) -> bytes:
        if self.drop_requested or self._chunks is None:
            self.drop_requested = False
            await self.close()
            raise IOFailed("the connection was dropped (drop_connection())")
        try:
            async with asyncio.timeout(limit):
                return await anext(self._chunks, b"")
        except TimeoutError:
            raise IOFailed(f"nothing read for {limit} s", timeout=True) from None
        except httpx.TransportError as exc:
            raise io_failure(exc) from None

    async def close(self) -> None:
        if self.response is not None:
            await self.response.aclose()
        self.response = self._chunks = None

    async def cancel(self, state: ChatState, cfg: StreamConfig) -> None:
        """DELETE the stream if the server may still be generating it for nobody (best effort: the
        server's disconnect grace period ends it anyway)."""
        url = state.cancel_url(cfg)
        if url is None:
            return
        with contextlib.suppress(httpx.HTTPError):
            await (await self._send(build_request(cancel_request(url, cfg)))).aclose()


async def adrive(engine: Engine, io: AsyncIO) -> AsyncGenerator[Any, None]:
    """Run ``engine`` to its end, yielding what it emits; its exceptions propagate."""
    value: Any = None
    failure: IOFailed | None = None
    while True:
        try:
            op = engine.throw(failure) if failure is not None else engine.send(value)
        except StopIteration:
            return
        value, failure = None, None
        if isinstance(op, Emit):
            yield op.item
        elif isinstance(op, Read):
            try:
                value = await io.read(op.timeout)
            except IOFailed as exc:
                failure = exc
        elif isinstance(op, Open):
            try:
                value = await io.open(op)
            except IOFailed as exc:
                failure = exc
        else:
            await asyncio.sleep(op.seconds)


class AsyncChatStream:
    """One streaming chat completion: ``async for`` it for ``Delta``s; it resumes by itself after a drop.

    Use it as an async context manager (or await ``close()``): leaving early cancels the generation.
    """

    def __init__(self, client: AsyncClient, body: dict[str, Any]) -> None:
        self._client = client
        self._state = ChatState()
        self._io = AsyncIO(lambda request: client.http.send(request, stream=True))
        self._engine = run_chat(client.config, body, self._state)
        self._deltas = self._iterate()

    async def _iterate(self) -> AsyncGenerator[Delta, None]:
        try:
            async for delta in adrive(self._engine, self._io):
                yield delta
        finally:
            await self._io.close()
            await self._io.cancel(self._state, self._client.config)

    def __aiter__(self) -> AsyncIterator[Delta]:
        return self._deltas

    async def __anext__(self) -> Delta:
        return await anext(self._deltas)

    @property
    async def text_stream(self) -> AsyncIterator[str]:
        """Only the answer's text, piece by piece."""
        async for delta in self._deltas:
            if type(delta) is TextDelta:
                yield delta.text

    @property
    def result(self) -> ChatResult:
        """What arrived so far, and the end state once it ended."""
        return self._state.snapshot()

    async def final_result(self) -> ChatResult:
        """Read the stream to its end and return the result (raises how it failed)."""
        async for _ in self._deltas:
            pass
        return self._state.snapshot()

    def drop_connection(self) -> None:
        """Drop the connection as a network failure would (to see resume work); the stream goes on."""
        self._io.drop_requested = True

    async def close(self) -> None:
        await self._deltas.aclose()
        await self._io.close()
        await self._io.cancel(self._state, self._client.config)

    async def __aenter__(self) -> AsyncChatStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncClient:
    """The asyncio twin of ``tokenrelay.client.Client`` (same arguments)."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeouts: Timeouts | None = None,
        retry: Retry | None = None,
        headers: Mapping[str, str] | None = None,
        http_client: httpx.AsyncClient | None = None,
        seed: int | None = None,
    ) -> None:
        self.config = stream_config(base_url, api_key, timeouts, retry, headers, seed)
        self._owns_http = http_client is None
        self.http = http_client or httpx.AsyncClient(limits=httpx.Limits(max_connections=None))

    def stream(self, *, model: str, messages: list[dict[str, Any]], **params: Any) -> AsyncChatStream:
        """Start a streaming chat completion; ``params`` are any other Chat Completions fields."""
        return AsyncChatStream(self, {"model": model, "messages": messages, **params})

    async def chat(self, *, model: str, messages: list[dict[str, Any]], **params: Any) -> ChatResult:
        """A whole chat completion, streamed (so it resumes after a drop) and collected."""
        async with self.stream(model=model, messages=messages, **params) as stream:
            return await stream.final_result()

    async def aclose(self) -> None:
        if self._owns_http:
            await self.http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
