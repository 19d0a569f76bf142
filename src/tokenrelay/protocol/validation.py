"""Turns msgspec decode and validation failures into 400s that name the field at fault."""

from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec

from tokenrelay.errors import GatewayError, invalid

_AT_PATH = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)


def field_error(exc: msgspec.ValidationError | msgspec.DecodeError, prefix: str = "") -> GatewayError:
    """``Expected `float` <= 2.0 - at `$.temperature` `` -> 400, param ``temperature``. ``prefix`` is where
    the value that failed sits in the request, when it was not the whole body (``input[2]``)."""
    text = str(exc)
    if isinstance(exc, msgspec.DecodeError) and not isinstance(exc, msgspec.ValidationError):
        return invalid(f"Request body is not valid JSON: {text}", code="invalid_json")
    match = _AT_PATH.match(text)
    what = match.group("what") if match else text
    path = (match.group("path") or "").lstrip(".") if match else ""
    if prefix:
        path = f"{prefix}.{path}" if path else prefix
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


T = TypeVar("T")
_top_level = msgspec.json.Decoder(dict[str, msgspec.Raw])


def decode_body(decoder: msgspec.json.Decoder[T], body: bytes) -> tuple[dict[str, Any], T]:
    """A request body as its top-level fields (undecoded) and as the protocol's typed request.

    The first pass tells "not a JSON object" apart from a field that is wrong, which the second names."""
    try:
        top = _top_level.decode(body)
    except msgspec.ValidationError as exc:
        raise invalid("Request body must be a JSON object.", code="invalid_json") from exc
    except msgspec.DecodeError as exc:
        raise field_error(exc) from exc
    try:
        return top, decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise field_error(exc) from exc


Renames = tuple[tuple[re.Pattern[str], str], ...]


def wire_param(param: str | None, renames: Renames) -> str | None:
    """A field named the internal (Chat) way, as the client's protocol names it. Stages after the decoder
    (a provider refusing a schema, say) only know the internal request; the first matching rename wins."""
    if param:
        for pattern, repl in renames:
            renamed, n = pattern.subn(repl, param, count=1)
            if n:
                return renamed
    return param
