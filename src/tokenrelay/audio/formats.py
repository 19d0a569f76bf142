"""Audio formats: media types, and the external encoders that compressed formats stream through.

``pcm`` (16-bit little-endian mono, no header) and ``wav`` (a streaming header, then that PCM) are the
gateway's own. ``mp3``, ``opus``, ``aac`` and ``flac`` need an encoder program on ``PATH``; each reads a
WAV stream on stdin and writes its format on stdout as it goes, so the encoded audio streams too. Which
programs a model may use is its ``options.encoders`` (the order is the preference); a format none of
them can make is a 400 naming ``response_format``.
"""

from __future__ import annotations

import shutil

FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")  # OpenAI's response_format values

MEDIA_TYPES = {
    "mp3": "audio/mpeg",
    "opus": "audio/ogg; codecs=opus",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}

# program -> {format: argv}; every command reads WAV on stdin and writes to stdout, resampling to the
# output rate where the format has one (opus encodes at 48 kHz whatever it is given)
_ENCODERS: dict[str, dict[str, list[str]]] = {
    "lame": {"mp3": ["lame", "--quiet", "--resample", "{khz}", "-m", "m", "-b", "64", "-", "-"]},
    "opusenc": {"opus": ["opusenc", "--quiet", "--max-delay", "100", "--bitrate", "32", "-", "-"]},
    "sox": {"flac": ["sox", "-q", "--ignore-length", "-t", "wav", "-", "-r", "{rate}", "-t", "flac", "-"]},
    "ffmpeg": {
        fmt: [
            "ffmpeg",
            "-hide_banner",
            "-loglevel",
            "error",
            "-f",
            "wav",
            "-ignore_length",
            "1",
            "-i",
            "pipe:0",
            "-ac",
            "1",
            "-ar",
            "{rate}" if fmt != "opus" else "48000",
            *codec,
            "pipe:1",
        ]
        for fmt, codec in {
            "mp3": ["-c:a", "libmp3lame", "-b:a", "64k", "-f", "mp3"],
            "opus": ["-c:a", "libopus", "-b:a", "32k", "-f", "ogg"],
            "aac": ["-c:a", "aac", "-b:a", "64k", "-f", "adts"],
            "flac": ["-c:a", "flac", "-f", "flac"],
        }.items()
    },
}

KNOWN_ENCODERS = tuple(_ENCODERS)


def encoder_command(fmt: str, allowed: list[str], sample_rate: int) -> list[str] | None:
    """The first allowed encoder on PATH that makes ``fmt``, as an argv; None if there is none."""
    for program in allowed:
        argv = _ENCODERS.get(program, {}).get(fmt)
        if argv is None:
            continue
        path = shutil.which(program)
        if path is None:
            continue
        khz = f"{sample_rate / 1000:g}"
        return [path, *(a.replace("{rate}", str(sample_rate)).replace("{khz}", khz) for a in argv[1:])]
    return None


def missing_encoder_message(fmt: str, allowed: list[str]) -> str:
    makers = [p for p in allowed if fmt in _ENCODERS.get(p, {})]
    if not makers:
        return f"response_format '{fmt}' is not enabled for this model; use wav or pcm."
    which = makers[0] if len(makers) == 1 else "one of " + ", ".join(makers)
    return f"response_format '{fmt}' needs {which} on the gateway's PATH (not installed); use wav or pcm."
