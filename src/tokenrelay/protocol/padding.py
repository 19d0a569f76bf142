"""Side-channel padding: streamed chunk sizes leak token lengths to anyone watching encrypted traffic.

Like OpenAI's ``obfuscation`` field, each padded event gets random characters so that its size says little
about the token inside: the padding brings the event's content up to the next multiple of ``BUCKET`` bytes
and then adds a random 0..``BUCKET``-1 more. Characters are slices of a per-process random pool and the
lengths come from a seeded PRNG, so padding costs a slice and one random number per event (one
``getrandbits`` call: ``randrange`` is pure Python and cost more than the rest of the chunk's encoding).

On by default for the OpenAI endpoints (off with ``stream_options.include_obfuscation: false``); any
protocol can ask with the header ``x-tokenrelay-obfuscation: on`` (or ``off``). Anthropic streams carry it
as an SSE comment line before the event, which every SSE parser skips.
"""

from __future__ import annotations

import random
import secrets
import string

BUCKET = 32
_POOL = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(8192)).encode()
_rng = random.Random(secrets.randbits(64))
_LEN_BITS = BUCKET.bit_length() - 1  # BUCKET is a power of two: its low bits pick the extra length
_STARTS = len(_POOL) - 2 * BUCKET
_BITS = _LEN_BITS + 24  # 24 bits pick the start, modulo 8,128: a bias far below anything observable


def padding(size: int) -> bytes:
    """Random characters for an event whose variable part is ``size`` bytes."""
    bits = _rng.getrandbits(_BITS)
    n = (-size) % BUCKET + (bits & (BUCKET - 1))
    start = (bits >> _LEN_BITS) % _STARTS
    return _POOL[start : start + n]


def obfuscation_field(size: int) -> bytes:
    """``,"obfuscation":"..."`` for a JSON event (the OpenAI wire field)."""
    return b',"obfuscation":"' + padding(size) + b'"'


def comment(size: int) -> bytes:
    """An SSE comment line of padding, for protocols whose events have no room for a field."""
    return b": " + padding(size) + b"\n"
