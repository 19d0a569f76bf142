"""Side-channel padding: random-length "obfuscation" on OpenAI streams by default, off on request, and an
SSE comment padding for Anthropic streams that ask for it; the SDKs read all of it unchanged."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import openai
from tests.conftest import Server, raw_post

MESSAGES: list[Any] = [{"role": "user", "content": "pad me"}]


def chat_chunks(gateway: Server, **extra: Any) -> list[dict[str, Any]]:
    body = {"model": "demo", "messages": MESSAGES, "stream": True, **extra}
    resp = raw_post(gateway.port, "/v1/chat/completions", body)
    return [json.loads(d) for d in resp.sse_data() if d.startswith(b"{")]


def test_chat_chunks_are_padded_by_default(gateway: Server, chunk_validator: Any) -> None:
    chunks = chat_chunks(gateway)
    content = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert content and all(isinstance(c.get("obfuscation"), str) for c in content)
    for chunk in chunks:
        chunk_validator.validate(chunk)
    # each delta plus its padding fills its 32-byte bucket, then a random part of one more
    for chunk in content[1:]:
        delta = len(json.dumps(chunk["choices"][0]["delta"], separators=(",", ":")))
        bucket = -(-delta // 32) * 32
        assert bucket <= delta + len(chunk["obfuscation"]) < bucket + 32
    assert len({len(c["obfuscation"]) for c in content}) > 1
    off = chat_chunks(gateway, stream_options={"include_obfuscation": False})
    assert off and not any("obfuscation" in c for c in off)


def test_the_openai_sdk_reads_padded_streams(gateway: Server) -> None:
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="k", max_retries=0)
    text = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(model="demo", messages=MESSAGES, stream=True)
        if c.choices
    )
    assert text
    with client.responses.stream(model="demo", input="pad me") as stream:
        assert stream.get_final_response().output_text == text


def test_responses_deltas_are_padded_unless_asked_not_to(gateway: Server) -> None:
    def deltas(**extra: Any) -> list[dict[str, Any]]:
        resp = raw_post(
            gateway.port, "/v1/responses", {"model": "demo", "input": "pad me", "stream": True, **extra}
        )
        events = [json.loads(d) for d in resp.sse_data()]
        return [e for e in events if e["type"] == "response.output_text.delta"]

    assert all("obfuscation" in e for e in deltas())
    assert not any("obfuscation" in e for e in deltas(stream_options={"include_obfuscation": False}))


def test_anthropic_streams_pad_with_comments_when_asked(gateway: Server) -> None:
    body = {"model": "demo", "max_tokens": 50, "messages": MESSAGES, "stream": True}
    plain = raw_post(gateway.port, "/v1/messages", body)
    assert b"\n: " not in plain.body and not plain.body.startswith(b": ")
    padded = raw_post(gateway.port, "/v1/messages", body, {"x-tokenrelay-obfuscation": "on"})
    comments = [ln for ln in padded.body.split(b"\n") if ln.startswith(b": ")]
    assert len(comments) >= 12  # one per text delta
    client = anthropic.Anthropic(base_url=gateway.url, api_key="k", max_retries=0)
    with client.messages.stream(
        model="demo", max_tokens=50, messages=MESSAGES, extra_headers={"x-tokenrelay-obfuscation": "on"}
    ) as stream:
        assert stream.get_final_text()
    bad = raw_post(gateway.port, "/v1/messages", body, {"x-tokenrelay-obfuscation": "maybe"})
    assert bad.status == 400 and bad.json()["error"]["param"] == "x-tokenrelay-obfuscation"


def test_ollama_websocket_and_grpc_pad_when_asked(gateway: Server) -> None:
    import grpc
    import ollama
    from websockets.sync.client import connect

    from tokenrelay.grpc_api import tokenrelay_pb2 as pb
    from tokenrelay.grpc_api import tokenrelay_pb2_grpc as pb_grpc

    body = {"model": "demo", "messages": MESSAGES}
    lines = [json.loads(x) for x in raw_post(gateway.port, "/api/chat", body).body.splitlines()]
    assert not any("obfuscation" in x for x in lines)
    padded = raw_post(gateway.port, "/api/chat", body, {"x-tokenrelay-obfuscation": "on"}).body.splitlines()
    text_lines = [json.loads(x) for x in padded if b'"done":false' in x]
    assert text_lines and all("obfuscation" in x for x in text_lines)
    client = ollama.Client(host=gateway.url, headers={"x-tokenrelay-obfuscation": "on"})
    assert "".join(
        part.message.content or "" for part in client.chat(model="demo", messages=MESSAGES, stream=True)
    )

    with connect(f"ws://127.0.0.1:{gateway.port}/v1/ws/chat", open_timeout=5) as ws:
        ws.send(
            json.dumps(
                {
                    "type": "request",
                    "id": 1,
                    "body": {**body, "stream_options": {"include_obfuscation": True}},
                }
            )
        )
        tokens = []
        while True:
            msg = json.loads(ws.recv(timeout=5))
            if msg["type"] == "done":
                break
            tokens.append(msg)
        assert tokens and all(m["type"] == "token" and "obfuscation" in m for m in tokens)

    with grpc.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
        stub = pb_grpc.TokenRelayStub(channel)
        request = pb.ChatRequest(
            model="demo", messages=[pb.Message(role="user", content="pad me")], obfuscation=True
        )
        events = [e for e in stub.StreamChat(request, timeout=10) if e.WhichOneof("kind") == "text"]
        assert events and all(e.obfuscation for e in events)
        plain = pb.ChatRequest(model="demo", messages=[pb.Message(role="user", content="pad me")])
        assert not any(e.obfuscation for e in stub.StreamChat(plain, timeout=10))
