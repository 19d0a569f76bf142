"""The gateway pipeline shared by every transport: request -> router -> provider -> stream session.

Owns the providers (and the one pooled upstream HTTP client), readiness, and the table of live
streams. Transports call ``open()`` with a decoded ``ChatRequest`` and read the returned session.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections import OrderedDict, deque
from typing import TYPE_CHECKING, Any

import msgspec

from tokenrelay.admission import Admission, Principal
from tokenrelay.audio.models import AudioEngine, AudioModels
from tokenrelay.config import Config
from tokenrelay.errors import GatewayError
from tokenrelay.events import Error, Event, ReasoningDelta, TextDelta, ToolCallDelta, Usage
from tokenrelay.metrics import GapCounts, Metrics
from tokenrelay.providers import build_provider
from tokenrelay.providers.base import Provider
from tokenrelay.providers.http_base import HttpStreamProvider
from tokenrelay.queueing import PriorityGate
from tokenrelay.records import RecordWriter, redact
from tokenrelay.request import ChatRequest, estimate_prompt_tokens, new_stream_id
from tokenrelay.router import Route, Router
from tokenrelay.session import StreamSession
from tokenrelay.store import Store
from tokenrelay.transport.credentials import digest
from tokenrelay.upstream_http import HttpPool

if TYPE_CHECKING:
    from tokenrelay.streamlog import RedisStreamLog, StreamMeta

log = logging.getLogger("tokenrelay")


def final_status(session: StreamSession) -> int:
    """The HTTP status a stream ended with: its pre-stream error's, its error event's, or 200."""
    if session.pre_error is not None:
        return session.pre_error.status
    last = session.events[-1] if session.events else None
    return last.status if isinstance(last, Error) else 200


def delivered_tokens(session: StreamSession) -> tuple[int, int]:
    """(prompt, completion) tokens: the provider's usage when it sent one, else what was delivered,
    counted (one token per text or tool-call delta) with the prompt estimated, so a disconnected or failed
    stream is charged for what it delivered."""
    for ev in reversed(session.events):
        if isinstance(ev, Usage):
            return ev.prompt_tokens, ev.completion_tokens
    produced = sum(1 for ev in session.events if isinstance(ev, TextDelta | ToolCallDelta | ReasoningDelta))
    return (estimate_prompt_tokens(session.request) if session.accepted else 0), produced


class Gateway:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.providers: dict[str, Provider] = {m.name: build_provider(m) for m in config.models}
        self.router = Router(self.providers, config.routers)
        self.audio = AudioModels(config)  # speech and transcription models (audio/)
        self.model_names = frozenset(self.router.names())
        self.gates = {
            m.name: PriorityGate(m.name, m.max_concurrent, m.max_queue_wait_seconds, m.max_queue)
            for m in config.models
            if m.max_concurrent
        }
        self.streams: dict[str, StreamSession] = {}  # live
        # finished, still resumable: id -> (expiry on the loop clock, session), oldest first
        self.finished: OrderedDict[str, tuple[float, StreamSession]] = OrderedDict()
        self.started_at = int(time.time())
        self.startup_errors: dict[str, str] = {}
        self.evicted = 0  # readers dropped for reading too slowly
        # finished streams' batches pushed by their provider and written directly to a client (GET /stats)
        self.pushed_batches = 0
        self.direct_writes = 0
        # finished streams of the last minutes, for the dashboard: (time, first token s, tokens/s, failed)
        self.recent: deque[tuple[float, float | None, float | None, bool]] = deque(maxlen=20_000)
        self.pool: HttpPool | None = None
        self.log: RedisStreamLog | None = None
        self.store = Store(config.server.database_url)
        audit_key = os.environ.get(config.server.audit_key_env)
        self.metrics = Metrics()
        self.metrics.attach(self)
        self.records = RecordWriter(self.store, audit_key.encode() if audit_key else None)
        self.admission = Admission(config, self.store, self.records)
        if config.server.redis_url:
            from tokenrelay.streamlog import RedisStreamLog  # redis loads only when used

            self.log = RedisStreamLog(config.server)
        self._start_task: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        return (
            "redis" not in self.startup_errors
            and self.admission.loaded
            and all(p.ready for p in self.providers.values())
            and self.audio.ready
        )

    def start(self) -> None:
        """Start every provider in the background; ``ready`` turns true when all are loaded and warm."""
        self._start_task = asyncio.get_running_loop().create_task(self._start())

    async def started(self) -> None:
        """Until every provider's start finished (successfully or not)."""
        if self._start_task is not None:
            await asyncio.shield(self._start_task)

    async def _start(self) -> None:
        try:
            await self.store.start()
            await self.records.start()
            await self.admission.start()
        except Exception as exc:
            self.startup_errors["database"] = f"{type(exc).__name__}: {exc}"
            log.error("the database at %s is not usable: %s", self.store.url, exc)
        if self.log is not None:
            try:
                await self.log.start()
            except Exception as exc:
                self.startup_errors["redis"] = f"{type(exc).__name__}: {exc}"
                log.error("Redis at %s is not reachable: %s", self.config.server.redis_url, exc)
        if any(isinstance(p, HttpStreamProvider) for p in self.providers.values()):
            self.pool = HttpPool(max(m.max_idle_connections for m in self.config.models))
            for p in self.providers.values():
                if isinstance(p, HttpStreamProvider):
                    p.pool = self.pool

        async def start_one(name: str, provider: Provider | AudioEngine) -> None:
            t0 = time.perf_counter()
            try:
                await provider.start()
            except Exception as exc:
                self.startup_errors[name] = f"{type(exc).__name__}: {exc}"
                log.error("model %s failed to start: %s", name, exc)
                return
            log.info("model %s (%s) ready in %.2f s", name, provider.kind, time.perf_counter() - t0)

        models: dict[str, Provider | AudioEngine] = {**self.providers, **self.audio.engines()}
        await asyncio.gather(*(start_one(n, p) for n, p in models.items()))

    async def close(self) -> None:
        if self._start_task is not None and not self._start_task.done():
            self._start_task.cancel()
        for session in list(self.streams.values()):
            session.cancel()
        for provider in self.providers.values():
            await provider.close()
        await self.audio.close()
        if self.pool is not None:
            self.pool.close()
        if self.log is not None:
            await self.log.close()
        await self.admission.close()
        await self.records.close()
        await self.store.close()

    def open(
        self,
        req: ChatRequest,
        id_prefix: str = "chatcmpl-",
        protocol: str = "openai",
        owner: str | None = None,
        principal: Principal | None = None,
    ) -> StreamSession:
        """Route the request and start its stream; raises ``GatewayError`` for an unknown model."""
        events: list[Event] = []
        route = Route(req.model)
        try:
            source = self.router.stream(req, events, route)
        except GatewayError as err:
            if err.code == "model_not_found":  # only then: no extra lookups for every chat request
                self.audio.refuse_chat_use(req.model, self.router.names())
            raise
        server = self.config.server
        session = StreamSession(
            new_stream_id(id_prefix),
            req,
            route,
            source,
            protocol,
            owner,
            events=events,
            max_buffered=server.max_buffered_events,
            stall_limit=server.client_stall_seconds,
        )
        session.principal = principal
        if req.model in self.model_names:
            session.batch_gaps = GapCounts(self.metrics.child(self.metrics.inter_token, req.model))
        if self.log is not None:
            self.log.opened(session)
        self._track(session)
        return session

    async def start_stream(
        self,
        req: ChatRequest,
        credential: bytes | None,
        id_prefix: str = "chatcmpl-",
        protocol: str = "openai",
    ) -> StreamSession:
        """Admission, then ``open()``: what every transport calls with a decoded request and the raw
        credential header (``Authorization`` or ``x-api-key``) it came with."""
        principal = await self.admission.admit(credential, req)
        gate = self.gates.get(req.model)
        try:
            if gate is not None:
                await gate.acquire(principal.plan.priority if principal else 0)
            try:
                session = self.open(
                    req, id_prefix, protocol, digest(credential) if credential else None, principal
                )
            except BaseException:
                if gate is not None:
                    gate.release()
                raise
        except BaseException:
            self.admission.release(principal, 0)
            raise
        session.gate = gate
        return session

    def _track(self, session: StreamSession) -> None:
        self.streams[session.id] = session
        session.task.add_done_callback(lambda _t: self._retire(session))

    def _retire(self, session: StreamSession) -> None:
        self.streams.pop(session.id, None)
        self.pushed_batches += session.pushed
        self.direct_writes += session.written_direct
        if session.gate is not None:
            session.gate.release()
            session.gate = None
        prompt, completion = delivered_tokens(session)
        status = final_status(session)
        first = session.first_token_at
        ttft = first - session.started_at if first is not None else None
        elapsed = time.perf_counter() - first if first is not None else 0.0
        tps = completion / elapsed if completion > 1 and elapsed > 0 else None  # output rate after the first
        self._observe(session, status, ttft, tps)
        principal = session.principal
        if principal is not None:
            self.admission.release(principal, prompt + completion)
        if self.admission.loaded:
            self.records.add(self._record(session, status, ttft, prompt, completion))
        server = self.config.server
        if server.stream_ttl_seconds <= 0 or server.max_finished_streams <= 0:
            return
        now = asyncio.get_running_loop().time()
        self.finished[session.id] = (now + server.stream_ttl_seconds, session)
        while self.finished:
            expires, oldest = next(iter(self.finished.values()))
            if expires > now and len(self.finished) <= server.max_finished_streams:
                break
            self.finished.pop(oldest.id)

    def _observe(self, session: StreamSession, status: int, ttft: float | None, tps: float | None) -> None:
        """A finished stream's metrics (metrics.py), what the router learns, and the dashboard's window."""
        m = self.metrics
        req = session.request
        model, deployment = req.model, session.deployment
        if model not in self.model_names:  # a stream followed from another replica may name any model
            return
        last = session.events[-1] if session.events else None
        m.child(m.requests, model, deployment, session.protocol, str(status)).inc()
        if isinstance(last, Error):
            m.child(m.errors, model, m.kind(last.type)).inc()
        elif session.pre_error is not None:
            m.child(m.errors, model, m.kind(session.pre_error.type)).inc()
        if ttft is not None:
            m.child(m.first_token, model, deployment, session.protocol).observe(ttft)
            if tps is not None:
                m.child(m.tokens_per_second, model, deployment).observe(tps)
            if last is not None and not isinstance(last, Error) and session.route.attempts == 1:
                # what the router learns: a clean stream served by one deployment from start to end
                self.router.deployments[deployment].learn(ttft, tps)
        if session.route.failovers:
            m.child(m.failovers, model).inc(session.route.failovers)
        self.recent.append((time.time(), ttft, tps, status >= 400))

    def dashboard(self) -> dict[str, Any]:
        """What /ui/dashboard shows, over the last minute of finished streams."""
        now = time.time()
        window = [r for r in self.recent if r[0] > now - 60]
        ttfts = sorted(r[1] for r in window if r[1] is not None)
        rates = [r[2] for r in window if r[2] is not None]
        return {
            "ts": now,
            "active_streams": len(self.streams),
            "first_token_p50_ms": round(ttfts[len(ttfts) // 2] * 1000, 1) if ttfts else None,
            "tokens_per_second": round(sum(rates) / len(rates), 1) if rates else None,
            "errors_last_minute": sum(1 for r in window if r[3]),
            "requests_last_minute": len(window),
            "deployments": [d.describe() for d in self.router.deployments.values()],
        }

    def _record(
        self, session: StreamSession, status: int, ttft: float | None, prompt: int, completion: int
    ) -> dict[str, Any]:
        """The usage and audit record of a finished stream (written later, in a batch)."""
        principal = session.principal
        now = time.perf_counter()
        req = session.request
        encoded = msgspec.json.encode(req)
        return {
            "ts": time.time(),
            "key_id": principal.key.id if principal else None,
            "stream_id": session.id,
            "model": req.model,
            "deployment": session.deployment,
            "protocol": session.protocol,
            "status": status,
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "ttft_ms": round(ttft * 1000, 3) if ttft is not None else None,
            "duration_ms": round((now - session.started_at) * 1000, 3),
            "cost": principal.plan.cost(req.model, prompt, completion) if principal else 0.0,
            "request_hash": hashlib.sha256(encoded).hexdigest(),
            "body": msgspec.json.encode(redact(msgspec.json.decode(encoded))).decode()
            if self.config.server.audit_bodies
            else None,
        }

    def _find_here(self, stream_id: str) -> StreamSession | None:
        session = self.streams.get(stream_id)
        if session is not None:
            return session
        entry = self.finished.get(stream_id)
        if entry is None:
            return None
        if entry[0] <= asyncio.get_running_loop().time():
            self.finished.pop(stream_id, None)
            return None
        return entry[1]

    async def find(self, stream_id: str, owner: str | None) -> StreamSession | None:
        """A live stream, or a finished one that has not expired, opened with the credential ``owner``:
        from this process, else (with Redis) from the shared log, followed here from now on."""
        session = self._find_here(stream_id)
        if session is None and self.log is not None:
            meta = await self.log.meta(stream_id)
            if meta is not None and meta.owner == owner:
                session = self._find_here(stream_id)  # another resume may have opened it meanwhile
                if session is None:
                    session = self._follow_remote(stream_id, meta)
        if session is None or session.owner != owner:
            return None
        return session

    def _follow_remote(self, stream_id: str, meta: StreamMeta) -> StreamSession:
        from tokenrelay.remote import RemoteStream

        assert self.log is not None
        remote = RemoteStream(self.log, self.router, stream_id)
        server = self.config.server
        session = StreamSession(
            stream_id,
            meta.request,
            Route(meta.request.model),
            remote.stream(),
            meta.protocol,
            meta.owner,
            max_buffered=server.max_buffered_events,
            stall_limit=server.client_stall_seconds,
        )
        session.created = meta.created
        remote.session = session
        self._track(session)
        return session

    def client_left(self, session: StreamSession) -> None:
        """A transport's reader is gone: apply the request's disconnect policy (or the server's)."""
        server = self.config.server
        policy = session.request.on_disconnect or server.on_disconnect
        session.client_left(policy, server.disconnect_grace_seconds)
