"""The ``openai`` provider: any OpenAI-compatible server (OpenAI, vLLM, Ollama, llama.cpp server ...).

One keep-alive connection pool for all upstream calls (``upstream_http``: a lean HTTP/1.1 client,
measured against aiohttp in docs/performance.md). The upstream is always asked to stream, whatever the client
asked: the gateway assembles non-streaming answers itself, so both kinds share one code path.

Reading: every socket read as it comes (no 128 KiB line limit), our own SSE parser, one typed
msgspec decode per chunk, one event batch per read. Timeouts: connect, first token, and idle between
reads, checked by one watchdog timer per stream that re-arms itself (no per-read timer churn).
A stream that ends without ``[DONE]`` is truncated and reported as ``upstream_disconnect``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from tokenrelay.config import ModelConfig
from tokenrelay.errors import GatewayError
from tokenrelay.events import Error, Event, Finish, ReasoningDelta, TextDelta, ToolCallDelta, Usage
from tokenrelay.openai_wire import UpChunk, UpError, UpUsage, up_chunk_decoder, up_error_decoder
from tokenrelay.providers.base import Provider
from tokenrelay.request import ChatRequest, estimate_prompt_tokens
from tokenrelay.sse import SSEError, SSEParser
from tokenrelay.upstream_http import HttpPool, UpstreamConnectionError, UpstreamResponse

_FINISH = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "content_filter": "content_filter",
    "function_call": "tool_calls",
    "eos": "stop",
    "max_tokens": "length",
}
_PASS_STATUS = {400, 404, 409, 413, 415, 422, 429}
_OPTIONAL = (
    "max_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
    "user",
    "mock",
)


def upstream_status_error(status: int, body: bytes, retry_after: str | None) -> GatewayError:
    """Map an upstream's error response to the status and OpenAI error body the client should get."""
    message, etype, code, param = f"upstream returned HTTP {status}", None, None, None
    try:
        parsed = up_error_decoder.decode(body)
        err = parsed.error
        if isinstance(err, UpError):
            message = err.message or message
            etype, param = err.type, err.param
            code = str(err.code) if err.code is not None else None
        elif isinstance(err, str):
            message = err
        elif parsed.message:
            message = parsed.message
    except msgspec.DecodeError:
        text = body[:200].decode("utf-8", "replace").strip()
        if text:
            message = f"{message}: {text}"
    after = _retry_after(retry_after)
    if status in _PASS_STATUS:
        return GatewayError(status, message, type=etype, param=param, code=code, retry_after=after)
    if status in (401, 403):
        return GatewayError(
            502,
            f"upstream rejected the gateway's credentials ({status}): {message}",
            type="upstream_auth_error",
            code=code,
        )
    if status in (408, 504):
        return GatewayError(504, f"upstream timed out ({status}): {message}", type="timeout", code=code)
    if status == 503:
        return GatewayError(503, message, type="upstream_unavailable", code=code, retry_after=after)
    return GatewayError(
        502, f"upstream error ({status}): {message}", type="upstream_error", code=code, retry_after=after
    )


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def chunk_events(chunk: UpChunk, out: list[Event]) -> str | None:
    """Append the events in one upstream chunk to ``out``; return its finish_reason, if any."""
    finish = None
    for choice in chunk.choices or ():
        if choice.index != 0:
            continue
        delta = choice.delta
        if delta is not None:
            reasoning = delta.reasoning_content or delta.reasoning
            if reasoning:
                out.append(ReasoningDelta(reasoning))
            if delta.content:
                out.append(TextDelta(delta.content))
            if delta.refusal:
                out.append(TextDelta(delta.refusal))
            for call in delta.tool_calls or ():
                fn = call.function
                out.append(
                    ToolCallDelta(
                        index=call.index,
                        arguments=(fn.arguments or "") if fn else "",
                        id=call.id,
                        name=fn.name if fn else None,
                    )
                )
        if choice.finish_reason:
            finish = _FINISH.get(choice.finish_reason, "stop")
    return finish


