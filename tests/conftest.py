"""Shared fixtures: a real mock upstream and a real gateway, each its own process on its own port.

Tests talk to them over real sockets with the official SDKs (or raw HTTP where the bytes matter).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = Path(__file__).resolve().parent / "schemas"
ARTIFACTS = ROOT / "artifacts"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(
    url_host: str, port: int, path: str, proc: subprocess.Popen[bytes], timeout: float, want: int = 200
) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {path} answered")
        try:
            conn = http.client.HTTPConnection(url_host, port, timeout=2)
            conn.request("GET", path)
            status = conn.getresponse().status
            conn.close()
            if status == want:
                return
            last = status
        except OSError as exc:
            last = exc
        time.sleep(0.1)
    raise RuntimeError(f"{path} on port {port} not {want} after {timeout} s (last: {last})")


def wait_for(predicate: Any, timeout: float = 10) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


@dataclass
class Server:
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    grpc_port: int = 0
    config: Path | None = None  # the YAML file it was started with

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get_json(self, path: str) -> Any:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.request("GET", path)
        resp = conn.getresponse()
        body = json.loads(resp.read())
        conn.close()
        return body

    def mock_cancelled(self, model: str = "demo") -> int:
        """How many streams of the gateway's in-process mock model were cancelled so far."""
        return int(self.get_json("/mock/stats")[model]["cancelled"])

    def wait_cancelled(self, before: int, model: str = "demo") -> None:
        wait_for(lambda: self.mock_cancelled(model) > before, timeout=5)
        assert self.mock_cancelled(model) == before + 1

    def post(self, path: str, body: bytes = b"{}") -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.request("POST", path, body=body, headers={"content-type": "application/json"})
        conn.getresponse().read()
        conn.close()


def start(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """A tokenrelay process; its key database is a SQLite file next to its log unless ``env`` names one."""
    log.parent.mkdir(parents=True, exist_ok=True)
    database = f"sqlite+aiosqlite:///{log.parent / (log.stem + '.db')}"
    return subprocess.Popen(
        [sys.executable, "-m", "tokenrelay", *args],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "TOKENRELAY_DATABASE_URL": database, **(env or {})},
        cwd=ROOT,
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def serving(
    tmp: Path,
    config: dict[str, Any],
    env: dict[str, str] | None = None,
    name: str = "gateway",
    args: tuple[str, ...] = (),
) -> Iterator[Server]:
    """A ``tokenrelay serve`` of ``config`` (written to ``tmp/<name>.yaml``, log ``tmp/<name>.log``, key
    database next to it unless ``env`` names one; ``args`` added to the command line), ready, and
    stopped with SIGTERM on the way out."""
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(config))
    port = free_port()
    log = tmp / f"{name}.log"
    proc = start(["serve", "--config", str(cfg), "--port", str(port), *args], log, env)
    try:
        wait_http("127.0.0.1", port, "/readyz", proc, 60)
        yield Server(port, proc, log, config=cfg)
    finally:
        stop(proc)


@pytest.fixture(scope="session")
def mock_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    port = free_port()
    log = tmp_path_factory.mktemp("mock") / "mock.log"
    proc = start(["mock-upstream", "--port", str(port)], log)
    try:
        wait_http("127.0.0.1", port, "/v1/models", proc, 30)
        yield Server(port, proc, log)
    finally:
        stop(proc)


# where a test checks how one upstream error reaches the client: no retry, and no breaker that opens
# because other tests inject errors on purpose
ONE_ERROR: dict[str, Any] = {"retries": 0, "breaker": {"enabled": False}}


