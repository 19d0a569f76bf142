"""The key store on both databases it supports: a SQLite file and the real PostgreSQL server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tokenrelay.store import Store, key_digest


async def exercise(url: str) -> None:
    store = Store(url)
    await store.start()
    try:
        key, secret = await store.create_key("pro", ["demo"], 5.0, "ci", {"team": "x"})
        assert key.digest == key_digest(secret) and secret.startswith("tr-")
        listed = {k.id: k for k in await store.keys()}
        assert listed[key.id].models == ["demo"] and listed[key.id].meta == {"team": "x"}
        assert key.id in {k.id for k in await store.keys(include_revoked=False)}
        assert await store.revoke(key.id)
        assert not await store.revoke(key.id)  # already revoked
        assert key.id not in {k.id for k in await store.keys(include_revoked=False)}
    finally:
        await store.close()


def test_sqlite(tmp_path: Path) -> None:
    asyncio.run(exercise(f"sqlite+aiosqlite:///{tmp_path / 'keys.db'}"))


def test_postgres(postgres_url: str) -> None:
    asyncio.run(exercise(postgres_url))


def test_bad_database_url_fails_clearly() -> None:
    with pytest.raises(ConnectionRefusedError):  # not a hang, nor a silent success
        asyncio.run(exercise("postgresql+asyncpg://postgres@127.0.0.1:1/test"))
