"""The blocking client: ``Client`` and ``ChatStream``, driving ``engine.run_chat`` with httpx.

from tokenrelay.client import Client

with Client("http://127.0.0.1:8080") as client, client.stream(model="tiny", messages=[...]) as stream:
    for text in stream.text_stream:
        print(text, end="", flush=True)
    result = stream.final_result()
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Callable, Generator, Iterator, Mapping
from typing import Any

import httpx

from tokenrelay.client.engine import (
    ChatState,
    Emit,
    Engine,
    IOFailed,
    Open,
    Opened,
    Read,
    Retry,
    StreamConfig,
    Timeouts,
    run_chat,
)
from tokenrelay.client.results import ChatResult, Delta, TextDelta

DEFAULT_URL = "http://127.0.0.1:8080"


def stream_config(
    base_url: str | None,
    api_key: str | None,
    timeouts: Timeouts | None,
    retry: Retry | None,
    headers: Mapping[str, str] | None,
    seed: int | None,
) -> StreamConfig:
    """A client's settings: ``base_url`` with or without ``/v1`` (``$TOKENRELAY_URL``, else
    http://127.0.0.1:8080); ``api_key`` sent as a Bearer token (``$TOKENRELAY_API_KEY`` when None)."""
    url = (base_url or os.environ.get("TOKENRELAY_URL") or DEFAULT_URL).rstrip("/")
    key = api_key if api_key is not None else os.environ.get("TOKENRELAY_API_KEY")
    sent = {"authorization": f"Bearer {key}"} if key else {}
    sent.update(headers or {})
    return StreamConfig(
        url if url.endswith("/v1") else url + "/v1",
        sent,
        timeouts or Timeouts(),
        retry or Retry(),
        random.Random(seed),
    )


def build_request(op: Open) -> httpx.Request:
    timeout = httpx.Timeout(op.connect_timeout, read=op.read_timeout)
    return httpx.Request(
        op.method, op.url, headers=op.headers, content=op.body, extensions={"timeout": timeout.as_dict()}
    )


def cancel_request(url: str, cfg: StreamConfig) -> Open:
    return Open("DELETE", url, cfg.headers, None, cfg.timeouts.connect, cfg.timeouts.connect)


def io_failure(exc: httpx.TransportError) -> IOFailed:
    return IOFailed(f"{type(exc).__name__}: {exc}", timeout=isinstance(exc, httpx.ReadTimeout))


class SyncIO:
    """Carries out an engine's operations with a blocking httpx ``send``; holds the open response."""

    def __init__(self, send: Callable[[httpx.Request], httpx.Response]) -> None:
        self._send = send
        self.response: httpx.Response | None = None
        self._chunks: Iterator[bytes] | None = None
        self.drop_requested = False

    def adopt(self, response: httpx.Response) -> None:
        """Read from an already open response (the openai transport opened it itself)."""
        self.response, self._chunks = response, response.iter_raw()

    def open(self, op: Open) -> Opened:
        self.close()
        try:
            response = self._send(build_request(op))
        except httpx.TransportError as exc:
            raise io_failure(exc) from None
        if response.status_code != 200:
            try:
                body = response.read()
            except httpx.TransportError:
                body = b""
            finally:
                response.close()
            return Opened(response.status_code, response.headers, body)
        self.adopt(response)
        return Opened(200, response.headers, b"")

    def read(self) -> bytes:
        if self.drop_requested or self._chunks is None:
            self.drop_requested = False
            self.close()
            raise IOFailed("the connection was dropped (drop_connection())")
        try:
            return next(self._chunks, b"")
        except httpx.TransportError as exc:
            raise io_failure(exc) from None

    def close(self) -> None:
        if self.response is not None:
            self.response.close()
        self.response = self._chunks = None

    def cancel(self, state: ChatState, cfg: StreamConfig) -> None:
        """DELETE the stream if the server may still be generating it for nobody (best effort: the
        server's disconnect grace period ends it anyway)."""
        url = state.cancel_url(cfg)
        if url is None:
            return
        with contextlib.suppress(httpx.HTTPError):
            self._send(build_request(cancel_request(url, cfg))).close()


