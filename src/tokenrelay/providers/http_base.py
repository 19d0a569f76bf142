"""Shared machinery of the HTTP upstream providers (``openai``, ``anthropic``).

One keep-alive connection pool for all upstream calls (``upstream_http``: a lean HTTP/1.1 client,
measured against aiohttp in docs/performance.md). The upstream is always asked to stream, whatever the
client asked: the gateway assembles non-streaming answers itself, so both kinds share one code path.
The connect timeout is here; first-token and stall timeouts are the router's, the same for every
provider. Subclasses say how to build the request body and how to turn
the upstream's stream into event batches (``relay``).
"""

from __future__ import annotations

import abc
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
    """Each upstream read as the SSE events it completed (every read as it comes: no line-length limit).
    A broken stream raises ``SSEError``, which ``HttpStreamProvider.stream()`` reports as
    ``upstream_error``. A plain async iterator, not an async generator: nothing to finalize when a relay
    returns early."""

    __slots__ = ("parser", "resp")

    def __init__(self, resp: UpstreamResponse) -> None:
        self.resp = resp
        self.parser = SSEParser()

    def __aiter__(self) -> SSEReads:
        return self

    async def __anext__(self) -> list[SSEEvent]:
        data = await self.resp.read_any()
        if not data:
            raise StopAsyncIteration
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
        # options.body: fields added to every upstream request of this deployment (a vLLM or provider
        # specific knob, or a mock-upstream's fault options); the request's own fields win
        body = cfg.options.get("body") or {}
        if not isinstance(body, dict):
            raise ValueError(f"models.{cfg.name}.options.body must be a mapping")
        self.body_defaults: dict[str, Any] = body

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
        self, resp: UpstreamResponse, req: ChatRequest, state: dict[str, Any]
    ) -> AsyncIterator[list[Event]]:
        """The upstream body as event batches, one per read (read them with ``SSEReads``). The final batch
        sets ``state["done"]`` (so the rest of the body is drained and the connection reused)."""

    async def stream(self, req: ChatRequest) -> AsyncIterator[list[Event]]:
        # first-token and stall timeouts are the router's (failover.py), the same for every provider
        assert self.pool is not None, "provider not started"
        state: dict[str, Any] = {}
        accepted = False
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
                async for batch in self.relay(resp, req, state):
                    yield batch
            finally:
                if state.get("done"):
                    # the client has its last chunk; read the body to its end to reuse the connection
                    await resp.drain()
                resp.release()
        except SSEError as exc:  # only raised by relay(), so after the upstream accepted
            yield [Error(type="upstream_error", message=str(exc))]
        except UpstreamConnectionError as exc:
            if not accepted:
                raise GatewayError(
                    502, f"upstream {self.cfg.name}: {exc}", type="upstream_unavailable"
                ) from None
            yield [Error(type="upstream_disconnect", message=f"upstream connection lost: {exc}")]
