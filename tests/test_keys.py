"""API keys, the admin API, plans and their limits, through real processes and the official SDKs.

One gateway for the module, with its own SQLite key database: it starts open (no keys), and the first key
made through the admin API closes it. Tests run in file order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
import yaml
from tests.conftest import ROOT, Server, free_port, raw_post, serving, wait_for
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

ADMIN = "admin-secret-for-tests"
MESSAGES: list[Any] = [{"role": "user", "content": "who may call what"}]
PLANS = {
    "tight": {"requests_per_minute": 3},
    "single": {"concurrent_streams": 1},
    "tokens": {"tokens_per_minute": 60},
    "demo-only": {"models": ["demo"]},
    "pro": {"requests_per_day": 1000},
    "metered": {
        "prices": {"*": {"input": 1_000_000, "output": 2_000_000}}
    },  # 1 per prompt token, 2 per completion
    "flat": {"price_per_request": 0.5},
}


def keyed_config() -> dict[str, Any]:
    return {
        "server": {"keepalive_seconds": 0.5},
        "plans": PLANS,
        "models": [
            {"name": "demo", "provider": "mock", "options": {"tokens": 12}},
            {"name": "other", "provider": "mock", "options": {"tokens": 3}},
            {"name": "slow", "provider": "mock", "options": {"tokens": 20, "tokens_per_second": 20}},
        ],
    }


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    tmp = tmp_path_factory.mktemp("keys")
    with serving(tmp, keyed_config(), {"TOKENRELAY_ADMIN_KEY": ADMIN}) as server:
        assert server.config is not None
        yield server, server.config


def admin(server: Server, method: str, path: str, body: Any = None, key: str = ADMIN) -> tuple[int, Any]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request(
        method,
        path,
        body=json.dumps(body) if body is not None else None,
        headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
    )
    resp = conn.getresponse()
    data = json.loads(resp.read())
    conn.close()
    return resp.status, data


def new_key(server: Server, plan: str, **extra: Any) -> str:
    status, body = admin(server, "POST", "/admin/keys", {"plan": plan, **extra})
    assert status == 201, body
    return str(body["key"])


def status_of(server: Server, key: str | None, model: str = "demo") -> int:
    """The HTTP status of one plain chat request with ``key`` (none: no credential)."""
    auth = {"authorization": f"Bearer {key}"} if key else {}
    return raw_post(server.port, "/v1/chat/completions", {"model": model, "messages": MESSAGES}, auth).status


def chat(server: Server, key: str | None, model: str = "demo") -> openai.OpenAI:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key or "none", max_retries=0)
    client.chat.completions.create(model=model, messages=MESSAGES)
    return client


def tokenrelay_cli(cfg: Path, db: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``tokenrelay <args> --config cfg`` as its own process, on the key database ``db``."""
    return subprocess.run(
        [sys.executable, "-m", "tokenrelay", *args, "--config", str(cfg)],
        capture_output=True,
        text=True,
        env={**os.environ, "TOKENRELAY_DATABASE_URL": f"sqlite+aiosqlite:///{db}"},
        cwd=ROOT,
        timeout=60,
    )


def test_open_until_the_first_key_then_closed(keyed: tuple[Server, Path]) -> None:
    server, _ = keyed
    assert (
        raw_post(server.port, "/v1/chat/completions", {"model": "demo", "messages": MESSAGES}).status == 200
    )
    key = new_key(server, "pro", name="first")
    assert key.startswith("tr-")
    missing = raw_post(server.port, "/v1/chat/completions", {"model": "demo", "messages": MESSAGES})
    assert missing.status == 401 and missing.json()["error"]["code"] == "missing_api_key"
    with pytest.raises(openai.AuthenticationError):
        chat(server, "tr-not-a-key")
    chat(server, key)  # the openai SDK sends it as a Bearer token
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)
    assert "demo" in [m.id for m in client.models.list()]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="tr-nope", max_retries=0).models.list()
    client = anthropic.Anthropic(base_url=server.url, api_key=key, max_retries=0)
    client.messages.create(model="demo", max_tokens=50, messages=MESSAGES)
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=server.url, api_key="tr-wrong", max_retries=0).messages.create(
            model="demo", max_tokens=50, messages=MESSAGES
        )


