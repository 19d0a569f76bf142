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

Run from the repository root::

    .venv/bin/python benchmarks/run.py --concurrency 5,100 --repeats 3 --out docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import json
import os
import platform
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

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SECTION_START = "<!-- tokenrelay-bench:start -->"
SECTION_END = "<!-- tokenrelay-bench:end -->"
TARGET_ORDER = ("direct", "nginx", "tokenrelay")

# (concurrency, metric key, comparison, threshold, label)
CHECKS: list[tuple[int, str, str, float, str]] = [
    (5, "added_ttft_p50_ms", "<=", 1.0, "added TTFT p50 <= 1 ms"),
    (100, "added_ttft_p50_ms", "<=", 3.0, "added TTFT p50 <= 3 ms"),
    (100, "added_ttft_p99_ms", "<=", 10.0, "added TTFT p99 <= 10 ms"),
    (100, "gap_p99_ms", "<=", 25.0, "gap p99 <= 25 ms"),
    (100, "chunks_per_cpu_s", ">=", 20000.0, ">= 20,000 chunks per relay CPU-second"),
    (100, "failed_streams", "<=", 0.0, "no errors or incomplete streams"),
]


def log(msg: str) -> None:
    """Progress output (stderr)."""
    print(msg, file=sys.stderr, flush=True)


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


def nginx_conf(tmp: Path, port: int, upstream_port: int) -> str:
    """A minimal nginx plain-relay config for streaming."""
    user = "user root root;\n" if os.geteuid() == 0 else ""
    return f"""{user}worker_processes 1;
worker_rlimit_nofile 20000;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 16000; multi_accept on; }}
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


@dataclass
class RunResult:
    """Metrics of one load-generator run against one target."""

    target: str
    concurrency: int
    repeat: int
    lg: dict[str, Any] = field(default_factory=dict)
    relay_cpu_s: float | None = None
    upstream_cpu_s: float = 0.0
    other_cpu_s: float | None = None
    peak_rss_mb: float | None = None
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
        if key == "errors":
            return float(lg["errors"])
        if key == "incomplete":
            return float(lg["incomplete"])
        if key == "failed_streams":
            return float(max(lg["errors"], lg["incomplete"]))
        if key == "loadgen_cpu_s":
            return lg["loadgen_cpu_s"]
        if key == "wall_s":
            return lg["wall_s"]
        if key == "relay_cpu_s":
            return self.relay_cpu_s
        if key == "chunks_per_cpu_s":
            if self.relay_cpu_s is None or self.relay_cpu_s <= 0:
                return None
            return lg["chunks"] / self.relay_cpu_s
        if key == "peak_rss_mb":
            return self.peak_rss_mb
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


def run_loadgen(
    args: argparse.Namespace,
    target: Target,
    upstream: Service,
    concurrency: int,
    tokens: int,
    rounds: int,
) -> RunResult:
    """Run loadgen.py once against ``target``, sampling the relay's CPU and RSS."""
    res = RunResult(target.name, concurrency, 0)
    stream_s = tokens * args.interval_ms / 1000.0
    ramp_s = (concurrency // args.ramp_batch) * args.ramp_interval_ms / 1000.0
    per_request_timeout = stream_s * 3 + 10.0
    hard_timeout = ramp_s + rounds * per_request_timeout + 30.0
    argv = [
        args.loadgen_python or sys.executable,
        str(HERE / "loadgen.py"),
        "--port",
        str(target.port),
        "--concurrency",
        str(concurrency),
        "--rounds",
        str(rounds),
        "--tokens",
        str(tokens),
        "--model",
        "bench",
        "--ramp-batch",
        str(args.ramp_batch),
        "--ramp-interval-ms",
        str(args.ramp_interval_ms),
        "--timeout",
        f"{per_request_timeout:.1f}",
    ]
    relay = target.service
    relay_before = relay.cpu_snapshot() if relay else {}
    up_before = upstream.cpu_snapshot()
    self_proc = psutil.Process()
    self_before = sum(self_proc.cpu_times()[:2])
    busy_before = busy_cpu_s()
    peak = relay.rss() if relay else 0
    lg_proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )
    lg_ps = psutil.Process(lg_proc.pid)
    lg_cpu = 0.0
    deadline = time.monotonic() + hard_timeout
    try:
        while lg_proc.poll() is None:
            if time.monotonic() > deadline:
                res.error = f"loadgen exceeded {hard_timeout:.0f} s and was killed"
                break
            if relay:
                peak = max(peak, relay.rss())
            with contextlib.suppress(psutil.Error):
                t = lg_ps.cpu_times()
                lg_cpu = t.user + t.system
            time.sleep(0.05)
    finally:
        if lg_proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(lg_proc.pid, signal.SIGKILL)
        out, err = lg_proc.communicate()
    if relay:
        res.relay_cpu_s = cpu_delta(relay_before, relay.cpu_snapshot())
        res.peak_rss_mb = peak / 1e6
    res.upstream_cpu_s = cpu_delta(up_before, upstream.cpu_snapshot())
    busy = busy_cpu_s() - busy_before
    self_cpu = sum(self_proc.cpu_times()[:2]) - self_before
    if res.error is None:
        if lg_proc.returncode != 0:
            res.error = f"loadgen exit {lg_proc.returncode}: {err.decode('utf-8', 'replace')[-800:]}"
        else:
            try:
                res.lg = json.loads(out)
            except ValueError:
                res.error = f"loadgen output not JSON: {out[:300]!r} {err[-300:]!r}"
    if relay and not relay.alive():
        res.error = (res.error or "") + f" [{target.name} died: exit {relay.popen.returncode}]"
    lg_total = max(lg_cpu, res.lg.get("loadgen_cpu_s", 0.0) if res.lg else 0.0)
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


