"""The upstream SSE parser on the framings real servers send (WHATWG rules)."""

from __future__ import annotations

import pytest

from tokenrelay.sse import SSEError, SSEParser


def feed_all(parts: list[bytes]) -> list[tuple[str | None, bytes]]:
    parser = SSEParser()
    out = []
    for part in parts:
        out.extend((e.event, e.data) for e in parser.feed(part))
    return out


STREAM = (
    b'data: {"a":1}\n\n: comment\n\nevent: delta\ndata: line1\ndata: line2\n\n'
    b"data:nospace\n\ndata: [DONE]\n\n"
)
EXPECTED = [(None, b'{"a":1}'), ("delta", b"line1\nline2"), (None, b"nospace"), (None, b"[DONE]")]


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_line_endings(newline: bytes) -> None:
    assert feed_all([STREAM.replace(b"\n", newline)]) == EXPECTED


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_any_split_point(newline: bytes) -> None:
    data = STREAM.replace(b"\n", newline)
    for cut in range(1, len(data)):
        assert feed_all([data[:cut], data[cut:]]) == EXPECTED, cut


def test_byte_by_byte_crlf() -> None:
    data = STREAM.replace(b"\n", b"\r\n")
    assert feed_all([data[i : i + 1] for i in range(len(data))]) == EXPECTED


def test_event_over_128_kib() -> None:
    big = b"data: " + b"x" * 300_000 + b"\n\n"
    assert feed_all([big[:70_000], big[70_000:200_000], big[200_000:]]) == [(None, b"x" * 300_000)]


def test_unterminated_event_is_not_dispatched() -> None:
    assert feed_all([b'data: {"a":1}\n\ndata: {"cut']) == [(None, b'{"a":1}')]


def test_event_size_limit() -> None:
    parser = SSEParser(max_event_bytes=1000)
    with pytest.raises(SSEError):
        parser.feed(b"data: " + b"x" * 2000)


def test_one_event_per_read_matches_the_general_path() -> None:
    """A read holding exactly one one-line event takes a shortcut; it must agree with the full parse,
    also when a read with a partial event comes between."""
    reads = [
        b'data: {"a":1}\n\n',
        b"data: x\n\n",
        b"data: par",
        b"tial\n\n",
        b"data: y\n\n",
        b"data: [DONE]\n\n",
    ]
    expected = [(None, b'{"a":1}'), (None, b"x"), (None, b"partial"), (None, b"y"), (None, b"[DONE]")]
    assert feed_all(reads) == expected
    assert feed_all([b"".join(reads)]) == expected
    parser = SSEParser()
    (event,) = parser.feed(b"data: z\n\n")
    assert event == (None, b"z", None) and event.data == b"z"
