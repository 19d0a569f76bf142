"""The lean upstream HTTP client against a raw socket server that sends exactly the bytes each test wants."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from tokenrelay.upstream_http import HttpPool, UpstreamConnectionError

Responder = Callable[[asyncio.StreamReader, asyncio.StreamWriter], "asyncio.Future[None] | object"]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        (
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        ),
        0,
    )
    return head + await reader.readexactly(length)


class RawServer:
    def __init__(self, responses: list[bytes], close_after: bool = False, split: int = 0) -> None:
        self.responses = responses
        self.close_after = close_after
        self.split = split
        self.requests: list[bytes] = []
        self.connections = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while self.responses:
                self.requests.append(await read_request(reader))
                data = self.responses.pop(0)
                step = self.split or len(data)
                for i in range(0, len(data), step):
                    writer.write(data[i : i + step])
                    await writer.drain()
                    if self.split:
                        await asyncio.sleep(0)
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[RawServer], asyncio.Future[str]]]:
    servers: list[asyncio.Server] = []

    async def start(raw: RawServer) -> str:
        server = await asyncio.start_server(raw.handle, "127.0.0.1", 0)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1/chat/completions"

    yield start  # type: ignore[misc]
    for server in servers:
        server.close()


CHUNKED = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"d\r\ndata: hello\n\n\r\n"
    b"b;ext=1\r\ndata: bye\n\n\r\n"
    b"0\r\nX-Trailer: yes\r\n\r\n"
)


async def body_of(pool: HttpPool, url: str) -> tuple[int, bytes]:
    resp = await pool.request("POST", url, {"content-type": "application/json"}, b'{"a": 1}')
    status = resp.status
    data = await resp.read()
    resp.release()
    return status, data


@pytest.mark.parametrize("split", [0, 1, 3, 7])
async def test_chunked_body_split_anywhere(
    serve: Callable[[RawServer], asyncio.Future[str]], split: int
) -> None:
    raw = RawServer([CHUNKED], split=split)
    status, data = await body_of(HttpPool(), await serve(raw))
    assert status == 200
    assert data == b"data: hello\n\ndata: bye\n\n"
    request = raw.requests[0]
    assert request.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert b"content-length: 8\r\n" in request and request.endswith(b'{"a": 1}')


async def test_content_length_and_close_delimited(serve: Callable[[RawServer], asyncio.Future[str]]) -> None:
    length = b'HTTP/1.1 429 Too Many\r\nRetry-After: 3\r\nContent-Length: 11\r\n\r\n{"e": "no"}'
    closing = b"HTTP/1.0 200 OK\r\n\r\nall of it until close"
    pool = HttpPool()
    resp = await pool.request("POST", await serve(RawServer([length])), {}, b"")
    assert (resp.status, resp.headers["retry-after"]) == (429, "3")
    assert await resp.read() == b'{"e": "no"}'
    resp.release()
    assert await body_of(pool, await serve(RawServer([closing], close_after=True))) == (
        200,
        b"all of it until close",
    )


async def test_keep_alive_reuses_one_connection(serve: Callable[[RawServer], asyncio.Future[str]]) -> None:
    raw = RawServer([CHUNKED] * 3)
    url = await serve(raw)
    pool = HttpPool()
    for _ in range(3):
        assert (await body_of(pool, url))[1].endswith(b"bye\n\n")
    assert raw.connections == 1 and pool.opened == 1


async def test_stale_pooled_connection_is_retried(serve: Callable[[RawServer], asyncio.Future[str]]) -> None:
    # the server closes each connection after one response, although it said keep-alive
    raw = RawServer([CHUNKED, CHUNKED], close_after=True)
    url = await serve(raw)
    pool = HttpPool()
    await body_of(pool, url)
    await asyncio.sleep(0.05)  # the close has arrived; the pool must notice or retry
    assert (await body_of(pool, url))[0] == 200
    assert raw.connections == 2


async def test_truncated_chunked_body_raises(serve: Callable[[RawServer], asyncio.Future[str]]) -> None:
    cut = CHUNKED[: CHUNKED.index(b"b;ext")]
    resp = await HttpPool().request("POST", await serve(RawServer([cut], close_after=True)), {}, b"")
    assert await resp.read_any() == b"data: hello\n\n"
    with pytest.raises(UpstreamConnectionError):
        await resp.read_any()


async def test_garbage_response_raises(serve: Callable[[RawServer], asyncio.Future[str]]) -> None:
    with pytest.raises(UpstreamConnectionError):
        await HttpPool().request("POST", await serve(RawServer([b"SSH-2.0-OpenSSH\r\n\r\n"])), {}, b"")


async def test_refused_connection() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(UpstreamConnectionError, match="cannot connect"):
        await HttpPool().request("POST", f"http://127.0.0.1:{port}/x", {}, b"")


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("http://example.test/v1", "example.test"),
        ("https://example.test:443/v1", "example.test"),
        ("http://example.test:8080/v1", "example.test:8080"),
        ("http://[::1]:9000/v1", "[::1]:9000"),
    ],
)
def test_host_header(url: str, host: str) -> None:
    from tokenrelay.upstream_http import _Origin

    assert _Origin(url).host_header == host


def test_rejects_other_schemes() -> None:
    from tokenrelay.upstream_http import _Origin

    with pytest.raises(ValueError, match="unsupported upstream URL"):
        _Origin("ftp://example.test/")
