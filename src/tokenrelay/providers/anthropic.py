"""The ``anthropic`` provider: Anthropic's native Messages API (or anything that speaks it).

Requests and stop reasons and usage translate through ``anthropic_mapping``; this module only reads the
SSE stream. Content blocks become events by type: ``text_delta`` -> text, ``thinking_delta`` -> reasoning,
a ``tool_use`` block -> one tool call (numbered in block order, its id and name on the first fragment,
then each ``input_json_delta`` as an argument fragment). Usage is cumulative: input counts arrive in
``message_start``, output counts in ``message_delta``. A body that ends before ``message_stop`` is
truncated; ``event: error`` ends the stream with that error.
"""

from __future__ import annotations

import os

import msgspec

from tokenrelay import anthropic_mapping as mapping
from tokenrelay.anthropic_wire import (
    UpUsage,
    up_block_start_decoder,
    up_delta_decoder,
    up_error_event_decoder,
    up_message_delta_decoder,
    up_start_decoder,
    up_type_decoder,
)
from tokenrelay.config import ModelConfig
from tokenrelay.events import Error, Event, Finish, ReasoningDelta, TextDelta, ToolCallDelta, Usage
from tokenrelay.providers.http_base import HttpStreamProvider, StreamDecoder
from tokenrelay.request import ChatRequest
from tokenrelay.sse import SSEEvent
from tokenrelay.upstream_http import HttpPool

DEFAULT_BASE_URL = "https://api.anthropic.com"
API_VERSION = "2023-06-01"


def messages_url(base_url: str) -> str:
    base = base_url.rstrip("/")
    return base + ("/messages" if base.endswith("/v1") else "/v1/messages")


class _Counts:
    __slots__ = ("cache_creation", "cache_read", "input", "output")

    def __init__(self) -> None:
        self.input = self.output = self.cache_creation = self.cache_read = 0

    def update(self, u: UpUsage | None) -> None:
        if u is None:
            return
        # cumulative counts: a later event's value replaces an earlier one
        if u.input_tokens is not None:
            self.input = u.input_tokens
        if u.output_tokens is not None:
            self.output = u.output_tokens
        if u.cache_creation_input_tokens is not None:
            self.cache_creation = u.cache_creation_input_tokens
        if u.cache_read_input_tokens is not None:
            self.cache_read = u.cache_read_input_tokens

    def usage(self) -> Usage:
        return mapping.usage_from_anthropic(self.input, self.output, self.cache_creation, self.cache_read)


class AnthropicProvider(HttpStreamProvider):
    kind = "anthropic"

    def __init__(self, cfg: ModelConfig, pool: HttpPool | None = None) -> None:
        headers = {
            "content-type": "application/json",
            "accept": "text/event-stream",
            "anthropic-version": API_VERSION,
            **cfg.headers,
        }
        key = os.environ.get(cfg.api_key_env or "ANTHROPIC_API_KEY")
        if key:
            headers["x-api-key"] = key
        super().__init__(cfg, messages_url(cfg.base_url or DEFAULT_BASE_URL), headers, pool)

    def body(self, req: ChatRequest) -> bytes:
        model = self.cfg.upstream_model or self.cfg.name
        body = mapping.request_to_anthropic(req, model, self.cfg.default_max_tokens)
        return msgspec.json.encode({**self.body_defaults, **body} if self.body_defaults else body)

    def decoder(self, req: ChatRequest) -> StreamDecoder:
        return _Decoder()


class _Decoder(StreamDecoder):
    __slots__ = ("counts", "stop", "tools")

    def __init__(self) -> None:
        super().__init__()
        self.counts = _Counts()
        self.stop: str | None = None
        self.tools: dict[int, int] = {}  # Anthropic block index -> tool-call number

    def decode(self, events: list[SSEEvent]) -> list[Event]:
        counts = self.counts
        tools = self.tools
        batch: list[Event] = []
        for ev in events:
            try:
                # the event name is authoritative; a server that leaves it out still names the type
                name = ev.event or up_type_decoder.decode(ev.data).type
                if name == "content_block_delta":
                    d = up_delta_decoder.decode(ev.data)
                    delta = d.delta
                    if delta is None:
                        continue
                    if delta.type == "text_delta" and delta.text:
                        batch.append(TextDelta(delta.text))
                    elif delta.type == "thinking_delta" and delta.thinking:
                        batch.append(ReasoningDelta(delta.thinking))
                    elif delta.type == "input_json_delta" and delta.partial_json and d.index in tools:
                        batch.append(ToolCallDelta(index=tools[d.index], arguments=delta.partial_json))
                elif name == "content_block_start":
                    s = up_block_start_decoder.decode(ev.data)
                    block = s.content_block
                    if block is None:
                        continue
                    if block.type == "tool_use":
                        tools[s.index] = len(tools)
                        batch.append(
                            ToolCallDelta(
                                index=tools[s.index],
                                id=block.id,
                                name=block.name,
                                # a non-streamed input (some servers send it whole) is one fragment
                                arguments=msgspec.json.encode(block.input).decode() if block.input else "",
                            )
                        )
                    elif block.type == "text" and block.text:
                        batch.append(TextDelta(block.text))
                    elif block.type == "thinking" and block.thinking:
                        batch.append(ReasoningDelta(block.thinking))
                elif name == "message_start":
                    m = up_start_decoder.decode(ev.data).message
                    counts.update(m.usage if m else None)
                elif name == "message_delta":
                    md = up_message_delta_decoder.decode(ev.data)
                    counts.update(md.usage)
                    if md.delta is not None and md.delta.stop_reason:
                        self.stop = md.delta.stop_reason
                elif name == "message_stop":
                    batch += [counts.usage(), Finish(mapping.finish_reason(self.stop))]  # type: ignore[arg-type]
                    self.ended = self.clean = True
                    return batch
                elif name == "error":
                    err = up_error_event_decoder.decode(ev.data).error
                    etype = (err.type if err else None) or "upstream_error"
                    batch.append(
                        Error(
                            type="upstream_overloaded" if etype == "overloaded_error" else "upstream_error",
                            message=(err.message if err else None) or etype,
                            status=503 if etype == "overloaded_error" else 502,
                            code=etype,
                        )
                    )
                    self.ended = True
                    return batch
                # ping, content_block_stop and unknown event types carry nothing to relay
            except msgspec.DecodeError:
                batch.append(Error(type="upstream_error", message="upstream sent a malformed event"))
                self.ended = True
                return batch
        return batch

    def truncated(self) -> Error:
        return Error(
            type="upstream_disconnect", message="upstream stream ended without message_stop (truncated)"
        )
