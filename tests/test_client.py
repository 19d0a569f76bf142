"""tokenrelay.client against a real gateway: resume through real dropped connections, retries and
Retry-After, timeouts, partial tool-call JSON, the openai SDK drop-in, and a server that cannot resume."""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from tests.chaos_proxy import ChaosProxy
from tests.conftest import Server, raw_post

from tokenrelay.client import (
    APIStatusError,
    AsyncClient,
    AsyncResumingTransport,
    Client,
    ConnectionFailed,
    FirstTokenTimeout,
    IdleTimeout,
    ResumingTransport,
    Retry,
    StreamError,
    StreamInterrupted,
    TextDelta,
    Timeouts,
    ToolCallDelta,
    parse_partial,
)

MESSAGES = [{"role": "user", "content": "tell me about resumable streams"}]
# long enough that cuts land while the model is still generating as well as after it finished
PACED = {"tokens": 60, "tokens_per_second": 300}
FAST_RETRY = Retry(max_retries=3, max_resumes=60, backoff=0.002, max_backoff=0.02)


def expected_text(gateway: Server, mock: dict[str, Any]) -> str:
    reply = raw_post(
        gateway.port, "/v1/chat/completions", {"model": "demo", "messages": MESSAGES, "mock": mock}
    ).json()
    return str(reply["choices"][0]["message"]["content"])


@pytest.fixture
def proxy(gateway: Server, request: pytest.FixtureRequest) -> Iterator[ChaosProxy]:
    with ChaosProxy(gateway.port, seed=sum(map(ord, request.node.name))) as p:
        yield p


# -- resume ----------------------------------------------------------------------------------------------


def test_random_disconnects_always_yield_the_exact_text(gateway: Server, proxy: ChaosProxy) -> None:
    want = expected_text(gateway, PACED)
    resumed = 0
    with Client(proxy.url, timeouts=Timeouts(first_token=10, idle=10), retry=FAST_RETRY, seed=7) as client:
        for run in range(25):
            with client.stream(model="demo", messages=MESSAGES, mock=PACED) as stream:
                pieces = [d.text for d in stream if isinstance(d, TextDelta)]
                result = stream.final_result()
            assert "".join(pieces) == want, f"run {run}"
            assert result.text == want
            assert result.state == "finished"
            assert result.finish_reason == "stop"
            assert result.usage is not None
            assert result.usage.completion_tokens == PACED["tokens"]
            assert result.resumable
            resumed += result.resumes
    # the proxy really did cut streams, many times, at many points
    assert proxy.cuts >= 25
    assert resumed >= 20


def test_async_client_survives_random_disconnects(gateway: Server, proxy: ChaosProxy) -> None:
    want = expected_text(gateway, PACED)

    async def main() -> list[int]:
        async with AsyncClient(proxy.url, retry=FAST_RETRY, seed=3) as client:

            async def one() -> int:
                async with client.stream(model="demo", messages=MESSAGES, mock=PACED) as stream:
                    text = [t async for t in stream.text_stream]
                    result = await stream.final_result()
                assert "".join(text) == want
                assert result.finish_reason == "stop"
                return result.resumes

            return list(await asyncio.gather(*(one() for _ in range(12))))

    resumes = asyncio.run(main())
    assert sum(resumes) >= 8
    assert proxy.cuts >= 8


def test_tool_call_arguments_survive_disconnects(gateway: Server, proxy: ChaosProxy) -> None:
    args = {"city": "Paris", "days": 12, "units": {"temp": "C", "wind": "km/h"}, "tags": ["a", "bb", "ccc"]}
    mock = {"tokens": 5, "tool_calls": [{"name": "get_weather", "arguments": args}], "tool_chunk_chars": 2}
    with Client(proxy.url, retry=FAST_RETRY, seed=5) as client:
        for _ in range(8):
            result = client.chat(model="demo", messages=MESSAGES, mock=mock)
            assert result.finish_reason == "tool_calls"
            (call,) = result.tool_calls
            assert call.name == "get_weather"
            assert call.id
            assert call.parsed() == args
    assert proxy.cuts >= 4


