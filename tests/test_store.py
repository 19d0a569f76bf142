"""The key store on both databases it supports: a SQLite file and the real PostgreSQL server."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

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


def record(i: int) -> dict[str, object]:
    return {
        "ts": 1_700_000_000.0 + i,
        "key_id": "key_test",
        "stream_id": f"chatcmpl-{i}",
        "model": "demo",
        "deployment": "demo",
        "protocol": "openai",
        "status": 200,
        "prompt_tokens": 10,
        "completion_tokens": i,
        "ttft_ms": 1.5,
        "duration_ms": 20.25,
        "cost": 0.001 * i,
        "request_hash": "ab" * 32,
        "body": None,
    }


async def insert_row(conn: Any, row: dict[str, Any]) -> None:
    from sqlalchemy import text

    columns = ", ".join(row)
    values = ", ".join(":" + c for c in row)
    await conn.execute(text(f"INSERT INTO audit_records ({columns}) VALUES ({values})"), row)


async def tamper_and_verify(url: str) -> list[str | None]:
    """Write a chain, then break it four ways in turn; what ``verify`` says each time."""
    from sqlalchemy import text

    from tokenrelay.records import RecordWriter, chain_hash, verify

    store = Store(url)
    await store.start()
    seen: list[str | None] = []
    try:
        async with store.engine.begin() as conn:
            await conn.execute(text("DELETE FROM audit_records"))
            await conn.execute(text("DELETE FROM usage_records"))
        writer = RecordWriter(store)
        for i in range(1, 6):
            writer.add(record(i))
        await writer.flush()
        writer.add(record(6))
        await writer.flush()  # a second batch links to the first
        checked, problem = await verify(store)
        seen.append(problem)
        assert checked == 6
        attacks = [
            "UPDATE audit_records SET completion_tokens = 99 WHERE seq = 3",  # edit
            "DELETE FROM audit_records WHERE seq = 4",  # delete
            # reorder: swap the contents of records 2 and 5 (numbers kept)
            "UPDATE audit_records SET seq = -2 WHERE seq = 2; "
            "UPDATE audit_records SET seq = 2 WHERE seq = 5; "
            "UPDATE audit_records SET seq = 5 WHERE seq = -2",
            # insert: the rest moved up by one, and a forged record 4 in the gap (filled in below)
            "UPDATE audit_records SET seq = seq + 100 WHERE seq >= 4; "
            "UPDATE audit_records SET seq = seq - 99 WHERE seq >= 100",
        ]
        for attack in attacks:
            async with store.engine.begin() as conn:
                saved = (
                    (await conn.execute(text("SELECT * FROM audit_records ORDER BY seq"))).mappings().all()
                )
                for statement in attack.split("; "):
                    await conn.execute(text(statement))
                if "seq + 100" in attack:  # a forgery that links to record 3 and carries a right hash
                    three = dict(next(r for r in saved if r["seq"] == 3))
                    fields = {k: three[k] for k in three if k not in ("hash", "prev_hash")}
                    fields.update(seq=4, completion_tokens=999)
                    forged = {**fields, "prev_hash": three["hash"], "hash": chain_hash(three["hash"], fields)}
                    await insert_row(conn, forged)
            seen.append((await verify(store))[1])
            async with store.engine.begin() as conn:  # put the chain back for the next attack
                await conn.execute(text("DELETE FROM audit_records"))
                for row in saved:
                    await insert_row(conn, dict(row))
        seen.append((await verify(store))[1])
    finally:
        await store.close()
    return seen


def check_attacks(seen: list[str | None]) -> None:
    intact, edited, deleted, reordered, inserted, restored = seen
    assert inserted is not None and "record 5 does not link" in inserted  # the forgery itself checks out
    assert intact is None and restored is None
    assert edited is not None and "record 3 was edited" in edited
    assert deleted is not None and "record 4 is missing" in deleted
    assert reordered is not None and "record 2" in reordered


def test_audit_chain_detects_tampering_sqlite(tmp_path: Path) -> None:
    check_attacks(asyncio.run(tamper_and_verify(f"sqlite+aiosqlite:///{tmp_path / 'audit.db'}")))


def test_audit_chain_detects_tampering_postgres(postgres_url: str) -> None:
    check_attacks(asyncio.run(tamper_and_verify(postgres_url)))


def test_a_keyed_chain_cannot_be_rebuilt_without_the_key(tmp_path: Path) -> None:
    from tokenrelay.records import RecordWriter, verify

    async def run() -> tuple[str | None, str | None]:
        store = Store(f"sqlite+aiosqlite:///{tmp_path / 'keyed.db'}")
        await store.start()
        try:
            writer = RecordWriter(store, b"audit-secret")
            for i in range(1, 4):
                writer.add(record(i))
            await writer.flush()
            return (await verify(store, b"audit-secret"))[1], (await verify(store))[1]
        finally:
            await store.close()

    with_key, without = asyncio.run(run())
    assert with_key is None
    assert without is not None and "record 1" in without  # plain SHA-256 over the same data does not match


async def close_during_commit(url: str) -> tuple[int, int]:
    """Queue a full batch, and close the writer while its own task is committing that batch."""
    from sqlalchemy import event, func, select, text

    from tokenrelay.records import FLUSH_BATCH, RecordWriter, UsageRecord

    store = Store(url)
    await store.start()
    try:
        async with store.engine.begin() as conn:
            await conn.execute(text("DELETE FROM audit_records"))
            await conn.execute(text("DELETE FROM usage_records"))
        committing = asyncio.Event()
        # fires just before the driver's COMMIT is awaited: the writer task is inside its flush then
        event.listen(store.engine.sync_engine, "commit", lambda conn: committing.set())
        writer = RecordWriter(store)
        await writer.start()
        for i in range(FLUSH_BATCH):  # a full batch wakes the writer task at once
            writer.add(record(i))
        await asyncio.wait_for(committing.wait(), 10)
        await writer.close()
        async with store.engine.begin() as conn:
            count = (await conn.execute(select(func.count()).select_from(UsageRecord))).scalar_one()
        return count, writer.written
    finally:
        await store.close()


def test_closing_mid_flush_writes_each_record_once(tmp_path: Path) -> None:
    """A SIGTERM while the writer task commits a batch: the batch is written once, not again by close()."""
    from tokenrelay.records import FLUSH_BATCH

    assert asyncio.run(close_during_commit(f"sqlite+aiosqlite:///{tmp_path / 'records.db'}")) == (
        FLUSH_BATCH,
        FLUSH_BATCH,
    )


def test_closing_mid_flush_writes_each_record_once_postgres(postgres_url: str) -> None:
    from tokenrelay.records import FLUSH_BATCH

    assert asyncio.run(close_during_commit(postgres_url)) == (FLUSH_BATCH, FLUSH_BATCH)
