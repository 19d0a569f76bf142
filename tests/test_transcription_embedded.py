"""The embedded transcription engine (``provider: pocketsphinx``) through a real gateway: sentences spoken by
the gateway's own espeak-ng engine are transcribed back with the official openai SDK, streamed and not;
the words recognised are counted; deltas join up to the done text; WAV variants and compressed formats
decode; silence is empty text; bad requests get a 400 naming the field; a client that leaves stops the
decoding; the voice socket's audio goes through the engine. Also the delta logic and the config default.

What pocketsphinx recognises of espeak-ng's voice was measured on 30 sentences (docs/audio.md): 72% of
the words on average, from all of them to none. The sentences below are ones it mostly gets (each was
measured at 0.6 to 1.0); the threshold, a mean of 0.6, leaves room for another espeak-ng version's voice.
"""

from __future__ import annotations

import base64
import http.client
import io
import itertools
import json
import re
import shutil
import struct
import subprocess
import time
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from tests.audio_tools import ensure_tools
from tests.conftest import Server, serving, wait_for
from websockets.sync.client import connect

from tokenrelay.audio.sphinx import Deltas
from tokenrelay.config import ConfigError, load_config

SENTENCES = [
    "Hello world.",
    "The weather is nice today.",
    "Please open the door.",
    "I would like a cup of coffee.",
    "We went to the beach last summer.",
    "It is a beautiful day in the park.",
]
MIN_MEAN_OVERLAP = 0.6
SHORT = "We went to the beach last summer. It is a beautiful day in the park."
LONG = " ".join(
    [
        "We went to the beach last summer. It is a beautiful day in the park.",
        "I like to listen to music. The store closes at six.",
        "Please open the door. We need more water.",
    ]
)


def overlap(reference: str, hypothesis: str) -> float:
    """The share of the reference's words found in the hypothesis (each used once), case and
    punctuation ignored."""

    def words(text: str) -> list[str]:
        return "".join(c if c.isalnum() or c in " '" else " " for c in text.lower()).split()

    hyp = words(hypothesis)
    ref = words(reference)
    found = 0
    for word in ref:
        if word in hyp:
            hyp.remove(word)
            found += 1
    return found / len(ref)


CONFIG: dict[str, Any] = {
    "server": {"keepalive_seconds": 0.5},
    "models": [{"name": "demo", "provider": "mock", "options": {"echo": True}}],
    "audio_models": [
        {"name": "speech", "provider": "espeak", "options": {"sample_rate": 16000}},
        {"name": "stt", "provider": "pocketsphinx"},
        {"name": "stt-short", "provider": "pocketsphinx", "options": {"max_seconds": 3}},
        {"name": "stt-wav", "provider": "pocketsphinx", "options": {"converters": []}},
    ],
}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    ensure_tools()
    with serving(tmp_path_factory.mktemp("stt"), CONFIG) as server:
        yield server


@pytest.fixture(scope="module")
def client(gw: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0, timeout=120)


_spoken: dict[tuple[str, str, str], bytes] = {}


def speak(client: openai.OpenAI, text: str, fmt: str = "wav", model: str = "speech") -> bytes:
    """``text`` spoken by the gateway's espeak-ng model (16 kHz), in ``fmt``; made once per test module."""
    key = (text, fmt, model)
    if key not in _spoken:
        resp = client.audio.speech.create(model=model, voice="alloy", input=text, response_format=fmt)  # type: ignore[arg-type]
        _spoken[key] = resp.content
    return _spoken[key]


def transcribe(gw: Server, data: bytes, **fields: str | list[str]) -> httpx.Response:
    form: dict[str, str | list[str]] = {"model": "stt", **fields}
    return httpx.post(
        f"{gw.url}/v1/audio/transcriptions", data=form, files={"file": ("a.wav", data)}, timeout=120
    )


def assert_error(resp: httpx.Response, status: int, param: str, code: str | None = None) -> str:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["param"] == param and err["message"], err
    if code is not None:
        assert err["code"] == code, err
    return str(err["message"])


def wav_bytes(pcm: bytes, rate: int = 16000, channels: int = 1, width: int = 2) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(pcm)
    return out.getvalue()


# ------------------------------------------------------------------------------ what it recognises


