"""Resuming a stream: ``GET /v1/streams/{id}?after=N`` (or ``Last-Event-ID``), in the stream's protocol."""

from __future__ import annotations

import http.client
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from tests.conftest import Server, raw_post, serving

SLOW = {"tokens": 30, "tokens_per_second": 60}


def get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path, headers=headers or {})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body


def start_and_drop(
    port: int, path: str, body: dict[str, Any], keep: int, headers: dict[str, str] | None = None
) -> tuple[str, list[bytes]]:
    """Start a stream, read ``keep`` data events, drop the connection; return the id and what was read."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request(
        "POST", path, body=json.dumps(body), headers={"content-type": "application/json", **(headers or {})}
    )
    resp = conn.getresponse()
    assert resp.status == 200
    stream_id = resp.getheader("x-stream-id")
    assert stream_id
    got: list[bytes] = []
    while len(got) < keep:
        line = resp.readline()
        if line.startswith(b"data: "):
            got.append(line[6:].rstrip(b"\n"))
    assert conn.sock is not None
    conn.sock.close()
    return stream_id, got


def events(body: bytes) -> list[dict[bytes, bytes]]:
    out = []
    for block in body.split(b"\n\n"):
        fields = dict(
            line.split(b": ", 1) for line in block.split(b"\n") if b": " in line and not line.startswith(b":")
        )
        if b"data" in fields:
            out.append(fields)
    return out


def chat_text(payloads: list[bytes]) -> str:
    text = []
    for p in payloads:
        if p.startswith(b"{"):
            chunk = json.loads(p)
            text.extend(c["delta"].get("content") or "" for c in chunk.get("choices", []))
    return "".join(text)


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": "demo", "stream": True, "messages": [{"role": "user", "content": "resume me"}], **extra}


def full_text(gateway: Server) -> str:
    reply = raw_post(gateway.port, "/v1/chat/completions", {**chat_body(mock=SLOW), "stream": False}).json()
    return str(reply["choices"][0]["message"]["content"])


def test_resume_after_a_drop_gets_the_rest(gateway: Server) -> None:
    body = chat_body(mock=SLOW, stream_options={"on_disconnect": "continue"})
    stream_id, first = start_and_drop(gateway.port, "/v1/chat/completions", body, keep=5)
    status, headers, rest = get(gateway.port, f"/v1/streams/{stream_id}?after={len(first)}")
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    resumed = events(rest)
    ids = [int(e[b"id"]) for e in resumed if b"id" in e]
    assert ids == sorted(ids) and ids[0] == len(first) + 1  # numbered from where the client was
    assert resumed[-1][b"data"] == b"[DONE]"
    whole = chat_text(first) + chat_text([e[b"data"] for e in resumed])
    assert whole == full_text(gateway)  # nothing repeated, nothing missing
    assert json.loads(resumed[0][b"data"])["id"] == stream_id


def test_last_event_id_wins_and_a_finished_stream_replays(gateway: Server) -> None:
    resp = raw_post(gateway.port, "/v1/chat/completions", chat_body(mock={"tokens": 6}))
    stream_id = resp.headers["x-stream-id"]
    assert b"id: " not in resp.body  # never on the POST endpoint: openai-python chokes on it
    text = chat_text(resp.sse_data())
    status, _, replay = get(gateway.port, f"/v1/streams/{stream_id}")
    assert status == 200 and chat_text([e[b"data"] for e in events(replay)]) == text
    # an EventSource reconnects to the same URL with Last-Event-ID: that wins over ?after
    status, _, tail = get(gateway.port, f"/v1/streams/{stream_id}?after=0", {"Last-Event-ID": "4"})
    tail_events = events(tail)
    assert int(tail_events[0][b"id"]) == 5
    assert chat_text([e[b"data"] for e in tail_events]) == "".join(re.findall(r"\S+\s?", text)[4:])


def test_unknown_and_foreign_streams_are_404(gateway: Server) -> None:
    status, _, body = get(gateway.port, "/v1/streams/chatcmpl-nope")
    assert status == 404 and json.loads(body)["error"]["code"] == "stream_not_found"
    mine = {"authorization": "Bearer alice"}
    resp = raw_post(gateway.port, "/v1/chat/completions", chat_body(mock={"tokens": 3}), mine)
    stream_id = resp.headers["x-stream-id"]
    assert get(gateway.port, f"/v1/streams/{stream_id}", {"authorization": "Bearer mallory"})[0] == 404
    assert get(gateway.port, f"/v1/streams/{stream_id}")[0] == 404
    assert get(gateway.port, f"/v1/streams/{stream_id}", mine)[0] == 200
    status, _, body = get(gateway.port, f"/v1/streams/{stream_id}?after=x", mine)
    assert status == 400 and json.loads(body)["error"]["param"] == "after"


def test_cancel_policy_ends_the_stream_at_the_drop(gateway: Server) -> None:
    before = gateway.mock_cancelled()
    stream_id, first = start_and_drop(gateway.port, "/v1/chat/completions", chat_body(mock=SLOW), keep=3)
    gateway.wait_cancelled(before)
    _, _, rest = get(gateway.port, f"/v1/streams/{stream_id}?after={len(first)}")
    data = [e[b"data"] for e in events(rest)]
    assert json.loads(data[-2])["error"]["type"] == "cancelled" and data[-1] == b"[DONE]"


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/responses"])
def test_resume_in_the_streams_own_protocol(gateway: Server, path: str) -> None:
    text = "one two three four five six seven eight"
    mock = {"text": text, "tokens_per_second": 60}
    if path == "/v1/messages":
        body: dict[str, Any] = {
            "model": "demo",
            "max_tokens": 50,
            "messages": [{"role": "user", "content": "x"}],
        }
        delta_type = "content_block_delta"
    else:
        body = {"model": "demo", "input": "x"}
        delta_type = "response.output_text.delta"
    body |= {"stream": True, "mock": mock}
    continue_ = {"x-tokenrelay-on-disconnect": "continue"}  # these protocols have no stream_options

    def pieces(payloads: list[bytes]) -> list[str]:
        objs = [json.loads(p) for p in payloads]
        return [
            o["delta"]["text"] if isinstance(o["delta"], dict) else o["delta"]
            for o in objs
            if o["type"] == delta_type
        ]

    stream_id, first = start_and_drop(gateway.port, path, body, keep=5, headers=continue_)
    n = len(pieces(first))
    assert 0 < n < 8
    _, _, rest = get(gateway.port, f"/v1/streams/{stream_id}?after={n}")
    rest_events = events(rest)
    names = [e[b"event"].decode() for e in rest_events]
    assert "message_start" not in names and "response.created" not in names  # no second opening
    assert names[-1] in ("message_stop", "response.completed")
    assert "".join(pieces(first)) + "".join(pieces([e[b"data"] for e in rest_events])) == text
    if path == "/v1/responses":  # sequence numbers carry on from the original stream
        seqs = [json.loads(e[b"data"])["sequence_number"] for e in rest_events]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))) and seqs[0] > 4


@pytest.fixture(scope="module")
def short_grace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A gateway whose streams outlive their client by default, for 0.4 s."""
    tmp = tmp_path_factory.mktemp("grace")
    server = {"on_disconnect": "continue", "disconnect_grace_seconds": 0.4}
    with serving(tmp, {"server": server, "models": [{"name": "demo", "provider": "mock"}]}) as gateway:
        yield gateway


