"""Incremental Server-Sent Events parser for upstream streams (WHATWG rules, minus what we never need).

Fed whatever bytes one socket read brought; returns the complete events in them. Handles LF, CRLF and
lone CR line ends (also a CRLF split across two reads), comments, multi-line ``data``, and events of any
size up to ``max_event_bytes`` (aiohttp's line reader gives up at 128 KiB; this does not). An event cut
off at end of stream is never dispatched: the caller sees it as truncation.
"""

from __future__ import annotations

from typing import NamedTuple


class SSEEvent(NamedTuple):
    event: str | None
    data: bytes
    id: str | None = None  # the last ``id:`` field of the event (tokenrelay's resume endpoint numbers events)


_new = tuple.__new__


class SSEError(Exception):
    pass


class SSEParser:
    __slots__ = ("_buf", "_pending_cr", "max_event_bytes")

    def __init__(self, max_event_bytes: int = 16 * 1024 * 1024) -> None:
        self._buf = b""
        self._pending_cr = False
        self.max_event_bytes = max_event_bytes

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        if (
            not self._buf
            and not self._pending_cr
            and chunk.startswith(b"data: ")
            and chunk.find(b"\n") == len(chunk) - 2
            and chunk.endswith(b"\n\n")
            and b"\r" not in chunk
        ):
            # the common read on a relay: exactly one event of one data line ("data: ...\n\n"); built
            # with tuple.__new__ because a NamedTuple's own constructor is a Python function
            return [_new(SSEEvent, (None, chunk[6:-2], None))]
        if self._pending_cr:
            # a CR ended the previous read: a LF starting this one belongs to it
            self._pending_cr = False
            if chunk.startswith(b"\n"):
                chunk = chunk[1:]
        if b"\r" in chunk:
            if chunk.endswith(b"\r"):
                self._pending_cr = True
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        buf = self._buf + chunk if self._buf else chunk
        end = buf.rfind(b"\n\n")
        if end < 0:
            if len(buf) > self.max_event_bytes:
                raise SSEError(f"upstream event larger than {self.max_event_bytes} bytes")
            self._buf = buf
            return []
        self._buf = buf[end + 2 :]
        events: list[SSEEvent] = []
        for block in buf[:end].split(b"\n\n"):
            if not block:
                continue
            if block.startswith(b"data: ") and b"\n" not in block:
                events.append(SSEEvent(None, block[6:]))  # the common case: one data line
                continue
            ev = _parse_block(block)
            if ev is not None:
                events.append(ev)
        return events


def _parse_block(block: bytes) -> SSEEvent | None:
    name: str | None = None
    event_id: str | None = None
    data: list[bytes] = []
    for line in block.split(b"\n"):
        if not line or line.startswith(b":"):
            continue
        field, sep, value = line.partition(b":")
        if sep and value.startswith(b" "):
            value = value[1:]
        if field == b"data":
            data.append(value)
        elif field == b"event":
            name = value.decode("utf-8", "replace")
        elif field == b"id":
            event_id = value.decode("utf-8", "replace")
    if not data:
        return None
    return SSEEvent(name, b"\n".join(data), event_id)
