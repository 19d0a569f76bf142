"""Durable records: API keys (and, growing here, usage and audit), through SQLAlchemy 2 async.

A SQLite file by default (``server.database_url`` unset: ``tokenrelay.db`` in the working directory),
PostgreSQL with ``postgresql+asyncpg://...``. Keys are stored as a SHA-256 digest of the secret (API keys
are 256-bit random strings, so a fast hash is as safe as a slow one and keeps the per-request check
cheap) plus an 8-character prefix to recognise them in listings; the secret itself is shown once, at
creation, and never stored.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from typing import Any

from sqlalchemy import JSON, Float, String, select, update
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///tokenrelay.db"
KEY_PREFIX = "tr-"


def key_digest(secret: str | bytes) -> str:
    raw = secret.encode() if isinstance(secret, str) else secret
    return hashlib.sha256(raw).hexdigest()


class Base(DeclarativeBase):
    pass


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    digest: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    prefix: Mapped[str] = mapped_column(String(16))
    name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    plan: Mapped[str] = mapped_column(String(64))
    models: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)  # None: the plan's models
    budget: Mapped[float | None] = mapped_column(Float, nullable=True)  # in the pricing's currency
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[float] = mapped_column(Float)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)

    def public(self) -> dict[str, Any]:
        """What listings show: everything but the digest."""
        return {
            "id": self.id,
            "prefix": self.prefix,
            "name": self.name,
            "plan": self.plan,
            "models": self.models,
            "budget": self.budget,
            "metadata": self.meta,
            "created_at": int(self.created_at),
            "revoked_at": int(self.revoked_at) if self.revoked_at else None,
        }


class Store:
    def __init__(self, url: str | None) -> None:
        self.url = url or DEFAULT_DATABASE_URL
        self.engine: AsyncEngine = create_async_engine(self.url)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)

    async def start(self) -> None:
        async with self.engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)

    async def close(self) -> None:
        await self.engine.dispose()

    async def create_key(
        self,
        plan: str,
        models: list[str] | None = None,
        budget: float | None = None,
        name: str | None = None,
        meta: dict[str, Any] | None = None,
    ) -> tuple[ApiKey, str]:
        """A new key and its secret (the only time the secret exists outside the caller)."""
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        key = ApiKey(
            id="key_" + secrets.token_hex(8),
            digest=key_digest(secret),
            prefix=secret[:8],
            name=name,
            plan=plan,
            models=models,
            budget=budget,
            meta=meta or {},
            created_at=time.time(),
            revoked_at=None,
        )
        async with self.sessions() as session, session.begin():
            session.add(key)
        return key, secret

    async def keys(self, include_revoked: bool = True) -> list[ApiKey]:
        query = select(ApiKey).order_by(ApiKey.created_at)
        if not include_revoked:
            query = query.where(ApiKey.revoked_at.is_(None))
        async with self.sessions() as session:
            return list((await session.scalars(query)).all())

    async def revoke(self, key_id: str) -> bool:
        async with self.sessions() as session, session.begin():
            result = await session.execute(
                update(ApiKey)
                .where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
                .values(revoked_at=time.time())
            )
        return bool(result.rowcount)  # type: ignore[attr-defined]