def test_known_sentences_are_recognised(client: openai.OpenAI) -> None:
    scores = []
    for sentence in SENTENCES:
        result = client.audio.transcriptions.create(model="stt", file=("s.wav", speak(client, sentence)))
        assert result.text.strip(), sentence
        scores.append(overlap(sentence, result.text))
        assert result.usage is not None and result.usage.type == "duration"
        assert result.usage.seconds >= 1
    assert sum(scores) / len(scores) >= MIN_MEAN_OVERLAP, list(zip(SENTENCES, scores, strict=True))
    again = client.audio.transcriptions.create(model="stt", file=("s.wav", speak(client, SENTENCES[2])))
    first = client.audio.transcriptions.create(model="stt", file=("s.wav", speak(client, SENTENCES[2])))
    assert again.text == first.text  # the same file, the same text, whatever was decoded before


def test_streamed_deltas_join_up_to_the_done_text_as_decoding_goes(client: openai.OpenAI) -> None:
    audio = speak(client, LONG)
    t0 = time.perf_counter()
    deltas: list[tuple[float, str]] = []
    done: Any = None
    for event in client.audio.transcriptions.create(model="stt", file=("long.wav", audio), stream=True):
        if event.type == "transcript.text.delta":
            assert done is None
            deltas.append((time.perf_counter() - t0, event.delta))
        elif event.type == "transcript.text.done":
            done = (time.perf_counter() - t0, event)
    assert done is not None
    end, event = done
    assert "".join(d for _, d in deltas) == event.text
    assert overlap(LONG, event.text) >= MIN_MEAN_OVERLAP, event.text
    assert len(deltas) >= 3  # word by word, not one piece at the end
    assert deltas[0][0] < end - 0.3, (deltas[0][0], end)  # the first words before the decoding ends
    assert event.usage is not None and event.usage.type == "duration"  # billed by the second
    plain = client.audio.transcriptions.create(model="stt", file=("long.wav", audio))
    assert overlap(plain.text, event.text) >= 0.8  # streaming sends what the decoding finally says, mostly


def test_compressed_formats_decode_through_their_programs(client: openai.OpenAI) -> None:
    sentence = SENTENCES[3]
    plain = client.audio.transcriptions.create(model="stt", file=("s.wav", speak(client, sentence))).text
    for fmt in ("mp3", "opus", "flac"):  # lame --decode, opusdec, sox
        data = speak(client, sentence, fmt)
        text = client.audio.transcriptions.create(model="stt", file=(f"s.{fmt}", data)).text
        assert overlap(sentence, text) >= 0.5, (fmt, text, plain)


def test_wav_variants(client: openai.OpenAI, tmp_path: Path) -> None:
    sentence = SENTENCES[4]
    source = tmp_path / "s.wav"
    source.write_bytes(speak(client, sentence))
    variants = {
        "8-bit": ["-b", "8", "-e", "unsigned-integer"],
        "24-bit 44.1 kHz": ["-b", "24", "-r", "44100"],
        "float stereo 48 kHz": ["-e", "floating-point", "-b", "32", "-c", "2", "-r", "48000"],
        "32-bit 22.05 kHz": ["-b", "32", "-e", "signed-integer", "-r", "22050"],
        "8 kHz": ["-r", "8000"],  # telephone audio: the model is wideband, so words are lost
    }
    for name, args in variants.items():
        out = tmp_path / "v.wav"
        subprocess.run(["sox", str(source), *args, str(out)], check=True, capture_output=True)
        text = client.audio.transcriptions.create(model="stt", file=("v.wav", out.read_bytes())).text
        assert overlap(sentence, text) >= (0.5 if name != "8 kHz" else 0.1), (name, text)


def test_silence_is_empty_text(gw: Server, client: openai.OpenAI) -> None:
    silent = wav_bytes(bytes(16000 * 2 * 2))
    result = client.audio.transcriptions.create(model="stt", file=("quiet.wav", silent))
    assert result.text == ""
    events = list(client.audio.transcriptions.create(model="stt", file=("quiet.wav", silent), stream=True))
    assert [e.type for e in events] == ["transcript.text.done"] and events[0].text == ""
    assert transcribe(gw, wav_bytes(b""), response_format="text").text == "\n"  # no samples at all


