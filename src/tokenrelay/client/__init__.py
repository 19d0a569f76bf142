"""tokenrelay.client: stream chat completions through tokenrelay, with drops made invisible.

- ``Client`` / ``AsyncClient``: iterate a chat stream as typed deltas (text, reasoning, tool-call fragments
  with their arguments parsed so far); a connection that drops mid-stream is resumed from its cursor with
  nothing repeated or missing; retries with backoff and ``Retry-After`` before the first token; connect,
  first-token and idle timeouts; a ``ChatResult`` with usage and the end state.
- ``ResumingTransport`` / ``AsyncResumingTransport``: the same resume for an unchanged openai SDK client.

Against other OpenAI-compatible servers the clients work too, but only retry before the first token (such a
server cannot resume a stream); the error raised after a mid-stream drop says so. See docs/clients.md.
"""

from tokenrelay.client.aio import AsyncChatStream, AsyncClient
from tokenrelay.client.engine import Retry, Timeouts
from tokenrelay.client.errors import (
    APIStatusError,
    ConnectionFailed,
    FirstTokenTimeout,
    IdleTimeout,
    StreamError,
    StreamInterrupted,
    StreamTimeout,
    TokenRelayError,
)
from tokenrelay.client.openai_transport import AsyncResumingTransport, ResumingTransport
from tokenrelay.client.partial_json import parse_partial
from tokenrelay.client.results import (
    ChatResult,
    Delta,
    ReasoningDelta,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from tokenrelay.client.sync import ChatStream, Client

__all__ = [
    "APIStatusError",
    "AsyncChatStream",
    "AsyncClient",
    "AsyncResumingTransport",
    "ChatResult",
    "ChatStream",
    "Client",
    "ConnectionFailed",
    "Delta",
    "FirstTokenTimeout",
    "IdleTimeout",
    "ReasoningDelta",
    "ResumingTransport",
    "Retry",
    "StreamError",
    "StreamInterrupted",
    "StreamTimeout",
    "TextDelta",
    "Timeouts",
    "TokenRelayError",
    "ToolCall",
    "ToolCallDelta",
    "Usage",
    "parse_partial",
]