class OpenAIProvider(Provider):
    kind = "openai"

    def __init__(self, cfg: ModelConfig, pool: HttpPool | None = None) -> None:
        super().__init__(cfg)
        assert cfg.base_url
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self.pool = pool
        self._own_pool = False
        self.headers = {"content-type": "application/json", "accept": "text/event-stream", **cfg.headers}
        if cfg.api_key_env:
            key = os.environ.get(cfg.api_key_env)
            if key:
                self.headers["authorization"] = f"Bearer {key}"

    async def start(self) -> None:
        if self.pool is None:
            self.pool = HttpPool(self.cfg.max_idle_connections)
            self._own_pool = True
        self.ready = True

    async def close(self) -> None:
        if self._own_pool and self.pool is not None:
            self.pool.close()

    def body(self, req: ChatRequest) -> bytes:
        payload: dict[str, Any] = dict(req.extra)
        payload["model"] = self.cfg.upstream_model or self.cfg.name
        payload["messages"] = req.messages
        payload["stream"] = True
        payload["stream_options"] = {"include_usage": True}
        for name in _OPTIONAL:
            value = getattr(req, name)
            if value is not None:
                payload[name] = value
        return msgspec.json.encode(payload)

    async def stream(self, req: ChatRequest) -> AsyncIterator[list[Event]]:
        assert self.pool is not None, "provider not started"
        loop = asyncio.get_running_loop()
        started = loop.time()
        first_limit, idle_limit = self.cfg.first_token_timeout, self.cfg.idle_timeout
        state: dict[str, Any] = {"last": started, "first": False}
        accepted = False
        try:
            async with asyncio.timeout(None) as deadline:

                def watchdog() -> None:
                    base, limit = (state["last"], idle_limit) if state["first"] else (started, first_limit)
                    due = float(base) + limit
                    if loop.time() >= due:
                        deadline.reschedule(loop.time())  # expires now: TimeoutError below
                    else:
                        state["timer"] = loop.call_at(due, watchdog)

                state["timer"] = loop.call_at(started + first_limit, watchdog)
                try:
                    resp = await self.pool.request(
                        "POST", self.url, self.headers, self.body(req), self.cfg.connect_timeout
                    )
                    try:
                        if resp.status != 200:
                            raise upstream_status_error(
                                resp.status, await resp.read(65536), resp.headers.get("retry-after")
                            )
                        accepted = True
                        yield []
                        async for batch in self._relay(resp, req, state, loop):
                            yield batch
                    finally:
                        if state.get("done"):
                            # the client has its last chunk; read the body to its end to reuse the connection
                            await resp.drain()
                        resp.release()
                finally:
                    state["timer"].cancel()
        except TimeoutError:
            what = "idle timeout" if state["first"] else "first-token timeout"
            limit = idle_limit if state["first"] else first_limit
            if not accepted:
                raise GatewayError(504, f"upstream {what} after {limit:g} s", type="timeout") from None
            yield [Error(type="timeout", message=f"upstream {what} after {limit:g} s", status=504)]
        except UpstreamConnectionError as exc:
            if not accepted:
                raise GatewayError(
                    502, f"upstream {self.cfg.name}: {exc}", type="upstream_unavailable"
                ) from None
            yield [Error(type="upstream_disconnect", message=f"upstream connection lost: {exc}")]

    async def _relay(
        self, resp: UpstreamResponse, req: ChatRequest, state: dict[str, Any], loop: asyncio.AbstractEventLoop
    ) -> AsyncIterator[list[Event]]:
        parser = SSEParser()
        finish: str | None = None
        usage: Usage | None = None
        produced = 0
        while data := await resp.read_any():
            state["last"] = loop.time()
            batch: list[Event] = []
            try:
                events = parser.feed(data)
            except SSEError as exc:
                yield [Error(type="upstream_error", message=str(exc))]
                return
            for ev in events:
                payload = ev.data
                if payload[:6] == b"[DONE]":
                    produced += len(batch)
                    batch += [usage or self._estimate(req, produced), Finish(finish or "stop")]  # type: ignore[arg-type]
                    state["done"] = True
                    yield batch
                    return
                try:
                    chunk = up_chunk_decoder.decode(payload)
                except msgspec.DecodeError:
                    batch.append(Error(type="upstream_error", message="upstream sent a malformed chunk"))
                    yield batch
                    return
                if chunk.error:
                    batch.append(_chunk_error(chunk.error))
                    yield batch
                    return
                finish = chunk_events(chunk, batch) or finish
                if chunk.usage is not None:
                    usage = _usage(chunk.usage)
            if batch:
                state["first"] = True
                produced += len(batch)
                yield batch
        yield [Error(type="upstream_disconnect", message="upstream stream ended without [DONE] (truncated)")]

    @staticmethod
    def _estimate(req: ChatRequest, produced: int) -> Usage:
        return Usage(prompt_tokens=estimate_prompt_tokens(req), completion_tokens=produced)


def _usage(u: UpUsage) -> Usage:
    return Usage(
        prompt_tokens=u.prompt_tokens or 0,
        completion_tokens=u.completion_tokens or 0,
        cached_tokens=(u.prompt_tokens_details.cached_tokens or 0) if u.prompt_tokens_details else 0,
        reasoning_tokens=(u.completion_tokens_details.reasoning_tokens or 0)
        if u.completion_tokens_details
        else 0,
    )


def _chunk_error(err: UpError | str) -> Error:
    if isinstance(err, str):
        return Error(type="upstream_error", message=err)
    return Error(
        type=err.type or "upstream_error",
        message=err.message or "upstream error",
        code=str(err.code) if err.code is not None else None,
        param=err.param,
    )
