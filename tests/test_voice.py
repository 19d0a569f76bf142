"""The voice pipeline (``/v1/ws/voice``) through a real gateway: a chat model's answer as text tokens and,
sentence by sentence, espeak-ng audio, interleaved, with speech starting before the answer ends; audio in,
transcribed by the mock upstream; errors naming the field; cancel. Also the sentence splitter itself."""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
from tests.audio_tools import ANSWER, audio_config, ensure_tools, rms, wav_info
from tests.conftest import Server, serving, wait_for
from websockets.sync.client import ClientConnection, connect

from tokenrelay.audio.mock_upstream import mock_transcript
from tokenrelay.audio.voice import SentenceSplitter


@pytest.fixture(scope="module")
def gw(mock_upstream: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    ensure_tools()
    tmp = tmp_path_factory.mktemp("voice")
    with serving(tmp, audio_config(mock_upstream.port), env={"TEST_AUDIO_KEY": "sk-audio"}) as server:
        yield server


def ws(gw: Server) -> ClientConnection:
    return connect(f"ws://127.0.0.1:{gw.port}/v1/ws/voice", max_size=None)


def request(rid: str, text: str = "Tell me about the river.", model: str = "chatty", **kw: Any) -> str:
    msg: dict[str, Any] = {
        "type": "request",
        "id": rid,
        "body": {"model": model},
        "text": text,
        "speech": {"model": "speech", "voice": "alloy", "response_format": "pcm"},
    }
    msg.update(kw)
    return json.dumps(msg)


def collect(conn: ClientConnection, rid: str) -> list[tuple[float, dict[str, Any]]]:
    t0 = time.perf_counter()
    out: list[tuple[float, dict[str, Any]]] = []
    while True:
        msg = json.loads(conn.recv(timeout=30))
        if msg.get("id") != rid:
            continue
        out.append((time.perf_counter() - t0, msg))
        if msg["type"] in ("done", "error"):
            return out


def sentences_of(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]


def test_speech_starts_before_the_answer_ends_and_interleaves(gw: Server) -> None:
    with ws(gw) as conn:
        conn.send(request("v1"))
        got = collect(conn, "v1")
    kinds = [m["type"] for _, m in got]
    assert kinds[-1] == "done", got[-1]
    first_audio = kinds.index("audio")
    last_token = len(kinds) - 1 - kinds[::-1].index("token")
    assert first_audio < last_token  # the first sentence is heard while the model still writes
    assert "token" in kinds[first_audio:]  # interleaved, not text then audio
    t_first_audio = next(t for t, m in got if m["type"] == "audio")
    t_last_token = max(t for t, m in got if m["type"] == "token")
    assert t_first_audio < t_last_token - 0.5  # 25 tokens/s: seconds of answer still to come

    text = "".join(m["text"] for _, m in got if m["type"] == "token")
    assert text == ANSWER
    spoken = [m for _, m in got if m["type"] == "sentence"]
    assert [s["sentence"] for s in spoken] == list(range(len(spoken)))
    assert [s["text"] for s in spoken] == sentences_of(ANSWER)
    for s in spoken:  # every sentence gets audio, and it is speech
        k = s["sentence"]
        pcm = b"".join(
            base64.b64decode(m["data"]) for _, m in got if m["type"] == "audio" and m["sentence"] == k
        )
        assert rms(pcm) > 0.03, k
        assert len(pcm) / 2 / 24000 > 0.08 * len(s["text"].split())  # some audio per word
        assert any(m["type"] == "audio_done" and m["sentence"] == k for _, m in got)
    # a sentence's audio follows its text, and sentences are spoken in order
    order = [(m["type"], m["sentence"]) for _, m in got if m["type"] in ("sentence", "audio_done")]
    ends = [k for kind, k in order if kind == "audio_done"]
    assert ends == sorted(ends)
    assert all(order.index(("sentence", k)) < order.index(("audio_done", k)) for k in ends)
    done = got[-1][1]
    assert done["finish_reason"] == "stop" and done["sentences"] == len(spoken)
    audio_bytes = sum(len(base64.b64decode(m["data"])) for _, m in got if m["type"] == "audio")
    assert done["audio_bytes"] == audio_bytes
    assert done["usage"]["speech_characters"] == sum(len(s["text"]) for s in spoken)
    assert done["usage"]["completion_tokens"] > 0


def test_each_sentence_is_a_whole_wav(gw: Server) -> None:
    with ws(gw) as conn:
        conn.send(request("w", speech={"model": "speech", "voice": "nova", "response_format": "wav"}))
        got = collect(conn, "w")
    assert got[-1][1]["type"] == "done"
    per_sentence: dict[int, bytes] = {}
    for _, m in got:
        if m["type"] == "audio":
            per_sentence[m["sentence"]] = per_sentence.get(m["sentence"], b"") + base64.b64decode(m["data"])
    assert len(per_sentence) == len(sentences_of(ANSWER))
    for data in per_sentence.values():
        rate, channels, _, pcm = wav_info(data)
        assert rate == 24000 and channels == 1 and rms(pcm) > 0.03


def test_audio_in_is_transcribed_then_answered(gw: Server) -> None:
    audio = b"RIFF" + bytes(2000)
    expected = mock_transcript("question.wav", len(audio))
    with ws(gw) as conn:
        conn.send(
            json.dumps(
                {
                    "type": "request",
                    "id": "a",
                    "body": {"model": "demo", "mock": {"echo": True}},  # the mock repeats the question
                    "audio": {
                        "data": base64.b64encode(audio).decode(),
                        "model": "whisper",
                        "filename": "question.wav",
                    },
                    "speech": {"model": "speech", "response_format": "pcm"},
                }
            )
        )
        got = collect(conn, "a")
    msgs = [m for _, m in got]
    assert msgs[0] == {"type": "transcript", "id": "a", "text": expected}
    assert "".join(m["text"] for m in msgs if m["type"] == "token") == expected
    assert msgs[-1]["type"] == "done" and msgs[-1]["sentences"] >= 1


def test_the_upstream_speech_model_works_too(gw: Server) -> None:
    with ws(gw) as conn:
        conn.send(request("u", speech={"model": "tts-up", "voice": "alloy", "response_format": "pcm"}))
        got = collect(conn, "u")
    assert got[-1][1]["type"] == "done"
    assert got[-1][1]["sentences"] == len(sentences_of(ANSWER))


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"speech": {"model": "speech", "voice": "nobody"}}, "speech.voice"),
        ({"speech": {"model": "demo"}}, "speech.model"),
        ({"speech": {"model": "speech", "response_format": "ogg"}}, "speech.response_format"),
        ({"speech": {"model": "speech", "speed": 9}}, "speech.speed"),
        ({"speech": None}, "speech"),
        ({"text": None}, "text"),
        ({"text": 5}, "text"),
        ({"body": {}}, "body.model"),
        ({"audio": {"data": "!!!", "model": "whisper"}, "text": None}, "audio.data"),
        ({"audio": {"data": "AAAA", "model": "speech"}, "text": None}, "audio.model"),
        ({"audio": {"data": "AAAA"}, "text": None}, "audio.model"),
    ],
)
def test_bad_requests_get_an_error_naming_the_field(gw: Server, change: dict[str, Any], param: str) -> None:
    msg = json.loads(request("bad"))
    for key, value in change.items():
        if value is None:
            msg.pop(key, None)
        else:
            msg[key] = value
    with ws(gw) as conn:
        conn.send(json.dumps(msg))
        err = json.loads(conn.recv(timeout=10))
        assert err["type"] == "error" and err["id"] == "bad"
        assert err["error"]["param"] == param, err
        conn.send(json.dumps({"type": "ping"}))  # the socket stays open
        assert json.loads(conn.recv(timeout=10)) == {"type": "pong"}


