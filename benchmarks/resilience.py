"""Resilience benchmarks (issue 4): resume latency, failover gap, and many slow readers.

    .venv/bin/python benchmarks/resilience.py [--redis redis://127.0.0.1:6379/0] [--slow 1000]

* resume latency: a stream is started, 3 events read, the connection dropped; 50 ms later
  ``GET /v1/streams/{id}?after=3`` is sent and timed to its first ``data:`` line. In memory (same
  process) and with Redis (started on replica A, resumed on replica B).
* failover gap: the upstream (``tokenrelay mock-upstream``) cuts the stream after 10 tokens; the fallback
  deployment (the same upstream, first token after 50 ms) continues it. Gap = the 10th to the 11th
  content event at the client; compared with the fallback's own time to first token, measured directly.
* slow readers: N clients read 100 bytes/s while ``fake_upstream.py`` streams 100 tokens at 10 ms; the
  relay's RSS growth, and the gap p99 of 20 normal streams next to them against the same 20 alone.
Every number comes from real processes on loopback; nothing is simulated in-process.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


class Procs:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = (self.tmp / f"{name}.log").open("wb")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def gateway(self, name: str, config: dict[str, Any]) -> int:
        port = free_port()
        cfg = self.tmp / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump(config))
        proc = self.start(
            name, [sys.executable, "-m", "tokenrelay", "serve", "--config", str(cfg), "--port", str(port)]
        )
        wait_ready(port, "/readyz", proc)
        return port

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def wait_ready(port: int, path: str, proc: subprocess.Popen[bytes]) -> None:
    import http.client

    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError(f"process on {port} exited")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", path)
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"port {port} not ready")


def request(method: str, path: str, body: dict[str, Any] | None = None) -> bytes:
    data = json.dumps(body).encode() if body is not None else b""
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: b\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    return head.encode() + data


async def open_stream(port: int, raw: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    return reader, writer


async def read_events(reader: asyncio.StreamReader, n: int) -> tuple[str, list[float]]:
    """Read until ``n`` content events arrived; returns the stream id and each event's arrival time."""
    stream_id = ""
    times: list[float] = []
    while len(times) < n:
        line = await reader.readline()
        if not line:
            break
        if line.lower().startswith(b"x-stream-id:"):
            stream_id = line.split(b":", 1)[1].strip().decode()
        if line.startswith(b"data: {") and b'"content":"' in line:
            times.append(time.perf_counter())
    return stream_id, times


STORY = {
    "model": "story",
    "stream": True,
    "messages": [{"role": "user", "content": "resume"}],
    "mock": {"tokens": 60, "tokens_per_second": 100},
}


async def resume_latency(start_port: int, resume_port: int, samples: int) -> list[float]:
    out = []
    for _ in range(samples):
        reader, writer = await open_stream(start_port, request("POST", "/v1/chat/completions", STORY))
        stream_id, _ = await read_events(reader, 3)
        writer.close()
        await asyncio.sleep(0.05)
        t0 = time.perf_counter()
        reader, writer = await open_stream(resume_port, request("GET", f"/v1/streams/{stream_id}?after=3"))
        while not (await reader.readline()).startswith(b"data: "):
            pass
        out.append((time.perf_counter() - t0) * 1000)
        writer.close()
    return out


async def failover_gaps(port: int, samples: int) -> tuple[list[float], list[float]]:
    gaps, ttfts = [], []
    body = {"model": "primary", "stream": True, "messages": [{"role": "user", "content": "fail over"}]}
    for _ in range(samples):
        reader, writer = await open_stream(port, request("POST", "/v1/chat/completions", body))
        _, times = await read_events(reader, 40)
        # the splice is the one long gap; the tokens around it come every 10 ms
        gaps.append(max(b - a for a, b in itertools.pairwise(times)) * 1000)
        writer.close()
        t0 = time.perf_counter()
        reader, writer = await open_stream(
            port, request("POST", "/v1/chat/completions", {**body, "model": "fallback"})
        )
        _, times = await read_events(reader, 1)
        ttfts.append((times[0] - t0) * 1000)
        writer.close()
    return gaps, ttfts


def tree_rss(pid: int) -> int:
    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])


async def normal_gaps(port: int, streams: int, rounds: int) -> list[float]:
    body = {
        "model": "fast",
        "stream": True,
        "messages": [{"role": "user", "content": "normal"}],
        "max_tokens": 50,
    }

    async def one() -> list[float]:
        gaps: list[float] = []
        for _ in range(rounds):
            reader, writer = await open_stream(port, request("POST", "/v1/chat/completions", body))
            _, times = await read_events(reader, 50)
            gaps += [(b - a) * 1000 for a, b in itertools.pairwise(times)]
            writer.close()
        return gaps

    results = await asyncio.gather(*(one() for _ in range(streams)))
    return [g for r in results for g in r]