def resilience_models(openai_base: str, anthropic_base: str) -> list[dict[str, Any]]:
    """Deployments with faults and fallback chains (tests/test_failover.py). A fallback gives the same
    text as its primary for the same prompt (same mock options but the fault), so a spliced stream can be
    compared with the whole answer."""
    text = {"tokens": 20}
    tools = {
        "tokens": 4,
        "tool_chunk_chars": 4,
        "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}],
    }
    fast_retry = {"retry_backoff_seconds": 0.05, "retries": 2}
    return [
        {"name": "steady", "provider": "mock", "options": text},
        {"name": "steady-tools", "provider": "mock", "options": tools},
        {"name": "flaky", "provider": "mock", "options": {**text, "cut_after": 5}, "fallbacks": ["steady"]},
        {
            "name": "flaky-tools",
            "provider": "mock",
            "options": {**tools, "cut_after": 7},  # 4 text tokens, then 3 fragments into the call
            "fallbacks": ["steady-tools"],
        },
        {"name": "flaky-alone", "provider": "mock", "options": {**text, "cut_after": 5}, "retries": 0},
        {
            "name": "flaky-chain",  # mock -> openai upstream -> anthropic upstream, each cut in turn
            "provider": "mock",
            "options": {"tokens": 16, "cut_after": 3},
            "fallbacks": ["gpt-cut", "claude-plain"],
        },
        {
            "name": "gpt-cut",
            "provider": "openai",
            "base_url": openai_base,
            "retries": 0,
            "options": {"body": {"mock": {"cut_after": 3}}},
        },
        {"name": "claude-plain", "provider": "anthropic", "base_url": anthropic_base, "retries": 0},
        {
            "name": "stalled",
            "provider": "mock",
            "options": {**text, "stall_after": 4},
            "idle_timeout": 0.3,
            "fallbacks": ["steady"],
        },
        {
            "name": "sleepy",
            "provider": "mock",
            "options": {**text, "first_token_ms": 5000},
            "first_token_timeout": 0.3,
            "fallbacks": ["steady"],
        },
        {
            "name": "down",
            "provider": "mock",
            "options": {"error_status": 503},
            **fast_retry,
            "fallbacks": ["steady"],
        },
        {
            "name": "busy",
            "provider": "mock",
            "options": {"error_status": 429, "retry_after": 0.4},
            "retries": 1,
            "fallbacks": ["steady"],
        },
        {
            "name": "busy-long",
            "provider": "mock",
            "options": {"error_status": 429, "retry_after": 60},
            "fallbacks": ["steady"],
        },
        {
            "name": "broken",
            "provider": "mock",
            "options": {"error_status": 500},
            "retries": 0,
            "breaker": {"failures": 2, "cooldown_seconds": 0.6},
            "fallbacks": ["steady"],
        },
        {"name": "refused", "provider": "mock", "options": {"error_status": 400}, "fallbacks": ["steady"]},
    ]


def gateway_config(upstream_port: int) -> dict[str, Any]:
    upstream = f"http://127.0.0.1:{upstream_port}/v1"
    return {
        "server": {"keepalive_seconds": 0.5, "max_body_bytes": 1_000_000},
        "models": [
            {"name": "tiny", "provider": "llamacpp", "options": {"n_ctx": 1024}},
            {"name": "demo", "provider": "mock", "options": {"tokens": 12}, **ONE_ERROR},
            {"name": "slow", "provider": "mock", "options": {"first_token_ms": 1600, "tokens": 3}},
            *resilience_models(upstream, f"http://127.0.0.1:{upstream_port}"),
            {
                "name": "gpt",
                "provider": "openai",
                "base_url": upstream,
                "upstream_model": "gpt-4o-mini",
                "api_key_env": "TEST_UPSTREAM_KEY",
                **ONE_ERROR,
            },
            {
                "name": "gpt-timeout",
                "provider": "openai",
                "base_url": upstream,
                "first_token_timeout": 0.6,
                "idle_timeout": 0.6,
                **ONE_ERROR,
            },
            {
                "name": "claude",
                "provider": "anthropic",
                "base_url": f"http://127.0.0.1:{upstream_port}",
                "upstream_model": "claude-test",
                "api_key_env": "TEST_ANTHROPIC_KEY",
                "default_max_tokens": 333,
                **ONE_ERROR,
            },
            {
                "name": "nowhere",
                "provider": "openai",
                "base_url": f"http://127.0.0.1:{free_port()}/v1",
                "connect_timeout": 2,
                **ONE_ERROR,
            },
        ],
    }


