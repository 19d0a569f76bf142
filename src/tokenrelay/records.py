"""Usage and audit records: one of each per request, written off the hot path in batches.

A finished stream hands its record to ``RecordWriter.add()`` (no await, no I/O); one writer task per
process flushes what queued every ``FLUSH_SECONDS`` (or at once past ``FLUSH_BATCH``) in one transaction,
and ``close()`` flushes the rest, so a graceful shutdown loses nothing.

The audit trail is a hash chain: each record's ``hash`` is SHA-256 over the previous record's hash and its
own canonical fields (an HMAC when ``$TOKENRELAY_AUDIT_KEY`` is set), so ``verify()`` finds any record
edited, inserted, deleted or reordered and names the first one that breaks the chain. Replicas sharing a
database append under a lock (PostgreSQL ``LOCK TABLE``; SQLite serialises writers itself), so the chain
stays one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
from typing import Any

import msgspec
from sqlalchemy import Float, Integer, String, Text, func, select, text
from sqlalchemy.orm import Mapped, mapped_column

from tokenrelay.store import Base, Store

log = logging.getLogger("tokenrelay.records")

FLUSH_SECONDS = 0.5
FLUSH_BATCH = 500
GENESIS = "0" * 64
REDACT = ("authorization", "api_key", "apikey", "x-api-key", "password", "secret", "token")


class UsageRecord(Base):
    __tablename__ = "usage_records"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    ts: Mapped[float] = mapped_column(Float, index=True)
    key_id: Mapped[str | None] = mapped_column(String(32), index=True, nullable=True)
    stream_id: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(200))
    deployment: Mapped[str] = mapped_column(String(200))
    protocol: Mapped[str] = mapped_column(String(32))
    status: Mapped[int] = mapped_column(Integer)
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    ttft_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    duration_ms: Mapped[float] = mapped_column(Float)
    cost: Mapped[float] = mapped_column(Float)

    def public(self) -> dict[str, Any]:
        return {c: getattr(self, c) for c in _USAGE_COLUMNS}


# the columns a record is written with (all but the generated id), in the table's order
_USAGE_COLUMNS = tuple(c.name for c in UsageRecord.__table__.columns if c.name != "id")


class AuditRecord(Base):
    __tablename__ = "audit_records"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    ts: Mapped[float] = mapped_column(Float)
    key_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    stream_id: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(200))
    deployment: Mapped[str] = mapped_column(String(200))
    protocol: Mapped[str] = mapped_column(String(32))
    status: Mapped[int] = mapped_column(Integer)
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    ttft_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    duration_ms: Mapped[float] = mapped_column(Float)
    request_hash: Mapped[str] = mapped_column(String(64))
    body: Mapped[str | None] = mapped_column(Text, nullable=True)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))

    def fields(self) -> dict[str, Any]:
        return {c: getattr(self, c) for c in _AUDIT_FIELDS}


# what a record's hash covers: every column but the links themselves
_AUDIT_FIELDS = tuple(c.name for c in AuditRecord.__table__.columns if c.name not in ("prev_hash", "hash"))
_AUDIT_COLUMNS = (*_AUDIT_FIELDS, "prev_hash", "hash")


def chain_hash(prev_hash: str, fields: dict[str, Any], key: bytes | None = None) -> str:
    """The record's link: SHA-256 of the previous hash and the record's canonical JSON; with ``key`` (the
    secret in ``$TOKENRELAY_AUDIT_KEY``) an HMAC, so someone who can write the database but lacks the key
    cannot rebuild a consistent chain after changing it."""
    data = prev_hash.encode() + msgspec.json.encode(fields, order="sorted")
    if key:
        return hmac.new(key, data, hashlib.sha256).hexdigest()
    return hashlib.sha256(data).hexdigest()


def redact(value: Any) -> Any:
    """A request body with anything that looks like a secret replaced, for the optional audit bodies."""
    if isinstance(value, dict):
        return {
            k: "[redacted]" if any(word in k.lower() for word in REDACT) else redact(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


class RecordWriter:
    def __init__(self, store: Store, key: bytes | None = None) -> None:
        self.store = store
        self.key = key
        self.pending: list[dict[str, Any]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # the writer task and a /v1/usage read may both flush
        self.spent: dict[str, float] = {}  # key id -> cost so far (budgets), from the database + this process
        self.written = 0

    async def start(self) -> None:
        await self.refresh_spent()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def refresh_spent(self) -> None:
        async with self.store.sessions() as session:
            rows = await session.execute(
                select(UsageRecord.key_id, func.sum(UsageRecord.cost)).group_by(UsageRecord.key_id)
            )
            written = {key: float(total or 0) for key, total in rows if key is not None}
        for entry in self.pending:  # queued here, not in the database yet
            if entry["key_id"]:
                written[entry["key_id"]] = written.get(entry["key_id"], 0.0) + entry["cost"]
        self.spent = written

    def add(self, entry: dict[str, Any]) -> None:
        """Queue one request's record (the fields of ``UsageRecord`` plus ``request_hash`` and ``body``)."""
        self.pending.append(entry)
        if entry["key_id"] and entry["cost"]:
            self.spent[entry["key_id"]] = self.spent.get(entry["key_id"], 0.0) + entry["cost"]
        if len(self.pending) >= FLUSH_BATCH:
            self._wake.set()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), FLUSH_SECONDS)
            self._wake.clear()
            if self.pending:
                try:
                    await self.flush()
                except Exception as exc:  # kept in memory and tried again next time
                    log.warning("writing %d usage/audit records failed: %s", len(self.pending), exc)

    async def close(self) -> None:
        # Stop the writer task only while holding the lock: cancelled in the middle of a flush, its commit
        # could finish in the driver's thread while ``pending`` still held the batch, and the last flush
        # below would write that batch a second time (seen: 36 records for 20 requests after a SIGTERM).
        async with self._lock:
            if self._task is not None:
                self._task.cancel()
                # ``asyncio.wait``, not ``await task``: our own cancellation still propagates
                await asyncio.wait([self._task])
                self._task = None
            await self._flush()

    async def flush(self) -> None:
        async with self._lock:
            await self._flush()

    async def _flush(self) -> None:
        batch = self.pending[:]
        if not batch:
            return
        # a Core connection, not an ORM session: the ORM's bulk path costs several times more per row
        async with self.store.engine.begin() as conn:
            if self.store.engine.dialect.name == "postgresql":
                await conn.execute(text("LOCK TABLE audit_records IN EXCLUSIVE MODE"))
            last = (
                await conn.execute(
                    select(AuditRecord.seq, AuditRecord.hash).order_by(AuditRecord.seq.desc()).limit(1)
                )
            ).first()
            seq, prev = (last[0], last[1]) if last else (0, GENESIS)
            usage_rows, audit_rows = [], []
            for entry in batch:
                usage_rows.append(tuple([entry[c] for c in _USAGE_COLUMNS]))
                seq += 1
                fields = {c: entry.get(c) for c in _AUDIT_FIELDS if c != "seq"}
                fields["seq"] = seq
                record_hash = chain_hash(prev, fields, self.key)
                audit_rows.append((*[fields[c] for c in _AUDIT_FIELDS], prev, record_hash))
                prev = record_hash
            # the driver's own executemany with positional rows: SQLAlchemy's insert() processed every
            # parameter of every row in Python (about 45 us a request's two rows, measured; 5 % of a short
            # request's CPU). Every column is a plain int, float or str, so no type processing is lost.
            style = conn.dialect.paramstyle
            await conn.exec_driver_sql(_insert_sql("usage_records", _USAGE_COLUMNS, style), usage_rows)
            await conn.exec_driver_sql(_insert_sql("audit_records", _AUDIT_COLUMNS, style), audit_rows)
        del self.pending[: len(batch)]
        self.written += len(batch)


