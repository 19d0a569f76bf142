"""The client's stream logic, written once for the sync and async clients: a sans-I/O generator.

``run_chat`` drives one Chat Completions stream: it opens it, retries what failed before the first token
(backoff with full jitter, at least ``Retry-After``), parses the SSE events into typed deltas, keeps the
resume cursor, and when the connection drops mid-stream reopens it at
``GET /v1/streams/{id}`` with ``Last-Event-ID`` so the caller gets every delta once. ``run_relay`` does the
same for an already open stream whose raw SSE bytes are handed on (the openai SDK transport).

They do no I/O themselves. They yield *operations* (``Open``, ``Read``, ``Sleep``) that a driver carries out
(``sync.py`` with blocking httpx, ``aio.py`` with asyncio), and ``Emit`` for what the caller gets. A driver
reports an I/O failure by throwing ``IOFailed`` into the generator.

The cursor: the server numbers each internal event of a stream. On the first response nothing carries
that number (an ``id:`` line breaks openai-python), but every text, reasoning or tool-call chunk is exactly
one event, so counting them gives it; the resume endpoint sends ``id: N`` itself.
"""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, TypeVar
from urllib.parse import urlsplit

import msgspec

from tokenrelay.client.errors import (
    APIStatusError,
    ConnectionFailed,
    FirstTokenTimeout,
    IdleTimeout,
    StreamError,
    StreamInterrupted,
    TokenRelayError,
)
from tokenrelay.client.results import (
    ChatResult,
    Delta,
    ReasoningDelta,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from tokenrelay.sse import SSEError, SSEEvent, SSEParser

T = TypeVar("T")

# what a stream's request asks of tokenrelay (other servers ignore the header): keep the model running when
# the connection drops, so the resume gets everything
ON_DISCONNECT_HEADER = "x-tokenrelay-on-disconnect"
RETRY_STATUSES = frozenset({408, 409, 425, 429})


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Client-side time limits in seconds (None: no limit).

    ``connect``: to connect and get the response headers. ``first_token``: from sending the request to the
    first delta. ``idle``: between deltas (the server's keep-alive comments do not count as deltas).
    """

    connect: float | None = 10.0
    first_token: float | None = 120.0
    idle: float | None = 60.0

    @property
    def read(self) -> float | None:
        """The longest a single socket read may wait: the shorter of the two token limits."""
        limits = [t for t in (self.first_token, self.idle) if t is not None]
        return min(limits) if limits else None


@dataclass(frozen=True, slots=True)
class Retry:
    """When to try again.

    Before the first token, a connection error or a 408/409/425/429/5xx is retried ``max_retries`` times.
    After it, a dropped connection is resumed (tokenrelay only): at once when something arrived since the
    last resume, else with the same backoff, giving up after ``max_resumes`` resumes in a row that
    delivered nothing. Attempt n waits a random time up to ``backoff * 2**n`` (full jitter, at most
    ``max_backoff``) and at least the server's ``Retry-After``; an error asking for longer than
    ``max_retry_after`` is raised instead.
    """

    max_retries: int = 2
    max_resumes: int = 10
    backoff: float = 0.25
    max_backoff: float = 8.0
    max_retry_after: float = 60.0

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        jitter = rng.uniform(0.0, min(self.max_backoff, self.backoff * (2**attempt)))
        return max(jitter, retry_after or 0.0)


@dataclass(frozen=True, slots=True)
class StreamConfig:
    """Where and how a stream runs: ``base_url`` ends in ``/v1``; ``headers`` go on every request."""

    base_url: str
    headers: Mapping[str, str]
    timeouts: Timeouts
    retry: Retry
    rng: random.Random


# -- operations a driver carries out -------------------------------------------------------------------


class Open(NamedTuple):
    """Send a request; the driver answers with ``Opened`` (and keeps a 200 response to read from)."""

    method: str
    url: str
    headers: Mapping[str, str]
    body: bytes | None
    connect_timeout: float | None
    read_timeout: float | None


class Opened(NamedTuple):
    status: int
    headers: Mapping[str, str]
    body: bytes  # an error response's body; empty for a 200


class Read(NamedTuple):
    """Read what the open response has next (b"" at its end) within ``timeout`` seconds."""

    timeout: float | None


class Sleep(NamedTuple):
    seconds: float


class Emit(NamedTuple, Generic[T]):
    """Hand ``item`` to the caller."""

    item: T


Operation = Open | Read | Sleep | Emit[Any]
Engine = Generator[Operation, Any, None]


class IOFailed(Exception):
    """Thrown into an engine by its driver: a connect, send or read failed (``timeout``: it timed out)."""

    def __init__(self, message: str, timeout: bool = False) -> None:
        super().__init__(message)
        self.timeout = timeout


# -- wire shapes of a Chat Completions stream ----------------------------------------------------------


class _Function(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class _ToolCallPart(msgspec.Struct):
    index: int = 0
    id: str | None = None
    function: _Function | None = None


class _Delta(msgspec.Struct):
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[_ToolCallPart] | None = None


class _Choice(msgspec.Struct):
    index: int = 0
    delta: _Delta | None = None
    finish_reason: str | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class _ErrorBody(msgspec.Struct):
    message: str = ""
    type: str | None = None
    param: str | None = None
    code: str | int | None = None


class _Chunk(msgspec.Struct):
    model: str | None = None
    choices: list[_Choice] = msgspec.field(default_factory=list)
    usage: _Usage | None = None
    error: _ErrorBody | None = None


class _ErrorEnvelope(msgspec.Struct):
    error: _ErrorBody | str | None = None
    message: str | None = None


_chunk_decoder = msgspec.json.Decoder(_Chunk)
_error_decoder = msgspec.json.Decoder(_ErrorEnvelope)


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """``Retry-After`` (seconds or an HTTP date) or ``retry-after-ms``, in seconds; None when absent."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        when = email.utils.parsedate_to_datetime(value) if value else None
        return None if when is None else max(0.0, when.timestamp() - time.time())


def status_error(opened: Opened) -> APIStatusError:
    """An error response, read in OpenAI's shape (``{"error": {message, type, param, code}}``) or as text."""
    message, type_, param, code = "", None, None, None
    try:
        envelope = _error_decoder.decode(opened.body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        message = opened.body[:500].decode("utf-8", "replace").strip()
    else:
        if isinstance(envelope.error, _ErrorBody):
            err = envelope.error
            message, type_, param = err.message, err.type, err.param
            code = None if err.code is None else str(err.code)
        else:
            message = envelope.error or envelope.message or ""
    return APIStatusError(
        opened.status,
        message or f"HTTP {opened.status}",
        type=type_,
        param=param,
        code=code,
        retry_after=retry_after_seconds(opened.headers),
    )


class Accepted(NamedTuple):
    deltas: list[Delta]
    fresh: bool  # False for a finish or usage chunk that a resume replayed


class ChatState:
    """What one stream delivered so far, its cursor and its deadlines."""

    def __init__(self) -> None:
        self.result = ChatResult()
        self.cursor = 0  # events delivered: where a resume continues
        self.done = False
        self.started = False  # a delta arrived
        self.cancel_sent = False
        self.resumed_at = 0  # the cursor at the last resume
        self.stalled_resumes = 0  # resumes in a row with nothing delivered in between
        self.sent_at = time.monotonic()
        self.last_delta_at = self.sent_at
        self._text: list[str] = []
        self._reasoning: list[str] = []
        self._calls: dict[int, ToolCall] = {}

    def opened(self, headers: Mapping[str, str]) -> None:
        self.result.stream_id = headers.get("x-stream-id")
        self.result.deployment = headers.get("x-tokenrelay-deployment")
        self.result.resumable = self.result.stream_id is not None

    def on_event(self, ev: SSEEvent) -> Accepted:
        if ev.data == b"[DONE]":
            self.done = True
            self._set_cursor(ev.id)
            return Accepted([], True)
        try:
            chunk = _chunk_decoder.decode(ev.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.end(
                StreamError("malformed_chunk", f"the server sent a chunk that is not a chat chunk: {exc}")
            )
            return Accepted([], False)
        if chunk.error is not None:
            err = chunk.error
            code = None if err.code is None else str(err.code)
            self.end(StreamError(err.type or "error", err.message, code=code, param=err.param))
            return Accepted([], True)
        if chunk.model:
            self.result.model = chunk.model
        fresh = True
        if chunk.usage is not None:
            fresh = self.result.usage is None
            u = chunk.usage
            self.result.usage = Usage(u.prompt_tokens, u.completion_tokens, u.total_tokens)
        deltas: list[Delta] = []
        for choice in chunk.choices:
            if choice.index != 0:
                continue
            if choice.delta is not None:
                self._deltas(choice.delta, deltas)
            if choice.finish_reason is not None:
                fresh = self.result.finish_reason is None
                self.result.finish_reason = choice.finish_reason
        if deltas:
            self.started = True
            self.last_delta_at = time.monotonic()
            if ev.id is None:
                self.cursor += 1
        self._set_cursor(ev.id)
        return Accepted(deltas, fresh or bool(deltas))

    def _set_cursor(self, event_id: str | None) -> None:
        if event_id is not None and event_id.isdigit():
            self.cursor = max(self.cursor, int(event_id))

    def _deltas(self, delta: _Delta, out: list[Delta]) -> None:
        if delta.reasoning_content:
            self._reasoning.append(delta.reasoning_content)
            out.append(ReasoningDelta(delta.reasoning_content))
        if delta.content:
            self._text.append(delta.content)
            out.append(TextDelta(delta.content))
        for part in delta.tool_calls or ():
            call = self._calls.get(part.index)
            if call is None:
                call = self._calls[part.index] = ToolCall(part.index)
            fn = part.function
            if part.id:
                call.id = part.id
            if fn is not None and fn.name:
                call.name = fn.name
            fragment = (fn.arguments if fn is not None else None) or ""
            call.arguments += fragment
            out.append(
                ToolCallDelta(part.index, fragment, call.arguments, id=part.id, name=fn.name if fn else None)
            )

    def deadline(self, timeouts: Timeouts) -> float | None:
        if self.started:
            return None if timeouts.idle is None else self.last_delta_at + timeouts.idle
        return None if timeouts.first_token is None else self.sent_at + timeouts.first_token

    def resumable_error(self) -> bool:
        """The server dropped this reader but keeps the stream (``client_too_slow``): resume, don't fail."""
        err = self.result.error
        return isinstance(err, StreamError) and err.code == "resumable" and self.result.resumable

    def cancel_url(self, cfg: StreamConfig) -> str | None:
        """Where to DELETE this stream when the server may still be generating it for nobody (it was not
        read to its end), once; None otherwise. Marks a stream left while running ``cancelled``."""
        r = self.result
        if not r.stream_id or self.cancel_sent or r.state in ("finished", "error"):
            return None
        self.cancel_sent = True
        if r.state == "streaming":
            r.state = "cancelled"
        return f"{cfg.base_url}/streams/{r.stream_id}"

    def reopen(self) -> None:
        self.done = False
        self.result.error = None
        self.result.state = "streaming"

    def end(self, error: TokenRelayError | None = None) -> None:
        """Record how the stream ended (a finish when ``error`` is None)."""
        self.done = True
        if error is None:
            self.result.state = "finished"
            return
        self.result.error = error
        self.result.state = (
            "timeout"
            if isinstance(error, FirstTokenTimeout | IdleTimeout)
            else "interrupted"
            if isinstance(error, StreamInterrupted | ConnectionFailed)
            else "error"
        )
        error.result = self.result

    def fail(self, error: TokenRelayError) -> TokenRelayError:
        self.end(error)
        self.snapshot()
        return error

    def timed_out(self, timeouts: Timeouts) -> TokenRelayError:
        if self.started:
            return self.fail(IdleTimeout(f"no token for {timeouts.idle} s (Timeouts.idle)"))
        return self.fail(FirstTokenTimeout(f"no first token within {timeouts.first_token} s"))

    def snapshot(self) -> ChatResult:
        """The result so far (the same object, brought up to date)."""
        r = self.result
        r.text = "".join(self._text)
        r.reasoning = "".join(self._reasoning)
        r.tool_calls = [self._calls[i] for i in sorted(self._calls)]
        return r


# -- the engines ---------------------------------------------------------------------------------------


def _connect(
    cfg: StreamConfig, st: ChatState, request: Open, resuming: bool
) -> Generator[Operation, Any, Opened]:
    """Send ``request`` until it opens, retrying what may work next time; raise what will not."""
    retry = cfg.retry
    while True:
        error: TokenRelayError
        retry_after: float | None = None
        try:
            opened: Opened = yield request
        except IOFailed as exc:
            error = ConnectionFailed(f"{request.method} {request.url}: {exc}")
        else:
            if opened.status == 200:
                return opened
            status = status_error(opened)
            if resuming and opened.status == 404:
                raise st.fail(StreamInterrupted(f"the stream cannot be resumed any more: {status.message}"))
            retry_after = status.retry_after
            if not (opened.status in RETRY_STATUSES or opened.status >= 500) or (
                retry_after is not None and retry_after > retry.max_retry_after
            ):
                raise st.fail(status)
            error = status
        used = st.stalled_resumes if resuming else st.result.retries
        if used >= (retry.max_resumes if resuming else retry.max_retries):
            raise st.fail(error)
        yield Sleep(retry.delay(used, retry_after, cfg.rng))
        if resuming:
            st.stalled_resumes += 1
            st.result.resumes += 1
        else:
            st.result.retries += 1
            st.sent_at = time.monotonic()


def _read(cfg: StreamConfig, st: ChatState, relay: bool) -> Generator[Operation, Any, str | None]:
    """Read the open response to its end: None when the stream ended, else why the connection dropped.

    Emits each delta, or (``relay``) the SSE bytes of each read with replayed finish/usage chunks left out.
    """
    parser = SSEParser()
    while True:
        deadline = st.deadline(cfg.timeouts)
        try:
            data: bytes = yield Read(None if deadline is None else max(0.0, deadline - time.monotonic()))
        except IOFailed as exc:
            if exc.timeout:
                raise st.timed_out(cfg.timeouts) from None
            return str(exc)
        if not data:
            return "the server closed the connection before the end of the stream"
        try:
            events = parser.feed(data)
        except SSEError as exc:
            raise st.fail(StreamError("malformed_stream", str(exc))) from None
        out: list[bytes] = []
        dropped: str | None = None
        for ev in events:
            accepted = st.on_event(ev)
            if st.done and st.resumable_error():
                dropped = f"the server dropped this reader: {st.result.error}"
                break
            if relay:
                if accepted.fresh:
                    out.append(b"data: " + ev.data + b"\n\n")
                if st.done and ev.data != b"[DONE]":
                    out.append(b"data: [DONE]\n\n")  # after an error event: the stream ends here
            else:
                for delta in accepted.deltas:
                    yield Emit(delta)
            if st.done:
                break
        if out:
            yield Emit(b"".join(out))
        if dropped is not None:
            return dropped
        if st.done:
            return None
        deadline = st.deadline(cfg.timeouts)
        if deadline is not None and time.monotonic() > deadline:
            raise st.timed_out(cfg.timeouts)


def _resume_request(cfg: StreamConfig, st: ChatState) -> Open:
    headers = {**cfg.headers, "accept": "text/event-stream", "last-event-id": str(st.cursor)}
    url = f"{cfg.base_url}/streams/{st.result.stream_id}"
    return Open("GET", url, headers, None, cfg.timeouts.connect, cfg.timeouts.read)


def _reconnect(
    cfg: StreamConfig, st: ChatState, reason: str, post: Open
) -> Generator[Operation, Any, Open | None]:
    """After a drop: the request that continues the stream (None: resumed already), or raise."""
    retry = cfg.retry
    if st.result.resumable:
        # a drop after progress is resumed at once; drops with nothing delivered in between back off
        if st.cursor > st.resumed_at:
            st.resumed_at, st.stalled_resumes = st.cursor, 0
        if st.stalled_resumes >= retry.max_resumes:
            raise st.fail(
                StreamInterrupted(
                    f"gave up after {st.stalled_resumes} resumes in a row with nothing delivered "
                    f"({st.result.resumes} in all); last drop: {reason}"
                )
            )
        if st.stalled_resumes:
            yield Sleep(retry.delay(st.stalled_resumes - 1, None, cfg.rng))
        st.stalled_resumes += 1
        st.result.resumes += 1
        st.reopen()
        yield from _connect(cfg, st, _resume_request(cfg, st), resuming=True)
        return None
    host = urlsplit(cfg.base_url).netloc
    if not st.started and st.result.retries < retry.max_retries:
        yield Sleep(retry.delay(st.result.retries, None, cfg.rng))
        st.result.retries += 1
        st.sent_at = time.monotonic()
        return post
    raise st.fail(
        StreamInterrupted(
            f"the connection dropped after {st.cursor} deltas ({reason}), and {host} cannot resume a stream "
            "(no x-stream-id header: not tokenrelay), so only failures before the first token are retried"
        )
    )


def run_chat(cfg: StreamConfig, body: dict[str, Any], st: ChatState) -> Engine:
    """One Chat Completions stream from request to end, emitting ``Delta``s; raises how it failed."""
    stream_options = {"include_usage": True, **(body.get("stream_options") or {})}
    payload = msgspec.json.encode({**body, "stream": True, "stream_options": stream_options})
    headers = {
        **cfg.headers,
        "content-type": "application/json",
        "accept": "text/event-stream",
        ON_DISCONNECT_HEADER: "continue",
    }
    post = Open(
        "POST", f"{cfg.base_url}/chat/completions", headers, payload, cfg.timeouts.connect, cfg.timeouts.read
    )
    request: Open | None = post
    while True:
        if request is not None:
            st.sent_at = time.monotonic()
            opened = yield from _connect(cfg, st, request, resuming=False)
            st.opened(opened.headers)
        reason = yield from _read(cfg, st, relay=False)
        if reason is None:
            break
        request = yield from _reconnect(cfg, st, reason, post)
    if st.result.error is not None:
        st.snapshot()
        raise st.result.error
    st.end()
    st.snapshot()


def run_relay(cfg: StreamConfig, st: ChatState) -> Engine:
    """Hand on the SSE bytes of an open tokenrelay stream, resuming it when the connection drops.

    The stream ends as the server ended it (an error event is handed on as it came); raises
    ``StreamInterrupted`` when it cannot be resumed.
    """
    while True:
        reason = yield from _read(cfg, st, relay=True)
        if reason is None:
            return
        request = yield from _reconnect(cfg, st, reason, post=_resume_request(cfg, st))
        assert request is None  # a relayed stream is always resumable
