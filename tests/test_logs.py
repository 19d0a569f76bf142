"""The access log's fast path writes the line the logging machinery would, and yields to it whenever
someone else listens (a handler or filter a user added)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import pytest

from tokenrelay import logs


@pytest.fixture
def gathered() -> Iterator[logs.GatheringHandler]:
    logs.setup_logging("info")
    handler = logging.getLogger("tokenrelay").handlers[0]
    assert isinstance(handler, logs.GatheringHandler)
    handler.stream = io.StringIO()
    yield handler
    logging.getLogger("tokenrelay").handlers[:] = []


def lines(handler: logs.GatheringHandler) -> list[dict[str, object]]:
    handler.flush()
    return [json.loads(line) for line in handler.stream.getvalue().splitlines()]  # type: ignore[attr-defined]


FIELDS: dict[str, object] = {"request_id": "r-1", "status": 200, "ttft_ms": 1.5, "stream": True}


def test_fast_line_equals_the_formatted_record(gathered: logs.GatheringHandler) -> None:
    access = logging.getLogger("tokenrelay.access")

    async def main() -> None:
        logs.bind_loop(asyncio.get_running_loop())
        logs.info_line(access, "request", FIELDS)  # the fast path
        access.info("request", extra={"fields": FIELDS})  # the standard one

    asyncio.run(main())
    fast, standard = lines(gathered)
    assert abs(float(fast.pop("ts")) - float(standard.pop("ts"))) < 5  # type: ignore[arg-type]
    assert fast == standard == {"level": "info", "logger": "tokenrelay.access", "msg": "request", **FIELDS}


def test_a_users_handler_still_gets_the_record(gathered: logs.GatheringHandler) -> None:
    access = logging.getLogger("tokenrelay.access")
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    keep = Keep()
    access.addHandler(keep)
    try:

        async def main() -> None:
            logs.bind_loop(asyncio.get_running_loop())
            logs.info_line(access, "request", FIELDS)

        asyncio.run(main())
    finally:
        access.removeHandler(keep)
    assert len(seen) == 1 and seen[0].fields == FIELDS  # type: ignore[attr-defined]
    assert [line["request_id"] for line in lines(gathered)] == ["r-1"]  # and the usual line, once
