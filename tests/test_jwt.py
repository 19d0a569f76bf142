"""OAuth2 / JWT bearer tokens: RS256 keys from a JWKS served on loopback, an ES256 key from the config,
both made by the test; issuer, audience, expiry and signature checked; claims mapped to plan and models."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import openai
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from tests.conftest import Server, raw_post, serving

ISSUER = "https://auth.test.example/"
EC_ISSUER = "https://other-idp.test.example/"
MESSAGES: list[Any] = [{"role": "user", "content": "token please"}]

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
STRANGER = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwks() -> bytes:
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(RSA_KEY.public_key()))
    return json.dumps({"keys": [{**public, "kid": "rsa-1", "use": "sig", "alg": "RS256"}]}).encode()


@pytest.fixture(scope="module")
def jwks_url() -> Iterator[str]:
    body = jwks()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/.well-known/jwks.json"
    finally:
        server.shutdown()


@pytest.fixture(scope="module")
def jwt_gateway(jwks_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("jwt")
    ec_public = EC_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp / "ec.pem").write_bytes(ec_public)
    config = {
        "plans": {"free": {"requests_per_minute": 2}, "pro": {}},
        "jwt_issuers": [
            {
                "issuer": ISSUER,
                "audience": "tokenrelay",
                "jwks_url": jwks_url,
                "algorithms": ["RS256"],
            },
            {
                "issuer": EC_ISSUER,
                "keys": [str(tmp / "ec.pem")],
                "algorithms": ["ES256"],
                "default_plan": "pro",
            },
        ],
        "models": [
            {"name": "demo", "provider": "mock", "options": {"tokens": 5}},
            {"name": "other", "provider": "mock", "options": {"tokens": 5}},
        ],
    }
    with serving(tmp, config) as server:
        yield server


def token(key: Any = RSA_KEY, alg: str = "RS256", kid: str | None = "rsa-1", **claims: Any) -> str:
    now = int(time.time())
    body = {"iss": ISSUER, "aud": "tokenrelay", "sub": "alice", "iat": now, "exp": now + 300, **claims}
    return jwt.encode(body, key, algorithm=alg, headers={"kid": kid} if kid else None)


def status(server: Server, bearer: str, model: str = "demo") -> tuple[int, dict[str, Any]]:
    resp = raw_post(
        server.port,
        "/v1/chat/completions",
        {"model": model, "messages": MESSAGES},
        {"authorization": f"Bearer {bearer}"},
    )
    return resp.status, resp.json()


def test_valid_tokens_are_accepted_with_the_sdk(jwt_gateway: Server) -> None:
    client = openai.OpenAI(base_url=f"{jwt_gateway.url}/v1", api_key=token(plan="pro"), max_retries=0)
    reply = client.chat.completions.create(model="demo", messages=MESSAGES)
    assert reply.choices[0].message.content
    ec_token = token(EC_KEY, "ES256", None, iss=EC_ISSUER, aud=None, sub="bob")
    assert status(jwt_gateway, ec_token)[0] == 200  # static ES256 key, no audience configured


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ({"exp": int(time.time()) - 3600}, "expired"),
        ({"aud": "someone-else"}, "audience"),
        ({"iss": "https://evil.example/"}, "issuer"),
    ],
)
def test_expired_wrong_audience_or_issuer_is_401(jwt_gateway: Server, bad: dict[str, Any], why: str) -> None:
    code, body = status(jwt_gateway, token(**bad))
    assert code == 401 and body["error"]["code"] == "invalid_token"
    assert why in body["error"]["message"].lower()


def test_a_token_signed_by_another_key_is_401(jwt_gateway: Server) -> None:
    code, body = status(jwt_gateway, token(STRANGER))
    assert code == 401 and "no key of the issuer verifies" in body["error"]["message"]
    assert status(jwt_gateway, "not-a-key-at-all")[0] == 401
    assert (
        raw_post(jwt_gateway.port, "/v1/chat/completions", {"model": "demo", "messages": MESSAGES}).status
        == 401
    )


def test_claims_choose_plan_and_models(jwt_gateway: Server) -> None:
    narrow = token(sub="carol", plan="pro", models=["other"])
    assert status(jwt_gateway, narrow, "other")[0] == 200
    code, body = status(jwt_gateway, narrow, "demo")
    assert code == 403 and body["error"]["param"] == "model"
    free = token(sub="dave")  # no plan claim: the issuer's default, free, 2 requests a minute
    assert [status(jwt_gateway, free)[0] for _ in range(3)] == [200, 200, 429]
    assert status(jwt_gateway, token(sub="erin"))[0] == 200  # limits are per subject


def test_usage_is_per_subject(jwt_gateway: Server, tmp_path: Path) -> None:
    bearer = token(sub="frank", plan="pro")
    status(jwt_gateway, bearer)
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", jwt_gateway.port, timeout=10)
    conn.request("GET", "/v1/usage", headers={"authorization": f"Bearer {bearer}"})
    usage = json.loads(conn.getresponse().read())
    assert usage["requests"] == 1 and usage["key_id"].startswith("jwt_")
