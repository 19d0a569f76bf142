"""Admission: who is calling (API key), what their plan lets them do, and whether they may start a stream now.

Runs between the protocol decoder and the router, for every transport. Keys live in the store
(``store.py``); this module keeps the active ones in memory by digest (refreshed every few seconds, so keys
made by another replica or the CLI take effect without a restart), so checking a key is one SHA-256 and one
dict lookup. Plans come from the config; their limits are enforced with the ``limits`` library, in memory or
in Redis (``server.redis_url``) so that they hold across replicas. Concurrent streams are counted per
replica.

With no keys at all the gateway runs open (every request admitted, no plan): fine on 127.0.0.1, and refused
on any other address unless ``server.allow_open`` (the CLI checks before binding).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from limits import RateLimitItem, RateLimitItemPerDay, RateLimitItemPerMinute
from limits.aio.strategies import FixedWindowRateLimiter
from limits.storage import storage_from_string

from tokenrelay.errors import GatewayError
from tokenrelay.records import RecordWriter
from tokenrelay.store import ApiKey, Store, key_digest

if TYPE_CHECKING:
    from tokenrelay.config import Config, PlanConfig
    from tokenrelay.jwt_auth import JwtVerifier
    from tokenrelay.request import ChatRequest

log = logging.getLogger("tokenrelay.admission")

REFRESH_SECONDS = 5.0


class Principal:
    """An admitted caller: the key, its plan, and the stream slot it holds until ``release()``."""

    __slots__ = ("key", "plan", "plan_name", "released")

    def __init__(self, key: ApiKey, plan_name: str, plan: PlanConfig) -> None:
        self.key = key
        self.plan_name = plan_name
        self.plan = plan
        self.released = False


class Limits:
    """The rate-limit items of one plan."""

    __slots__ = ("checks", "requests", "tokens")

    def __init__(self, plan: PlanConfig) -> None:
        self.requests: list[tuple[str, RateLimitItem]] = []
        if plan.requests_per_minute:
            self.requests.append(("requests per minute", RateLimitItemPerMinute(plan.requests_per_minute)))
        if plan.requests_per_day:
            self.requests.append(("requests per day", RateLimitItemPerDay(plan.requests_per_day)))
        self.tokens = RateLimitItemPerMinute(plan.tokens_per_minute) if plan.tokens_per_minute else None
        self.checks = len(self.requests) + (self.tokens is not None)


def looks_like_jwt(secret: bytes) -> bool:
    return secret.startswith(b"eyJ") and secret.count(b".") == 2


def bearer(value: bytes | None) -> bytes | None:
    """The secret in an ``Authorization: Bearer ...`` or ``x-api-key`` value."""
    if value is None:
        return None
    if value[:7].lower() == b"bearer ":
        return value[7:].strip()
    return value.strip()


class Admission:
    def __init__(self, config: Config, store: Store, records: RecordWriter) -> None:
        self.config = config
        self.store = store
        self.records = records
        self.plans = config.plans
        self.limits = {name: Limits(plan) for name, plan in self.plans.items()}
        server = config.server
        redis_url = server.rate_limit_url or server.redis_url
        self.remote = bool(redis_url)
        uri = "async+" + redis_url if redis_url else "async+memory://"
        options: dict[str, Any] = {"implementation": "redispy"} if redis_url else {}  # measured: a third
        # less CPU per command than the default coredis client (docs/benchmarks.md), and redis-py is
        # already the stream log's client
        storage = storage_from_string(uri, key_prefix=f"{server.redis_prefix}:limits", **options)
        self.limiter = FixedWindowRateLimiter(storage)
        self.keys: dict[str, ApiKey] = {}  # digest -> active key
        self.jwt: JwtVerifier | None = None
        if config.jwt_issuers:
            from tokenrelay.jwt_auth import JwtVerifier  # PyJWT and cryptography load only when used

            self.jwt = JwtVerifier(config.jwt_issuers)
        self.streams: dict[str, int] = {}  # key id -> live streams on this replica
        self._refresher: asyncio.Task[None] | None = None
        self.loaded = False  # until the keys are read, nobody is admitted (not even "open")

    @property
    def open(self) -> bool:
        """No keys and no token issuers: every request is admitted without a plan."""
        return not self.keys and self.jwt is None

    async def start(self) -> None:
        if self.jwt is not None:
            await self.jwt.start()
        await self.refresh()
        self.loaded = True
        self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop())

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
        if self.jwt is not None:
            await self.jwt.close()

    async def refresh(self) -> None:
        self.keys = {k.digest: k for k in await self.store.keys(include_revoked=False)}

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_SECONDS)
            try:
                await self.refresh()
                await self.records.refresh_spent()  # what other replicas charged, for budgets
            except Exception as exc:  # the database is away: keep the keys we have
                log.warning("refreshing API keys failed: %s", exc)

    def authenticate(self, credential: bytes | None) -> ApiKey | None:
        """The caller's key; ``None`` when running open. Raises 401 for a missing or unknown key."""
        if not self.loaded:
            raise GatewayError(503, "The gateway is starting (API keys not loaded yet).", retry_after=1)
        if self.open:
            return None
        secret = bearer(credential)
        if not secret:
            raise GatewayError(
                401,
                "An API key is required: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'.",
                type="authentication_error",
                code="missing_api_key",
            )
        if self.jwt is not None and looks_like_jwt(secret):
            return self.jwt.verify(secret)
        key = self.keys.get(key_digest(secret))
        if key is None:
            raise GatewayError(
                401,
                "The API key is not valid (unknown or revoked).",
                type="authentication_error",
                code="invalid_api_key",
            )
        return key

    async def admit(self, credential: bytes | None, req: ChatRequest) -> Principal | None:
        """Authenticate and apply the plan to this request; raises 401/403/429 with the reason."""
        key = self.authenticate(credential)
        if key is None:
            return None
        plan = self.plans.get(key.plan)
        if plan is None:
            raise GatewayError(
                403, f"The key's plan '{key.plan}' is not configured.", type="permission_error"
            )
        allowed = key.models if key.models is not None else plan.models
        if allowed is not None and req.model not in allowed:
            raise GatewayError(
                403,
                f"This key may not use the model '{req.model}'. Allowed: {', '.join(allowed) or 'none'}.",
                type="permission_error",
                param="model",
                code="model_not_allowed",
            )
        if key.budget is not None and self.records.spent.get(key.id, 0.0) >= key.budget:
            raise GatewayError(
                429,
                f"This key's budget of {key.budget:g} is spent.",
                type="insufficient_quota",
                code="budget_exhausted",
            )
        if plan.concurrent_streams and self.streams.get(key.id, 0) >= plan.concurrent_streams:
            raise GatewayError(
                429,
                f"Limit of {plan.concurrent_streams} concurrent streams reached for this key.",
                type="rate_limit_error",
                code="concurrent_streams",
                retry_after=1,
            )
        limits = self.limits[key.plan]
        if limits.checks:
            # with Redis, every limit at once: one round trip of waiting, not one per limit
            checks = [self.limiter.hit(item, key.id) for _, item in limits.requests]
            if limits.tokens is not None:
                checks.append(self.limiter.test(limits.tokens, key.id))
            if self.remote and len(checks) > 1:
                results = await asyncio.gather(*checks)
            else:
                results = [await check for check in checks]
            if limits.tokens is not None and not results[-1]:
                raise await self._refusal(limits.tokens, key.id, "tokens per minute", "tokens")
            for (what, item), ok in zip(limits.requests, results, strict=False):
                if not ok:
                    raise await self._refusal(item, key.id, what, "requests")
        self.streams[key.id] = self.streams.get(key.id, 0) + 1
        return Principal(key, key.plan, plan)

    async def _refusal(self, item: RateLimitItem, key_id: str, what: str, unit: str) -> GatewayError:
        stats = await self.limiter.get_window_stats(item, key_id)
        reset = max(0.0, stats.reset_time - time.time())
        err = GatewayError(
            429,
            f"Rate limit reached: {item.amount} {what} for this key's plan. Try again in {reset:.0f} s.",
            type="rate_limit_error",
            code=f"{unit}_limit",
            retry_after=max(1.0, reset),
        )
        err.headers = [
            (f"x-ratelimit-limit-{unit}".encode(), str(item.amount).encode()),
            (f"x-ratelimit-remaining-{unit}".encode(), str(max(0, stats.remaining)).encode()),
            (f"x-ratelimit-reset-{unit}".encode(), f"{reset:.0f}s".encode()),
        ]
        return err

    def release(self, principal: Principal | None, tokens: int) -> None:
        """The stream ended: free its slot and count its tokens against tokens per minute."""
        if principal is None or principal.released:
            return
        principal.released = True
        key_id = principal.key.id
        left = self.streams.get(key_id, 1) - 1
        if left > 0:
            self.streams[key_id] = left
        else:
            self.streams.pop(key_id, None)
        item = self.limits[principal.plan_name].tokens
        if item is not None and tokens > 0:
            asyncio.get_running_loop().create_task(self._charge_tokens(item, key_id, tokens))

    async def _charge_tokens(self, item: RateLimitItem, key_id: str, tokens: int) -> None:
        try:
            await self.limiter.hit(item, key_id, cost=tokens)
        except Exception as exc:
            log.warning("counting tokens for %s failed: %s", key_id, exc)

    def stats(self) -> dict[str, Any]:
        return {"open": self.open, "keys": len(self.keys), "streams": sum(self.streams.values())}
