"""Uploaded audio to what the embedded recognizer takes: 16 kHz mono 16-bit PCM.

WAV is read here with numpy: integer PCM of 8, 16, 24 or 32 bits, IEEE float of 32 or 64 bits (plain or
``WAVE_FORMAT_EXTENSIBLE``), any rate from 1 to 384 kHz, any number of channels (averaged to mono), then
resampled to 16 kHz by ``LinearResampler`` (wav.py). The sizes in the header are not trusted: a data
chunk that claims more than the file holds (a streamed WAV's 0xFFFFFFFF, lame's 0x7FFFFFFF) or nothing
at all runs to the end of the file, cut to whole sample frames.

Every other format is recognised by its first bytes and piped through a program on ``PATH`` that writes
WAV on stdout (formats are never guessed from the file name or the client's content type): flac, Ogg
Vorbis and AIFF through ``sox``, mp3 through ``lame --decode``, Ogg Opus through ``opusdec``, and any of
them plus webm, mp4/m4a and AAC through ``ffmpeg``. The programs' output is read as it comes and cut off
past what ``max_seconds`` of audio can take, so a small file that decodes to hours (flac of silence
compresses to almost nothing) costs no more than the limit. What cannot be read is an ``AudioInputError``,
which the caller turns into a 400 naming the field.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import struct
from typing import Any

import numpy as np

from tokenrelay.audio.wav import LinearResampler

RATE = 16000  # what the recognizer takes
WAV_HEADER_SLACK = 4096  # a converter's WAV header and odd chunks, on top of the samples

# format -> the programs that decode it to WAV on stdout, in order of preference
_SOX_OUT = ["-t", "wav", "-r", str(RATE), "-c", "1", "-b", "16", "-e", "signed-integer", "-"]
_FFMPEG = ["-hide_banner", "-loglevel", "error", "-i", "pipe:0", "-vn", "-ac", "1", "-ar", str(RATE)]
_FFMPEG_OUT = [*_FFMPEG, "-c:a", "pcm_s16le", "-f", "wav", "pipe:1"]
_PROGRAMS: dict[str, list[tuple[str, list[str]]]] = {
    "flac": [("sox", ["-V1", "-t", "flac", "-", *_SOX_OUT]), ("ffmpeg", _FFMPEG_OUT)],
    "ogg vorbis": [("sox", ["-V1", "-t", "ogg", "-", *_SOX_OUT]), ("ffmpeg", _FFMPEG_OUT)],
    "aiff": [("sox", ["-V1", "-t", "aiff", "-", *_SOX_OUT]), ("ffmpeg", _FFMPEG_OUT)],
    "mp3": [
        ("lame", ["--quiet", "--decode", "--mp3input", "-", "-"]),
        ("sox", ["-V1", "-t", "mp3", "-", *_SOX_OUT]),
        ("ffmpeg", _FFMPEG_OUT),
    ],
    "ogg opus": [
        ("opusdec", ["--quiet", "--rate", str(RATE), "--force-wav", "-", "-"]),
        ("ffmpeg", _FFMPEG_OUT),
    ],
    "ogg": [("ffmpeg", _FFMPEG_OUT)],  # another codec in Ogg (Speex, FLAC)
    "webm": [("ffmpeg", _FFMPEG_OUT)],
    "mp4": [("ffmpeg", _FFMPEG_OUT)],  # m4a too; an index at the end of the file cannot be read from a pipe
    "aac": [("ffmpeg", _FFMPEG_OUT)],
}
# the most bytes a second of each program's output can take: sox and ffmpeg write 16 kHz mono, opusdec
# 16 kHz in the file's channels (at most stereo), lame the mp3's own rate and channels (48 kHz stereo)
_BYTES_PER_SECOND = {"sox": 32000, "ffmpeg": 32000, "opusdec": 64000, "lame": 192000}
# sox reads a format only when its build has the library: the format name in `sox -h` for each
_SOX_TYPES = {"flac": "flac", "ogg vorbis": "ogg", "aiff": "aiff", "mp3": "mp3"}
KNOWN_CONVERTERS = ("sox", "lame", "opusdec", "ffmpeg")


class AudioInputError(Exception):
    """The upload cannot be read; the message is for the client."""


class AudioTooLongError(AudioInputError):
    """The upload holds more audio than the model takes."""


def sniff(data: bytes) -> str | None:
    """A file's format by its first bytes: ``wav``, ``flac``, ``mp3``, ``ogg opus`` ...; None if unknown."""
    head = data[:4]
    if head == b"RIFF" and data[8:12] == b"WAVE":
        return "wav"
    if head == b"fLaC":
        return "flac"
    if head == b"OggS":
        first_page = data[:512]
        if b"OpusHead" in first_page:
            return "ogg opus"
        if b"\x01vorbis" in first_page:
            return "ogg vorbis"
        return "ogg"
    if head == b"FORM" and data[8:12] in (b"AIFF", b"AIFC"):
        return "aiff"
    if head == b"\x1a\x45\xdf\xa3":
        return "webm"  # Matroska's EBML header
    if data[4:8] == b"ftyp":
        return "mp4"
    if data[:3] == b"ID3":
        return "mp3"
    if len(data) >= 2 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0:
        # an MPEG audio frame's sync word; layer bits 00 is AAC's ADTS, anything else mp3
        return "aac" if data[1] & 0x06 == 0 else "mp3"
    return None


