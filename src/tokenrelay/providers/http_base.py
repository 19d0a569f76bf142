"""Shared machinery of the HTTP upstream providers (``openai``, ``anthropic``).

One keep-alive connection pool for all upstream calls (``upstream_http``: a lean HTTP/1.1 client,
measured against aiohttp in docs/performance.md). The upstream is always asked to stream, whatever the
client asked: the gateway assembles non-streaming answers itself, so both kinds share one code path.
The connect timeout is here; first-token and stall timeouts are the router's, the same for every
provider. Subclasses say how to build the request body and how to turn the upstream's stream into event
batches (a ``StreamDecoder``). With a push lane (``providers/base.py``), reads after the upstream accepted are
decoded inside the upstream socket's callback and handed to the session directly.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from typing import Any

from tokenrelay.config import ModelConfig
from tokenrelay.errors import GatewayError
from tokenrelay.events import Error, Event
from tokenrelay.providers.base import Provider, Push
from tokenrelay.providers.upstream_errors import upstream_status_error
from tokenrelay.request import ChatRequest
from tokenrelay.sse import SSEError, SSEEvent, SSEParser
from tokenrelay.upstream_http import HttpPool, UpstreamConnectionError


class StreamDecoder(abc.ABC):
    """One upstream body, read by read, as event batches: the same object serves the task's reads and
    the push lane's socket callback. A batch that ends the stream sets ``ended`` (and ``clean`` when the
    upstream finished properly, so the rest of the body is drained and the connection reused)."""

    __slots__ = ("clean", "ended", "sse")

    def __init__(self) -> None:
        self.sse = SSEParser()
        self.ended = False
        self.clean = False

    def feed(self, data: bytes) -> list[Event]:
        try:
            events = self.sse.feed(data)
        except SSEError as exc:
            self.ended = True
            return [Error(type="upstream_error", message=str(exc))]
        return self.decode(events) if events else []

    @abc.abstractmethod
    def decode(self, events: list[SSEEvent]) -> list[Event]:
        """The events of the SSE events one read completed."""

    @abc.abstractmethod
    def truncated(self) -> Error:
        """What the client gets when the body ends before the upstream said it finished."""


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
    def decoder(self, req: ChatRequest) -> StreamDecoder:
        """A fresh decoder for one upstream body."""

    async def stream(self, req: ChatRequest, push: Push | None = None) -> AsyncIterator[list[Event]]:
        # first-token and stall timeouts are the router's (failover.py), the same for every provider
        assert self.pool is not None, "provider not started"
        accepted = False
        dec = self.decoder(req)
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
                lane = _Lane(dec, push) if push is not None else None
                while not dec.ended:
                    if lane is not None:
                        # the push lane: later reads go to the session from the socket callback
                        await resp.push_reads(lane.on_body)
                        if lane.failure is not None:
                            raise lane.failure
                        if lane.last is not None:
                            yield lane.last
                            break
                        if lane.stopped:
                            lane.stopped = False
                            yield []  # the session waits for a slow reader before this goes on
                    data = await resp.read_any()
                    if not data:
                        yield [dec.truncated()]
                        break
                    batch = dec.feed(data)
                    if batch:
                        yield batch
            finally:
                if dec.clean:
                    # the client has its last chunk; read the body to its end to reuse the connection
                    await resp.drain()
                resp.release()
        except UpstreamConnectionError as exc:
            if not accepted:
                raise GatewayError(
                    502, f"upstream {self.cfg.name}: {exc}", type="upstream_unavailable"
                ) from None
            yield [Error(type="upstream_disconnect", message=f"upstream connection lost: {exc}")]


class _Lane:
    """The push lane's socket-callback side: decode a read and hand its batch to the session; the batch
    that ends the stream is kept for the provider's task to yield."""

    __slots__ = ("dec", "failure", "last", "push", "stopped")

    def __init__(self, dec: StreamDecoder, push: Push) -> None:
        self.dec = dec
        self.push = push
        self.last: list[Event] | None = None
        self.stopped = False
        self.failure: Exception | None = None

    def on_body(self, data: bytes) -> bool:
        try:
            batch = self.dec.feed(data)
            if not batch:
                return True
            if self.dec.ended:
                self.last = batch
                return False
            if self.push(batch):
                return True
            self.stopped = True
            return False
        except Exception as exc:  # a bug: raised in the stream's task, never inside the socket callback
            self.failure = exc
            return False