def drive(engine: Engine, io: SyncIO) -> Generator[Any, None, None]:
    """Run ``engine`` to its end, yielding what it emits; its exceptions propagate."""
    value: Any = None
    failure: IOFailed | None = None
    while True:
        try:
            op = engine.throw(failure) if failure is not None else engine.send(value)
        except StopIteration:
            return
        value, failure = None, None
        if isinstance(op, Emit):
            yield op.item
        elif isinstance(op, Read):
            try:
                value = io.read()
            except IOFailed as exc:
                failure = exc
        elif isinstance(op, Open):
            try:
                value = io.open(op)
            except IOFailed as exc:
                failure = exc
        else:
            time.sleep(op.seconds)


class ChatStream:
    """One streaming chat completion: iterate it for ``Delta``s; it resumes by itself after a drop.

    Use it as a context manager (or call ``close()``): leaving early cancels the generation on the server.
    """

    def __init__(self, client: Client, body: dict[str, Any]) -> None:
        self._client = client
        self._state = ChatState()
        self._io = SyncIO(lambda request: client.http.send(request, stream=True))
        self._deltas = self._iterate(run_chat(client.config, body, self._state))

    def _iterate(self, engine: Engine) -> Generator[Delta, None, None]:
        try:
            yield from drive(engine, self._io)
        finally:
            self._io.close()
            self._io.cancel(self._state, self._client.config)

    def __iter__(self) -> Iterator[Delta]:
        return self._deltas

    def __next__(self) -> Delta:
        return next(self._deltas)

    @property
    def text_stream(self) -> Iterator[str]:
        """Only the answer's text, piece by piece."""
        for delta in self._deltas:
            if type(delta) is TextDelta:
                yield delta.text

    @property
    def result(self) -> ChatResult:
        """What arrived so far, and the end state once it ended."""
        return self._state.snapshot()

    def final_result(self) -> ChatResult:
        """Read the stream to its end and return the result (raises how it failed)."""
        for _ in self._deltas:
            pass
        return self._state.snapshot()

    def drop_connection(self) -> None:
        """Drop the connection as a network failure would (to see resume work); the stream goes on."""
        self._io.drop_requested = True

    def close(self) -> None:
        self._deltas.close()
        self._io.close()
        self._io.cancel(self._state, self._client.config)

    def __enter__(self) -> ChatStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Client:
    """A blocking client for tokenrelay's (or any OpenAI-compatible server's) Chat Completions streams.

    ``base_url``: the server (``$TOKENRELAY_URL``, else http://127.0.0.1:8080), with or without ``/v1``.
    ``api_key``: sent as a Bearer token (``$TOKENRELAY_API_KEY`` when not given). ``seed`` fixes the
    backoff jitter (tests).
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeouts: Timeouts | None = None,
        retry: Retry | None = None,
        headers: Mapping[str, str] | None = None,
        http_client: httpx.Client | None = None,
        seed: int | None = None,
    ) -> None:
        self.config = stream_config(base_url, api_key, timeouts, retry, headers, seed)
        self._owns_http = http_client is None
        self.http = http_client or httpx.Client(limits=httpx.Limits(max_connections=None))

    def stream(self, *, model: str, messages: list[dict[str, Any]], **params: Any) -> ChatStream:
        """Start a streaming chat completion; ``params`` are any other Chat Completions fields."""
        return ChatStream(self, {"model": model, "messages": messages, **params})

    def chat(self, *, model: str, messages: list[dict[str, Any]], **params: Any) -> ChatResult:
        """A whole chat completion, streamed (so it resumes after a drop) and collected."""
        with self.stream(model=model, messages=messages, **params) as stream:
            return stream.final_result()

    def close(self) -> None:
        if self._owns_http:
            self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