def test_drop_connection_resumes_from_the_cursor(gateway: Server) -> None:
    # paced so that no two drops land in the same read (a resume replays its backlog in one read)
    mock = {"tokens": 60, "tokens_per_second": 100}
    want = expected_text(gateway, mock)
    with (
        Client(gateway.url, retry=FAST_RETRY, seed=1) as client,
        client.stream(model="demo", messages=MESSAGES, mock=mock) as s,
    ):
        texts = []
        for i, delta in enumerate(s):
            assert isinstance(delta, TextDelta)
            texts.append(delta.text)
            if i in (3, 20, 40):
                s.drop_connection()
        result = s.result
    assert "".join(texts) == want
    assert result.resumes == 3
    assert result.stream_id and result.stream_id.startswith("chatcmpl-")
    assert result.deployment == "demo"


def test_openai_sdk_resumes_through_the_transport(gateway: Server, proxy: ChaosProxy) -> None:
    want = expected_text(gateway, PACED)
    transport = ResumingTransport(retry=FAST_RETRY, seed=11)
    client = openai.OpenAI(
        base_url=proxy.url + "/v1",
        api_key="unused",
        http_client=httpx.Client(transport=transport),
        max_retries=5,
    )
    for run in range(12):
        text, finishes, usage = [], [], []
        stream = client.chat.completions.create(
            model="demo",
            messages=MESSAGES,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"mock": PACED},
        )
        for chunk in stream:
            if chunk.choices:
                text.append(chunk.choices[0].delta.content or "")
                if chunk.choices[0].finish_reason:
                    finishes.append(chunk.choices[0].finish_reason)
            if chunk.usage:
                usage.append(chunk.usage.completion_tokens)
        assert "".join(text) == want, f"run {run}"
        assert finishes == ["stop"]  # a replayed finish is not handed on twice
        assert usage == [PACED["tokens"]]
    assert proxy.cuts >= 8


def test_async_openai_sdk_resumes_through_the_transport(gateway: Server, proxy: ChaosProxy) -> None:
    want = expected_text(gateway, PACED)

    async def main() -> None:
        client = openai.AsyncOpenAI(
            base_url=proxy.url + "/v1",
            api_key="unused",
            http_client=httpx.AsyncClient(transport=AsyncResumingTransport(retry=FAST_RETRY, seed=2)),
            max_retries=5,
        )
        for _ in range(6):
            stream = await client.chat.completions.create(
                model="demo",
                messages=MESSAGES,  # type: ignore[arg-type]
                stream=True,
                extra_body={"mock": PACED},
            )
            text = [c.choices[0].delta.content or "" async for c in stream if c.choices]
            assert "".join(text) == want

    asyncio.run(main())
    assert proxy.cuts >= 4


def test_closing_a_transport_stream_early_cancels_the_model(gateway: Server) -> None:
    transport = ResumingTransport()
    client = openai.OpenAI(
        base_url=gateway.url + "/v1", api_key="-", http_client=httpx.Client(transport=transport)
    )
    before = gateway.mock_cancelled()
    stream = client.chat.completions.create(
        model="demo",
        messages=MESSAGES,  # type: ignore[arg-type]
        stream=True,
        extra_body={"mock": {"tokens": 400, "tokens_per_second": 50}},
    )
    next(iter(stream))
    stream.close()
    gateway.wait_cancelled(before)


# -- retries, Retry-After, errors ------------------------------------------------------------------------


def test_retry_after_is_honoured_before_the_first_token(gateway: Server) -> None:
    mock = {"error_status": 429, "retry_after": 1, "error_message": "slow down"}
    with Client(gateway.url, retry=Retry(max_retries=1, backoff=0.01)) as client:
        started = time.monotonic()
        with pytest.raises(APIStatusError) as err:
            client.chat(model="demo", messages=MESSAGES, mock=mock)
        elapsed = time.monotonic() - started
    assert err.value.status == 429
    assert err.value.retry_after == 1
    assert "slow down" in err.value.message
    assert err.value.result is not None
    assert err.value.result.retries == 1
    assert err.value.result.state == "error"
    assert 1.0 <= elapsed < 3.0


def test_a_retry_after_beyond_the_limit_is_raised_at_once(gateway: Server) -> None:
    mock = {"error_status": 503, "retry_after": 30}
    with Client(gateway.url, retry=Retry(max_retries=3, max_retry_after=5)) as client:
        started = time.monotonic()
        with pytest.raises(APIStatusError) as err:
            client.chat(model="demo", messages=MESSAGES, mock=mock)
    assert err.value.status == 503
    assert err.value.result is not None
    assert err.value.result.retries == 0
    assert time.monotonic() - started < 1.0


