"""Voice pipeline benchmark: when does the listener hear the first sound?

    .venv/bin/python benchmarks/voice.py [--repeats 10] [--tokens-per-second 40] [--first-token-ms 300]
        [--out docs/benchmarks.md]

One ``tokenrelay serve`` (its own process) with a mock chat model that answers a 6-sentence, ~100-word
paragraph at a realistic rate (first token after ``--first-token-ms``, then ``--tokens-per-second``) and
the embedded espeak-ng speech model. Per repeat, over real sockets on loopback:

* pipeline: ``/v1/ws/voice`` with the question as text, 24 kHz PCM: the time to the first token, to the
  first audio byte and to the last token, from the moment the request is sent;
* whole answer at the end: the same answer streamed from ``/v1/chat/completions`` to its end, then all of
  it sent to ``POST /v1/audio/speech`` (streamed, PCM): the time to its first audio byte (the best the
  "synthesize when the text is complete" design can do) and to its last (a design that also buffers the
  audio before playing it).

It prints a markdown table of medians and p90s; ``--out`` replaces (or appends) its marked section there.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from websockets.sync.client import connect

ROOT = Path(__file__).resolve().parent.parent
SECTION_START = "<!-- tokenrelay-voice-bench:start -->"
SECTION_END = "<!-- tokenrelay-voice-bench:end -->"

ANSWER = (
    "Rivers begin as rain and melting snow high in the mountains. "
    "Small streams join together as they run downhill, and the water grows faster and stronger. "
    "In the valleys the river slows down and starts to wind from side to side! "
    "Along the way it carries sand and stones that settle on the bottom and build new land. "
    "Have you ever wondered why river water is fresh while the sea is salty? "
    "The answer is that rivers keep moving, while the sea collects salt for millions of years."
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def start_gateway(tmp: Path, first_token_ms: float, tps: float) -> tuple[subprocess.Popen[bytes], int]:
    config = {
        "server": {"log_level": "warning"},
        "models": [
            {
                "name": "llm",
                "provider": "mock",
                "options": {"text": ANSWER, "first_token_ms": first_token_ms, "tokens_per_second": tps},
            }
        ],
        "audio_models": [{"name": "speech", "provider": "espeak"}],
    }
    (tmp / "voice.yaml").write_text(yaml.safe_dump(config))
    port = free_port()
    env = {**os.environ, "TOKENRELAY_DATABASE_URL": f"sqlite+aiosqlite:///{tmp / 'voice.db'}"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tokenrelay",
            "serve",
            "--config",
            str(tmp / "voice.yaml"),
            "--port",
            str(port),
        ],
        stdout=(tmp / "gateway.log").open("wb"),
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env=env,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200:
                return proc, port
        except OSError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"the gateway did not get ready; see {tmp / 'gateway.log'}")


def pipeline(port: int) -> dict[str, float]:
    msg = {
        "type": "request",
        "id": "b",
        "body": {"model": "llm"},
        "text": "How do rivers work?",
        "speech": {"model": "speech", "voice": "alloy", "response_format": "pcm"},
    }
    out: dict[str, float] = {}
    with connect(f"ws://127.0.0.1:{port}/v1/ws/voice", max_size=None) as ws:
        t0 = time.perf_counter()
        ws.send(json.dumps(msg))
        while True:
            m = json.loads(ws.recv(timeout=60))
            now = (time.perf_counter() - t0) * 1000
            if m["type"] == "token":
                out.setdefault("first_token_ms", now)
                out["last_token_ms"] = now
            elif m["type"] == "audio":
                out.setdefault("first_audio_ms", now)
            elif m["type"] == "done":
                out["done_ms"] = now
                out["sentences"] = m["sentences"]
                return out
            elif m["type"] == "error":
                raise RuntimeError(m)


def whole_at_end(port: int) -> dict[str, float]:
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    body = {"model": "llm", "stream": True, "messages": [{"role": "user", "content": "How do rivers work?"}]}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"content-type": "application/json"})
    resp = conn.getresponse()
    text: list[str] = []
    first_token = None
    buf = b""
    while chunk := resp.read1(65536):
        buf += chunk
        *events, buf = buf.split(b"\n\n")
        for ev in events:
            data = ev.removeprefix(b"data: ")
            if data == b"[DONE]":
                continue
            for choice in json.loads(data).get("choices", []):
                piece = choice.get("delta", {}).get("content")
                if piece:
                    first_token = first_token or time.perf_counter()
                    text.append(piece)
    chat_done = time.perf_counter()
    speech = {"model": "speech", "voice": "alloy", "input": "".join(text), "response_format": "pcm"}
    conn.request("POST", "/v1/audio/speech", json.dumps(speech), {"content-type": "application/json"})
    resp = conn.getresponse()
    first_audio = None
    while chunk := resp.read1(65536):
        first_audio = first_audio or time.perf_counter()
    last_audio = time.perf_counter()
    conn.close()
    assert first_token is not None and first_audio is not None
    return {
        "first_token_ms": (first_token - t0) * 1000,
        "chat_done_ms": (chat_done - t0) * 1000,
        "first_audio_ms": (first_audio - t0) * 1000,
        "last_audio_ms": (last_audio - t0) * 1000,
    }


def table(rows: list[tuple[str, list[float]]]) -> str:
    lines = ["| measure | median ms | p90 ms |", "|---|---:|---:|"]
    for label, values in rows:
        lines.append(f"| {label} | {statistics.median(values):.0f} | {pct(values, 0.9):.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--tokens-per-second", type=float, default=40.0)
    parser.add_argument("--first-token-ms", type=float, default=300.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = start_gateway(Path(tmp), args.first_token_ms, args.tokens_per_second)
        try:
            pipeline(port)  # warm-up: first espeak-ng run, connection set-up
            whole_at_end(port)
            pipe: list[dict[str, float]] = []
            whole: list[dict[str, float]] = []
            for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
                pipe.append(pipeline(port))
                whole.append(whole_at_end(port))
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
    rows = [
        ("pipeline: first token", [r["first_token_ms"] for r in pipe]),
        ("pipeline: **first audio byte**", [r["first_audio_ms"] for r in pipe]),
        ("pipeline: last token", [r["last_token_ms"] for r in pipe]),
        ("pipeline: done (last sentence's audio sent)", [r["done_ms"] for r in pipe]),
        ("whole answer at the end: chat finished", [r["chat_done_ms"] for r in whole]),
        (
            "whole answer at the end: **first audio byte** (streamed synthesis)",
            [r["first_audio_ms"] for r in whole],
        ),
        (
            "whole answer at the end: last audio byte (buffered synthesis)",
            [r["last_audio_ms"] for r in whole],
        ),
    ]
    gain = [w["first_audio_ms"] - p["first_audio_ms"] for p, w in zip(pipe, whole, strict=True)]
    after_ttft = [p["first_audio_ms"] - p["first_token_ms"] for p in pipe]
    rows.append(("first audio, pipeline minus its first token", after_ttft))
    rows.append(("first audio sooner than whole-at-end (streamed)", gain))
    command = "python benchmarks/voice.py " + shlex.join(sys.argv[1:])
    section = "\n".join(
        [
            SECTION_START,
            "## Voice pipeline: time to first audio (issue 9)",
            "",
            f"`{command.strip()}`, {dt.date.today().isoformat()}, {platform.machine()} "
            f"{platform.system()} {platform.release()}, {os.cpu_count()} CPUs, Python "
            f"{platform.python_version()}; mock chat model (first token after {args.first_token_ms:g} ms, "
            f"{args.tokens_per_second:g} tokens/s, a 6-sentence answer of {len(ANSWER.split())} words), "
            f"espeak-ng speech at 24 kHz PCM, {args.repeats} repeats after a warm-up, all on loopback.",
            "",
            table(rows),
            "",
            f"Sentences per answer: {pipe[0]['sentences']:g}. The pipeline speaks the first sentence while "
            "the model writes the rest; synthesizing the whole answer at the end waits for the last token "
            "first.",
            SECTION_END,
        ]
    )
    print(section)
    if args.out:
        text = args.out.read_text() if args.out.exists() else ""
        if SECTION_START in text and SECTION_END in text:
            head, rest = text.split(SECTION_START, 1)
            text = head + section + rest.split(SECTION_END, 1)[1]
        else:
            text = text.rstrip("\n") + "\n\n" + section + "\n"
        args.out.write_text(text)


if __name__ == "__main__":
    main()
