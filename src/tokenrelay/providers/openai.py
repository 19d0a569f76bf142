"""The ``openai`` provider: any OpenAI-compatible server (OpenAI, vLLM, Ollama, llama.cpp server ...).

Pooling, timeouts and error mapping come from ``http_base``. Reading: every socket read as it comes (no
128 KiB line limit), our own SSE parser, one typed msgspec decode per chunk, one event batch per read
(``_Decoder``, which also serves the push lane from the socket callback).
A stream that ends without ``[DONE]`` is truncated and reported as ``upstream_disconnect``.
"""

from __future__ import annotations

import os
from typing import Any

import msgspec

from tokenrelay.config import ModelConfig
from tokenrelay.events import Error, Event, Finish, ReasoningDelta, TextDelta, ToolCallDelta, Usage
from tokenrelay.openai_wire import UpChunk, UpError, UpUsage, up_chunk_decoder
from tokenrelay.providers.http_base import HttpStreamProvider, StreamDecoder
from tokenrelay.request import ChatRequest, estimate_prompt_tokens
from tokenrelay.sse import SSEEvent
from tokenrelay.upstream_http import HttpPool

_FINISH = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "content_filter": "content_filter",
    "function_call": "tool_calls",
    "eos": "stop",
    "max_tokens": "length",
}
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


class OpenAIProvider(HttpStreamProvider):
    kind = "openai"

    def __init__(self, cfg: ModelConfig, pool: HttpPool | None = None) -> None:
        assert cfg.base_url
        headers = {"content-type": "application/json", "accept": "text/event-stream", **cfg.headers}
        if cfg.api_key_env:
            key = os.environ.get(cfg.api_key_env)
            if key:
                headers["authorization"] = f"Bearer {key}"
        super().__init__(cfg, cfg.base_url.rstrip("/") + "/chat/completions", headers, pool)

    def body(self, req: ChatRequest) -> bytes:
        payload: dict[str, Any] = {**self.body_defaults, **req.extra}
        payload["model"] = self.cfg.upstream_model or self.cfg.name
        payload["messages"] = req.messages
        payload["stream"] = True
        payload["stream_options"] = {"include_usage": True}
        for name in _OPTIONAL:
            value = getattr(req, name)
            if value is not None:
                payload[name] = value
        return msgspec.json.encode(payload)

    def decoder(self, req: ChatRequest) -> StreamDecoder:
        return _Decoder(req)


class _Decoder(StreamDecoder):
    __slots__ = ("finish", "produced", "req", "usage")

    def __init__(self, req: ChatRequest) -> None:
        super().__init__()
        self.req = req
        self.finish: str | None = None
        self.usage: Usage | None = None
        self.produced = 0  # events so far: the completion count when the upstream reports no usage

    def decode(self, events: list[SSEEvent]) -> list[Event]:
        batch: list[Event] = []
        for ev in events:
            payload = ev.data
            if payload[:6] == b"[DONE]":
                self.produced += len(batch)
                usage = self.usage or Usage(
                    prompt_tokens=estimate_prompt_tokens(self.req), completion_tokens=self.produced
                )
                batch += [usage, Finish(self.finish or "stop")]  # type: ignore[arg-type]
                self.ended = self.clean = True
                return batch
            try:
                chunk = up_chunk_decoder.decode(payload)
            except msgspec.DecodeError:
                batch.append(Error(type="upstream_error", message="upstream sent a malformed chunk"))
                self.ended = True
                return batch
            if chunk.error:
                batch.append(_chunk_error(chunk.error))
                self.ended = True
                return batch
            self.finish = chunk_events(chunk, batch) or self.finish
            if chunk.usage is not None:
                self.usage = _usage(chunk.usage)
        self.produced += len(batch)
        return batch

    def truncated(self) -> Error:
        return Error(type="upstream_disconnect", message="upstream stream ended without [DONE] (truncated)")


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