def test_admin_api_needs_its_credential_and_never_shows_secrets(keyed: tuple[Server, Path]) -> None:
    server, _ = keyed
    assert admin(server, "GET", "/admin/keys", key="guess")[0] == 401
    key = new_key(server, "pro", name="listed", metadata={"team": "search"})
    status, listing = admin(server, "GET", "/admin/keys")
    assert status == 200
    mine = next(k for k in listing["data"] if k["name"] == "listed")
    assert mine["metadata"] == {"team": "search"} and mine["prefix"] == key[:8]
    assert key not in json.dumps(listing) and "digest" not in mine
    status, err = admin(server, "POST", "/admin/keys", {"plan": "gold"})
    assert status == 400 and err["error"]["param"] == "plan"
    status, err = admin(server, "POST", "/admin/keys", {"plan": "pro", "models": ["demo", "nope"]})
    assert status == 400 and err["error"]["param"] == "models[1]"


def test_keys_are_stored_hashed(keyed: tuple[Server, Path]) -> None:
    server, _ = keyed
    key = new_key(server, "pro")
    database = server.log.parent / (server.log.stem + ".db")
    raw = b"".join(p.read_bytes() for p in database.parent.glob(database.name + "*"))
    assert key.encode() not in raw and key[8:].encode() not in raw


def test_requests_per_minute_gives_429_with_headers_in_each_protocol(keyed: tuple[Server, Path]) -> None:
    server, _ = keyed
    key = new_key(server, "tight")
    auth = {"authorization": f"Bearer {key}"}
    for _ in range(3):
        assert (
            raw_post(
                server.port, "/v1/chat/completions", {"model": "demo", "messages": MESSAGES}, auth
            ).status
            == 200
        )
    refused = raw_post(server.port, "/v1/chat/completions", {"model": "demo", "messages": MESSAGES}, auth)
    assert refused.status == 429
    err = refused.json()["error"]
    assert err["type"] == "rate_limit_error" and "3 requests per minute" in err["message"]
    h = refused.headers
    assert int(h["retry-after"]) >= 1
    assert h["x-ratelimit-limit-requests"] == "3" and h["x-ratelimit-remaining-requests"] == "0"
    assert h["x-ratelimit-reset-requests"].endswith("s")
    anth = raw_post(
        server.port,
        "/v1/messages",
        {"model": "demo", "max_tokens": 5, "messages": MESSAGES},
        {"x-api-key": key},
    )
    assert anth.status == 429 and anth.json()["error"]["type"] == "rate_limit_error"
    assert anth.json()["type"] == "error"


def test_models_outside_the_key_or_plan_are_403(keyed: tuple[Server, Path]) -> None:
    server, _ = keyed
    by_plan = new_key(server, "demo-only")
    by_key = new_key(server, "pro", models=["other"])
    chat(server, by_plan, "demo")
    chat(server, by_key, "other")
    for key, model in ((by_plan, "other"), (by_key, "demo")):
        with pytest.raises(openai.PermissionDeniedError) as info:
            chat(server, key, model)
        assert info.value.body["param"] == "model"  # type: ignore[index]


def test_concurrent_streams_are_capped(keyed: tuple[Server, Path]) -> None:
    server, _ = keyed
    key = new_key(server, "single")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)
    stream = client.chat.completions.create(model="slow", messages=MESSAGES, stream=True)
    next(iter(stream))
    with pytest.raises(openai.RateLimitError) as info:
        chat(server, key)
    assert info.value.body["code"] == "concurrent_streams"  # type: ignore[index]
    for _ in stream:
        pass
    wait_for(lambda: status_of(server, key) == 200)


def test_tokens_per_minute_counts_what_streams_used(keyed: tuple[Server, Path]) -> None:
    server, _ = keyed
    key = new_key(server, "tokens")  # 60 tokens a minute; each demo answer is 12 + the prompt's
    auth = {"authorization": f"Bearer {key}"}
    statuses = []
    for _ in range(8):
        statuses.append(
            raw_post(
                server.port, "/v1/chat/completions", {"model": "demo", "messages": MESSAGES}, auth
            ).status
        )
        time.sleep(0.1)  # the tokens are counted as each stream ends
    assert statuses[:2] == [200, 200] and statuses[-1] == 429
    refused = raw_post(server.port, "/v1/chat/completions", {"model": "demo", "messages": MESSAGES}, auth)
    assert refused.json()["error"]["code"] == "tokens_limit"
    assert refused.headers["x-ratelimit-limit-tokens"] == "60"


def test_revoked_keys_stop_working(keyed: tuple[Server, Path]) -> None:
    server, _ = keyed
    _, body = admin(server, "POST", "/admin/keys", {"plan": "pro"})
    chat(server, body["key"])
    assert admin(server, "DELETE", f"/admin/keys/{body['id']}")[0] == 200
    with pytest.raises(openai.AuthenticationError):
        chat(server, body["key"])
    assert admin(server, "DELETE", f"/admin/keys/{body['id']}")[0] == 404


