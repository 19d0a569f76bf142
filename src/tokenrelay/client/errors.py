"""Exceptions of tokenrelay.client: one base class, and one subclass per way a chat stream can end badly.

Every exception raised after a stream started carries ``result``: the ``ChatResult`` so far (text, tool
calls, where it stopped), so a caller can show or keep what arrived.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenrelay.client.results import ChatResult


class TokenRelayError(Exception):
    """Base class of every error the client raises."""

    result: ChatResult | None = None


class APIStatusError(TokenRelayError):
    """The server refused the request with an HTTP error status (after any retries)."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"HTTP {status}: {message}" + (f" (param: {param})" if param else ""))
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.retry_after = retry_after


class ConnectionFailed(TokenRelayError):
    """No connection could be made (after any retries)."""


class StreamError(TokenRelayError):
    """The stream ended with an error event from the server (``upstream_error``, ``cancelled`` ...)."""

    def __init__(self, type: str, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(f"{type}: {message}")
        self.type = type
        self.message = message
        self.code = code
        self.param = param


class StreamInterrupted(TokenRelayError):
    """The connection dropped mid-stream and the stream could not be resumed (see the message for why)."""


class StreamTimeout(TokenRelayError, TimeoutError):
    """A client-side timeout fired; ``FirstTokenTimeout`` or ``IdleTimeout`` says which."""


class FirstTokenTimeout(StreamTimeout):
    """No token arrived within ``Timeouts.first_token`` of sending the request."""


class IdleTimeout(StreamTimeout):
    """No token arrived within ``Timeouts.idle`` of the previous one."""
