"""Partial JSON of streamed tool-call arguments: the value written so far, growing monotonically.

A model streams a tool call's arguments as fragments of one JSON document. ``parse_partial`` turns the
text received so far into the value it describes, with ``jiter``'s partial mode: an unfinished string shows
what it holds so far, an unfinished key or literal (``tru``) is left out. One case is held back on purpose:
a number at the very end (``{"n": 12``) may still grow (``123``), so it is left out until something follows
it. That way every partial value is contained in the next one (strings only grow, keys and list items only
get added), which is what a UI rendering arguments live needs.
"""

from __future__ import annotations

from typing import Any

import jiter

_NUMBER_CHARS = frozenset("0123456789.eE+-")


def stable_prefix(text: str) -> str:
    """``text`` without a trailing number that a later fragment could still extend."""
    in_string = escaped = False
    for ch in text:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = in_string
        elif ch == '"':
            in_string = not in_string
    if in_string:
        return text
    end = len(text.rstrip())
    start = end
    while start > 0 and text[start - 1] in _NUMBER_CHARS:
        start -= 1
    if start < end and text[start] in "-0123456789":
        return text[:start]
    return text


def parse_partial(text: str) -> Any:
    """The JSON value that ``text`` (a prefix of a JSON document) holds so far; None before it starts."""
    prefix = stable_prefix(text)
    if not prefix.strip():
        return None
    try:
        return jiter.from_json(prefix.encode(), partial_mode="trailing-strings")
    except ValueError:
        return None
