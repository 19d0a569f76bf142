"""Helpers for the audio tests: the programs they need, a gateway with audio models, and measuring audio
(RMS, WAV headers) with plain Python, so nothing here depends on the code under test."""

from __future__ import annotations

import array
import math
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

# espeak-ng is the embedded engine; sox checks its WAVs and makes flac; lame and opusenc make mp3 and opus
PACKAGES = {"espeak-ng": "espeak-ng", "sox": "sox", "lame": "lame", "opusenc": "opus-tools"}


def ensure_tools() -> None:
    """The audio programs, installed when missing (as root: the CI machine), never silently skipped."""
    missing = [pkg for prog, pkg in PACKAGES.items() if shutil.which(prog) is None]
    for step in (["install"], ["update"], ["install"]):  # a fresh machine may have no package lists yet
        if not [pkg for prog, pkg in PACKAGES.items() if shutil.which(prog) is None]:
            break
        args = [*step, "-y", "-q", *missing] if step == ["install"] else ["update", "-q"]
        subprocess.run(["apt-get", *args], check=False, capture_output=True)
    still = [prog for prog in PACKAGES if shutil.which(prog) is None]
    if still:
        pytest.fail(
            f"{', '.join(still)} missing and could not be installed: "
            f"apt-get install {' '.join(PACKAGES[p] for p in still)} (.ci/run does)"
        )


def audio_config(upstream_port: int, extra: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    upstream = f"http://127.0.0.1:{upstream_port}/v1"
    return {
        "server": {"keepalive_seconds": 0.5},
        "models": [
            {"name": "demo", "provider": "mock", "options": {"tokens": 12}},
            {
                "name": "chatty",  # a multi-sentence answer at a realistic rate
                "provider": "mock",
                "options": {"tokens_per_second": 25, "text": ANSWER},
            },
        ],
        "audio_models": [
            {"name": "speech", "provider": "espeak"},
            {"name": "speech-native", "provider": "espeak", "options": {"sample_rate": 22050}},
            {"name": "speech-short", "provider": "espeak", "options": {"max_input_chars": 50}},
            {"name": "speech-plain", "provider": "espeak", "options": {"encoders": []}},
            {
                "name": "tts-up",
                "kind": "speech",
                "provider": "openai",
                "base_url": upstream,
                "upstream_model": "tts-1",
                "api_key_env": "TEST_AUDIO_KEY",
            },
            {
                "name": "whisper",
                "kind": "transcription",
                "provider": "openai",
                "base_url": upstream,
                "upstream_model": "whisper-1",
                "api_key_env": "TEST_AUDIO_KEY",
            },
            {
                "name": "whisper-small",
                "kind": "transcription",
                "provider": "openai",
                "base_url": upstream,
                "options": {"max_file_bytes": 1000},
            },
            *(extra or []),
        ],
    }


ANSWER = (
    "The river starts high in the mountains, where the snow melts each spring. "
    "It runs fast through narrow valleys and slows down as the land gets flat! "
    "Have you ever seen it reach the sea at the end of a long summer? "
    "Most people say that the last mile is the most beautiful part of the journey."
)


def wav_info(data: bytes) -> tuple[int, int, int, bytes]:
    """(sample rate, channels, bits, PCM data) of a WAV, with its placeholder sizes ignored."""
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE", data[:12]
    pos = 12
    rate = channels = bits = 0
    while pos + 8 <= len(data):
        chunk, size = data[pos : pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        if chunk == b"fmt ":
            _, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", data, pos + 8)
        if chunk == b"data":
            return rate, channels, bits, data[pos + 8 :]
        pos += 8 + size
    raise AssertionError("no data chunk")


def rms(pcm: bytes) -> float:
    """Root mean square of 16-bit little-endian samples, from 0 (silence) to 1 (full scale)."""
    samples = array.array("h")
    samples.frombytes(pcm[: len(pcm) - len(pcm) % 2])
    if sys.byteorder == "big":
        samples.byteswap()
    if not samples:
        return 0.0
    return math.sqrt(sum(s * s for s in samples) / len(samples)) / 32768


def sox_info(path: Path) -> dict[str, str]:
    """``sox --i`` of a file: its header as sox reads it."""
    out = subprocess.run(["sox", "--i", str(path)], capture_output=True, text=True, check=True).stdout
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines()) if v}