def test_a_model_error_is_an_error_message(gw: Server) -> None:
    with ws(gw) as conn:
        conn.send(request("m", model="nope"))
        err = json.loads(conn.recv(timeout=10))
    assert err["type"] == "error" and err["error"]["code"] == "model_not_found"


def test_cancel_stops_the_answer_and_its_speech(gw: Server) -> None:
    with ws(gw) as conn:
        conn.send(request("c", body={"model": "chatty", "mock": {"tokens_per_second": 10}}))
        while json.loads(conn.recv(timeout=10))["type"] != "token":
            pass
        conn.send(json.dumps({"type": "cancel", "id": "c"}))
        got = collect(conn, "c")
    assert got[-1][1]["type"] == "error" and got[-1][1]["error"]["type"] == "cancelled"
    wait_for(lambda: gw.get_json("/mock/stats")["chatty"]["cancelled"] >= 1, timeout=5)
    wait_for(lambda: gw.get_json("/stats")["audio_models"]["speech"]["active"] == 0, timeout=5)


def test_closing_the_socket_cancels_the_chat(gw: Server) -> None:
    before = gw.get_json("/mock/stats")["chatty"]["cancelled"]
    with ws(gw) as conn:
        conn.send(request("x", body={"model": "chatty", "mock": {"tokens_per_second": 10}}))
        json.loads(conn.recv(timeout=10))
    wait_for(lambda: gw.get_json("/mock/stats")["chatty"]["cancelled"] > before, timeout=5)


def test_several_requests_share_a_socket(gw: Server) -> None:
    with ws(gw) as conn:
        for rid in ("p", "q"):
            conn.send(
                request(rid, model="demo", body={"model": "demo", "mock": {"text": f"Answer {rid} is here."}})
            )
        done: dict[str, dict[str, Any]] = {}
        while len(done) < 2:
            msg = json.loads(conn.recv(timeout=30))
            if msg["type"] in ("done", "error"):
                done[msg["id"]] = msg
    assert all(m["type"] == "done" and m["sentences"] == 1 for m in done.values())


# ------------------------------------------------------------------------------ the sentence splitter


def split_all(chunks: list[str], **kw: Any) -> list[str]:
    splitter = SentenceSplitter(**kw)
    out = [s for chunk in chunks for s in splitter.feed(chunk)]
    rest = splitter.flush()
    return [*out, rest] if rest else out


def test_splitter_cuts_on_terminators_and_newlines() -> None:
    text = "Hello there, my good friend. How are you today? Fine!\nA new line of text here\nEnd"
    tokens = re.findall(r"\S+\s*", text)
    assert split_all(tokens) == [
        "Hello there, my good friend.",
        "How are you today? Fine!",  # "Fine!" alone is under the minimum: it runs on
        "A new line of text here",
        "End",
    ]


def test_splitter_waits_for_what_follows_a_terminator() -> None:
    splitter = SentenceSplitter(min_chars=5)
    assert splitter.feed("The value of pi is 3.") == []  # maybe a decimal point
    assert splitter.feed("14 exactly") == []
    assert splitter.feed(". Next") == ["The value of pi is 3.14 exactly."]
    assert splitter.feed(' "Quoted!"') == []  # the closing quote belongs to the sentence
    assert splitter.feed(" she said") == ['Next "Quoted!"']
    assert splitter.flush() == "she said"


def test_splitter_cuts_a_run_on_at_a_space() -> None:
    words = ["word "] * 200
    out = split_all(words, max_chars=100)
    assert all(len(s) <= 100 for s in out) and len(out) > 5
    assert " ".join(out).split() == "".join(words).split()