def summarize(
    results: list[RunResult], concurrencies: list[int], targets: list[str]
) -> dict[tuple[int, str], dict[str, float | None]]:
    """Median of each metric over repeats, plus added TTFT vs the direct run of the same repeat."""
    by_key: dict[tuple[int, str, int], RunResult] = {(r.concurrency, r.target, r.repeat): r for r in results}
    summary: dict[tuple[int, str], dict[str, float | None]] = {}
    keys = (
        "ttft_p50_ms",
        "ttft_p99_ms",
        "gap_p99_ms",
        "chunks",
        "relay_cpu_s",
        "chunks_per_cpu_s",
        "peak_rss_mb",
        "errors",
        "incomplete",
        "failed_streams",
        "loadgen_cpu_s",
        "wall_s",
        "other_cpu_s",
        "upstream_cpu_s",
    )
    for c in concurrencies:
        for t in targets:
            runs = [r for r in results if r.concurrency == c and r.target == t]
            if not runs:
                continue
            row: dict[str, float | None] = {k: median([r.metric(k) for r in runs]) for k in keys}
            row["runs"] = float(len(runs))
            row["failed_runs"] = float(sum(1 for r in runs if r.error))
            for q in ("p50", "p99"):
                added: list[float | None] = []
                for r in runs:
                    d = by_key.get((c, "direct", r.repeat))
                    a, b = r.metric(f"ttft_{q}_ms"), d.metric(f"ttft_{q}_ms") if d else None
                    added.append(a - b if a is not None and b is not None else None)
                row[f"added_ttft_{q}_ms"] = median(added) if t != "direct" else None
            summary[(c, t)] = row
    return summary


def results_table(summary: dict[tuple[int, str], dict[str, float | None]], failed: list[str]) -> str:
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


def checks_table(
    summary: dict[tuple[int, str], dict[str, float | None]], targets: list[str], failed: list[str]
) -> str:
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


