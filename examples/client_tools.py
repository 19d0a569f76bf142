"""The Python client ``tokenrelay.client``: a tool call whose arguments are parsed as they stream.

    python examples/client_tools.py ["What is the weather in Paris?"]

Declares one tool and streams the answer. Each ``ToolCallDelta`` carries the fragment that arrived and
``partial``: the arguments parsed so far (strings grow, keys appear, a number waits until it is whole), which
is what a UI needs to show a call taking shape. At the end, ``result.tool_calls`` holds each call whole.

With ``TOKENRELAY_MOCK_TOOLS=1`` the request asks tokenrelay's mock model (docs/mock.md) to call the tool,
for demos and tests without a real model. Environment as in the other examples: ``TOKENRELAY_URL``,
``TOKENRELAY_MODEL`` (default ``tiny``), ``TOKENRELAY_API_KEY``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from tokenrelay.client import Client, TextDelta, ToolCallDelta

MODEL = os.environ.get("TOKENRELAY_MODEL", "tiny")
MOCK_TOOLS = os.environ.get("TOKENRELAY_MOCK_TOOLS") == "1"
ARGUMENTS = {"city": "Paris", "days": 3, "units": {"temperature": "celsius"}}

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_forecast",
            "description": "The weather forecast for a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "days": {"type": "integer"},
                    "units": {"type": "object", "properties": {"temperature": {"type": "string"}}},
                },
                "required": ["city"],
            },
        },
    }
]


def main() -> int:
    prompt = sys.argv[1] if len(sys.argv) > 1 else "What is the weather in Paris?"
    extra: dict[str, Any] = {}
    if MOCK_TOOLS:  # a body field only the mock model reads: call the tool with these arguments
        extra["mock"] = {
            "tool_calls": [{"name": "get_forecast", "arguments": ARGUMENTS}],
            "tool_chunk_chars": 6,
        }
    with (
        Client() as client,
        client.stream(
            model=MODEL, messages=[{"role": "user", "content": prompt}], tools=TOOLS, **extra
        ) as stream,
    ):
        for delta in stream:
            if isinstance(delta, TextDelta):
                print(f"text: {delta.text!r}")
            elif isinstance(delta, ToolCallDelta):
                if delta.name:
                    print(f"tool call {delta.index}: {delta.name}")
                print(f"  partial: {json.dumps(delta.partial)}")
        result = stream.result
    for call in result.tool_calls:
        print(f"call {call.name}({json.dumps(call.parsed())})")
    print(f"finish_reason: {result.finish_reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