async def slow_reader(port: int, stop: asyncio.Event) -> None:
    body = {
        "model": "fast",
        "stream": True,
        "messages": [{"role": "user", "content": "slow"}],
        "max_tokens": 100,
    }
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
    writer.write(request("POST", "/v1/chat/completions", body))
    while not stop.is_set():
        if not await reader.read(100):
            break
        await asyncio.sleep(1)
    writer.close()


async def slow_readers(port: int, gateway_pid: int, n: int) -> dict[str, float]:
    base = await normal_gaps(port, 20, 3)
    rss0 = tree_rss(gateway_pid)
    stop = asyncio.Event()
    tasks = []
    for i in range(n):
        tasks.append(asyncio.create_task(slow_reader(port, stop)))
        if i % 100 == 99:
            await asyncio.sleep(1)  # 100 new streams a second: the ramp of a busy gateway, not a burst
    await asyncio.sleep(3)  # every slow stream's upstream finished (100 tokens at 10 ms)
    loaded = await normal_gaps(port, 20, 3)
    rss1 = tree_rss(gateway_pid)
    stop.set()
    for t in tasks:
        t.cancel()
    return {
        "slow": n,
        "rss_growth_mb": (rss1 - rss0) / 2**20,
        "gap_p99_alone_ms": pct(base, 0.99),
        "gap_p99_loaded_ms": pct(loaded, 0.99),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--slow", type=int, default=1000)
    ap.add_argument("--json-out")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tr-resilience-"))
    procs = Procs(tmp)
    results: dict[str, Any] = {}
    try:
        import uvloop

        up = free_port()
        procs.start("mock-upstream", [sys.executable, "-m", "tokenrelay", "mock-upstream", "--port", str(up)])
        fake = free_port()
        procs.start(
            "fake",
            [
                sys.executable,
                "benchmarks/fake_upstream.py",
                "--port",
                str(fake),
                "--tokens",
                "100",
                "--interval-ms",
                "10",
            ],
        )
        time.sleep(1.5)
        story = {"name": "story", "provider": "mock"}
        server = {"on_disconnect": "continue"}
        mem = procs.gateway("memory", {"server": server, "models": [story]})
        shared = {**server, "redis_url": args.redis, "redis_prefix": f"bench-{os.getpid()}"}
        a = procs.gateway("replica-a", {"server": shared, "models": [story]})
        b = procs.gateway("replica-b", {"server": shared, "models": [story]})
        base = f"http://127.0.0.1:{up}/v1"
        fo = procs.gateway(
            "failover",
            {
                "models": [
                    {
                        "name": "primary",
                        "provider": "openai",
                        "base_url": base,
                        "options": {
                            "body": {"mock": {"tokens": 40, "tokens_per_second": 100, "cut_after": 10}}
                        },
                        "fallbacks": ["fallback"],
                        "breaker": {"enabled": False},  # else it opens and no stream is spliced
                    },
                    {
                        "name": "fallback",
                        "provider": "openai",
                        "base_url": base,
                        "options": {
                            "body": {"mock": {"tokens": 40, "tokens_per_second": 100, "first_token_ms": 50}}
                        },
                    },
                ]
            },
        )
        slow_cfg = {
            "models": [{"name": "fast", "provider": "openai", "base_url": f"http://127.0.0.1:{fake}/v1"}]
        }
        slow_port = procs.gateway("slow", slow_cfg)
        slow_pid = procs.procs[-1].pid

        async def run_all() -> None:
            for label, start, resume in (
                ("memory", mem, mem),
                ("redis, same replica", a, a),
                ("redis, other replica", a, b),
            ):
                await resume_latency(start, resume, 5)  # warm-up
                lat = await resume_latency(start, resume, args.samples)
                results[f"resume {label}"] = {
                    "p50_ms": pct(lat, 0.5),
                    "p99_ms": pct(lat, 0.99),
                    "n": len(lat),
                }
                print(label, results[f"resume {label}"], flush=True)
            gaps, ttfts = await failover_gaps(fo, 50)
            results["failover"] = {
                "gap_p50_ms": pct(gaps, 0.5),
                "gap_p99_ms": pct(gaps, 0.99),
                "fallback_ttft_p50_ms": pct(ttfts, 0.5),
                "fallback_ttft_p99_ms": pct(ttfts, 0.99),
                "gap_minus_ttft_p50_ms": statistics.median(g - t for g, t in zip(gaps, ttfts, strict=True)),
            }
            print("failover", results["failover"], flush=True)
            results["slow readers"] = await slow_readers(slow_port, slow_pid, args.slow)
            print("slow readers", results["slow readers"], flush=True)

        uvloop.run(run_all())
    finally:
        procs.close()
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
