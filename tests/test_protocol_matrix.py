"""Any protocol reaches any model: every inbound protocol x every provider streams the same text.

Each client is the protocol's own: the openai SDK (Chat and Responses), the anthropic SDK, the ollama
client and a websockets client. The mock script fixes the text for the mock-backed providers; the embedded
model, at temperature 0, must give the same text whichever protocol asks.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import anthropic
import ollama
import openai
import pytest
from tests.conftest import Server
from websockets.sync.client import connect

TEXT = "Streams cross protocols unchanged, token by token."
PROMPT = "Name three colors."

Streamer = Callable[[Server, str, dict[str, Any]], list[str]]


def via_chat(gw: Server, model: str, opts: dict[str, Any]) -> list[str]:
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="k", max_retries=0, timeout=60)
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": PROMPT}],
        stream=True,
        max_tokens=opts["max_tokens"],
        temperature=0,
        extra_body={"mock": opts["mock"]},
    )
    return [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]


def via_responses(gw: Server, model: str, opts: dict[str, Any]) -> list[str]:
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="k", max_retries=0, timeout=60)
    with client.responses.stream(
        model=model,
        input=PROMPT,
        max_output_tokens=opts["max_tokens"],
        temperature=0,
        extra_body={"mock": opts["mock"]},
    ) as stream:
        return [e.delta for e in stream if e.type == "response.output_text.delta"]


def via_anthropic(gw: Server, model: str, opts: dict[str, Any]) -> list[str]:
    client = anthropic.Anthropic(base_url=gw.url, api_key="k", max_retries=0, timeout=60)
    with client.messages.stream(
        model=model,
        max_tokens=opts["max_tokens"],
        messages=[{"role": "user", "content": PROMPT}],
        extra_body={"mock": opts["mock"], "temperature": 0},  # 2.x dropped the keyword, not the field
    ) as stream:
        return list(stream.text_stream)


def via_ollama(gw: Server, model: str, opts: dict[str, Any]) -> list[str]:
    assert opts["mock"] is None  # the ollama client sends only Ollama's fields
    client = ollama.Client(host=gw.url, timeout=60)
    parts = client.chat(
        model=model,
        messages=[{"role": "user", "content": PROMPT}],
        stream=True,
        options={"temperature": 0, "num_predict": opts["max_tokens"]},
    )
    return [p.message.content for p in parts if p.message.content]


def via_websocket(gw: Server, model: str, opts: dict[str, Any]) -> list[str]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": opts["max_tokens"],
        "temperature": 0,
        "mock": opts["mock"],
    }
    pieces = []
    with connect(f"ws://127.0.0.1:{gw.port}/v1/ws/chat") as ws:
        ws.send(json.dumps({"type": "request", "id": 1, "body": body}))
        while True:
            msg = json.loads(ws.recv(timeout=60))
            if msg["type"] == "token":
                pieces.append(msg["text"])
            elif msg["type"] in ("done", "error"):
                assert msg["type"] == "done", msg
                return pieces


PROTOCOLS: dict[str, Streamer] = {
    "chat": via_chat,
    "responses": via_responses,
    "anthropic": via_anthropic,
    "ollama": via_ollama,
    "websocket": via_websocket,
}


@pytest.mark.parametrize("model", ["demo", "gpt", "claude"])
@pytest.mark.parametrize("protocol", [p for p in PROTOCOLS if p != "ollama"])
def test_same_text_everywhere(gateway: Server, protocol: str, model: str) -> None:
    # paced, so each token is its own upstream read (a burst may be coalesced into fewer messages)
    mock = {"text": TEXT, "tokens_per_second": 100}
    pieces = PROTOCOLS[protocol](gateway, model, {"max_tokens": 50, "mock": mock})
    assert "".join(pieces) == TEXT
    assert len(pieces) == len(TEXT.split())  # streamed token by token, in every protocol


@pytest.mark.parametrize("model", ["demo", "gpt", "claude"])
def test_ollama_gets_the_same_default_script_as_chat(gateway: Server, model: str) -> None:
    expected = "".join(via_chat(gateway, model, {"max_tokens": 50, "mock": None}))
    assert "".join(via_ollama(gateway, model, {"max_tokens": 50, "mock": None})) == expected


def test_embedded_model_through_every_protocol(gateway: Server) -> None:
    texts = {
        name: "".join(fn(gateway, "tiny", {"max_tokens": 8, "mock": None})) for name, fn in PROTOCOLS.items()
    }
    assert texts["chat"].strip(), texts
    assert len(set(texts.values())) == 1, texts
