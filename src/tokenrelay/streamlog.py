"""Stream logs shared by replicas, in Redis Streams (used when ``server.redis_url`` is set).

Each stream has three keys under ``{prefix}:s:{id}``:
* ``:meta``: what a replica needs to serve or continue the stream (protocol, owner digest, the request),
  msgpack;
* ``:log``: a Redis Stream, one entry per event batch (``s``: sequence number of its first event, ``e``:
  the batch, msgpack), trimmed to ``max_log_entries``;
* ``:lease``: the id of the replica running the model, with a short expiry that replica keeps renewing.
Every key expires ``stream_ttl_seconds`` after the stream's last write.

Writes never wait on Redis in the stream's own task: batches queue here and one writer task per process
sends everything queued in one pipeline (so a burst of streams costs one round trip, not one each).
A replica asked to resume a stream it does not hold reads the log (``XREAD BLOCK``) and follows it; if the
lease lapses before the log ends, the owner died, and the follower claims the stream and finishes the
answer through mid-stream failover (``failover.py``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from typing import TYPE_CHECKING, Any

import msgspec
import redis.asyncio as aioredis

from tokenrelay.events import TERMINAL, Event
from tokenrelay.request import ChatRequest

if TYPE_CHECKING:
    from tokenrelay.config import ServerConfig
    from tokenrelay.session import StreamSession

log = logging.getLogger("tokenrelay.streamlog")

_batch = msgspec.msgpack.Encoder()
_batch_decoder = msgspec.msgpack.Decoder(list[Event])


class StreamMeta(msgspec.Struct, kw_only=True):
    protocol: str
    owner: str | None
    created: int
    request: ChatRequest


_meta_decoder = msgspec.msgpack.Decoder(StreamMeta)


class RedisStreamLog:
    def __init__(self, server: ServerConfig) -> None:
        assert server.redis_url
        self.redis: aioredis.Redis = aioredis.from_url(server.redis_url)
        self.prefix = server.redis_prefix
        self.ttl_ms = max(1000, int(server.stream_ttl_seconds * 1000))
        self.lease_ms = max(100, int(server.replica_lease_seconds * 1000))
        self.max_entries = server.max_log_entries
        self.replica = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.owned: dict[str, StreamSession] = {}  # live streams whose model runs here
        self._ops: list[tuple[Any, ...]] = []
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def key(self, stream_id: str, part: str) -> str:
        return f"{self.prefix}:s:{stream_id}:{part}"

    async def start(self) -> None:
        await self.redis.ping()  # a wrong URL fails start-up, not the first stream
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._writer()), loop.create_task(self._renew_leases())]

    async def close(self) -> None:
        if self._ops:
            await self._flush()
        for task in self._tasks:
            task.cancel()
        await self.redis.aclose()

    # ------------------------------------------------------------------------------ writing

    def opened(self, session: StreamSession) -> None:
        """A stream whose model runs here: publish its meta and claim it."""
        meta = StreamMeta(
            protocol=session.protocol, owner=session.owner, created=session.created, request=session.request
        )
        self.own(session)
        self._ops.append(("meta", session.id, _batch.encode(meta)))
        self._wake.set()

    def own(self, session: StreamSession) -> None:
        self.owned[session.id] = session
        session.sink = self.append
        self._ops.append(("lease", session.id))

    def append(self, session: StreamSession, start: int, batch: list[Event]) -> None:
        """The session's sink: queue the batch (sent with the next flush)."""
        self._ops.append(("log", session.id, start, _batch.encode(batch)))
        if isinstance(batch[-1], TERMINAL):
            self.owned.pop(session.id, None)
            self._ops.append(("end", session.id))
        self._wake.set()

    async def _writer(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._flush()
            except Exception as exc:  # Redis down: streams go on from memory; resumes elsewhere will miss
                log.warning("writing stream logs to Redis failed: %s", exc)
                await asyncio.sleep(0.5)

    async def _flush(self) -> None:
        ops, self._ops = self._ops, []
        if not ops:
            return
        pipe = self.redis.pipeline(transaction=False)
        touched: set[str] = set()
        for op in ops:
            kind, stream_id = op[0], op[1]
            if kind == "meta":
                pipe.set(self.key(stream_id, "meta"), op[2], px=self.ttl_ms)
            elif kind == "lease":
                pipe.set(self.key(stream_id, "lease"), self.replica, px=self.lease_ms)
            elif kind == "log":
                pipe.xadd(
                    self.key(stream_id, "log"),
                    {"s": op[2], "e": op[3]},
                    maxlen=self.max_entries,
                    approximate=True,
                )
                touched.add(stream_id)
            elif kind == "end":
                pipe.delete(self.key(stream_id, "lease"))
        for stream_id in touched:
            pipe.pexpire(self.key(stream_id, "log"), self.ttl_ms)
            pipe.pexpire(self.key(stream_id, "meta"), self.ttl_ms)
        await pipe.execute()

    async def _renew_leases(self) -> None:
        while True:
            await asyncio.sleep(self.lease_ms / 3000)
            if not self.owned:
                continue
            try:
                pipe = self.redis.pipeline(transaction=False)
                for stream_id in list(self.owned):
                    pipe.set(self.key(stream_id, "lease"), self.replica, px=self.lease_ms)
                await pipe.execute()
            except Exception as exc:
                log.warning("renewing stream leases in Redis failed: %s", exc)

    # ------------------------------------------------------------------------------ reading

    async def meta(self, stream_id: str) -> StreamMeta | None:
        raw: Any = await self.redis.get(self.key(stream_id, "meta"))
        return None if raw is None else _meta_decoder.decode(raw)

    async def read(
        self, stream_id: str, after_entry: str, block_ms: int | None
    ) -> list[tuple[str, int, list[Event]]]:
        """Log entries after ``after_entry`` (a Redis entry id), waiting up to ``block_ms`` for one."""
        reply: Any = await self.redis.xread(
            {self.key(stream_id, "log"): after_entry}, count=1000, block=block_ms
        )
        out: list[tuple[str, int, list[Event]]] = []
        for _key, entries in reply or ():
            for entry_id, fields in entries:
                out.append((entry_id.decode(), int(fields[b"s"]), _batch_decoder.decode(fields[b"e"])))
        return out

    async def owner_alive(self, stream_id: str) -> bool:
        return bool(await self.redis.exists(self.key(stream_id, "lease")))

    async def claim(self, stream_id: str) -> bool:
        """Take over a stream whose owner's lease lapsed; only one replica wins."""
        won = await self.redis.set(self.key(stream_id, "lease"), self.replica, px=self.lease_ms, nx=True)
        return bool(won)
