"""Reading a request's headers and the credential it carries, for the transports.

Streams remember who opened them as a digest of the credential (``Authorization`` or ``x-api-key``), never
the credential itself, so a resume can be limited to the same caller.
"""

from __future__ import annotations

import hashlib
from typing import Any


def header(scope: dict[str, Any], name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


def digest(credential: bytes) -> str:
    return hashlib.sha256(credential).hexdigest()[:32]


def credential(scope: dict[str, Any]) -> bytes | None:
    """The raw ``Authorization`` (or else ``x-api-key``) header value."""
    return header(scope, b"authorization") or header(scope, b"x-api-key")


def credential_digest(scope: dict[str, Any]) -> str | None:
    value = credential(scope)
    return digest(value) if value else None
