"""Errors that stop a request before its stream starts.

Any stage (decoder, admission, router, provider) raises ``GatewayError``; the transport turns it into an
HTTP status and the client protocol's error body. Once bytes have gone out, failures travel as an
``events.Error`` event instead, so the encoder can end the stream in the client's own protocol.
"""

from __future__ import annotations

from tokenrelay.events import Error

# OpenAI's error "type" for each status, used when a stage does not name one.
DEFAULT_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout",
}


class GatewayError(Exception):
    """A failure with an HTTP status, an error type, a message and (when a field is at fault) its name."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or DEFAULT_TYPES.get(
            status, "server_error" if status >= 500 else "invalid_request_error"
        )
        self.param = param
        self.code = code
        self.retry_after = retry_after
        self.headers: list[tuple[bytes, bytes]] = []  # extra response headers (x-ratelimit-* ...)

    def to_event(self) -> Error:
        return Error(
            type=self.type, message=self.message, status=self.status, code=self.code, param=self.param
        )

    @classmethod
    def from_event(cls, event: Error) -> GatewayError:
        return cls(event.status, event.message, type=event.type, param=event.param, code=event.code)


def invalid(message: str, param: str | None = None, code: str | None = None) -> GatewayError:
    """A 400 naming the field at fault."""
    return GatewayError(400, message, param=param, code=code)
