"""Turns msgspec decode and validation failures into 400s that name the field at fault."""

from __future__ import annotations

import re

import msgspec

from tokenrelay.errors import GatewayError, invalid

_AT_PATH = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)


def field_error(exc: msgspec.ValidationError | msgspec.DecodeError) -> GatewayError:
    """``Expected `float` <= 2.0 - at `$.temperature` `` -> 400, param ``temperature``."""
    text = str(exc)
    if isinstance(exc, msgspec.DecodeError) and not isinstance(exc, msgspec.ValidationError):
        return invalid(f"Request body is not valid JSON: {text}", code="invalid_json")
    match = _AT_PATH.match(text)
    what = match.group("what") if match else text
    path = (match.group("path") or "").lstrip(".") if match else ""
    if what.startswith("Object missing required field `"):
        missing = what.split("`")[1]
        path = f"{path}.{missing}" if path else missing
        return invalid(
            f"Missing required parameter: '{path}'.", param=path, code="missing_required_parameter"
        )
    if not path:
        return invalid(f"Invalid request body: {what}", code="invalid_value")
    what = what[:1].lower() + what[1:]
    return invalid(f"Invalid value for '{path}': {what}", param=path, code="invalid_value")
