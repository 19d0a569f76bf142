"""``POST /v1/audio/speech`` and ``POST /v1/audio/transcriptions`` through a real gateway process: espeak-ng's
audio measured (sample rate, loudness, duration), streaming checked by timing, the official openai SDK on
both endpoints, the mock upstream's relay (streaming and not), and every bad request's 400 naming its field.
"""

from __future__ import annotations

import array
import base64
import http.client
import itertools
import json
import math
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from tests.audio_tools import audio_config, ensure_tools, rms, sox_info, wav_info
from tests.conftest import Server, raw_post, serving, wait_for
from websockets.sync.client import connect

from tokenrelay.audio import multipart
from tokenrelay.audio.mock_upstream import mock_pcm, mock_transcript
from tokenrelay.audio.wav import LinearResampler, WavStreamReader, stream_header
from tokenrelay.errors import GatewayError

SENTENCE = "The quick brown fox jumps over the lazy dog, and then it runs away into the forest."
LONG = " ".join(f"This is sentence number {i} of a long text that the engine reads aloud." for i in range(50))


@pytest.fixture(scope="module")
def gw(mock_upstream: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    ensure_tools()
    tmp = tmp_path_factory.mktemp("audio")
    with serving(tmp, audio_config(mock_upstream.port), env={"TEST_AUDIO_KEY": "sk-audio"}) as server:
        yield server


@pytest.fixture(scope="module")
def client(gw: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0, timeout=60)


def speech(gw: Server, **body: Any) -> httpx.Response:
    body = {"model": "speech", "voice": "alloy", "input": SENTENCE, **body}
    return httpx.post(f"{gw.url}/v1/audio/speech", json=body, timeout=60)


def assert_error(resp: httpx.Response | Any, status: int, param: str | None) -> dict[str, Any]:
    assert resp.status_code if hasattr(resp, "status_code") else resp.status == status
    body = resp.json()
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, body
    assert err["param"] == param, body
    assert err["message"]
    return err  # type: ignore[no-any-return]


# ------------------------------------------------------------------------------ speech: the audio


def test_wav_is_real_speech_at_the_declared_rate(gw: Server, tmp_path: Path) -> None:
    resp = speech(gw, response_format="wav")
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "audio/wav"
    assert resp.headers["x-audio-sample-rate"] == "24000"
    assert resp.headers["transfer-encoding"] == "chunked"
    rate, channels, bits, pcm = wav_info(resp.content)
    assert (rate, channels, bits) == (24000, 1, 16)
    assert resp.content[4:8] == b"\xff\xff\xff\xff"  # a streaming header: length unknown
    assert rms(pcm) > 0.03  # speech, not silence
    seconds = len(pcm) / 2 / rate
    words = len(SENTENCE.split())
    expected = words / 175 * 60  # espeak-ng's 175 words a minute at speed 1.0
    assert 0.5 * expected < seconds < 2.0 * expected, (seconds, expected)
    path = tmp_path / "speech.wav"
    path.write_bytes(resp.content)
    info = sox_info(path)  # an independent reader agrees on the header
    assert info["Sample Rate"] == "24000" and info["Channels"] == "1" and info["Precision"] == "16-bit"


def test_pcm_is_the_wav_without_its_header_and_native_rate_is_honest(gw: Server) -> None:
    wav = speech(gw, response_format="wav")
    pcm = speech(gw, response_format="pcm")
    assert pcm.headers["content-type"] == "audio/pcm"
    assert pcm.headers["x-audio-sample-rate"] == "24000"
    assert pcm.content == wav_info(wav.content)[3]  # deterministic, and the same samples
    native = speech(gw, model="speech-native", response_format="wav")
    rate, _, _, samples = wav_info(native.content)
    assert rate == 22050 and native.headers["x-audio-sample-rate"] == "22050"
    # the resampled audio lasts as long as espeak-ng's own (within a sample or two per chunk)
    assert abs(len(samples) / 2 / 22050 - len(pcm.content) / 2 / 24000) < 0.01
    assert rms(samples) == pytest.approx(rms(pcm.content), rel=0.05)


def test_speed_and_voices_change_the_audio(gw: Server) -> None:
    normal = speech(gw, response_format="pcm").content
    fast = speech(gw, response_format="pcm", speed=2.0).content
    assert len(fast) < 0.7 * len(normal)
    nova = speech(gw, response_format="pcm", voice="nova").content
    german = speech(gw, response_format="pcm", voice="de").content
    variant = speech(gw, response_format="pcm", voice="en-gb+klatt").content
    assert len({normal, nova, german, variant}) == 4
    assert rms(german) > 0.03


def test_long_input_streams_as_it_is_synthesized(gw: Server) -> None:
    """The first audio arrives long before the synthesis of ~4000 characters ends (chunked, not buffered)."""
    t0 = time.perf_counter()
    chunks = 0
    first = None
    size = 0
    body = {"model": "speech", "voice": "alloy", "input": LONG[:4000], "response_format": "pcm"}
    with httpx.stream("POST", f"{gw.url}/v1/audio/speech", json=body, timeout=60) as resp:
        assert resp.status_code == 200
        for chunk in resp.iter_raw():
            if first is None:
                first = time.perf_counter() - t0
            chunks += 1
            size += len(chunk)
    total = time.perf_counter() - t0
    assert first is not None
    assert chunks > 20
    assert size / 2 / 24000 > 120  # minutes of audio
    assert first < total / 3, (first, total)


def test_openai_sdk_streaming_response(client: openai.OpenAI) -> None:
    parts: list[bytes] = []
    with client.audio.speech.with_streaming_response.create(
        model="speech", voice="echo", input=SENTENCE, response_format="wav"
    ) as resp:
        assert resp.headers["content-type"] == "audio/wav"
        for chunk in resp.iter_bytes():
            parts.append(chunk)
    rate, _, _, pcm = wav_info(b"".join(parts))
    assert rate == 24000 and rms(pcm) > 0.03


def _is_mp3(data: bytes) -> bool:
    return data[:3] == b"ID3" or (data[0] == 0xFF and data[1] & 0xE0 == 0xE0)


@pytest.mark.parametrize(
    ("fmt", "program", "check"),
    [
        ("mp3", "lame", _is_mp3),
        ("opus", "opusenc", lambda d: d[:4] == b"OggS" and b"OpusHead" in d[:100]),
        ("flac", "sox", lambda d: d[:4] == b"fLaC"),
    ],
)
def test_compressed_formats_stream_through_an_installed_encoder(
    gw: Server, fmt: str, program: str, check: Any
) -> None:
    resp = speech(gw, response_format=fmt)
    if shutil.which(program) is None and shutil.which("ffmpeg") is None:
        assert_error(resp, 400, "response_format")  # no encoder: a clear refusal
        return
    assert resp.status_code == 200, resp.text
    assert check(resp.content)
    assert len(resp.content) > 2000


def test_compressed_formats_without_an_encoder_are_a_400(gw: Server) -> None:
    for fmt in ("mp3", "opus", "flac", "aac"):
        err = assert_error(speech(gw, model="speech-plain", response_format=fmt), 400, "response_format")
        assert fmt in err["message"] and "wav or pcm" in err["message"]
    assert speech(gw, model="speech-plain", response_format="wav").status_code == 200


def test_sse_stream_format(gw: Server) -> None:
    resp = speech(gw, response_format="pcm", stream_format="sse")
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in resp.text.split("\n") if line.startswith("data: ")]
    audio = b"".join(base64.b64decode(e["audio"]) for e in events if e["type"] == "speech.audio.delta")
    assert events[-1]["type"] == "speech.audio.done"
    assert events[-1]["usage"]["input_tokens"] == len(SENTENCE)
    assert audio == speech(gw, response_format="pcm").content


