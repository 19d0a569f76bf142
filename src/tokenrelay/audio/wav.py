"""WAV framing for streams: a header for audio of unknown length, a reader for one that arrives in pieces,
and a cheap resampler.

A streamed WAV cannot know its length when its header goes out, so ``stream_header`` writes the largest
sizes a RIFF file can state (0xFFFFFFFF), which players and decoders read as "until the data ends"
(espeak-ng does the same with 0x7FFFF000). ``WavStreamReader`` takes such a stream (espeak-ng's
``--stdout``) as it arrives and hands back the PCM samples, whole 16-bit samples only.

``LinearResampler`` converts 16-bit mono PCM between rates by linear interpolation between neighbouring
samples (numpy, vectorised per chunk, state carried across chunks so chunk boundaries leave no seam). It
is the cheap choice, not the best-sounding one: there is no low-pass filter, which speech from espeak-ng
(22050 Hz, little energy above 5 kHz) up to 24 kHz does not need.
"""

from __future__ import annotations

import struct

import numpy as np

UNKNOWN_SIZE = 0xFFFFFFFF


def stream_header(sample_rate: int, channels: int = 1, bits: int = 16) -> bytes:
    """A 44-byte PCM WAV header whose RIFF and data sizes say "unknown" (the maximum)."""
    block = channels * bits // 8
    return (
        b"RIFF"
        + struct.pack("<I", UNKNOWN_SIZE)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, channels, sample_rate, sample_rate * block, block, bits)
        + b"data"
        + struct.pack("<I", UNKNOWN_SIZE)
    )


class WavFormatError(Exception):
    """The stream is not 16-bit PCM WAV."""


class WavStreamReader:
    """Feed the bytes of a WAV stream as they come; get back its PCM data (16-bit samples, never split).

    The header's sizes are ignored (a streamed WAV's are placeholders): the data runs to the end."""

    __slots__ = ("_buf", "channels", "in_data", "sample_rate")

    def __init__(self) -> None:
        self._buf = bytearray()
        self.in_data = False
        self.sample_rate = 0
        self.channels = 0

    def feed(self, data: bytes) -> bytes:
        if self.in_data and not self._buf:
            if len(data) % 2 == 0:
                return data
            self._buf += data[-1:]
            return data[:-1]
        self._buf += data
        if not self.in_data and not self._parse_header():
            return b""
        usable = len(self._buf) - len(self._buf) % 2
        out = bytes(self._buf[:usable])
        del self._buf[:usable]
        return out

    def _parse_header(self) -> bool:
        buf = self._buf
        if len(buf) < 12:
            return False
        if buf[:4] != b"RIFF" or buf[8:12] != b"WAVE":
            raise WavFormatError("not a RIFF/WAVE stream")
        pos = 12
        while True:
            if len(buf) < pos + 8:
                return False
            chunk_id = bytes(buf[pos : pos + 4])
            (size,) = struct.unpack_from("<I", buf, pos + 4)
            if chunk_id == b"data":
                if not self.sample_rate:
                    raise WavFormatError("data before the fmt chunk")
                del buf[: pos + 8]
                self.in_data = True
                return True
            if len(buf) < pos + 8 + size:
                return False
            if chunk_id == b"fmt ":
                fmt, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", buf, pos + 8)
                if fmt != 1 or bits != 16:
                    raise WavFormatError(f"expected 16-bit PCM, got format {fmt} with {bits} bits")
                self.sample_rate, self.channels = rate, channels
            pos += 8 + size + (size & 1)  # chunks are padded to an even size


class LinearResampler:
    """16-bit little-endian mono PCM from ``src`` Hz to ``dst`` Hz, chunk by chunk (see the module notes)."""

    __slots__ = ("_pos", "_step", "_tail")

    def __init__(self, src: int, dst: int) -> None:
        self._step = src / dst  # input samples per output sample
        self._pos = 0.0  # where the next output sample falls, in input samples after ``_tail``'s
        self._tail: np.ndarray | None = None  # the last input sample of the previous chunk

    def feed(self, pcm: bytes) -> bytes:
        x = np.frombuffer(pcm, dtype="<i2").astype(np.float32)
        if self._tail is not None:
            x = np.concatenate((self._tail, x))
        n = len(x)
        if n == 0:
            return b""
        last = n - 1
        count = int((last - self._pos) // self._step) + 1 if last >= self._pos else 0
        if count <= 0:
            self._tail = x[-1:]
            self._pos -= last
            return b""
        at = self._pos + self._step * np.arange(count, dtype=np.float64)
        i = at.astype(np.int64)
        frac = (at - i).astype(np.float32)
        nxt = np.minimum(i + 1, last)
        y = x[i] * (1.0 - frac) + x[nxt] * frac
        self._pos = self._pos + self._step * count - last  # relative to the new tail, x[last]
        self._tail = x[-1:]
        out: bytes = np.clip(np.rint(y), -32768, 32767).astype("<i2").tobytes()
        return out