class WavFormat:
    """Where a WAV's samples are and what they are."""

    __slots__ = ("bits", "channels", "is_float", "offset", "rate", "size")

    def __init__(self, rate: int, channels: int, bits: int, is_float: bool, offset: int, size: int) -> None:
        self.rate = rate
        self.channels = channels
        self.bits = bits
        self.is_float = is_float
        self.offset = offset  # of the first sample in the file
        self.size = size  # bytes of whole sample frames

    @property
    def frames(self) -> int:
        return self.size // (self.channels * self.bits // 8)

    @property
    def seconds(self) -> float:
        return self.frames / self.rate


def read_wav_header(data: bytes) -> WavFormat:
    """The format and data chunk of a RIFF/WAVE file (see the module notes on sizes)."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise AudioInputError("not a RIFF/WAVE file")
    pos = 12
    fmt: tuple[int, int, int, int] | None = None  # (format tag, channels, rate, bits)
    while pos + 8 <= len(data):
        chunk_id = data[pos : pos + 4]
        (size,) = struct.unpack_from("<I", data, pos + 4)
        body = pos + 8
        if chunk_id == b"fmt ":
            if size < 16 or body + 16 > len(data):
                raise AudioInputError("the WAV's fmt chunk is cut short")
            tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", data, body)
            if tag == 0xFFFE and size >= 40 and body + 40 <= len(data):  # WAVE_FORMAT_EXTENSIBLE
                (tag,) = struct.unpack_from("<H", data, body + 24)  # the sub-format GUID's first two bytes
            fmt = (tag, channels, rate, bits)
        elif chunk_id == b"data":
            if fmt is None:
                raise AudioInputError("the WAV has its data before its fmt chunk")
            return _format(fmt, body, min(size, len(data) - body) or len(data) - body)
        pos = body + size + (size & 1)  # chunks are padded to an even size
    raise AudioInputError("the WAV has no data chunk" if fmt else "the WAV has no fmt chunk")


def _format(fmt: tuple[int, int, int, int], offset: int, size: int) -> WavFormat:
    tag, channels, rate, bits = fmt
    if tag == 1:
        is_float = False
        if bits not in (8, 16, 24, 32):
            raise AudioInputError(f"WAV PCM of {bits} bits is not supported (8, 16, 24 or 32)")
    elif tag == 3:
        is_float = True
        if bits not in (32, 64):
            raise AudioInputError(f"WAV float of {bits} bits is not supported (32 or 64)")
    else:
        raise AudioInputError(f"WAV encoding {tag:#06x} is not supported (PCM or IEEE float)")
    if not 1 <= channels <= 64:
        raise AudioInputError(f"a WAV with {channels} channels is not supported")
    if not 1000 <= rate <= 384000:
        raise AudioInputError(f"a WAV at {rate} Hz is not supported (1000 to 384000)")
    frame = channels * bits // 8
    return WavFormat(rate, channels, bits, is_float, offset, size - size % frame)


def wav_to_pcm16k(data: bytes, fmt: WavFormat) -> bytes:
    """The WAV's samples as 16 kHz mono 16-bit little-endian PCM (CPU-bound: run it in a thread)."""
    raw = memoryview(data)[fmt.offset : fmt.offset + fmt.size]
    samples: np.ndarray[Any, Any]
    if fmt.is_float:
        samples = np.frombuffer(raw, dtype="<f4" if fmt.bits == 32 else "<f8") * 32768.0
        samples = np.nan_to_num(samples, nan=0.0, posinf=32767.0, neginf=-32768.0)
    elif fmt.bits == 8:
        samples = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) * 256.0
    elif fmt.bits == 16:
        samples = np.frombuffer(raw, dtype="<i2")
    elif fmt.bits == 24:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        value = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        samples = (value - ((value & 0x800000) << 1)) / 256.0  # sign-extend, then to 16-bit scale
    else:
        samples = np.frombuffer(raw, dtype="<i4") / 65536.0
    if fmt.channels > 1:
        samples = samples.reshape(-1, fmt.channels).mean(axis=1)
    if samples.dtype != np.dtype("<i2"):
        samples = np.clip(np.rint(samples), -32768, 32767).astype("<i2")
    pcm: bytes = samples.tobytes()
    if fmt.rate == RATE:
        return pcm
    return LinearResampler(fmt.rate, RATE).feed(pcm)