def test_cli_keys_reach_the_running_gateway(keyed: tuple[Server, Path]) -> None:
    server, cfg = keyed

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return tokenrelay_cli(cfg, server.log.parent / "gateway.db", "keys", *args)

    made = cli("create", "--plan", "pro", "--models", "demo", "--name", "from-cli")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    wait_for(lambda: status_of(server, key) == 200, timeout=10)  # the gateway re-reads keys every few seconds
    listed = cli("list")
    assert "from-cli" in listed.stdout and key not in listed.stdout
    rows = [json.loads(line) for line in cli("list", "--json").stdout.splitlines()]
    key_id = next(row["id"] for row in rows if row["name"] == "from-cli")
    assert cli("revoke", key_id).returncode == 0
    assert cli("create", "--plan", "gold").returncode == 2


def test_websocket_needs_a_key_at_the_handshake(keyed: tuple[Server, Path]) -> None:
    server, _ = keyed
    with pytest.raises(InvalidStatus):  # closed before accept: the handshake is refused
        connect(f"ws://127.0.0.1:{server.port}/v1/ws/chat", open_timeout=5)
    key = new_key(server, "pro")
    with connect(f"ws://127.0.0.1:{server.port}/v1/ws/chat?api_key={key}", open_timeout=5) as ws:
        ws.send(json.dumps({"type": "request", "id": 1, "body": {"model": "demo", "messages": MESSAGES}}))
        kinds = []
        while "done" not in kinds:
            kinds.append(json.loads(ws.recv(timeout=5))["type"])
        assert "token" in kinds


def test_serving_a_public_address_with_no_keys_is_refused(tmp_path: Path) -> None:
    env = {**os.environ, "TOKENRELAY_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}"}
    out = subprocess.run(
        [sys.executable, "-m", "tokenrelay", "serve", "--host", "0.0.0.0", "--port", str(free_port())],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )
    assert out.returncode == 2 and "no API keys" in out.stderr


def test_limits_hold_across_replicas_sharing_redis(tmp_path: Path, redis_url: str) -> None:
    """Two replicas, one key database and one Redis: a plan's 3 requests a minute are 3 in all."""
    config = keyed_config()
    config["server"]["redis_url"] = redis_url
    config["server"]["redis_prefix"] = f"test-{os.getpid()}-{time.monotonic_ns()}"
    env = {
        "TOKENRELAY_ADMIN_KEY": ADMIN,
        "TOKENRELAY_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'shared.db'}",
    }
    with serving(tmp_path, config, env, "a") as a, serving(tmp_path, config, env, "b") as b:
        key = new_key(a, "tight")
        # B started with no keys, so it ran open; it closes when it next reads the database
        wait_for(lambda: status_of(b, None) == 401)
        assert [status_of(b, key), status_of(a, key), status_of(a, key)] == [200, 200, 200]
        assert status_of(b, key) == 429 and status_of(a, key) == 429


def usage_of(server: Server, key: str) -> dict[str, Any]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", "/v1/usage", headers={"authorization": f"Bearer {key}"})
    resp = conn.getresponse()
    body = json.loads(resp.read())
    assert resp.status == 200, body
    return body  # type: ignore[no-any-return]


def test_usage_and_token_pricing(keyed: tuple[Server, Path]) -> None:
    server, _ = keyed
    key = new_key(server, "metered")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)
    replies = [client.chat.completions.create(model="demo", messages=MESSAGES) for _ in range(2)]
    usage = usage_of(server, key)
    assert usage["requests"] == 2
    assert usage["completion_tokens"] == sum(r.usage.completion_tokens for r in replies if r.usage) == 24
    expected = sum(r.usage.prompt_tokens + 2 * r.usage.completion_tokens for r in replies if r.usage)
    assert usage["cost"] == pytest.approx(expected)
    assert usage["by_model"]["demo"]["requests"] == 2
    assert {r["stream_id"] for r in usage["recent"]} == {r.id for r in replies}


def test_a_dropped_stream_is_charged_for_what_it_delivered(keyed: tuple[Server, Path]) -> None:
    server, _ = keyed
    key = new_key(server, "metered")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)
    stream = client.chat.completions.create(model="slow", messages=MESSAGES, stream=True)
    for got, _ in enumerate(stream, 1):
        if got == 4:
            break
    stream.close()
    wait_for(lambda: usage_of(server, key)["requests"] == 1)
    record = usage_of(server, key)["recent"][0]
    assert record["status"] == 499  # cancelled by the disconnect
    assert 4 <= record["completion_tokens"] < 20  # what was generated before the cancel, not the whole answer