def test_client_errors_are_not_retried(gateway: Server) -> None:
    with Client(gateway.url, retry=Retry(max_retries=3)) as client, pytest.raises(APIStatusError) as err:
        client.chat(model="demo", messages=[], mock=PACED)
    assert err.value.status == 400
    assert err.value.param == "messages"
    assert err.value.result is not None
    assert err.value.result.retries == 0


def test_refused_connections_are_retried_with_backoff(gateway: Server, proxy: ChaosProxy) -> None:
    proxy.cutting = False
    proxy.refuse_next = 2
    want = expected_text(gateway, {"tokens": 8})
    with Client(proxy.url, retry=Retry(max_retries=2, backoff=0.05)) as client:
        result = client.chat(model="demo", messages=MESSAGES, mock={"tokens": 8})
    assert result.text == want
    assert result.retries == 2
    assert proxy.connections >= 3


def test_connection_failures_end_with_connection_failed(gateway: Server, proxy: ChaosProxy) -> None:
    proxy.refuse_next = 10
    client = Client(proxy.url, retry=Retry(max_retries=2, backoff=0.01))
    with client, pytest.raises(ConnectionFailed) as err:
        client.chat(model="demo", messages=MESSAGES, mock={"tokens": 8})
    assert err.value.result is not None
    assert err.value.result.retries == 2
    assert err.value.result.state == "interrupted"


def test_a_mid_stream_error_event_ends_the_stream_with_its_type(gateway: Server) -> None:
    with (
        Client(gateway.url) as client,
        client.stream(model="demo", messages=MESSAGES, mock={"tokens": 20, "cut_after": 4}) as stream,
    ):
        got = []
        with pytest.raises(StreamError) as err:
            for delta in stream:
                got.append(delta)
    assert err.value.type == "upstream_disconnect"
    assert len(got) == 4
    assert stream.result.state == "error"
    assert stream.result.finish_reason is None


# -- timeouts --------------------------------------------------------------------------------------------


def test_first_token_timeout_fires_and_cancels_the_model(gateway: Server) -> None:
    before = gateway.mock_cancelled()
    with Client(gateway.url, timeouts=Timeouts(first_token=0.5)) as client:
        started = time.monotonic()
        with pytest.raises(FirstTokenTimeout) as err:
            client.chat(model="demo", messages=MESSAGES, mock={"first_token_ms": 5000, "tokens": 3})
    assert 0.5 <= time.monotonic() - started < 2.5
    assert err.value.result is not None
    assert err.value.result.state == "timeout"
    gateway.wait_cancelled(before)


def test_idle_timeout_fires_between_tokens(gateway: Server) -> None:
    mock = {"tokens": 10, "stall_after": 3, "stall_ms": 5000}
    client = Client(gateway.url, timeouts=Timeouts(first_token=5, idle=0.4))
    with client, pytest.raises(IdleTimeout) as err:
        client.chat(model="demo", messages=MESSAGES, mock=mock)
    assert err.value.result is not None
    assert len(err.value.result.text.split()) == 3


def test_async_timeouts_fire_on_time(gateway: Server) -> None:
    async def main() -> float:
        async with AsyncClient(gateway.url, timeouts=Timeouts(first_token=0.3)) as client:
            started = time.monotonic()
            with pytest.raises(FirstTokenTimeout):
                await client.chat(model="demo", messages=MESSAGES, mock={"first_token_ms": 5000})
            return time.monotonic() - started

    assert 0.3 <= asyncio.run(main()) < 1.0


# -- tool calls and partial JSON -------------------------------------------------------------------------


def contained(a: Any, b: Any) -> bool:
    """``a`` is an earlier state of ``b``: strings grow, keys and items get added, nothing else changes."""
    if isinstance(a, dict):
        return isinstance(b, dict) and all(k in b and contained(v, b[k]) for k, v in a.items())
    if isinstance(a, list):
        return (
            isinstance(b, list)
            and len(a) <= len(b)
            and all(contained(x, y) for x, y in zip(a[:-1], b, strict=False))
            and (not a or contained(a[-1], b[len(a) - 1]))
        )
    if isinstance(a, str):
        return isinstance(b, str) and b.startswith(a)
    return a == b and type(a) is type(b)