def _insert_sql(table: str, columns: tuple[str, ...], paramstyle: str) -> str:
    """``INSERT INTO table (columns) VALUES (placeholders)`` in the driver's parameter style."""
    if paramstyle == "qmark":
        marks = ["?"] * len(columns)
    elif paramstyle == "numeric_dollar":
        marks = [f"${i}" for i in range(1, len(columns) + 1)]
    elif paramstyle == "numeric":
        marks = [f":{i}" for i in range(1, len(columns) + 1)]
    elif paramstyle == "format":
        marks = ["%s"] * len(columns)
    else:
        raise ValueError(f"unsupported DB-API paramstyle {paramstyle!r}")
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join(marks)})"


async def verify(store: Store, key: bytes | None = None) -> tuple[int, str | None]:
    """Walk the chain: (records checked, None) when intact, else the first problem, naming the record.
    ``key`` must be the one the records were written with (none, or ``$TOKENRELAY_AUDIT_KEY``)."""
    prev, expected_seq, checked = GENESIS, 1, 0
    async with store.sessions() as session:
        result = await session.stream_scalars(select(AuditRecord).order_by(AuditRecord.seq))
        async for record in result:
            if record.seq != expected_seq:
                what = "deleted" if record.seq > expected_seq else "out of order"
                return checked, f"record {expected_seq} is missing ({what}); the next one is {record.seq}"
            if record.prev_hash != prev:
                return (
                    checked,
                    f"record {record.seq} does not link to record {record.seq - 1} (inserted or reordered)",
                )
            if chain_hash(prev, record.fields(), key) != record.hash:
                return checked, f"record {record.seq} was edited: its contents do not match its hash"
            prev = record.hash
            expected_seq += 1
            checked += 1
    return checked, None


async def tail(store: Store, count: int) -> list[dict[str, Any]]:
    async with store.sessions() as session:
        rows = await session.scalars(select(AuditRecord).order_by(AuditRecord.seq.desc()).limit(count))
        return [{**r.fields(), "hash": r.hash} for r in reversed(list(rows))]


async def usage(store: Store, key_id: str | None, since: float = 0.0, limit: int = 100) -> dict[str, Any]:
    """Totals (all time, and by model) and the most recent records, for one key or for all."""
    async with store.sessions() as session:
        where = [UsageRecord.ts >= since]
        if key_id is not None:
            where.append(UsageRecord.key_id == key_id)
        totals = (
            await session.execute(
                select(
                    UsageRecord.model,
                    func.count(),
                    func.sum(UsageRecord.prompt_tokens),
                    func.sum(UsageRecord.completion_tokens),
                    func.sum(UsageRecord.cost),
                )
                .where(*where)
                .group_by(UsageRecord.model)
            )
        ).all()
        recent = await session.scalars(
            select(UsageRecord).where(*where).order_by(UsageRecord.id.desc()).limit(limit)
        )
        by_model = {
            model: {
                "requests": n,
                "prompt_tokens": int(p or 0),
                "completion_tokens": int(c or 0),
                "cost": float(x or 0),
            }
            for model, n, p, c, x in totals
        }
        return {
            "key_id": key_id,
            "requests": sum(m["requests"] for m in by_model.values()),
            "prompt_tokens": sum(m["prompt_tokens"] for m in by_model.values()),
            "completion_tokens": sum(m["completion_tokens"] for m in by_model.values()),
            "cost": round(sum(m["cost"] for m in by_model.values()), 10),
            "by_model": by_model,
            "recent": [r.public() for r in recent],
            "as_of": time.time(),
        }
