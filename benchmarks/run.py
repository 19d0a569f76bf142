"""One-command streaming relay benchmark: direct upstream vs nginx vs tokenrelay.

Starts ``benchmarks/fake_upstream.py`` (own process), ``tokenrelay serve`` (own process,
config in a temp dir, free port) and, when ``nginx`` is installed, an nginx plain relay
(``proxy_buffering off``, upstream keep-alive, one worker). Then, for every concurrency
level and every repeat, it runs ``benchmarks/loadgen.py`` against each target in turn
(direct -> nginx -> tokenrelay) so machine noise hits all targets alike, and records:

* TTFT p50/p99 and the TTFT added over the direct run of the same repeat;
* inter-event gap p99, chunks received, errors and incomplete streams;
* relay CPU seconds (psutil user+system of the relay process and its children, delta over
  the run), chunks per relay CPU-second and the relay's peak RSS (sampled every 50 ms);
* the load generator's own CPU seconds and the CPU used by everything else on the machine.

It reports the median over repeats as a markdown table (stdout) with pass/fail against
the targets, and with ``--out`` writes or replaces a marked section in that file.

``--scale`` is the issue-7 suite (``make bench``): levels of 5 and 100 streams with the fast
profile (tokens 20 ms apart), 1,000 and 10,000 with the paced one (one token per second) and a
saturation level; targets direct, nginx, tokenrelay with 1 worker (the built-in server, the
default, and granian) and with 2 workers, and the Anthropic
and WebSocket protocols through the 1-worker gateway. The gateway runs with its features on: an
API key on a plan with a (never reached) rate limit, usage and audit records in SQLite, metrics and
the in-memory resume log. It writes its own section (``tokenrelay-scale`` markers) and a PNG plot.

Run from the repository root::

    .venv/bin/python benchmarks/run.py --concurrency 5,100 --repeats 3 --out docs/benchmarks.md
    .venv/bin/python benchmarks/run.py --scale --out docs/benchmarks.md --plot docs/bench-scale.png
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import http.client
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SECTION_START = "<!-- tokenrelay-bench:start -->"
SECTION_END = "<!-- tokenrelay-bench:end -->"
SCALE_START = "<!-- tokenrelay-scale:start -->"
SCALE_END = "<!-- tokenrelay-scale:end -->"
TARGET_ORDER = (
    "direct",
    "nginx",
    "tokenrelay",
    "tokenrelay-granian",
    "tokenrelay-2w",
    "tokenrelay-anthropic",
    "tokenrelay-ws",
)
# the target's load-generator protocol (tokenrelay-anthropic / -ws run on the 1-worker gateway)
TARGET_PROTOCOL = {"tokenrelay-anthropic": "anthropic", "tokenrelay-ws": "ws"}
Row = dict[str, float | None]
NOFILE_WANTED = 65536  # 10,000 streams through a relay: 10,000 client + 10,000 upstream sockets


@dataclass(frozen=True)
class Profile:
    """How each stream of a level behaves: tokens, pacing (by model name), rounds, connection ramp."""

    name: str
    model: str  # fake_upstream paces models named paced* at --paced-interval-ms
    tokens: int
    interval_ms: float
    rounds: int
    ramp_batch: int
    ramp_interval_ms: float


@dataclass(frozen=True)
class Level:
    """A concurrency level: N concurrent streams of one profile."""

    concurrency: int
    profile: Profile

    @property
    def key(self) -> str:
        return f"{self.concurrency}:{self.profile.name}"


# (concurrency, metric key, comparison, threshold, label)
CHECKS: list[tuple[int, str, str, float, str]] = [
    (5, "added_ttft_p50_ms", "<=", 1.0, "added TTFT p50 <= 1 ms"),
    (100, "added_ttft_p50_ms", "<=", 3.0, "added TTFT p50 <= 3 ms"),
    (100, "added_ttft_p99_ms", "<=", 10.0, "added TTFT p99 <= 10 ms"),
    (100, "gap_p99_ms", "<=", 25.0, "gap p99 <= 25 ms"),
    (100, "chunks_per_cpu_s", ">=", 20000.0, ">= 20,000 chunks per relay CPU-second"),
    (100, "failed_streams", "<=", 0.0, "no errors or incomplete streams"),
]


CONSOLE = Console(stderr=True, highlight=False, soft_wrap=True)


def log(msg: str) -> None:
    """Progress output (stderr, above the progress bar when one is shown)."""
    CONSOLE.print(msg, markup=False)


def raise_nofile(wanted: int = NOFILE_WANTED) -> tuple[int, int]:
    """Raise this process's open-file limits; children (relays, upstream, loadgen) inherit them.

    As root the hard limit may be raised too (CAP_SYS_RESOURCE); otherwise the soft limit goes up to
    the hard one. 10,000 streams through a relay need 20,000+ descriptors in the relay alone.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted, wanted
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def _die_with_parent() -> None:
    """preexec_fn: have the kernel SIGTERM this child if the harness dies (Linux only)."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    """Return a currently free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Service:
    """A child process in its own session, logging to a file, killed as a group on stop()."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self.proc = psutil.Process(self.popen.pid)
        self._tree: list[psutil.Process] = [self.proc]
        self._tree_at = 0.0

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, limit: int = 4000) -> str:
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return ""
        return data[-limit:].decode("utf-8", "replace")

    def tree(self, refresh_s: float = 1.0) -> list[psutil.Process]:
        """The process and its descendants (the list is refreshed at most every ``refresh_s``)."""
        now = time.monotonic()
        if now - self._tree_at >= refresh_s:
            try:
                self._tree = [self.proc, *self.proc.children(recursive=True)]
            except psutil.Error:
                self._tree = [self.proc]
            self._tree_at = now
        return self._tree

    def cpu_snapshot(self) -> dict[tuple[int, float], float]:
        """user+system CPU seconds per process of the tree, keyed by (pid, create_time)."""
        snap: dict[tuple[int, float], float] = {}
        for p in self.tree(refresh_s=0.0):
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                snap[(p.pid, p.create_time())] = t.user + t.system
        return snap

    def rss(self) -> int:
        total = 0
        for p in self.tree():
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return total

    def stop(self, timeout: float = 5.0) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout)
        # Orphaned descendants that left the group are killed too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self._log.close()


def cpu_delta(before: dict[tuple[int, float], float], after: dict[tuple[int, float], float]) -> float:
    """CPU seconds spent between two snapshots (new processes count from zero)."""
    return sum(v - before.get(k, 0.0) for k, v in after.items())


def http_status(port: int, path: str, timeout: float = 1.0) -> int | None:
    """Status of ``GET path`` on 127.0.0.1:port, or None if it cannot be fetched."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def wait_ready(svc: Service, port: int, path: str, timeout: float) -> None:
    """Wait until ``GET path`` answers 200; raise RuntimeError with the log tail otherwise."""
    deadline = time.monotonic() + timeout
    last: int | None = None
    while time.monotonic() < deadline:
        if not svc.alive():
            raise RuntimeError(
                f"{svc.name} exited with status {svc.popen.returncode} before it was ready.\n"
                f"command: {shlex.join(svc.argv)}\n--- log tail ---\n{svc.log_tail()}"
            )
        last = http_status(port, path)
        if last == 200:
            return
        time.sleep(0.1)
    raise RuntimeError(
        f"{svc.name} not ready after {timeout:.0f} s (last GET {path} status: {last}).\n"
        f"command: {shlex.join(svc.argv)}\n--- log tail ---\n{svc.log_tail()}"
    )