def write_section(out: Path, section: str) -> None:
    """Write ``section`` between the markers in ``out`` (replacing a previous one)."""
    block = f"{SECTION_START}\n{section.rstrip()}\n{SECTION_END}\n"
    if out.exists():
        text = out.read_text()
        if SECTION_START in text and SECTION_END in text:
            pre, rest = text.split(SECTION_START, 1)
            post = rest.split(SECTION_END, 1)[1].lstrip("\n")
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
        ],
        tmp / "fake_upstream.log",
    )
    services.append(upstream)
    wait_ready(upstream, up_port, "/health", 20.0)
    targets: list[Target] = []
    wanted = [t.strip() for t in args.targets.split(",") if t.strip()]
    for name in TARGET_ORDER:
        if name not in wanted:
            continue
        if name == "direct":
            targets.append(Target("direct", up_port, None))
        elif name == "nginx":
            nginx = find_nginx()
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
        else:
            port = free_port()
            cfg = tmp / "tokenrelay.yaml"
            cfg.write_text(
                "models:\n"
                "  - name: bench\n"
                "    provider: openai\n"
                f"    base_url: http://127.0.0.1:{up_port}/v1\n"
            )
            env = dict(os.environ)
            if (ROOT / "src" / "tokenrelay").is_dir():
                env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
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
            if args.workers:
                argv += ["--workers", str(args.workers)]
            argv += shlex.split(args.relay_args)
            svc = Service("tokenrelay", argv, tmp / "tokenrelay.log", env=env)
            services.append(svc)
            try:
                wait_ready(svc, port, "/readyz", args.ready_timeout)
            except RuntimeError as exc:
                msg = f"tokenrelay failed to start:\n\n```\n{exc}\n```"
                notes.append(msg)
                log(str(exc))
                targets.append(Target("tokenrelay", port, svc, failed=str(exc)))
                continue
            targets.append(Target("tokenrelay", port, svc))
    return upstream, targets


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; return the process exit status."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", default="5,100", help="comma-separated concurrent stream counts")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tokens", type=int, default=50, help="token chunks per stream")
    p.add_argument("--interval-ms", type=float, default=20.0, help="upstream delay between token chunks")
    p.add_argument("--rounds", type=int, default=3, help="streams per connection, back to back, in each run")
    p.add_argument("--ramp-batch", type=int, default=10, help="connections started per ramp step")
    p.add_argument("--ramp-interval-ms", type=float, default=10.0, help="delay between ramp steps")
    p.add_argument("--targets", default="direct,nginx,tokenrelay", help="subset of direct,nginx,tokenrelay")
    p.add_argument("--workers", type=int, default=0, help="pass --workers N to tokenrelay serve")
    p.add_argument("--relay-args", default="", help="extra arguments for tokenrelay serve")
    p.add_argument("--relay-python", default=None, help="python for tokenrelay (default: this one)")
    p.add_argument("--upstream-python", default=None, help="python for fake_upstream (default: this one)")
    p.add_argument("--loadgen-python", default=None, help="python for loadgen (default: this one)")
    p.add_argument("--ready-timeout", type=float, default=60.0, help="seconds to wait for GET /readyz")
    p.add_argument("--no-warmup", action="store_true", help="skip the short warm-up run per target")
    p.add_argument(
        "--out", type=Path, default=None, help="markdown file to write/update (e.g. docs/benchmarks.md)"
    )
    p.add_argument("--json-out", type=Path, default=None, help="write every run's raw results as JSON")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    args = p.parse_args(argv)
    concurrencies = [int(c) for c in args.concurrency.split(",") if c.strip()]

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
            if not args.no_warmup:
                # One short wave at the highest concurrency: imports, caches and the relay's
                # upstream connection pool are warm before anything is measured.
                for t in runnable:
                    w = run_loadgen(args, t, upstream, max(concurrencies), min(5, args.tokens), 1)
                    log(progress_line(w, "[warm-up]"))
            for c in concurrencies:
                for rep in range(args.repeats):
                    for t in runnable:
                        if t.service is not None and not t.service.alive():
                            r = RunResult(
                                t.name, c, rep, error=f"{t.name} is not running: {t.service.log_tail(800)}"
                            )
                        else:
                            r = run_loadgen(args, t, upstream, c, args.tokens, args.rounds)
                            r.repeat = rep
                        results.append(r)
                        log(progress_line(r, f"[c={c} rep {rep + 1}/{args.repeats}]"))
                        if r.error and t.service is not None and not t.service.alive():
                            notes.append(
                                f"{t.name} died during the c={c} run (exit {t.service.popen.returncode}):"
                                f"\n\n```\n{t.service.log_tail(2000)}\n```"
                            )
    except KeyboardInterrupt:
        log("interrupted: processes stopped")
        return 130
    finally:
        if args.keep_tmp or relay_failed:
            log(f"logs and configs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    target_names = [t for t in TARGET_ORDER if any(r.target == t for r in results)]
    summary = summarize(results, concurrencies, target_names)
    for r in results:
        if r.error:
            notes.append(f"run c={r.concurrency} repeat {r.repeat + 1} {r.target}: {r.error[:500]}")
    for r in results:
        if r.lg and r.lg.get("error_samples"):
            notes.append(
                f"{r.target} c={r.concurrency} error samples: " + "; ".join(r.lg["error_samples"][:3])
            )
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
    section = render(args, started, summary, target_names, failed_names, notes, lg_share)
    print(section)
    if args.out:
        out = args.out if args.out.is_absolute() else Path.cwd() / args.out
        write_section(out, section)
        log(f"wrote {out}")
    if args.json_out:
        args.json_out.write_text(
            json.dumps(
                [
                    {
                        "target": r.target,
                        "concurrency": r.concurrency,
                        "repeat": r.repeat,
                        "relay_cpu_s": r.relay_cpu_s,
                        "upstream_cpu_s": r.upstream_cpu_s,
                        "other_cpu_s": r.other_cpu_s,
                        "peak_rss_mb": r.peak_rss_mb,
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
    summary: dict[tuple[int, str], dict[str, float | None]],
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


if __name__ == "__main__":
    sys.exit(main())