def test_response_formats(gw: Server, client: openai.OpenAI) -> None:
    audio = speak(client, SHORT)
    seconds = (len(audio) - 44) / 32000
    both = {"timestamp_granularities[]": ["word", "segment"]}
    verbose = transcribe(gw, audio, response_format="verbose_json", **both).json()
    assert verbose["language"] == "english" and abs(verbose["duration"] - seconds) < 0.01
    words, segments = verbose["words"], verbose["segments"]
    assert " ".join(w["word"] for w in words) == verbose["text"] == " ".join(s["text"] for s in segments)
    assert all(0 <= w["start"] <= w["end"] <= seconds for w in words)
    assert all(a["end"] <= b["start"] + 0.01 for a, b in itertools.pairwise(words))
    assert segments[0]["start"] < 0.5 and segments[-1]["end"] > seconds - 1.0
    assert "words" not in transcribe(gw, audio, response_format="verbose_json", language="en").json()
    hello = speak(client, SENTENCES[0])  # a short clip for the text forms
    text = transcribe(gw, hello, response_format="text")
    assert text.headers["content-type"].startswith("text/plain") and text.text.endswith("\n")
    srt = transcribe(gw, hello, response_format="srt").text
    assert re.fullmatch(r"1\n00:00:00,\d{3} --> 00:00:0\d,\d{3}\n" + re.escape(text.text), srt), srt
    vtt = transcribe(gw, hello, response_format="vtt").text
    assert re.fullmatch(r"WEBVTT\n\n00:00:00\.\d{3} --> 00:00:0\d\.\d{3}\n" + re.escape(text.text), vtt), vtt


# ------------------------------------------------------------------------------ refusals


def test_bad_requests_name_the_field(gw: Server, client: openai.OpenAI) -> None:
    wav = speak(client, SENTENCES[0])
    message = assert_error(transcribe(gw, wav, language="de"), 400, "language", "unsupported_language")
    assert "English" in message
    assert transcribe(gw, wav, language="en-US").status_code == 200
    message = assert_error(transcribe(gw, b"\x00junk" * 200), 400, "file", "unsupported_format")
    assert "wav" in message and "mp3" in message  # which formats work
    mp3 = speak(client, SENTENCES[0], "mp3")
    message = assert_error(transcribe(gw, mp3, model="stt-wav"), 400, "file", "unsupported_format")
    assert "mp3" in message and "send wav" in message
    long = speak(client, LONG)
    message = assert_error(transcribe(gw, long, model="stt-short"), 400, "file", "audio_too_long")
    assert "3 seconds" in message
    flac = speak(client, LONG, "flac")  # decoded by sox, then found too long
    assert_error(transcribe(gw, flac, model="stt-short"), 400, "file", "audio_too_long")
    assert_error(transcribe(gw, b"RIFF\x00\x00\x00\x00WAVEfmt "), 400, "file", "invalid_audio")
    float16 = b"RIFF\x00\x00\x00\x00WAVEfmt " + struct.pack("<IHHIIHH", 16, 3, 1, 16000, 32000, 2, 16)
    message = assert_error(transcribe(gw, float16 + b"data\x04\x00\x00\x00\x00\x00\x00\x00"), 400, "file")
    assert "16 bits" in message
    assert_error(transcribe(gw, wav, response_format="diarized_json"), 400, "response_format")
    assert_error(transcribe(gw, wav, response_format="srt", stream="true"), 400, "response_format")
    with pytest.raises(openai.BadRequestError) as info:
        client.audio.transcriptions.create(model="stt", file=("a.wav", wav), language="fr")
    assert info.value.body["param"] == "language"  # type: ignore[index]


def test_a_bad_request_does_not_harm_a_stream_in_progress(gw: Server, client: openai.OpenAI) -> None:
    audio = speak(client, LONG)
    events: list[Any] = []
    with client.audio.transcriptions.with_streaming_response.create(
        model="stt", file=("long.wav", audio), stream=True
    ) as resp:
        lines = resp.iter_lines()
        assert_error(transcribe(gw, b"garbage" * 100), 400, "file")
        assert_error(transcribe(gw, audio, language="xx"), 400, "language")
        events = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    assert events[-1]["type"] == "transcript.text.done"
    assert "".join(e["delta"] for e in events[:-1]) == events[-1]["text"] != ""


def test_a_client_that_leaves_stops_the_decoding(gw: Server, client: openai.OpenAI) -> None:
    audio = speak(client, " ".join([LONG] * 6))  # a minute of speech: ~15 s of decoding or more
    cancelled = gw.get_json("/stats")["audio_models"]["stt"]["cancelled"]

    def stats() -> dict[str, Any]:
        return dict(gw.get_json("/stats")["audio_models"]["stt"])

    for stream in ("true", "false"):
        body, ctype = _form({"model": "stt", "stream": stream}, audio)
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
        conn.request("POST", "/v1/audio/transcriptions", body=body, headers={"content-type": ctype})
        wait_for(lambda: stats()["active"] == 1, timeout=10)
        time.sleep(0.5)  # decoding
        conn.close()  # gone before the answer (json) or between its events (stream)
        t0 = time.perf_counter()
        cancelled += 1
        wait_for(lambda: stats()["active"] == 0, timeout=10)
        # within a piece or two, not after the whole minute (~15 s); pieces take longer on a loaded machine
        assert time.perf_counter() - t0 < 5, stream
        assert stats()["cancelled"] == cancelled, stream