def find_nginx() -> str | None:
    """nginx on PATH (or in /usr/sbin, which is often missing from PATH)."""
    return shutil.which("nginx") or shutil.which(
        "nginx", path="/usr/sbin:/usr/local/sbin:/usr/local/nginx/sbin"
    )


def install_nginx(notes: list[str]) -> str | None:
    """Install Debian's nginx-light (nginx 1.22 on bookworm) when root and apt-get exist; else None."""
    apt = shutil.which("apt-get")
    if os.geteuid() != 0 or apt is None:
        return None
    log("nginx not found: apt-get install -y nginx-light")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = [apt, "install", "-y", "-q", "nginx-light"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:  # stale package lists: update once and retry
        subprocess.run([apt, "update", "-q"], capture_output=True, env=env)
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        notes.append(f"apt-get install nginx-light failed: {done.stderr.strip()[-300:]}")
        return None
    notes.append("nginx was missing and was installed from Debian's nginx-light by the harness.")
    return find_nginx()


def nginx_conf(tmp: Path, port: int, upstream_port: int) -> str:
    """A minimal nginx plain-relay config for streaming."""
    user = "user root root;\n" if os.geteuid() == 0 else ""
    return f"""{user}worker_processes 1;
worker_rlimit_nofile {NOFILE_WANTED};
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 30000; multi_accept on; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/nginx-body;
    proxy_temp_path {tmp}/nginx-proxy;
    fastcgi_temp_path {tmp}/nginx-fastcgi;
    uwsgi_temp_path {tmp}/nginx-uwsgi;
    scgi_temp_path {tmp}/nginx-scgi;
    upstream bench_upstream {{
        server 127.0.0.1:{upstream_port};
        keepalive 1024;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /readyz {{ return 200 "ok"; }}
        location / {{
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""


@dataclass
class Target:
    """A benchmark target: where the load generator connects and which process tree is the relay."""

    name: str
    port: int
    service: Service | None  # the relay (None for direct)
    failed: str | None = None
    protocol: str = "openai"
    levels: set[str] | None = None  # level keys this target runs at (None: every level)


@dataclass
class RunResult:
    """Metrics of one load-generator run (one or several processes, merged) against one target."""

    target: str
    concurrency: int
    repeat: int
    level: str = ""
    lg: dict[str, Any] = field(default_factory=dict)
    relay_cpu_s: float | None = None
    upstream_cpu_s: float = 0.0
    other_cpu_s: float | None = None
    peak_rss_mb: float | None = None
    idle_rss_mb: float | None = None
    error: str | None = None

    def metric(self, key: str) -> float | None:
        lg = self.lg
        if self.error or not lg:
            return None
        if key == "ttft_p50_ms":
            return lg["ttft_ms"]["p50"]
        if key == "ttft_p99_ms":
            return lg["ttft_ms"]["p99"]
        if key == "gap_p99_ms":
            return lg["gap_ms"]["p99"]
        if key == "chunks":
            return float(lg["chunks"])
        if key == "content_chunks":
            return float(lg.get("content_chunks", 0))
        if key == "chunks_per_s":
            return lg["chunks"] / lg["wall_s"] if lg.get("wall_s") else None
        if key == "errors":
            return float(lg["errors"])
        if key == "incomplete":
            return float(lg["incomplete"])
        if key == "failed_streams":
            return float(max(lg["errors"], lg["incomplete"]))
        if key == "loadgen_cpu_s":
            return lg["loadgen_cpu_s"]
        if key == "loadgen_cpu_share":
            return lg.get("loadgen_cpu_share")
        if key == "wall_s":
            return lg["wall_s"]
        if key == "relay_cpu_s":
            return self.relay_cpu_s
        if key == "chunks_per_cpu_s":
            if self.relay_cpu_s is None or self.relay_cpu_s <= 0:
                return None
            return lg["chunks"] / self.relay_cpu_s
        if key == "cpu_us_per_content_chunk":
            content = lg.get("content_chunks", 0)
            if self.relay_cpu_s is None or not content:
                return None
            return self.relay_cpu_s / content * 1e6
        if key == "peak_rss_mb":
            return self.peak_rss_mb
        if key == "rss_per_stream_kb":
            if self.peak_rss_mb is None or self.idle_rss_mb is None or not self.concurrency:
                return None
            return max(0.0, self.peak_rss_mb - self.idle_rss_mb) * 1e6 / self.concurrency / 1024
        if key == "other_cpu_s":
            return self.other_cpu_s
        if key == "upstream_cpu_s":
            return self.upstream_cpu_s
        raise KeyError(key)


def busy_cpu_s() -> float:
    """Machine-wide non-idle CPU seconds."""
    t = psutil.cpu_times()
    return (
        sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)
    )


def pct(values: list[float], q: float) -> float | None:
    """The same nearest-rank percentile as loadgen.py, over merged samples."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100.0 * (len(s) - 1))))]


def merge_loadgen(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One summary from several load-generator processes' JSON (``--raw`` samples re-ranked)."""
    if len(parts) == 1 and "raw" not in parts[0]:
        return parts[0]
    ttft = [v for p in parts for v in p.get("raw", {}).get("ttft_ms", []) if v is not None]
    gaps = [v for p in parts for v in p.get("raw", {}).get("gap_ms", []) if v is not None]
    kinds: dict[str, int] = {}
    for p in parts:
        for k, n in p["error_kinds"].items():
            kinds[k] = kinds.get(k, 0) + n
    wall = max(p["wall_s"] for p in parts)
    cpu = sum(p["loadgen_cpu_s"] for p in parts)
    return {
        "processes": len(parts),
        "concurrency": sum(p["concurrency"] for p in parts),
        "streams": sum(p["streams"] for p in parts),
        "complete": sum(p["complete"] for p in parts),
        "incomplete": sum(p["incomplete"] for p in parts),
        "errors": sum(p["errors"] for p in parts),
        "error_kinds": kinds,
        "error_samples": [e for p in parts for e in p["error_samples"]][:5],
        "chunks": sum(p["chunks"] for p in parts),
        "content_chunks": sum(p.get("content_chunks", 0) for p in parts),
        "ttft_ms": {
            "n": len(ttft),
            "p50": pct(ttft, 50),
            "p90": pct(ttft, 90),
            "p99": pct(ttft, 99),
            "max": max(ttft) if ttft else None,
        },
        "gap_ms": {
            "n": len(gaps),
            "p50": pct(gaps, 50),
            "p99": pct(gaps, 99),
            "max": max(gaps) if gaps else None,
        },
        "wall_s": wall,
        "loadgen_cpu_s": round(cpu, 3),
        "loadgen_cpu_share": round(cpu / wall, 4) if wall > 0 else None,
    }


def run_loadgen(
    args: argparse.Namespace,
    target: Target,
    upstream: Service,
    level: Level,
    tmp: Path,
) -> RunResult:
    """Run loadgen.py (``--loadgen-procs`` processes) once against ``target``, sampling the relay."""
    concurrency, prof = level.concurrency, level.profile
    res = RunResult(target.name, concurrency, 0, level.key)
    interval_ms = prof.interval_ms
    stream_s = prof.tokens * interval_ms / 1000.0
    procs = max(1, min(args.loadgen_procs, concurrency))
    ramp_batch = max(1, prof.ramp_batch // procs)
    shares = [concurrency // procs + (1 if i < concurrency % procs else 0) for i in range(procs)]
    ramp_s = (max(shares) // ramp_batch) * prof.ramp_interval_ms / 1000.0
    per_request_timeout = stream_s * 3 + 10.0
    hard_timeout = ramp_s + prof.rounds * per_request_timeout + 30.0
    relay = target.service
    relay_before = relay.cpu_snapshot() if relay else {}
    up_before = upstream.cpu_snapshot()
    self_proc = psutil.Process()
    self_before = sum(self_proc.cpu_times()[:2])
    busy_before = busy_cpu_s()
    idle = relay.rss() if relay else 0
    peak = idle
    running: list[tuple[subprocess.Popen[bytes], psutil.Process, Path, Path]] = []
    for i, share in enumerate(shares):
        argv = [
            args.loadgen_python or sys.executable,
            str(HERE / "loadgen.py"),
            "--port",
            str(target.port),
            "--protocol",
            target.protocol,
            "--concurrency",
            str(share),
            "--rounds",
            str(prof.rounds),
            "--tokens",
            str(prof.tokens),
            "--model",
            prof.model,
            "--ramp-batch",
            str(ramp_batch),
            "--ramp-interval-ms",
            str(prof.ramp_interval_ms),
            "--timeout",
            f"{per_request_timeout:.1f}",
            "--connect-timeout",
            "30",
        ]
        if procs > 1:
            argv.append("--raw")
        if args.api_key and target.service is not None and target.name.startswith("tokenrelay"):
            argv += ["--api-key", args.api_key]
        # stdout goes to a file: raw samples of 10,000 streams are megabytes, more than a pipe holds
        out_path, err_path = tmp / f"loadgen-{i}.json", tmp / f"loadgen-{i}.err"
        with open(out_path, "wb") as out_f, open(err_path, "wb") as err_f:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out_f,
                stderr=err_f,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        running.append((popen, psutil.Process(popen.pid), out_path, err_path))
    lg_cpu = [0.0] * procs
    deadline = time.monotonic() + hard_timeout
    try:
        while any(pp.poll() is None for pp, _, _, _ in running):
            if time.monotonic() > deadline:
                res.error = f"loadgen exceeded {hard_timeout:.0f} s and was killed"
                break
            if relay:
                peak = max(peak, relay.rss())
            for i, (_, ps, _, _) in enumerate(running):
                with contextlib.suppress(psutil.Error):
                    t = ps.cpu_times()
                    lg_cpu[i] = t.user + t.system
            time.sleep(0.05)
    finally:
        for pp, _, _, _ in running:
            if pp.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pp.pid, signal.SIGKILL)
            pp.wait()
    if relay:
        res.relay_cpu_s = cpu_delta(relay_before, relay.cpu_snapshot())
        res.peak_rss_mb = peak / 1e6
        res.idle_rss_mb = idle / 1e6
    res.upstream_cpu_s = cpu_delta(up_before, upstream.cpu_snapshot())
    busy = busy_cpu_s() - busy_before
    self_cpu = sum(self_proc.cpu_times()[:2]) - self_before
    parts: list[dict[str, Any]] = []
    if res.error is None:
        for pp, _, out_path, err_path in running:
            err = err_path.read_bytes()
            out = out_path.read_bytes()
            if pp.returncode != 0:
                res.error = f"loadgen exit {pp.returncode}: {err.decode('utf-8', 'replace')[-800:]}"
                break
            try:
                parts.append(json.loads(out))
            except ValueError:
                res.error = f"loadgen output not JSON: {out[:300]!r} {err[-300:]!r}"
                break
        if res.error is None:
            res.lg = merge_loadgen(parts)
            res.lg.pop("raw", None)
    if relay and not relay.alive():
        res.error = (res.error or "") + f" [{target.name} died: exit {relay.popen.returncode}]"
    lg_total = max(sum(lg_cpu), res.lg.get("loadgen_cpu_s", 0.0) if res.lg else 0.0)
    res.other_cpu_s = max(0.0, busy - (res.relay_cpu_s or 0.0) - res.upstream_cpu_s - lg_total - self_cpu)
    return res


def fmt(v: float | None, digits: int = 2) -> str:
    if v is None:
        return "—"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def summarize(results: list[RunResult], levels: list[str], targets: list[str]) -> dict[tuple[str, str], Row]:
    """Median of each metric over repeats, plus added TTFT vs the direct run of the same repeat.

    Keyed by (level key, target); a level key is ``"<streams>:<profile>"``.
    """
    by_key: dict[tuple[str, str, int], RunResult] = {(r.level, r.target, r.repeat): r for r in results}
    summary: dict[tuple[str, str], Row] = {}
    keys = (
        "ttft_p50_ms",
        "ttft_p99_ms",
        "gap_p99_ms",
        "chunks",
        "content_chunks",
        "chunks_per_s",
        "relay_cpu_s",
        "chunks_per_cpu_s",
        "cpu_us_per_content_chunk",
        "peak_rss_mb",
        "rss_per_stream_kb",
        "errors",
        "incomplete",
        "failed_streams",
        "loadgen_cpu_s",
        "loadgen_cpu_share",
        "wall_s",
        "other_cpu_s",
        "upstream_cpu_s",
    )
    for lv in levels:
        for t in targets:
            runs = [r for r in results if r.level == lv and r.target == t]
            if not runs:
                continue
            row: Row = {k: median([r.metric(k) for r in runs]) for k in keys}
            row["runs"] = float(len(runs))
            row["failed_runs"] = float(sum(1 for r in runs if r.error))
            for q in ("p50", "p99"):
                added: list[float | None] = []
                for r in runs:
                    d = by_key.get((lv, "direct", r.repeat))
                    a, b = r.metric(f"ttft_{q}_ms"), d.metric(f"ttft_{q}_ms") if d else None
                    added.append(a - b if a is not None and b is not None else None)
                row[f"added_ttft_{q}_ms"] = median(added) if t != "direct" else None
            summary[(lv, t)] = row
    return summary


def by_concurrency(summary: dict[tuple[str, str], Row]) -> dict[tuple[int, str], Row]:
    """The issue-2 tables' view: keyed by (streams, target) (every level there is the fast profile)."""
    return {(int(lv.split(":", 1)[0]), t): row for (lv, t), row in summary.items()}


def results_table(summary: dict[tuple[int, str], Row], failed: list[str]) -> str:
    head = (
        "| streams | target | TTFT p50 ms | TTFT p99 ms | added TTFT p50 ms | added TTFT p99 ms | gap p99 ms "
        "| chunks | relay CPU s | chunks / relay CPU-s | relay peak RSS MB | errors / incomplete "
        "| loadgen CPU s | other CPU s |"
    )
    lines = [head, "|" + "---|" * 14]
    concurrencies = sorted({c for c, _ in summary})
    rows: list[tuple[int, str, dict[str, float | None] | None]] = [
        (c, t, row) for (c, t), row in summary.items()
    ]
    rows += [(c, t, None) for c in concurrencies for t in failed]
    rows.sort(key=lambda x: (x[0], TARGET_ORDER.index(x[1]) if x[1] in TARGET_ORDER else 99))
    for c, t, row in rows:
        if row is None:
            lines.append(f"| {c} | {t} | did not start (see notes) |" + " |" * 11)
            continue
        errs = row["errors"]
        inc = row["incomplete"]
        err_cell = f"{fmt(errs, 0)} / {fmt(inc, 0)}"
        if row["failed_runs"]:
            err_cell += f" ({fmt(row['failed_runs'], 0)} runs failed)"
        lines.append(
            f"| {c} | {t} | {fmt(row['ttft_p50_ms'])} | {fmt(row['ttft_p99_ms'])} "
            f"| {fmt(row['added_ttft_p50_ms'])} | {fmt(row['added_ttft_p99_ms'])} | {fmt(row['gap_p99_ms'])} "
            f"| {fmt(row['chunks'], 0)} | {fmt(row['relay_cpu_s'], 3)} | {fmt(row['chunks_per_cpu_s'], 0)} "
            f"| {fmt(row['peak_rss_mb'], 1)} | {err_cell} | {fmt(row['loadgen_cpu_s'], 3)} "
            f"| {fmt(row['other_cpu_s'], 2)} |"
        )
    return "\n".join(lines)


def checks_table(summary: dict[tuple[int, str], Row], targets: list[str], failed: list[str]) -> str:
    relays = [t for t in TARGET_ORDER if t != "direct" and (t in targets or t in failed)]
    if not relays:
        return ""
    lines = [
        "| streams | target | " + " | ".join(relays) + " |",
        "|---|---|" + "---|" * len(relays),
    ]
    for c, key, op, thr, label in CHECKS:
        cells = []
        for t in relays:
            row = summary.get((c, t))
            v = row.get(key) if row else None
            if t in failed:
                cells.append("not run (did not start)")
                continue
            if v is None:
                cells.append("—")
                continue
            ok = v <= thr if op == "<=" else v >= thr
            cells.append(f"{fmt(v, 2 if abs(v) < 1000 else 0)} {'PASS' if ok else 'FAIL'}")
        if all(cell == "—" for cell in cells) or (c, "direct") not in summary:
            continue
        lines.append(f"| {c} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def display_command() -> str:
    exe = Path(sys.executable)
    with contextlib.suppress(ValueError):
        exe = exe.relative_to(ROOT) if exe.is_absolute() else exe
    script = Path(sys.argv[0]).resolve()
    with contextlib.suppress(ValueError):
        script = script.relative_to(ROOT)
    return shlex.join([str(exe), str(script), *sys.argv[1:]])


def write_section(out: Path, section: str, start: str = SECTION_START, end: str = SECTION_END) -> None:
    """Write ``section`` between the markers in ``out`` (replacing a previous one; others are kept)."""
    block = f"{start}\n{section.rstrip()}\n{end}\n"
    if out.exists():
        text = out.read_text()
        if start in text and end in text:
            pre, rest = text.split(start, 1)
            post = rest.split(end, 1)[1].lstrip("\n")
            text = pre + block + (("\n" + post) if post else "")
        else:
            text = text.rstrip() + "\n\n" + block
    else:
        text = "# Benchmarks\n\n" + block
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


def progress_line(r: RunResult, label: str) -> str:
    if r.error and not r.lg:
        return f"{label} {r.target}: ERROR {r.error[:300]}"
    m = r.metric
    cps = m("chunks_per_cpu_s")
    relay = (
        f" relay cpu {fmt(r.relay_cpu_s, 3)} s ({fmt(cps, 0)} chunks/cpu-s) rss {fmt(r.peak_rss_mb, 1)} MB"
        f" ({fmt(m('rss_per_stream_kb'), 1)} KB/stream)"
        if r.relay_cpu_s is not None
        else ""
    )
    return (
        f"{label} {r.target:<10} ttft p50 {fmt(m('ttft_p50_ms'))} p99 {fmt(m('ttft_p99_ms'))} ms, "
        f"gap p99 {fmt(m('gap_p99_ms'))} ms, chunks {fmt(m('chunks'), 0)}, errors {fmt(m('errors'), 0)}, "
        f"incomplete {fmt(m('incomplete'), 0)},{relay} upstream cpu {fmt(r.upstream_cpu_s, 3)} s, "
        f"loadgen cpu {fmt(m('loadgen_cpu_s'), 3)} s, other cpu {fmt(r.other_cpu_s, 2)} s"
        + (f" [{r.error[:200]}]" if r.error else "")
    )


@contextlib.contextmanager
def services_cleanup() -> Iterator[list[Service]]:
    """Yield a list to register services in; stop them all on exit, Ctrl-C or SIGTERM."""
    services: list[Service] = []

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, on_term)
    old_hup = signal.signal(signal.SIGHUP, on_term)
    try:
        yield services
    finally:
        for svc in reversed(services):
            try:
                svc.stop()
            except Exception as exc:
                log(f"warning: stopping {svc.name} failed: {exc!r}")
        signal.signal(signal.SIGTERM, old)
        signal.signal(signal.SIGHUP, old_hup)


def relay_env() -> dict[str, str]:
    """Environment for tokenrelay processes: this checkout's src/ first on PYTHONPATH."""
    env = dict(os.environ)
    if (ROOT / "src" / "tokenrelay").is_dir():
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    return env


def relay_config(args: argparse.Namespace, tmp: Path, name: str, up_port: int) -> Path:
    """A tokenrelay config: the fast and the paced model on the fake upstream; with --features a
    database in ``tmp`` and a plan whose limit is checked on every request but never reached."""
    text = "models:\n"
    for model in ("bench", "paced"):
        text += f"  - name: {model}\n    provider: openai\n    base_url: http://127.0.0.1:{up_port}/v1\n"
    if args.features:
        text += (
            "server:\n"
            f"  database_url: sqlite+aiosqlite:///{tmp / (name + '.db')}\n"
            "plans:\n"
            "  bench: {requests_per_minute: 100000000}\n"
        )
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(text)
    return cfg


def create_key(args: argparse.Namespace, cfg: Path) -> str:
    """``tokenrelay keys create --plan bench`` against the config's database; the key's secret."""
    done = subprocess.run(
        [
            *(args.relay_python or sys.executable, "-m", "tokenrelay", "keys", "create"),
            *("--plan", "bench", "--name", "bench", "--config", str(cfg)),
        ],
        capture_output=True,
        text=True,
        env=relay_env(),
        cwd=ROOT,
    )
    key = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    if done.returncode != 0 or not key:
        raise RuntimeError(f"tokenrelay keys create failed ({done.returncode}): {done.stderr[-800:]}")
    return key


def start_tokenrelay(
    args: argparse.Namespace,
    tmp: Path,
    name: str,
    cfg: Path,
    workers: int,
    services: list[Service],
    extra: tuple[str, ...] = (),
) -> tuple[int, Service, str | None]:
    """Start ``tokenrelay serve``; return its port, service and the start failure (None when ready)."""
    port = free_port()
    argv = [
        args.relay_python or sys.executable,
        "-m",
        "tokenrelay",
        "serve",
        "--config",
        str(cfg),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    if workers:
        argv += ["--workers", str(workers)]
    argv += [*extra, *shlex.split(args.relay_args)]
    svc = Service(name, argv, tmp / f"{name}.log", env=relay_env())
    services.append(svc)
    try:
        wait_ready(svc, port, "/readyz", args.ready_timeout)
    except RuntimeError as exc:
        log(str(exc))
        return port, svc, str(exc)
    return port, svc, None


def start_targets(
    args: argparse.Namespace, tmp: Path, services: list[Service], notes: list[str]
) -> tuple[Service, list[Target]]:
    """Start the fake upstream and the relays; return the upstream and the usable targets."""
    up_port = free_port()
    upstream = Service(
        "fake_upstream",
        [
            args.upstream_python or sys.executable,
            str(HERE / "fake_upstream.py"),
            "--port",
            str(up_port),
            "--tokens",
            str(args.tokens),
            "--interval-ms",
            str(args.interval_ms),
            "--paced-interval-ms",
            str(args.paced_interval_ms),
        ],
        tmp / "fake_upstream.log",
    )
    services.append(upstream)
    wait_ready(upstream, up_port, "/health", 20.0)
    targets: list[Target] = []
    wanted = [t.strip() for t in args.targets.split(",") if t.strip()]
    protocol_levels = set(args.protocol_levels.split(",")) if args.protocol_levels else None
    relay1: tuple[int, Service, str | None] | None = None
    for name in TARGET_ORDER:
        if name not in wanted:
            continue
        if name == "direct":
            targets.append(Target("direct", up_port, None))
        elif name == "nginx":
            nginx = find_nginx()
            if nginx is None and args.install_nginx:
                nginx = install_nginx(notes)
            if nginx is None:
                notes.append("nginx is not installed (not on PATH): the nginx reference rows are skipped.")
                log("nginx not found: skipping the nginx target")
                continue
            port = free_port()
            conf = tmp / "nginx.conf"
            conf.write_text(nginx_conf(tmp, port, up_port))
            svc = Service(
                "nginx",
                [
                    nginx,
                    "-p",
                    str(tmp),
                    "-c",
                    str(conf),
                    "-e",
                    str(tmp / "nginx-error.log"),
                    "-g",
                    "daemon off;",
                ],
                tmp / "nginx.log",
            )
            services.append(svc)
            try:
                wait_ready(svc, port, "/readyz", 15.0)
            except RuntimeError as exc:
                msg = f"nginx failed to start, skipped: {exc}"
                notes.append(msg)
                log(msg)
                continue
            version = subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr.strip()
            notes.append(
                f"nginx reference: {version}, worker_processes 1, proxy_buffering off, upstream keepalive."
            )
            targets.append(Target("nginx", port, svc))
        elif name in ("tokenrelay", "tokenrelay-granian", "tokenrelay-2w"):
            workers = 2 if name == "tokenrelay-2w" else args.workers
            cfg = relay_config(args, tmp, name, up_port)
            if args.features:
                if args.api_key is None:
                    args.api_key = create_key(args, cfg)
                else:  # one key for every gateway: the first database, copied
                    first = next(tmp.glob("tokenrelay*.db"), None)
                    if first is not None:
                        shutil.copy(first, tmp / f"{name}.db")
            extra = ("--server", "granian") if name == "tokenrelay-granian" else ()
            port, svc, failed = start_tokenrelay(args, tmp, name, cfg, workers, services, extra)
            if failed:
                notes.append(f"{name} failed to start:\n\n```\n{failed}\n```")
            targets.append(Target(name, port, svc, failed=failed))
            if name == "tokenrelay":
                relay1 = (port, svc, failed)
        else:  # a protocol variant through the 1-worker gateway
            if relay1 is None:
                log(f"{name} needs the tokenrelay target: skipped")
                continue
            port, svc, failed = relay1
            targets.append(Target(name, port, svc, failed, TARGET_PROTOCOL[name], protocol_levels))
    return upstream, targets


def parse_levels(args: argparse.Namespace) -> list[Level]:
    """``--levels 5:fast,100:fast,1000:paced`` (scale) or ``--concurrency 5,100`` (all fast)."""
    profiles = {
        "fast": Profile(
            "fast",
            "bench",
            args.tokens,
            args.interval_ms,
            args.rounds,
            args.ramp_batch,
            args.ramp_interval_ms,
        ),
        # one token per second: 10,000 such streams are 10,000 events per second through the relay
        "paced": Profile(
            "paced", "paced", args.paced_tokens, args.paced_interval_ms, 1, args.paced_ramp_batch, 20.0
        ),
        # the fast profile as one wave of many streams: more offered than one worker can relay
        "sat": Profile("sat", "bench", args.tokens, args.interval_ms, 1, 100, 10.0),
    }
    spec = (
        args.levels if args.scale else ",".join(f"{c}:fast" for c in args.concurrency.split(",") if c.strip())
    )
    levels = []
    for item in spec.split(","):
        c, _, prof = item.strip().partition(":")
        if prof not in profiles:
            raise SystemExit(f"unknown profile {prof!r} in {item!r} (fast, paced, sat)")
        levels.append(Level(int(c), profiles[prof]))
    return levels


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; return the process exit status."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", default="5,100", help="comma-separated concurrent stream counts")
    p.add_argument("--repeats", type=int, default=3, help="repeats of each fast level")
    p.add_argument("--tokens", type=int, default=50, help="token chunks per stream")
    p.add_argument("--interval-ms", type=float, default=20.0, help="upstream delay between token chunks")
    p.add_argument("--rounds", type=int, default=3, help="streams per connection, back to back, in each run")
    p.add_argument("--ramp-batch", type=int, default=10, help="connections started per ramp step")
    p.add_argument("--ramp-interval-ms", type=float, default=10.0, help="delay between ramp steps")
    p.add_argument("--targets", default=None, help=f"subset of {','.join(TARGET_ORDER)}")
    p.add_argument("--workers", type=int, default=0, help="pass --workers N to tokenrelay serve")
    p.add_argument("--relay-args", default="", help="extra arguments for tokenrelay serve")
    p.add_argument("--relay-python", default=None, help="python for tokenrelay (default: this one)")
    p.add_argument("--upstream-python", default=None, help="python for fake_upstream (default: this one)")
    p.add_argument("--loadgen-python", default=None, help="python for loadgen (default: this one)")
    p.add_argument("--ready-timeout", type=float, default=60.0, help="seconds to wait for GET /readyz")
    p.add_argument("--no-warmup", action="store_true", help="skip the short warm-up run per target")
    scale = p.add_argument_group("scale suite (issue 7)")
    scale.add_argument("--scale", action="store_true", help="run the scale suite (make bench)")
    scale.add_argument(
        "--levels",
        default="5:fast,100:fast,1000:paced,10000:paced,1000:sat",
        help="STREAMS:PROFILE list; profiles fast (tokens --interval-ms apart), paced (one per second), "
        "sat (fast, one wave)",
    )
    scale.add_argument("--paced-tokens", type=int, default=20, help="tokens per paced stream")
    scale.add_argument("--paced-interval-ms", type=float, default=1000.0)
    scale.add_argument(
        "--paced-ramp-batch", type=int, default=20, help="paced connections opened per 20 ms (1,000 per s)"
    )
    scale.add_argument("--big-repeats", type=int, default=1, help="repeats of each paced and sat level")
    scale.add_argument(
        "--protocol-levels", default="100:fast,1000:paced", help="levels for tokenrelay-anthropic and -ws"
    )
    scale.add_argument("--loadgen-procs", type=int, default=1, help="load generator processes per run")
    scale.add_argument(
        "--features",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="API key + plan limit + SQLite records (default: on with --scale)",
    )
    scale.add_argument("--api-key", default=None, help=argparse.SUPPRESS)
    scale.add_argument(
        "--install-nginx",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="apt-get install nginx-light when nginx is missing (root only)",
    )
    scale.add_argument("--settle-s", type=float, default=3.0, help="pause after runs of >= 1,000 streams")
    scale.add_argument("--plot", type=Path, default=None, help="PNG plot of the scale suite (matplotlib)")
    p.add_argument(
        "--out", type=Path, default=None, help="markdown file to write/update (e.g. docs/benchmarks.md)"
    )
    p.add_argument("--json-out", type=Path, default=None, help="write every run's raw results as JSON")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    args = p.parse_args(argv)
    if args.features is None:
        args.features = args.scale
    if args.targets is None:
        args.targets = ",".join(TARGET_ORDER) if args.scale else "direct,nginx,tokenrelay,tokenrelay-granian"
    levels = parse_levels(args)
    nofile = raise_nofile()

    started = dt.datetime.now(dt.UTC)
    notes: list[str] = []
    results: list[RunResult] = []
    tmp = Path(tempfile.mkdtemp(prefix="tokenrelay-bench-"))
    os.chmod(tmp, 0o755)
    relay_failed = False
    failed_names: list[str] = []
    try:
        with services_cleanup() as services:
            upstream, targets = start_targets(args, tmp, services, notes)
            runnable = [t for t in targets if t.failed is None]
            failed_names = [t.name for t in targets if t.failed]
            relay_failed = bool(failed_names)
            plan: list[tuple[Level, int, Target]] = []
            for lv in levels:
                reps = args.repeats if lv.profile.name == "fast" else args.big_repeats
                for rep in range(reps):
                    plan += [(lv, rep, t) for t in runnable if t.levels is None or lv.key in t.levels]
            fast = levels[0].profile
            if args.scale:
                warm = Level(100, dataclasses.replace(fast, tokens=min(5, fast.tokens), rounds=1))
            else:
                top = max(lv.concurrency for lv in levels)
                warm = Level(top, dataclasses.replace(fast, tokens=min(5, fast.tokens), rounds=1))
            warmups = [] if args.no_warmup else runnable
            with Progress(
                TextColumn("{task.description:<44}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=CONSOLE,
            ) as progress:
                task = progress.add_task("benchmark", total=len(warmups) + len(plan))
                # One short wave per target first: imports, caches and the relay's upstream
                # connection pool are warm before anything is measured.
                for t in warmups:
                    progress.update(task, description=f"warm-up {t.name}")
                    w = run_loadgen(args, t, upstream, warm, tmp)
                    log(progress_line(w, "[warm-up]"))
                    progress.advance(task)
                for lv, rep, t in plan:
                    reps = args.repeats if lv.profile.name == "fast" else args.big_repeats
                    label = f"[{lv.concurrency} {lv.profile.name} rep {rep + 1}/{reps}]"
                    progress.update(task, description=f"{label} {t.name}")
                    if t.service is not None and not t.service.alive():
                        r = RunResult(
                            t.name,
                            lv.concurrency,
                            rep,
                            lv.key,
                            error=f"{t.name} is not running: {t.service.log_tail(800)}",
                        )
                    else:
                        r = run_loadgen(args, t, upstream, lv, tmp)
                        r.repeat = rep
                    results.append(r)
                    log(progress_line(r, label))
                    if r.error and t.service is not None and not t.service.alive():
                        notes.append(
                            f"{t.name} died during the {lv.key} run (exit {t.service.popen.returncode}):"
                            f"\n\n```\n{t.service.log_tail(2000)}\n```"
                        )
                    progress.advance(task)
                    if lv.concurrency >= 1000:
                        time.sleep(args.settle_s)  # let closing sockets and finished streams settle
    except KeyboardInterrupt:
        log("interrupted: processes stopped")
        return 130
    finally:
        if args.keep_tmp or relay_failed:
            log(f"logs and configs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    target_names = [t for t in TARGET_ORDER if any(r.target == t for r in results)]
    level_keys = [lv.key for lv in levels]
    summary = summarize(results, level_keys, target_names)
    for r in results:
        if r.error:
            notes.append(f"run {r.level} repeat {r.repeat + 1} {r.target}: {r.error[:500]}")
    for r in results:
        if r.lg and r.lg.get("error_samples"):
            notes.append(f"{r.target} {r.level} error samples: " + "; ".join(r.lg["error_samples"][:3]))
            break

    lg_runs = [r for r in results if r.lg]
    lg_share = median([r.lg.get("loadgen_cpu_share") for r in lg_runs])
    bg = [r.other_cpu_s / r.lg["wall_s"] for r in lg_runs if r.other_cpu_s is not None and r.lg.get("wall_s")]
    if bg:
        bg_median, bg_max = statistics.median(bg), max(bg)
        msg = (
            f"Background load (CPU used by other processes on the machine during runs): median "
            f"{bg_median:.2f}, max {bg_max:.2f} of {os.cpu_count()} cores."
        )
        if bg_median > 0.25:
            msg += " The machine was busy: treat these numbers as disturbed and rerun on a quiet machine."
        notes.insert(0, msg)
    top = max(lv.concurrency for lv in levels)
    if nofile[1] < 2 * top + 512:
        notes.append(
            f"The open-file hard limit ({nofile[1]}) is below the {2 * top + 512:,} descriptors a "
            f"one-process relay needs for {top:,} streams (a client and an upstream socket each): at that "
            "level nginx runs out of descriptors and tokenrelay (which admits (limit - 256) / 2 requests per "
            "worker) queues the rest. The harness could not raise it (no CAP_SYS_RESOURCE)."
        )
    if args.scale:
        plot_note = ""
        if args.plot:
            try:
                plot_note = plot_scale(summary, levels, args.plot)
            except Exception as exc:  # a broken plot must not lose the run's tables
                plot_note = f"plot skipped: {exc!r}"
                log(plot_note)
            if not plot_note.startswith("plot skipped"):
                out_dir = (args.out.parent if args.out else Path("docs")).resolve()
                with contextlib.suppress(ValueError):
                    plot_note = str(args.plot.resolve().relative_to(out_dir))
        section = render_scale(
            args, started, summary, levels, target_names, failed_names, notes, nofile, plot_note
        )
        start, end = SCALE_START, SCALE_END
    else:
        section = render(args, started, by_concurrency(summary), target_names, failed_names, notes, lg_share)
        start, end = SECTION_START, SECTION_END
    print(section)
    if args.out:
        out = args.out if args.out.is_absolute() else Path.cwd() / args.out
        write_section(out, section, start, end)
        log(f"wrote {out}")
    if args.json_out:
        args.json_out.write_text(
            json.dumps(
                [
                    {
                        "target": r.target,
                        "level": r.level,
                        "concurrency": r.concurrency,
                        "repeat": r.repeat,
                        "relay_cpu_s": r.relay_cpu_s,
                        "upstream_cpu_s": r.upstream_cpu_s,
                        "other_cpu_s": r.other_cpu_s,
                        "peak_rss_mb": r.peak_rss_mb,
                        "idle_rss_mb": r.idle_rss_mb,
                        "error": r.error,
                        "loadgen": r.lg,
                    }
                    for r in results
                ],
                indent=1,
            )
        )
    return 2 if relay_failed else 0


def render(
    args: argparse.Namespace,
    started: dt.datetime,
    summary: dict[tuple[int, str], Row],
    targets: list[str],
    failed: list[str],
    notes: list[str],
    lg_share: float | None,
) -> str:
    """The markdown section: command, machine, method, results, checks, notes."""
    py = subprocess.run(
        [args.relay_python or sys.executable, "--version"], capture_output=True, text=True
    ).stdout.strip()
    parts = [
        "## Streaming relay benchmark",
        "",
        f"- Command: `{display_command()}`",
        f"- Date: {started.strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Machine: {os.cpu_count()} CPUs (nproc), {cpu_model()}, {platform.system()} {platform.release()}, "
        f"{py} ({platform.python_implementation()})",
        f"- Load: {args.tokens} tokens per stream, {args.interval_ms:g} ms apart; {args.rounds} streams per "
        f"connection back to back; streams start {args.ramp_batch} every {args.ramp_interval_ms:g} ms; "
        f"medians over {args.repeats} repeats, targets alternated within each repeat.",
        "- Added TTFT = target TTFT - direct TTFT of the same repeat. Chunks = `data:` events other than "
        "`[DONE]` received by the load generator. Relay CPU = user+system of the relay process tree. "
        "Other CPU = machine-wide busy CPU not used by the relay, upstream, load generator or harness "
        "(noise).",
        "",
        results_table(summary, failed),
    ]
    checks = checks_table(summary, targets, failed)
    if checks:
        parts += ["", "Targets (medians over repeats):", "", checks]
    if lg_share is not None:
        parts += [
            "",
            f"Load generator CPU share: median {lg_share * 100:.1f}% of one core during a run.",
        ]
    if notes:
        parts += ["", "Notes:", ""] + [f"- {n}" if "\n" not in n else f"- {n}\n" for n in notes]
    return "\n".join(parts) + "\n"


def scale_checks(summary: dict[tuple[str, str], Row], levels: list[Level]) -> list[tuple[str, str, str, str]]:
    """The issue-7 targets as (level, target, measured, verdict) rows, from this one run."""
    rows: list[tuple[str, str, str, str]] = []

    def get(lv: str, t: str, key: str) -> float | None:
        row = summary.get((lv, t))
        return row.get(key) if row else None

    def verdict(ok: bool | None) -> str:
        return "—" if ok is None else ("PASS" if ok else "FAIL")

    relays = ("tokenrelay", "tokenrelay-granian", "tokenrelay-2w")
    keys = [lv.key for lv in levels]
    for lv in keys:
        ngx = get(lv, "nginx", "chunks_per_cpu_s")
        for t in relays:
            v = get(lv, t, "chunks_per_cpu_s")
            if ngx and v:
                measured = f"{v / ngx:.2f}x ({fmt(v, 0)} / {fmt(ngx, 0)})"
                rows.append((lv, f"{t}: chunks per CPU-s >= 0.5x nginx's", measured, verdict(v / ngx >= 0.5)))
    for lv, limit in (("100:fast", 2.0), ("1000:paced", 20.0)):
        for t in relays:
            v = get(lv, t, "added_ttft_p99_ms")
            if v is not None:
                rows.append((lv, f"{t}: added TTFT p99 <= {limit:g} ms", f"{v:.2f} ms", verdict(v <= limit)))
    lv = "10000:paced"
    for t in relays:
        if (lv, t) not in summary:
            continue
        failed = get(lv, t, "failed_streams")
        gap = get(lv, t, "gap_p99_ms")
        rss = get(lv, t, "peak_rss_mb")
        rows.append(
            (
                lv,
                f"{t}: every stream complete",
                "no run" if failed is None else f"{fmt(failed, 0)} failed",
                verdict(None if failed is None else failed == 0),
            )
        )
        if gap is not None:
            rows.append((lv, f"{t}: gap p99 <= 1,050 ms", f"{gap:.1f} ms", verdict(gap <= 1050)))
        if rss is not None:
            rows.append((lv, f"{t}: peak RSS <= 1 GiB", f"{rss:.0f} MB", verdict(rss <= 1073.7)))
    for lv in keys:
        if not lv.endswith(":sat"):
            continue
        one, two = get(lv, "tokenrelay", "chunks_per_s"), get(lv, "tokenrelay-2w", "chunks_per_s")
        if one and two:
            rows.append(
                (
                    lv,
                    "2 workers >= 1.7x the chunks/s of 1 worker",
                    f"{two / one:.2f}x ({fmt(two, 0)} / {fmt(one, 0)})",
                    verdict(two / one >= 1.7),
                )
            )
    for lv in keys:
        base_ttft = get(lv, "tokenrelay", "added_ttft_p99_ms")
        base_cpu = get(lv, "tokenrelay", "cpu_us_per_content_chunk")
        for t in ("tokenrelay-anthropic", "tokenrelay-ws"):
            ttft = get(lv, t, "added_ttft_p99_ms")
            cpu = get(lv, t, "cpu_us_per_content_chunk")
            if ttft is not None and base_ttft is not None:
                ok = None if base_ttft <= 0 else ttft <= 1.3 * base_ttft
                ratio = f"{ttft / base_ttft:.2f}x" if base_ttft > 0 else "n/a"
                measured = f"{ratio} ({ttft:.2f} / {base_ttft:.2f} ms)"
                rows.append((lv, f"{t}: added TTFT p99 <= 1.3x OpenAI's", measured, verdict(ok)))
            if cpu is not None and base_cpu:
                rows.append(
                    (
                        lv,
                        f"{t}: CPU per content chunk <= 1.3x OpenAI's",
                        f"{cpu / base_cpu:.2f}x ({cpu:.1f} / {base_cpu:.1f} us)",
                        verdict(cpu <= 1.3 * base_cpu),
                    )
                )
    return rows


def scale_table(summary: dict[tuple[str, str], Row], levels: list[Level], failed: list[str]) -> str:
    head = (
        "| streams | profile | target | TTFT p50 / p99 ms | added TTFT p50 / p99 ms | gap p99 ms | chunks/s "
        "| relay CPU s | chunks / relay CPU-s | relay CPU us / content chunk | peak RSS MB | RSS / stream KB "
        "| errors / incomplete | loadgen CPU % of a core | other CPU s |"
    )
    lines = [head, "|" + "---|" * 15]
    for lv in levels:
        for t in TARGET_ORDER:
            if t in failed:
                lines.append(
                    f"| {lv.concurrency:,} | {lv.profile.name} | {t} | did not start (see notes) |"
                    + " |" * 11
                )
                continue
            row = summary.get((lv.key, t))
            if row is None:
                continue
            err_cell = f"{fmt(row['errors'], 0)} / {fmt(row['incomplete'], 0)}"
            if row["failed_runs"]:
                err_cell += f" ({fmt(row['failed_runs'], 0)} runs failed)"
            share = row["loadgen_cpu_share"]
            lines.append(
                f"| {lv.concurrency:,} | {lv.profile.name} | {t} "
                f"| {fmt(row['ttft_p50_ms'])} / {fmt(row['ttft_p99_ms'])} "
                f"| {fmt(row['added_ttft_p50_ms'])} / {fmt(row['added_ttft_p99_ms'])} "
                f"| {fmt(row['gap_p99_ms'])} | {fmt(row['chunks_per_s'], 0)} | {fmt(row['relay_cpu_s'], 2)} "
                f"| {fmt(row['chunks_per_cpu_s'], 0)} "
                f"| {fmt(row['cpu_us_per_content_chunk'], 1)} | {fmt(row['peak_rss_mb'], 0)} "
                f"| {fmt(row['rss_per_stream_kb'], 1)} | {err_cell} "
                f"| {fmt(share * 100 if share is not None else None, 1)} | {fmt(row['other_cpu_s'], 1)} |"
            )
    return "\n".join(lines)


def render_scale(
    args: argparse.Namespace,
    started: dt.datetime,
    summary: dict[tuple[str, str], Row],
    levels: list[Level],
    targets: list[str],
    failed: list[str],
    notes: list[str],
    nofile: tuple[int, int],
    plot: str,
) -> str:
    """The scale suite's markdown section."""
    py = subprocess.run(
        [args.relay_python or sys.executable, "--version"], capture_output=True, text=True
    ).stdout.strip()
    somaxconn = "?"
    with contextlib.suppress(OSError):
        somaxconn = Path("/proc/sys/net/core/somaxconn").read_text().strip()
    profiles = {lv.profile.name: lv.profile for lv in levels}
    desc = {
        "fast": "{tokens} tokens {interval_ms:g} ms apart, {rounds} streams per connection back to back, "
        "connections opened {ramp_batch} every {ramp_interval_ms:g} ms, {reps} repeats (medians)",
        "paced": "{tokens} tokens {interval_ms:g} ms apart (one per second), one stream per connection, "
        "connections opened {ramp_batch} every {ramp_interval_ms:g} ms, {reps} run(s)",
        "sat": "{tokens} tokens {interval_ms:g} ms apart, one wave, connections opened {ramp_batch} every "
        "{ramp_interval_ms:g} ms: more than one worker can relay on this machine, {reps} run(s)",
    }
    parts = [
        "## Scale benchmark (issue 7)",
        "",
        f"- Command: `{display_command()}` (what `make bench` runs)",
        f"- Date: {started.strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Machine: {os.cpu_count()} CPUs (nproc), {cpu_model()}, {platform.system()} {platform.release()}, "
        f"{py}; open files {nofile[0]} soft / {nofile[1]} hard (the harness raises them as far as it is "
        f"allowed; every process inherits them), somaxconn {somaxconn}. "
        "Everything (load generator, fake upstream, relays) shares these CPUs, and other engineers' jobs ran "
        "on the machine at the same time: see the *other CPU* column.",
    ]
    for name, prof in profiles.items():
        reps = args.repeats if name == "fast" else args.big_repeats
        parts.append(f"- Profile `{name}`: " + desc[name].format(reps=reps, **dataclasses.asdict(prof)) + ".")
    parts += [
        "- tokenrelay as measured: "
        + (
            "every request carries an API key (`tokenrelay keys create`, SQLite database) on a plan with a "
            "requests-per-minute limit that is checked on each request and never reached; usage and audit "
            "records written to SQLite; Prometheus metrics; the in-memory resume log (every stream "
            "resumable for `stream_ttl_seconds`); `obfuscation` padding on Chat chunks (the default). "
            if args.features
            else "open mode (no keys), default settings. "
        )
        + "`tokenrelay` runs on the built-in server (the default), `tokenrelay-granian` on granian "
        "(`--server granian`); "
        "`tokenrelay-2w` is `--workers 2` (SO_REUSEPORT, state per worker, no Redis); "
        "`tokenrelay-anthropic` and `tokenrelay-ws` are the 1-worker gateway through `/v1/messages` and "
        "`/v1/ws/chat`.",
        "- Added TTFT = target TTFT - direct TTFT of the same level and repeat. Chunks = events received "
        "(SSE `data:` events other than the terminator; WebSocket messages other than `done`); content "
        "chunks = those carrying text, the figure compared across protocols. Relay CPU = user+system of the "
        "relay's process tree; RSS / stream = (peak RSS during the run - RSS just before it) / streams. "
        "Loadgen CPU % shows the load generator is not the bottleneck; other CPU = machine-wide busy CPU not "
        "used by the relay, upstream, load generator or harness (noise).",
        "",
        scale_table(summary, levels, failed),
        "",
        "Targets (issue 7), all ratios from this one run:",
        "",
        "| level | target | measured | |",
        "|---|---|---|---|",
    ]
    parts += [
        f"| {lv} | {label} | {value} | {ok} |" for lv, label, value, ok in scale_checks(summary, levels)
    ]
    if plot.startswith("plot skipped"):
        notes.append(plot)
    elif plot:
        parts += ["", f"![added first-token time and relay CPU per chunk against concurrency]({plot})"]
    if notes:
        parts += ["", "Notes:", ""] + [f"- {n}" if "\n" not in n else f"- {n}\n" for n in notes]
    return "\n".join(parts) + "\n"


def plot_scale(summary: dict[tuple[str, str], Row], levels: list[Level], out: Path) -> str:
    """Added TTFT p99 and relay CPU per chunk against concurrency, one line per relay; returns the path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        msg = "plot skipped: matplotlib is not installed (pip install -e '.[bench]')"
        log(msg)
        return msg
    curve = [lv for lv in levels if lv.profile.name in ("fast", "paced")]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {
        "nginx": ("tab:gray", "s", "-"),
        "tokenrelay": ("tab:blue", "o", "-"),
        "tokenrelay-granian": ("tab:cyan", "P", "--"),
        "tokenrelay-2w": ("tab:green", "^", "-"),
        "tokenrelay-anthropic": ("tab:orange", "D", ":"),
        "tokenrelay-ws": ("tab:purple", "v", ":"),
    }
    for t, (color, marker, ls) in styles.items():
        xs, ttft, cpu = [], [], []
        for lv in curve:
            row = summary.get((lv.key, t))
            if row is None:
                continue
            xs.append(lv.concurrency)
            added = row.get("added_ttft_p99_ms")
            ttft.append(max(added, 0.01) if added is not None else float("nan"))
            cps = row.get("chunks_per_cpu_s")
            cpu.append(1e6 / cps if cps else float("nan"))
        if xs:
            ax1.plot(xs, ttft, marker=marker, linestyle=ls, color=color, label=t)
            ax2.plot(xs, cpu, marker=marker, linestyle=ls, color=color, label=t)
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("concurrent streams (5, 100: 20 ms tokens; 1,000, 10,000: 1 token/s)")
        ax.grid(True, which="both", alpha=0.3)
    ax1.set_ylabel("added first-token time p99 (ms)")
    ax1.set_title("Added TTFT p99 over direct")
    ax2.set_ylabel("relay CPU per chunk (us)")
    ax2.set_title("Relay CPU per delivered chunk")
    ax1.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    log(f"wrote {out}")
    return str(out)


if __name__ == "__main__":
    sys.exit(main())