def test_grace_period_then_cancel(short_grace: Server) -> None:
    gw = short_grace
    before = gw.mock_cancelled()
    slow = {"tokens": 100, "tokens_per_second": 20}  # 5 s of tokens
    start_and_drop(gw.port, "/v1/chat/completions", chat_body(mock=slow), keep=2)
    gw.wait_cancelled(before)  # nobody came back within 0.4 s


def test_a_resume_within_the_grace_keeps_the_model_going(short_grace: Server) -> None:
    gw = short_grace
    before = gw.mock_cancelled()
    mock = {"tokens": 20, "tokens_per_second": 20}  # 1 s of tokens
    stream_id, first = start_and_drop(gw.port, "/v1/chat/completions", chat_body(mock=mock), keep=2)
    _, _, rest = get(gw.port, f"/v1/streams/{stream_id}?after={len(first)}")
    data = [e[b"data"] for e in events(rest)]
    assert data[-1] == b"[DONE]" and b"error" not in data[-2]
    assert len((chat_text(first) + chat_text(data)).split()) == 20
    assert gw.mock_cancelled() == before


def test_a_foreign_stream_looks_like_no_stream(gateway: Server) -> None:
    body = {"model": "demo", "max_tokens": 5, "stream": True, "messages": [{"role": "user", "content": "x"}]}
    resp = raw_post(gateway.port, "/v1/messages", body, {"x-api-key": "alice"})
    foreign = get(gateway.port, f"/v1/streams/{resp.headers['x-stream-id']}", {"x-api-key": "mallory"})
    unknown = get(gateway.port, "/v1/streams/msg_nope", {"x-api-key": "mallory"})
    assert foreign[0] == unknown[0] == 404
    # the same body shape (not the Anthropic one the stream speaks), so nothing says the stream exists
    assert json.loads(foreign[2]).keys() == json.loads(unknown[2]).keys() == {"error"}
