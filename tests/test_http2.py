"""HTTP/2 (h2c with prior knowledge) with httpx's HTTP/2 client: streams multiplexed on one connection.

HTTP/2 is granian's (``--server granian``); the built-in server, the default, speaks HTTP/1.1 only."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from tests.conftest import Server, gateway_config, serving


@pytest.fixture(scope="module")
def gateway(mock_upstream: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The test gateway's configuration served by granian."""
    tmp = tmp_path_factory.mktemp("h2")
    with serving(tmp, gateway_config(mock_upstream.port), args=("--server", "granian")) as server:
        yield server


def body(model: str, mock: dict[str, Any]) -> dict[str, Any]:
    return {"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}], "mock": mock}


async def stream_text(client: httpx.AsyncClient, url: str, payload: dict[str, Any]) -> tuple[str, str]:
    text = []
    async with client.stream("POST", url, json=payload) as resp:
        assert resp.status_code == 200
        version = resp.http_version
        async for line in resp.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                text.extend(c["delta"].get("content") or "" for c in chunk["choices"])
    return version, "".join(text)


async def test_concurrent_streams_on_one_connection(gateway: Server) -> None:
    limits = httpx.Limits(max_connections=1)
    async with httpx.AsyncClient(http1=False, http2=True, limits=limits, timeout=30) as client:
        url = f"{gateway.url}/v1/chat/completions"
        results = await asyncio.gather(
            *(
                stream_text(
                    client, url, body(model, {"text": f"stream {i} over h2", "tokens_per_second": 100})
                )
                for i, model in enumerate(["demo", "gpt", "claude", "demo"])
            )
        )
    assert [v for v, _ in results] == ["HTTP/2"] * 4
    assert [t for _, t in results] == [f"stream {i} over h2" for i in range(4)]


async def test_other_protocols_and_a_reset_stream_cancels(gateway: Server) -> None:
    before = gateway.mock_cancelled()
    async with httpx.AsyncClient(http1=False, http2=True, timeout=30) as client:
        resp = await client.post(
            f"{gateway.url}/v1/messages",
            json={"model": "demo", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
        )
        assert resp.http_version == "HTTP/2" and resp.json()["type"] == "message"
        async with client.stream(
            "POST",
            f"{gateway.url}/v1/chat/completions",
            json=body("demo", {"tokens": 500, "tokens_per_second": 50}),
        ) as stream:
            async for line in stream.aiter_lines():
                if line.startswith("data: {"):
                    break  # leaving the block resets this stream; the connection stays up
        again = await client.get(f"{gateway.url}/healthz")
        assert again.http_version == "HTTP/2" and again.status_code == 200
    gateway.wait_cancelled(before)