def test_partial_tool_arguments_grow_monotonically_to_the_final_object(gateway: Server) -> None:
    args = {
        "query": 'caf\u00e9 "quoted" \\ slash',
        "limit": 1234,
        "ratio": -0.125e2,
        "flags": [True, False, None],
        "nested": {"list": [1, 22, 333, {"deep": "yes"}], "empty": {}},
    }
    mock = {"tokens": 2, "tool_calls": [{"name": "search", "arguments": args}], "tool_chunk_chars": 3}
    partials = []
    with Client(gateway.url) as client, client.stream(model="demo", messages=MESSAGES, mock=mock) as stream:
        for delta in stream:
            if isinstance(delta, ToolCallDelta):
                partials.append(delta.partial)
        result = stream.result
    assert len(partials) > 20
    assert partials[-1] == args
    seen = [p for p in partials if p is not None]
    for earlier, later in itertools.pairwise(seen):
        assert contained(earlier, later), (earlier, later)
    assert result.tool_calls[0].parsed() == args
    assert result.tool_calls[0].partial == args


@pytest.mark.parametrize(
    "doc",
    [
        {"a": 1, "b": [10, 200, -3.5e-7], "c": {"d": "e\nf", "g": None, "h": True}},
        [{"x": '\u00e9\u00e8 \\"q\\"'}, 0, 12345678901234567890, [], {}],
        "just a string",
    ],
)
def test_parse_partial_on_every_prefix(doc: Any) -> None:
    text = json.dumps(doc, ensure_ascii=False)
    values = [parse_partial(text[:n]) for n in range(len(text) + 1)]
    assert values[-1] == doc
    seen = [v for v in values if v is not None]
    for earlier, later in itertools.pairwise(seen):
        assert contained(earlier, later), (earlier, later)


# -- servers that are not tokenrelay ---------------------------------------------------------------------


def test_plain_openai_server_streams_and_says_it_cannot_resume(mock_upstream: Server) -> None:
    with Client(mock_upstream.url) as client:
        whole = client.chat(model="gpt", messages=MESSAGES, mock={"tokens": 6})
        assert whole.finish_reason == "stop"
        assert len(whole.text.split()) == 6
        assert not whole.resumable
        with pytest.raises(StreamInterrupted) as err:
            client.chat(model="gpt", messages=MESSAGES, mock={"tokens": 12, "cut_after": 5})
    assert "cannot resume" in str(err.value)
    assert err.value.result is not None
    assert len(err.value.result.text.split()) == 5
    assert err.value.result.retries == 0


def test_plain_openai_server_drop_before_the_first_token_is_retried(mock_upstream: Server) -> None:
    client = Client(mock_upstream.url, retry=Retry(max_retries=2, backoff=0.01))
    with client, pytest.raises(StreamInterrupted) as err:
        client.chat(model="gpt", messages=MESSAGES, mock={"tokens": 12, "cut_after": 0})
    assert err.value.result is not None
    assert err.value.result.retries == 2
    assert err.value.result.text == ""


def test_connect_timeout_fires_when_no_connection_is_accepted() -> None:
    """A listener whose accept queue is full drops new SYNs, so connecting hangs until the timeout."""
    with socket.create_server(("127.0.0.1", 0), backlog=0) as listener:
        port = listener.getsockname()[1]
        fillers = []
        for _ in range(4):  # fill the accept queue; later connects get no answer
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            fillers.append(s)
        time.sleep(0.2)
        client = Client(
            f"http://127.0.0.1:{port}", timeouts=Timeouts(connect=0.3), retry=Retry(max_retries=1)
        )
        started = time.monotonic()
        with client, pytest.raises(ConnectionFailed) as err:
            client.chat(model="demo", messages=MESSAGES)
        elapsed = time.monotonic() - started
        for s in fillers:
            s.close()
    assert "ConnectTimeout" in str(err.value)
    assert err.value.result is not None
    assert err.value.result.retries == 1
    assert 0.6 <= elapsed < 2.5  # two attempts of 0.3 s, and a short backoff between them