@pytest.fixture(scope="session")
def gateway(mock_upstream: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("gateway")
    cfg = tmp / "tokenrelay.yaml"
    cfg.write_text(yaml.safe_dump(gateway_config(mock_upstream.port)))
    port, grpc_port = free_port(), free_port()
    log = tmp / "gateway.log"
    proc = start(
        ["serve", "--config", str(cfg), "--port", str(port), "--grpc-port", str(grpc_port)],
        log,
        {"TEST_UPSTREAM_KEY": "sk-test", "TEST_ANTHROPIC_KEY": "sk-ant-test"},
    )
    try:
        wait_http("127.0.0.1", port, "/readyz", proc, 180)
        yield Server(port, proc, log, grpc_port)
    finally:
        stop(proc)
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "gateway.log").write_bytes(log.read_bytes())


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Redis: $TOKENRELAY_TEST_REDIS, the machine's on 6379, or a redis-server started here."""
    if os.environ.get("TOKENRELAY_TEST_REDIS"):
        yield os.environ["TOKENRELAY_TEST_REDIS"]
        return
    if port_open(6379):
        yield "redis://127.0.0.1:6379/0"
        return
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed (.ci/run installs it: apt-get install redis-server)")
    port = free_port()
    log = tmp_path_factory.mktemp("redis") / "redis.log"
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: port_open(port), timeout=10)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop(proc)


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """The real PostgreSQL: $TOKENRELAY_TEST_POSTGRES, else 127.0.0.1:5432 (database test, trust auth),
    started with pg_ctlcluster when it is installed but stopped. Never skipped: a missing server fails."""
    if os.environ.get("TOKENRELAY_TEST_POSTGRES"):
        return os.environ["TOKENRELAY_TEST_POSTGRES"]
    if not port_open(5432) and Path("/etc/postgresql").is_dir():
        for version in os.listdir("/etc/postgresql"):
            subprocess.run(
                ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"], check=False
            )
        wait_for(lambda: port_open(5432), timeout=30)
    if not port_open(5432):
        pytest.fail("PostgreSQL is not running on 127.0.0.1:5432 and could not be started")
    return "postgresql+asyncpg://postgres@127.0.0.1:5432/test"


@pytest.fixture(scope="session")
def chunk_validator() -> Any:
    from jsonschema import Draft202012Validator

    return Draft202012Validator(json.loads((SCHEMAS / "chat_completion_chunk.schema.json").read_text()))


def validator(name: str) -> Any:
    from jsonschema import Draft202012Validator

    return Draft202012Validator(json.loads((SCHEMAS / f"{name}.schema.json").read_text()))


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def sse_data(self) -> list[bytes]:
        """The data payloads, in order (comments dropped)."""
        out = []
        for block in self.body.split(b"\n\n"):
            lines = [ln for ln in block.split(b"\n") if ln and not ln.startswith(b":")]
            data = [ln[6:] for ln in lines if ln.startswith(b"data: ")]
            if data:
                out.append(b"\n".join(data))
        return out


def raw_post(
    port: int,
    path: str,
    body: bytes | dict[str, Any],
    headers: dict[str, str] | None = None,
    timeout: float = 30,
) -> RawResponse:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("POST", path, body=data, headers={"content-type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    payload = resp.read()
    result = RawResponse(resp.status, {k.lower(): v for k, v in resp.getheaders()}, payload)
    conn.close()
    return result


# -- a real browser: Debian's Chromium driven by Playwright (test_browser, test_examples) ----------------

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def ensure_chromium() -> None:
    """Debian's chromium, installed here when missing (root: the CI machine), never silently skipped."""
    if shutil.which(CHROMIUM):
        return
    subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], check=False, capture_output=True)
    if not shutil.which(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing and could not be installed (apt-get install chromium)")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    ensure_chromium()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A fresh page; its screenshot goes to artifacts/ when the test ends."""
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    pg = context.new_page()
    try:
        yield pg
    finally:
        ARTIFACTS.mkdir(exist_ok=True)
        name = re.sub(r"[^\w.-]", "_", request.node.name)
        pg.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
        context.close()