def test_budget_stops_requests_once_spent(keyed: tuple[Server, Path]) -> None:
    server, _ = keyed
    key = new_key(server, "flat", budget=1.0)  # 0.5 a request
    chat(server, key)
    chat(server, key)
    with pytest.raises(openai.RateLimitError) as info:
        chat(server, key)
    assert info.value.body["type"] == "insufficient_quota"  # type: ignore[index]
    assert usage_of(server, key)["cost"] == pytest.approx(1.0)


def test_admin_usage_and_the_audit_cli(keyed: tuple[Server, Path], tmp_path: Path) -> None:
    server, cfg = keyed
    key = new_key(server, "pro")
    for _ in range(3):
        chat(server, key)
    status, everyone = admin(server, "GET", "/admin/usage")
    assert status == 200 and everyone["requests"] >= 3
    key_id = next(k["id"] for k in admin(server, "GET", "/admin/keys")[1]["data"] if k["prefix"] == key[:8])
    status, mine = admin(server, "GET", f"/admin/usage?key_id={key_id}")
    assert status == 200 and mine["requests"] == 3 and mine["key_id"] == key_id
    database = server.log.parent / (server.log.stem + ".db")

    def audit(db: Path, *args: str) -> subprocess.CompletedProcess[str]:
        return tokenrelay_cli(cfg, db, "audit", *args)

    ok = audit(database, "verify")
    assert ok.returncode == 0 and "intact" in ok.stderr
    tail = [json.loads(line) for line in audit(database, "tail", "-n", "3").stdout.splitlines()]
    assert len(tail) == 3 and tail[-1]["seq"] == tail[0]["seq"] + 2
    copy = tmp_path / "copy.db"
    copy.write_bytes(database.read_bytes())
    import sqlite3

    with sqlite3.connect(copy) as conn:
        conn.execute("UPDATE audit_records SET status = 200 WHERE seq = 2")
        conn.execute("UPDATE audit_records SET model = 'other' WHERE seq = 2")
    broken = audit(copy, "verify")
    assert broken.returncode == 1 and "record 2 was edited" in broken.stderr


def test_records_survive_a_graceful_shutdown(tmp_path: Path) -> None:
    """Records are written in batches every half second; a SIGTERM right after the requests loses none."""
    import asyncio

    from tokenrelay import records
    from tokenrelay.store import Store

    config = keyed_config()
    config["server"]["audit_bodies"] = True
    db = tmp_path / "records.db"
    with serving(tmp_path, config, {"TOKENRELAY_DATABASE_URL": f"sqlite+aiosqlite:///{db}"}) as server:
        body = {"model": "other", "messages": MESSAGES, "vendor_api_key": "sk-do-not-keep"}
        for _ in range(20):
            assert raw_post(server.port, "/v1/chat/completions", body).status == 200
    # leaving serving() sent SIGTERM at once: the last batch was still queued in the process
    cfg = server.config
    assert cfg is not None

    async def check() -> tuple[int, tuple[int, str | None]]:
        store = Store(f"sqlite+aiosqlite:///{db}")
        await store.start()
        try:
            return (await records.usage(store, None))["requests"], await records.verify(store)
        finally:
            await store.close()

    count, (checked, problem) = asyncio.run(check())
    assert count == 20 and checked == 20 and problem is None

    def cli(*args: str) -> str:
        out = tokenrelay_cli(cfg, db, *args)
        assert out.returncode == 0, out.stderr
        return out.stdout

    rows = [line for line in cli("usage").splitlines() if "other" in line]
    assert rows and " 20 " in rows[0]  # the table row of model "other": 20 requests
    bodies = [json.loads(line)["body"] for line in cli("audit", "tail", "-n", "5").splitlines()]
    assert all(
        b and "[redacted]" in b and "sk-do-not-keep" not in b and "vendor_api_key" in b for b in bodies
    )


def test_cost_compares_request_and_token_pricing(tmp_path: Path) -> None:
    cfg = tmp_path / "tokenrelay.yaml"
    config = keyed_config()
    config["plans"] = {"both": {"price_per_request": 0.01, "prices": {"*": {"input": 1.0, "output": 4.0}}}}
    cfg.write_text(yaml.safe_dump(config))
    out = subprocess.run(
        [sys.executable, "-m", "tokenrelay", "cost", "--requests", "1000", "--prompt-tokens", "500",
         "--completion-tokens", "1000", "--config", str(cfg)],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    row = next(line for line in out.stdout.splitlines() if "both" in line)
    # 1000 x 0.01 = 10.0 by request; 1000 x (500 x 1 + 1000 x 4) / 1e6 = 4.5 by tokens
    assert "10.0000" in row and "4.5000" in row and "token-based" in row
