"""A finished stream leaves no reference cycles: everything it allocated is freed by reference counting.

Garbage that only the cyclic collector can free makes its young-generation passes run more often and walk
more, on the event loop's thread, under load (docs/performance.md). The gateway runs here in-process on
uvloop, as ``tokenrelay serve`` does (uvloop's cancelled timer handles keep their callback, so a
self-re-arming closure there is a cycle that asyncio's own loop would not show), with the in-process mock
and an OpenAI-compatible upstream (the push lane).
"""

from __future__ import annotations

import asyncio
import gc
import json
import types
from pathlib import Path
from typing import Any

import uvloop
from tests.conftest import Server

from tokenrelay.config import config_from_json
from tokenrelay.events import Finish
from tokenrelay.gateway import Gateway
from tokenrelay.protocol.openai_chat import decode_request


def ours(obj: object) -> bool:
    if isinstance(obj, types.FunctionType):
        return obj.__module__.startswith("tokenrelay")
    return type(obj).__module__.startswith("tokenrelay")


async def run_streams(gw: Gateway, model: str, n: int) -> None:
    for _ in range(n):
        req = decode_request(
            b'{"model":"%s","stream":true,"max_tokens":4,"messages":[{"role":"user","content":"hi"}]}'
            % model.encode()
        )
        session = gw.open(req)
        follower = session.follow()
        while await follower.next_batch() is not None:
            pass
        follower.close()
        await session.task
        assert type(session.events[-1]) is Finish, session.events[-1]


def test_finished_streams_leave_no_cycles(mock_upstream: Server, tmp_path: Path) -> None:
    config: dict[str, Any] = {
        "models": [
            {"name": "demo", "provider": "mock", "options": {"first_token_ms": 1, "tokens_per_second": 1000}},
            {"name": "gpt", "provider": "openai", "base_url": f"{mock_upstream.url}/v1"},
        ],
        "server": {"database_url": f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}"},
    }
    found: list[str] = []

    async def main() -> None:
        gw = Gateway(config_from_json(json.dumps(config)))
        gw.start()
        for _ in range(200):
            if gw.ready:
                break
            await asyncio.sleep(0.05)
        assert gw.ready
        try:
            await run_streams(gw, "demo", 3)  # warm: first-use caches are not what this looks for
            await run_streams(gw, "gpt", 3)
            gc.collect()
            gc.set_debug(gc.DEBUG_SAVEALL)
            try:
                await run_streams(gw, "demo", 10)
                await run_streams(gw, "gpt", 10)
                gc.collect()
                found.extend(
                    f"{type(o).__qualname__} {getattr(o, '__qualname__', '')}" for o in gc.garbage if ours(o)
                )
            finally:
                gc.set_debug(0)
                gc.garbage.clear()
        finally:
            await gw.close()

    uvloop.run(main())
    assert found == []
