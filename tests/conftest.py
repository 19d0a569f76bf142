"""Shared fixtures: a real mock upstream and a real gateway, each its own process on its own port.

Tests talk to them over real sockets with the official SDKs (or raw HTTP where the bytes matter).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
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
    log.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-m", "tokenrelay", *args],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


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


def gateway_config(upstream_port: int) -> dict[str, Any]:
    upstream = f"http://127.0.0.1:{upstream_port}/v1"
    return {
        "server": {"keepalive_seconds": 0.5, "max_body_bytes": 1_000_000},
        "models": [
            {"name": "tiny", "provider": "llamacpp", "options": {"n_ctx": 1024}},
            {"name": "demo", "provider": "mock", "options": {"tokens": 12}},
            {"name": "slow", "provider": "mock", "options": {"first_token_ms": 1600, "tokens": 3}},
            {
                "name": "gpt",
                "provider": "openai",
                "base_url": upstream,
                "upstream_model": "gpt-4o-mini",
                "api_key_env": "TEST_UPSTREAM_KEY",
            },
            {
                "name": "gpt-timeout",
                "provider": "openai",
                "base_url": upstream,
                "first_token_timeout": 0.6,
                "idle_timeout": 0.6,
            },
            {
                "name": "claude",
                "provider": "anthropic",
                "base_url": f"http://127.0.0.1:{upstream_port}",
                "upstream_model": "claude-test",
                "api_key_env": "TEST_ANTHROPIC_KEY",
                "default_max_tokens": 333,
            },
            {
                "name": "nowhere",
                "provider": "openai",
                "base_url": f"http://127.0.0.1:{free_port()}/v1",
                "connect_timeout": 2,
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
