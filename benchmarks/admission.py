"""Cost of authentication plus rate limiting per request (issue 5).

    .venv/bin/python benchmarks/admission.py [--requests 3000] [--redis redis://127.0.0.1:6379/0]

Three gateways in one run, each a real ``tokenrelay serve`` with the same mock model (one token): open (no
keys), API key + plan limits in memory, API key + plan limits in Redis. One keep-alive client sends
requests one after another, the targets taking turns in rounds of 100 so machine noise hits all alike.
Reported: p50 and p99 latency per target and the added p50 against the open gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
ADMIN = "bench-admin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(tmp: Path, name: str, server: dict[str, Any]) -> tuple[subprocess.Popen[bytes], int]:
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "server": server,
                "plans": {
                    "bench": {
                        "requests_per_minute": 10**9,
                        "requests_per_day": 10**9,
                        "tokens_per_minute": 10**12,
                    }
                },
                "models": [{"name": "m", "provider": "mock", "options": {"tokens": 1}}],
            }
        )
    )
    port = free_port()
    env = {
        **os.environ,
        "TOKENRELAY_ADMIN_KEY": ADMIN,
        "TOKENRELAY_DATABASE_URL": f"sqlite+aiosqlite:///{tmp / name}.db",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenrelay", "serve", "--config", str(cfg), "--port", str(port)],
        stdout=(tmp / f"{name}.log").open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
        cwd=ROOT,
        start_new_session=True,
    )
    for _ in range(300):
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1).status == 200:
                return proc, port
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{name} did not start")


def create_key(port: int) -> str:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/admin/keys",
        data=json.dumps({"plan": "bench"}).encode(),
        headers={"authorization": f"Bearer {ADMIN}", "content-type": "application/json"},
    )
    return str(json.loads(urllib.request.urlopen(req).read())["key"])


class Client:
    def __init__(self, port: int, key: str | None) -> None:
        self.port = port
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}]}).encode()
        auth = f"Authorization: Bearer {key}\r\n" if key else ""
        self.request = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: b\r\nContent-Type: application/json\r\n{auth}"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        self.samples: list[float] = []

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)

    async def one(self) -> None:
        t0 = time.perf_counter()
        self.writer.write(self.request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = int(
            next(ln.split(b":")[1] for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length"))
        )
        body = await self.reader.readexactly(length)
        self.samples.append((time.perf_counter() - t0) * 1000)
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head + body)


async def run(clients: dict[str, Client], total: int) -> None:
    for c in clients.values():
        await c.connect()
        for _ in range(50):
            await c.one()  # warm-up
        c.samples.clear()
    for _ in range(total // 100):
        for c in clients.values():
            for _ in range(100):
                await c.one()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tr-admission-"))
    procs = []
    try:
        targets: dict[str, Client] = {}
        prefix = {"redis_prefix": f"bench-{os.getpid()}"}
        setups: list[tuple[str, dict[str, Any], bool]] = [
            ("open", {}, False),
            ("keys, limits in memory", {}, True),
            ("keys, limits in Redis", {"rate_limit_url": args.redis, **prefix}, True),
            ("keys, limits and stream logs in Redis", {"redis_url": args.redis, **prefix}, True),
        ]
        for i, (name, server, keyed) in enumerate(setups):
            proc, port = serve(tmp, f"target{i}", server)
            procs.append(proc)
            targets[name] = Client(port, create_key(port) if keyed else None)
        import uvloop

        uvloop.run(run(targets, args.requests))
        base = statistics.median(targets["open"].samples)
        print(f"{args.requests} requests per target, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
        print("| target | p50 ms | p99 ms | added p50 ms |\n|---|---|---|---|")
        for name, c in targets.items():
            s = sorted(c.samples)
            p50, p99 = statistics.median(s), s[int(0.99 * len(s))]
            print(f"| {name} | {p50:.3f} | {p99:.3f} | {p50 - base:+.3f} |")
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            proc.wait(10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