def _form(fields: dict[str, str], data: bytes) -> tuple[bytes, str]:
    from tokenrelay.audio import multipart

    return multipart.encode(list(fields.items()), [multipart.Part("file", data, "long.wav", "audio/wav")])


# ------------------------------------------------------------------------------ the voice socket


def test_voice_audio_is_transcribed_by_the_embedded_engine(gw: Server, client: openai.OpenAI) -> None:
    sentence = SENTENCES[5]
    audio = base64.b64encode(speak(client, sentence)).decode()
    with connect(f"ws://127.0.0.1:{gw.port}/v1/ws/voice", max_size=None) as conn:
        request = {
            "type": "request",
            "id": "v",
            "body": {"model": "demo"},  # the mock echoes the question
            "audio": {"data": audio, "model": "stt", "language": "en"},
            "speech": {"model": "speech", "response_format": "pcm"},
        }
        conn.send(json.dumps(request))
        messages: list[dict[str, Any]] = []
        while not messages or messages[-1]["type"] not in ("done", "error"):
            messages.append(json.loads(conn.recv(timeout=60)))
        assert messages[0]["type"] == "transcript", messages[0]
        transcript = messages[0]["text"]
        assert overlap(sentence, transcript) >= 0.5, transcript
        assert messages[1]["type"] == "token"
        assert "".join(m["text"] for m in messages if m["type"] == "token") == transcript
        assert messages[-1]["type"] == "done" and messages[-1]["sentences"] >= 1
        conn.send(
            json.dumps({**request, "id": "w", "audio": {"data": audio, "model": "stt", "language": "de"}})
        )
        error = json.loads(conn.recv(timeout=30))
        assert error["type"] == "error" and error["error"]["param"] == "audio.language", error
        silent = base64.b64encode(wav_bytes(bytes(32000))).decode()
        conn.send(json.dumps({**request, "id": "s", "audio": {"data": silent, "model": "stt"}}))
        error = json.loads(conn.recv(timeout=30))
        assert error["type"] == "error" and error["error"]["code"] == "empty_transcript", error
        conn.send(json.dumps({**request, "id": "j", "audio": {"data": "AAAA" * 50, "model": "stt"}}))
        error = json.loads(conn.recv(timeout=30))
        assert error["type"] == "error" and error["error"]["param"] == "audio.data", error


# ------------------------------------------------------------------------------ in process


def test_deltas_only_ever_extend_what_was_sent() -> None:
    deltas = Deltas(stable=2)
    sent = [
        deltas.partial([("the", 0, 10), ("low", 11, 20)]),
        deltas.partial([("the", 0, 10), ("low", 11, 20), ("we're", 21, 30)]),  # "the" held still twice
        deltas.partial([("the", 0, 10), ("low", 11, 20), ("world", 21, 40)]),  # so did "low"
        deltas.final([("hello", 0, 20), ("world", 21, 40), ("again", 41, 60)]),  # revised: they stand
        deltas.partial([("next", 0, 10), ("one", 11, 20)]),  # a new utterance
        deltas.final([("next", 0, 10), ("one", 11, 20)]),
    ]
    assert sent == ["", "the", " low", " world again", "", " next one"]
    assert "".join(sent) == deltas.text == "the low world again next one"


@pytest.mark.parametrize(
    ("entry", "where"),
    [
        ({"kind": "speech"}, "audio_models[0].kind"),
        ({"options": {"max_seconds": 0}}, "max_seconds"),
        ({"options": {"converters": ["mplayer"]}}, "converters[0]"),
        ({"options": {"decoder": {"no_such_option": 1}}}, "decoder.no_such_option"),
        ({"options": {"colour": "red"}}, "colour"),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, entry: dict[str, Any], where: str) -> None:
    path = tmp_path / "c.yaml"
    model = {"name": "stt", "provider": "pocketsphinx", **entry}
    path.write_text(json.dumps({"models": [{"name": "m", "provider": "mock"}], "audio_models": [model]}))
    with pytest.raises(ConfigError, match=re.escape(where)):
        load_config(path, env={})


def test_default_config_serves_the_embedded_engines() -> None:
    cfg = load_config(None, env={})
    audio = {m.name: (m.provider, m.kind) for m in cfg.audio_models}
    assert audio["stt"] == ("pocketsphinx", "transcription")
    if shutil.which("espeak-ng"):
        assert audio["tts"] == ("espeak", "speech")
