"""Upstream HTTP error responses -> the status and error the client gets (shared by HTTP providers)."""

from __future__ import annotations

import msgspec

from tokenrelay.errors import GatewayError
from tokenrelay.openai_wire import UpError, up_error_decoder

_PASS_STATUS = {400, 404, 409, 413, 415, 422, 429}


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
    if status in (503, 529):  # 529: Anthropic's "overloaded"
        return GatewayError(503, message, type="upstream_unavailable", code=code, retry_after=after)
    return GatewayError(
        502, f"upstream error ({status}): {message}", type="upstream_error", code=code, retry_after=after
    )


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