@pytest.mark.parametrize(
    ("body", "param", "status"),
    [
        ({"input": None}, "input", 400),
        ({"input": "   "}, "input", 400),
        ({"voice": "nobody"}, "voice", 400),
        ({"voice": {"id": "voice_123"}}, "voice", 400),
        ({"response_format": "ogg"}, "response_format", 400),
        ({"speed": 5}, "speed", 400),
        ({"model": "speech-short"}, "input", 400),  # over its 50 characters
        ({"model": "demo"}, "model", 400),  # a chat model
        ({"model": "whisper"}, "model", 400),  # a transcription model
        ({"model": "nope"}, "model", 404),
        ({"stream_format": "bytes"}, "stream_format", 400),
    ],
)
def test_bad_speech_requests_name_the_field(
    gw: Server, body: dict[str, Any], param: str, status: int
) -> None:
    full = {"model": "speech", "voice": "alloy", "input": SENTENCE, **body}
    full = {k: v for k, v in full.items() if v is not None}
    resp = httpx.post(f"{gw.url}/v1/audio/speech", json=full, timeout=30)
    assert resp.status_code == status, resp.text
    assert_error(resp, status, param)


def test_bad_speech_requests_through_the_sdk(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.audio.speech.create(model="speech", voice="nobody", input="hi", response_format="wav")
    assert info.value.body["param"] == "voice"  # type: ignore[index]
    resp = raw_post(int(client.base_url.port or 0), "/v1/audio/speech", b"{not json")
    assert resp.status == 400 and resp.json()["error"]["code"] == "invalid_json"


def test_a_client_that_leaves_stops_the_synthesis(gw: Server) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
    body = json.dumps({"model": "speech", "voice": "alloy", "input": LONG[:4000], "response_format": "pcm"})
    conn.request("POST", "/v1/audio/speech", body=body, headers={"content-type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    resp.read(1000)
    conn.close()
    wait_for(lambda: gw.get_json("/stats")["audio_models"]["speech"]["active"] == 0, timeout=10)


# ------------------------------------------------------------------------------ speech: the upstream


def test_upstream_speech_is_relayed_as_it_streams(gw: Server, mock_upstream: Server) -> None:
    text = "Relay this text through the upstream."
    t0 = time.perf_counter()
    arrivals: list[float] = []
    parts: list[bytes] = []
    body = {
        "model": "tts-up",
        "voice": "alloy",
        "input": text,
        "response_format": "pcm",
        "mock": {"chunk_ms": 200, "delay_ms": 60},
    }
    with httpx.stream("POST", f"{gw.url}/v1/audio/speech", json=body, timeout=30) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"] == "audio/pcm"
        for chunk in resp.iter_raw():
            arrivals.append(time.perf_counter() - t0)
            parts.append(chunk)
    assert b"".join(parts) == mock_pcm(len(text))
    assert len(arrivals) >= 5 and arrivals[0] < arrivals[-1] - 0.2  # piece by piece, as sent
    seen = mock_upstream.get_json("/mock/stats")["audio"]["speech"]
    assert seen["body"]["model"] == "tts-1" and seen["body"]["voice"] == "alloy"
    assert seen["authorization"] == "Bearer sk-audio"


def test_upstream_speech_errors_and_cuts(gw: Server) -> None:
    err = assert_error(speech(gw, model="tts-up", response_format="mp3"), 400, "response_format")
    assert "mock upstream" in err["message"]  # the upstream's own 400, passed on
    resp = speech(gw, model="tts-up", response_format="pcm", mock={"error_status": 503})
    assert resp.status_code == 503
    body = {"model": "tts-up", "voice": "alloy", "input": SENTENCE, "response_format": "pcm"}
    body["mock"] = {"cut_after": 3, "chunk_ms": 50}
    with pytest.raises(httpx.RemoteProtocolError):  # cut off: never a short file that looks whole
        httpx.post(f"{gw.url}/v1/audio/speech", json=body, timeout=30)


def test_speech_usage_is_counted_in_characters(gw: Server) -> None:
    text = "Count these characters, please."
    assert speech(gw, input=text, model="speech-native", response_format="pcm").status_code == 200

    def recorded() -> Any:
        usage = gw.get_json("/v1/usage")
        return usage["by_model"].get("speech-native")

    wait_for(recorded, timeout=10)
    mine = [r for r in gw.get_json("/v1/usage")["recent"] if r["model"] == "speech-native"]
    assert mine[0]["prompt_tokens"] == len(text) and mine[0]["protocol"] == "audio.speech"
    assert mine[0]["status"] == 200 and mine[0]["ttft_ms"] is not None


def test_models_list_and_readiness_include_audio_models(gw: Server) -> None:
    ids = {m["id"] for m in gw.get_json("/v1/models")["data"]}
    assert {"speech", "tts-up", "whisper", "demo"} <= ids
    assert gw.get_json("/readyz")["models"]["speech"] == "ready"
    assert "pcm" in gw.get_json("/stats")["audio_models"]["speech"]["formats"]


# ------------------------------------------------------------------------------ transcription


def test_transcription_through_the_sdk(client: openai.OpenAI, mock_upstream: Server) -> None:
    audio = speech_bytes(client)
    result = client.audio.transcriptions.create(
        file=("question.wav", audio, "audio/wav"), model="whisper", language="en", prompt="rivers"
    )
    assert result.text == mock_transcript("question.wav", len(audio))
    seen = mock_upstream.get_json("/mock/stats")["audio"]["transcription"]
    assert seen["fields"]["model"] == "whisper-1"  # renamed to the upstream's model
    assert seen["fields"]["language"] == "en" and seen["fields"]["prompt"] == "rivers"
    assert seen["bytes"] == len(audio) and seen["filename"] == "question.wav"
    assert seen["authorization"] == "Bearer sk-audio"


def speech_bytes(client: openai.OpenAI) -> bytes:
    return client.audio.speech.create(
        model="speech", voice="alloy", input="Hello", response_format="wav"
    ).content


def test_streamed_transcription_is_relayed_as_it_arrives(client: openai.OpenAI) -> None:
    audio = b"RIFF" + bytes(3000)
    expected = mock_transcript("clip.wav", len(audio))
    t0 = time.perf_counter()
    stream = client.audio.transcriptions.create(
        file=("clip.wav", audio), model="whisper", stream=True, extra_body={"mock_delay_ms": "60"}
    )
    deltas: list[tuple[float, str]] = []
    done = None
    for event in stream:
        if event.type == "transcript.text.delta":
            deltas.append((time.perf_counter() - t0, event.delta))
        elif event.type == "transcript.text.done":
            done = event
    assert done is not None and done.text == expected
    assert "".join(d for _, d in deltas) == expected
    assert len(deltas) == len(expected.split(" "))
    assert deltas[0][0] < deltas[-1][0] - 0.3  # one by one, not all at the end
    assert done.usage is not None and done.usage.output_tokens == len(expected.split())


def test_transcription_text_format_and_usage(gw: Server) -> None:
    files = {"file": ("a.wav", b"RIFF" + bytes(500), "audio/wav")}
    resp = httpx.post(
        f"{gw.url}/v1/audio/transcriptions",
        files=files,
        data={"model": "whisper", "response_format": "text"},
        timeout=30,
    )
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    assert resp.text.strip() == mock_transcript("a.wav", 504)

    def records() -> Any:
        return [r for r in gw.get_json("/v1/usage")["recent"] if r["protocol"] == "audio.transcriptions"]

    wait_for(records, timeout=10)


def post_form(gw: Server, data: dict[str, str], files: dict[str, Any] | None, **kw: Any) -> httpx.Response:
    return httpx.post(f"{gw.url}/v1/audio/transcriptions", data=data, files=files, timeout=30, **kw)


WAV_FILE = {"file": ("a.wav", b"RIFF" + bytes(100), "audio/wav")}


@pytest.mark.parametrize(
    ("data", "files", "param", "status"),
    [
        ({"model": "whisper"}, None, "file", 400),
        ({}, WAV_FILE, "model", 400),
        ({"model": "whisper", "stream": "maybe"}, WAV_FILE, "stream", 400),
        ({"model": "whisper", "response_format": "mp3"}, WAV_FILE, "response_format", 400),
        ({"model": "whisper", "temperature": "3"}, WAV_FILE, "temperature", 400),
        ({"model": "speech"}, WAV_FILE, "model", 400),
        ({"model": "demo"}, WAV_FILE, "model", 400),
        ({"model": "nope"}, WAV_FILE, "model", 404),
        ({"model": "whisper-small"}, {"file": ("big.wav", bytes(5000))}, "file", 413),
        ({"model": "whisper", "mock_error_status": "429"}, WAV_FILE, None, 429),
    ],
)
def test_bad_transcription_requests_name_the_field(
    gw: Server, data: dict[str, str], files: Any, param: str | None, status: int
) -> None:
    if files is None:  # a form with no file part: still multipart
        files = {"note": (None, "x")}
    resp = post_form(gw, data, files)
    assert resp.status_code == status, resp.text
    assert_error(resp, status, param)


def test_transcription_needs_multipart(gw: Server) -> None:
    resp = httpx.post(f"{gw.url}/v1/audio/transcriptions", json={"model": "whisper"}, timeout=30)
    assert resp.status_code == 415
    resp = httpx.post(
        f"{gw.url}/v1/audio/transcriptions",
        content=b"--x\r\nbroken",
        headers={"content-type": "multipart/form-data; boundary=x"},
        timeout=30,
    )
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_multipart"


def test_sdk_raises_for_a_missing_model_kind(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.audio.transcriptions.create(file=("a.wav", b"RIFF"), model="speech")
    assert info.value.body["param"] == "model"  # type: ignore[index]


def test_an_audio_model_on_the_chat_endpoint_says_where_it_is_served(client: openai.OpenAI) -> None:
    for model, endpoint in (("speech", "/v1/audio/speech"), ("whisper", "/v1/audio/transcriptions")):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
        body = info.value.body
        assert isinstance(body, dict)
        assert body["param"] == "model"
        assert body["code"] == "wrong_model_kind"
        assert endpoint in body["message"]


# ------------------------------------------------------------------------------ the pieces, in process


def test_resampler_chunks_leave_no_seam_and_keep_the_pitch() -> None:
    src = array.array("h", (round(10000 * math.sin(2 * math.pi * 440 * i / 22050)) for i in range(22050)))
    data = src.tobytes()
    whole = LinearResampler(22050, 24000).feed(data)
    rng = random.Random(7)
    chunked = LinearResampler(22050, 24000)
    out, pos = [], 0
    while pos < len(data):
        step = rng.randrange(2, 3000, 2)
        out.append(chunked.feed(data[pos : pos + step]))
        pos += step
    assert b"".join(out) == whole
    assert abs(len(whole) / 2 - 24000) <= 2
    samples = array.array("h")
    samples.frombytes(whole)
    crossings = sum(1 for a, b in itertools.pairwise(samples) if a < 0 <= b)
    assert crossings in (439, 440)  # still 440 Hz over the one second


def test_wav_reader_takes_any_split() -> None:
    body = stream_header(22050) + bytes(range(256)) * 4
    reader = WavStreamReader()
    pcm = b"".join(reader.feed(body[i : i + 3]) for i in range(0, len(body), 3))
    assert pcm == bytes(range(256)) * 4 and reader.sample_rate == 22050


def test_multipart_parser() -> None:
    body, ctype = multipart.encode([("model", "whisper"), ("prompt", 'say "hi"; ok')], [])
    boundary = multipart.boundary_of(ctype.encode())
    parts = multipart.parse(body, boundary)
    assert [(p.name, p.text()) for p in parts] == [("model", "whisper"), ("prompt", 'say "hi"; ok')]
    raw = (
        b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename*=UTF-8''caf%C3%A9.wav\r\n"
        b'Content-Type: audio/wav\r\n\r\nRIFF\r\n--b\r\nContent-Disposition: form-data; name="x"\r\n\r\n'
        b"1\r\n--b--\r\n"
    )
    parts = multipart.parse(raw, b"b")
    assert parts[0].filename == "caf\u00e9.wav" and parts[0].data == b"RIFF"
    assert parts[0].content_type == "audio/wav" and parts[1].data == b"1"
    for broken in (b'--b\r\nContent-Disposition: form-data; name="x"\r\n\r\n1', b"no boundary here"):
        with pytest.raises(GatewayError) as info:
            multipart.parse(broken, b"b")
        assert info.value.status == 400


def test_keys_and_plans_apply_to_audio(mock_upstream: Server, tmp_path: Path) -> None:
    admin = "audio-admin-secret"
    with serving(tmp_path, audio_config(mock_upstream.port), env={"TOKENRELAY_ADMIN_KEY": admin}) as gw:

        def new_key(models: list[str] | None) -> str:
            resp = httpx.post(
                f"{gw.url}/admin/keys",
                json={"plan": "pro", "models": models},
                headers={"authorization": f"Bearer {admin}"},
                timeout=10,
            )
            assert resp.status_code == 201, resp.text
            return str(resp.json()["key"])

        speech_only, chat_only = new_key(["speech"]), new_key(["demo"])
        body = {"model": "speech", "voice": "alloy", "input": "Who may speak?", "response_format": "pcm"}
        url = f"{gw.url}/v1/audio/speech"
        wait_for(lambda: httpx.post(url, json=body, timeout=10).status_code == 401, timeout=10)
        ok = httpx.post(url, json=body, headers={"authorization": f"Bearer {speech_only}"}, timeout=30)
        assert ok.status_code == 200 and rms(ok.content) > 0.03
        refused = httpx.post(url, json=body, headers={"authorization": f"Bearer {chat_only}"}, timeout=30)
        assert_error(refused, 403, "model")
        files = {"file": ("a.wav", b"RIFF" + bytes(100))}
        resp = httpx.post(
            f"{gw.url}/v1/audio/transcriptions",
            data={"model": "whisper"},
            files=files,
            headers={"authorization": f"Bearer {speech_only}"},
            timeout=30,
        )
        assert_error(resp, 403, "model")
        with pytest.raises(Exception, match=r"401|403"):  # the voice socket checks the key at the handshake
            connect(f"ws://127.0.0.1:{gw.port}/v1/ws/voice").close()
