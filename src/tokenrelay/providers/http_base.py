"""Shared machinery of the HTTP upstream providers (``openai``, ``anthropic``).

One keep-alive connection pool for all upstream calls (``upstream_http``: a lean HTTP/1.1 client,
measured against aiohttp in docs/performance.md). The upstream is always asked to stream, whatever the
client asked: the gateway assembles non-streaming answers itself, so both kinds share one code path.
Timeouts: connect, first token, and idle between reads, checked by one watchdog timer per stream that
re-arms itself (no per-read timer churn). Subclasses say how to build the request body and how to turn
the upstream's stream into event batches (``relay``).
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterator
from typing import Any

from tokenrelay.config import ModelConfig
from tokenrelay.errors import GatewayError
from tokenrelay.events import Error, Event
from tokenrelay.providers.base import Provider
from tokenrelay.providers.upstream_errors import upstream_status_error
from tokenrelay.request import ChatRequest
from tokenrelay.sse import SSEError, SSEEvent, SSEParser
from tokenrelay.upstream_http import HttpPool, UpstreamConnectionError, UpstreamResponse


class SSEReads:
    """Each upstream read as the SSE events it completed (every read as it comes: no line-length limit),
    marking the read's time for the idle watchdog. A broken stream raises ``SSEError``, which
    ``HttpStreamProvider.stream()`` reports as ``upstream_error``. A plain async iterator, not an async
    generator: nothing to finalize when a relay returns early."""

    __slots__ = ("loop", "parser", "resp", "state")

    def __init__(
        self, resp: UpstreamResponse, state: dict[str, Any], loop: asyncio.AbstractEventLoop
    ) -> None:
        self.resp = resp
        self.state = state
        self.loop = loop
        self.parser = SSEParser()

    def __aiter__(self) -> SSEReads:
        return self

    async def __anext__(self) -> list[SSEEvent]:
        data = await self.resp.read_any()
        if not data:
            raise StopAsyncIteration
        self.state["last"] = self.loop.time()
        return self.parser.feed(data)


class HttpStreamProvider(Provider):
    def __init__(
        self, cfg: ModelConfig, url: str, headers: dict[str, str], pool: HttpPool | None = None
    ) -> None:
        super().__init__(cfg)
        self.url = url
        self.headers = headers
        self.pool = pool
        self._own_pool = False

    async def start(self) -> None:
        if self.pool is None:
            self.pool = HttpPool(self.cfg.max_idle_connections)
            self._own_pool = True
        self.ready = True

    async def close(self) -> None:
        if self._own_pool and self.pool is not None:
            self.pool.close()

    @abc.abstractmethod
    def body(self, req: ChatRequest) -> bytes:
        """The upstream request body (always a streaming request)."""

    @abc.abstractmethod
    def relay(
        self, resp: UpstreamResponse, req: ChatRequest, state: dict[str, Any], loop: asyncio.AbstractEventLoop
    ) -> AsyncIterator[list[Event]]:
        """The upstream body as event batches, one per read (read them with ``SSEReads``). The
        first batch with content sets ``state["first"]``, and the final batch ``state["done"]`` (so the rest
        of the body is drained and the connection reused)."""

    async def stream(self, req: ChatRequest) -> AsyncIterator[list[Event]]:
        assert self.pool is not None, "provider not started"
        loop = asyncio.get_running_loop()
        started = loop.time()
        first_limit, idle_limit = self.cfg.first_token_timeout, self.cfg.idle_timeout
        state: dict[str, Any] = {"last": started, "first": False}
        accepted = False
        try:
            async with asyncio.timeout(None) as deadline:

                def watchdog() -> None:
                    base, limit = (state["last"], idle_limit) if state["first"] else (started, first_limit)
                    due = float(base) + limit
                    if loop.time() >= due:
                        deadline.reschedule(loop.time())  # expires now: TimeoutError below
                    else:
                        state["timer"] = loop.call_at(due, watchdog)

                state["timer"] = loop.call_at(started + first_limit, watchdog)
                try:
                    resp = await self.pool.request(
                        "POST", self.url, self.headers, self.body(req), self.cfg.connect_timeout
                    )
                    try:
                        if resp.status != 200:
                            raise upstream_status_error(
                                resp.status, await resp.read(65536), resp.headers.get("retry-after")
                            )
                        accepted = True
                        yield []
                        async for batch in self.relay(resp, req, state, loop):
                            yield batch
                    finally:
                        if state.get("done"):
                            # the client has its last chunk; read the body to its end to reuse the connection
                            await resp.drain()
                        resp.release()
                finally:
                    state["timer"].cancel()
        except TimeoutError:
            what = "idle timeout" if state["first"] else "first-token timeout"
            limit = idle_limit if state["first"] else first_limit
            if not accepted:
                raise GatewayError(504, f"upstream {what} after {limit:g} s", type="timeout") from None
            yield [Error(type="timeout", message=f"upstream {what} after {limit:g} s", status=504)]
        except SSEError as exc:  # only raised by relay(), so after the upstream accepted
            yield [Error(type="upstream_error", message=str(exc))]
        except UpstreamConnectionError as exc:
            if not accepted:
                raise GatewayError(
                    502, f"upstream {self.cfg.name}: {exc}", type="upstream_unavailable"
                ) from None
            yield [Error(type="upstream_disconnect", message=f"upstream connection lost: {exc}")]
