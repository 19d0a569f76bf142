"""OAuth2 / JWT bearer tokens from configured issuers (``jwt_issuers`` in the config).

A token is checked against its issuer's keys: a JWKS URL (fetched at start, re-fetched every
``JWKS_REFRESH_SECONDS`` and, at most every ``UNKNOWN_KID_BACKOFF`` seconds, when a token names a key id it
does not know) or static PEM public keys. RS256 and ES256 (and whatever else ``algorithms`` allows).
Signature, issuer, audience and expiry are verified by PyJWT. A verified token becomes a key-like
identity: the plan from a claim (or the issuer's default), allowed models from a claim, and an id derived
from issuer and subject so usage and limits are per user.

Verification runs in the request path without I/O: keys are fetched in the background, and a verified
token is cached until it expires (bounded), so a client reusing its token costs one dict lookup.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jwt
import msgspec

from tokenrelay.errors import GatewayError
from tokenrelay.store import ApiKey

if TYPE_CHECKING:
    from tokenrelay.config import JwtIssuer

log = logging.getLogger("tokenrelay.jwt")

JWKS_REFRESH_SECONDS = 600.0
UNKNOWN_KID_BACKOFF = 30.0
CACHE_SIZE = 10_000


def _fetch(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as resp:  # an operator-configured URL
        return dict(msgspec.json.decode(resp.read()))


class Issuer:
    def __init__(self, cfg: JwtIssuer) -> None:
        self.cfg = cfg
        self.keys: dict[str | None, Any] = {}  # kid -> key (None: the static keys, tried in turn)
        self.static = [Path(k).read_text() if not k.lstrip().startswith("-----") else k for k in cfg.keys]
        self.fetched_at = 0.0
        self.fetching = False

    async def refresh(self) -> None:
        if not self.cfg.jwks_url or self.fetching:
            return
        self.fetching = True
        try:
            # a thread for the blocking fetch: once in minutes, never per request
            jwks = await asyncio.to_thread(_fetch, self.cfg.jwks_url)
            keys: dict[str | None, Any] = {}
            for entry in jwks.get("keys", []):
                try:
                    keys[entry.get("kid")] = jwt.PyJWK(entry)
                except jwt.PyJWTError as exc:
                    log.warning("JWKS %s: skipping a key: %s", self.cfg.jwks_url, exc)
            self.keys = keys
        except Exception as exc:
            log.warning("fetching JWKS %s failed: %s", self.cfg.jwks_url, exc)
        finally:
            self.fetched_at = time.monotonic()
            self.fetching = False

    def candidates(self, kid: str | None) -> list[Any]:
        if kid is not None and kid in self.keys:
            return [self.keys[kid]]
        if self.cfg.jwks_url and time.monotonic() - self.fetched_at > UNKNOWN_KID_BACKOFF:
            asyncio.get_running_loop().create_task(self.refresh())  # a rotated key: fetch, reject for now
        return [*self.static, *(k for k in self.keys.values() if kid is None)]


class JwtVerifier:
    def __init__(self, issuers: list[JwtIssuer]) -> None:
        self.issuers = {i.issuer: Issuer(i) for i in issuers}
        self.cache: dict[bytes, tuple[float, ApiKey]] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await asyncio.gather(*(i.refresh() for i in self.issuers.values()))
        if any(i.cfg.jwks_url for i in self.issuers.values()):
            self._task = asyncio.get_running_loop().create_task(self._refresh_loop())

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(JWKS_REFRESH_SECONDS)
            await asyncio.gather(*(i.refresh() for i in self.issuers.values()))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def verify(self, token: bytes) -> ApiKey:
        """The identity a valid token stands for; raises 401 naming what is wrong."""
        now = time.time()
        hit = self.cache.get(token)
        if hit is not None and hit[0] > now:
            return hit[1]
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise _unauthorized(f"malformed token: {exc}") from None
        issuer = self.issuers.get(str(unverified.get("iss")))
        if issuer is None:
            raise _unauthorized(f"tokens from issuer {unverified.get('iss')!r} are not accepted here")
        cfg = issuer.cfg
        claims: dict[str, Any] | None = None
        error: Exception | None = None
        for key in issuer.candidates(header.get("kid")):
            try:
                claims = jwt.decode(
                    token,
                    key,
                    algorithms=cfg.algorithms,
                    audience=cfg.audience,
                    issuer=cfg.issuer,
                    options={"require": ["exp", "iss", "sub"]},
                    leeway=cfg.leeway_seconds,
                )
                break
            except jwt.InvalidSignatureError as exc:
                error = exc
            except jwt.PyJWTError as exc:
                raise _unauthorized(str(exc)) from None
        if claims is None:
            raise _unauthorized(f"no key of the issuer verifies this token ({error or 'no keys'})")
        key = self._identity(cfg, claims)
        if len(self.cache) >= CACHE_SIZE:
            self.cache.clear()
        self.cache[token] = (float(claims["exp"]), key)
        return key

    @staticmethod
    def _identity(cfg: JwtIssuer, claims: dict[str, Any]) -> ApiKey:
        plan = claims.get(cfg.plan_claim) or cfg.default_plan
        models = claims.get(cfg.models_claim)
        subject = f"{cfg.issuer}|{claims['sub']}"
        return ApiKey(
            id="jwt_" + hashlib.sha256(subject.encode()).hexdigest()[:24],
            digest="",
            prefix="jwt",
            name=str(claims["sub"]),
            plan=str(plan),
            models=[str(m) for m in models] if isinstance(models, list) else None,
            budget=None,
            meta={"issuer": cfg.issuer},
            created_at=0.0,
            revoked_at=None,
        )


def _unauthorized(why: str) -> GatewayError:
    return GatewayError(
        401, f"The bearer token was not accepted: {why}.", type="authentication_error", code="invalid_token"
    )