class Converters:
    """The decoding programs found on ``PATH`` (looked up once, at start-up), by format."""

    def __init__(self, allowed: list[str]) -> None:
        self.allowed = allowed
        self.by_format: dict[str, tuple[str, list[str]]] = {}  # format -> (program, argv)

    async def find(self) -> None:
        paths = {p: shutil.which(p) for p in self.allowed}
        sox_types: set[str] = set()
        if paths.get("sox"):
            sox_types = await _sox_types(str(paths["sox"]))
        for fmt, programs in _PROGRAMS.items():
            usable = [
                (p, [str(paths[p]), *args])
                for p, args in programs
                if paths.get(p) and (p != "sox" or _SOX_TYPES.get(fmt) in sox_types)
            ]
            usable.sort(key=lambda item: self.allowed.index(item[0]))
            if usable:
                self.by_format[fmt] = usable[0]

    @property
    def formats(self) -> list[str]:
        return ["wav", *self.by_format]

    def unsupported(self, fmt: str | None) -> str:
        """The 400's message for a file in ``fmt`` (None: not recognised)."""
        works = ", ".join(self.formats)
        if fmt is None:
            return f"The file is not audio in a format this model reads ({works})."
        makers = [p for p, _ in _PROGRAMS.get(fmt, []) if p in self.allowed]
        need = " or ".join(makers) if makers else "a decoder"
        return f"The file is {fmt}, which needs {need} on the gateway's PATH (not installed); send {works}."

    async def decode(self, data: bytes, fmt: str, max_seconds: float, time_limit: float) -> bytes:
        """The file as a WAV, from its program (the caller reads the WAV)."""
        program, argv = self.by_format[fmt]
        limit = int(max_seconds * _BYTES_PER_SECOND[program]) + WAV_HEADER_SLACK
        return await run_converter(program, argv, data, limit, time_limit)


async def _sox_types(sox: str) -> set[str]:
    proc = await asyncio.create_subprocess_exec(
        sox, "-h", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    out, _ = await proc.communicate()
    for line in out.decode("utf-8", "replace").splitlines():
        if line.startswith("AUDIO FILE FORMATS:"):
            return set(line.split(":", 1)[1].split())
    return set()


async def run_converter(program: str, argv: list[str], data: bytes, limit: int, time_limit: float) -> bytes:
    """Pipe ``data`` through ``argv``; its stdout, or ``AudioInputError``. Output past ``limit`` bytes is
    ``AudioTooLongError`` (the program is killed at once); stdin is written while stdout is read, so
    neither pipe can fill up and stall the other."""
    pipe = asyncio.subprocess.PIPE
    proc = await asyncio.create_subprocess_exec(*argv, stdin=pipe, stdout=pipe, stderr=pipe)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    stdin, stderr = proc.stdin, proc.stderr

    async def feed() -> None:
        with contextlib.suppress(OSError):  # it stopped reading: its exit status says why
            stdin.write(data)
            await stdin.drain()
            stdin.close()

    loop = asyncio.get_running_loop()
    writer = loop.create_task(feed())
    errors = loop.create_task(stderr.read(64 * 1024))
    out = bytearray()
    try:
        async with asyncio.timeout(time_limit):
            while chunk := await proc.stdout.read(256 * 1024):
                out += chunk
                if len(out) > limit:
                    raise AudioTooLongError("more audio than this model takes")
            rc = await proc.wait()
            err = await errors
    except TimeoutError:
        raise AudioInputError(f"{program} did not finish decoding the file in {time_limit:g} s") from None
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        writer.cancel()
        errors.cancel()
    if rc != 0:
        lines = err.decode("utf-8", "replace").strip().splitlines()
        why = lines[-1][:200] if lines else f"exit status {rc}"
        raise AudioInputError(f"{program} could not decode the file: {why}")
    return bytes(out)
