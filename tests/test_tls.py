"""TLS on every transport: HTTPS (HTTP/1.1 and HTTP/2 by ALPN), WSS and gRPC over TLS, one certificate."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import openai
import pytest
import yaml
from tests.conftest import Server, free_port, start, stop, wait_for
from websockets.sync.client import connect

from tokenrelay.grpc_api import tokenrelay_pb2 as pb
from tokenrelay.grpc_api import tokenrelay_pb2_grpc as pb_grpc


def trusting(cert: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cert))


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("tls")
    key, crt = tmp / "key.pem", tmp / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(crt)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return crt, key


@pytest.fixture(scope="module", params=["builtin", "granian"])
def tls_gateway(cert: tuple[Path, Path], request: pytest.FixtureRequest) -> Iterator[Server]:
    """TLS on both HTTP servers (the default built-in one and granian)."""
    crt, key = cert
    cfg = crt.parent / "config.yaml"
    cfg.write_text(yaml.safe_dump({"models": [{"name": "demo", "provider": "mock"}]}))
    port, grpc_port = free_port(), free_port()
    log = crt.parent / f"gateway-{request.param}.log"
    args = ["serve", "--config", str(cfg), "--port", str(port), "--grpc-port", str(grpc_port)]
    args += ["--server", request.param]
    proc = start([*args, "--ssl-certfile", str(crt), "--ssl-keyfile", str(key)], log)
    server = Server(port, proc, log, grpc_port)
    try:

        def ready() -> bool:
            try:
                return (
                    httpx.get(f"https://127.0.0.1:{port}/readyz", verify=trusting(crt), timeout=2).status_code
                    == 200
                )
            except httpx.HTTPError:
                assert proc.poll() is None, log.read_text()
                return False

        wait_for(ready, timeout=60)
        yield server
    finally:
        stop(proc)


def test_https_with_the_openai_sdk(tls_gateway: Server, cert: tuple[Path, Path]) -> None:
    http = httpx.Client(verify=trusting(cert[0]))
    client = openai.OpenAI(base_url=f"https://127.0.0.1:{tls_gateway.port}/v1", api_key="k", http_client=http)
    stream = client.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        extra_body={"mock": {"text": "a b"}},
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "a b"
    with pytest.raises(openai.APIConnectionError):  # plain HTTP on the TLS port gets nowhere
        openai.OpenAI(
            base_url=f"http://127.0.0.1:{tls_gateway.port}/v1", api_key="k", max_retries=0
        ).models.list()


def test_http2_over_tls_by_alpn(tls_gateway: Server, cert: tuple[Path, Path]) -> None:
    """granian agrees on HTTP/2 by ALPN; the built-in server offers HTTP/1.1, and the client falls back."""
    with httpx.Client(http2=True, verify=trusting(cert[0])) as client:
        resp = client.post(
            f"https://127.0.0.1:{tls_gateway.port}/v1/messages",
            json={"model": "demo", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
        )
    expected = "HTTP/2" if "granian" in tls_gateway.log.name else "HTTP/1.1"
    assert resp.http_version == expected and resp.json()["type"] == "message"


def test_wss(tls_gateway: Server, cert: tuple[Path, Path]) -> None:
    with connect(f"wss://127.0.0.1:{tls_gateway.port}/v1/ws/chat", ssl=trusting(cert[0])) as ws:
        ws.send(json.dumps({"type": "ping"}))
        assert json.loads(ws.recv(timeout=5)) == {"type": "pong"}


def test_grpc_over_tls(tls_gateway: Server, cert: tuple[Path, Path]) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=cert[0].read_bytes())
    with grpc.secure_channel(f"localhost:{tls_gateway.grpc_port}", creds) as channel:
        stub = pb_grpc.TokenRelayStub(channel)
        req = pb.ChatRequest(
            model="demo", messages=[pb.Message(role="user", content="hi")], mock_json='{"text": "x y"}'
        )
        assert stub.Complete(req, timeout=10).text == "x y"


def test_half_a_tls_config_refuses_to_start(cert: tuple[Path, Path], tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tokenrelay",
            "serve",
            "--port",
            str(free_port()),
            "--ssl-certfile",
            str(cert[0]),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "ssl_keyfile" in out.stderr
