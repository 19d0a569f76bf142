"""Tool calling through tokenrelay with the ``openai`` SDK, the call's arguments streamed as they are written.

    python examples/tool_calling_openai.py ["What is the weather in Paris?"]

Declares one tool, ``get_weather``, and streams the model's answer: each ``tool_calls`` delta is printed
as it arrives (the first fragment of a call carries its id and name, the later ones only pieces of the
JSON arguments), then the assembled arguments. The example then runs the tool (a made-up forecast) and
sends the result back, streaming the model's final answer: the whole round trip.

A model may also answer without calling the tool (``tool_choice`` is left at ``auto``); the example then
stops after that answer. With ``TOKENRELAY_MOCK_TOOLS=1`` the request also asks tokenrelay's mock model
(docs/mock.md) to call the tool, which is how tests and demos run this without a real model. Environment:
``TOKENRELAY_URL`` (default http://127.0.0.1:8080), ``TOKENRELAY_MODEL`` (default ``tiny``),
``TOKENRELAY_API_KEY`` (when the gateway has keys), ``TOKENRELAY_MOCK_TOOLS``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam

URL = os.environ.get("TOKENRELAY_URL", "http://127.0.0.1:8080")
MODEL = os.environ.get("TOKENRELAY_MODEL", "tiny")
API_KEY = os.environ.get("TOKENRELAY_API_KEY", "unused")  # the SDK insists on one; open gateways ignore it
MOCK_TOOLS = os.environ.get("TOKENRELAY_MOCK_TOOLS") == "1"

TOOLS: list[ChatCompletionToolParam] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "The city's name."}},
                "required": ["city"],
            },
        },
    }
]


def get_weather(city: str) -> dict[str, Any]:
    """The tool itself; a real one would ask a weather service."""
    return {"city": city, "forecast": "sunny", "celsius": 21}


def main() -> None:
    prompt = sys.argv[1] if len(sys.argv) > 1 else "What is the weather in Paris?"
    client = OpenAI(base_url=f"{URL}/v1", api_key=API_KEY)
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": prompt}]
    # a body field only tokenrelay's mock model reads: call get_weather, with these arguments
    mock = {"mock": {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}}

    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        tools=TOOLS,
        stream=True,
        extra_body=mock if MOCK_TOOLS else None,
    )
    calls: dict[int, dict[str, str]] = {}  # by the call's index: its id, name and arguments so far
    finish_reason = None
    text = ""
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        if choice.delta.content:  # a model may say something before it calls a tool
            text += choice.delta.content
            print(choice.delta.content, end="", flush=True)
        for delta in choice.delta.tool_calls or []:
            fn = delta.function
            if delta.index not in calls:  # the call's first fragment: its id and name, no arguments yet
                if text and not calls:
                    print()
                name = (fn.name if fn else None) or ""
                calls[delta.index] = {"id": delta.id or "", "name": name, "arguments": ""}
                print(f"tool call {delta.index}: {name} (id {delta.id})", flush=True)
            if fn and fn.arguments:
                calls[delta.index]["arguments"] += fn.arguments
                print(f"  arguments += {fn.arguments!r}", flush=True)
        if choice.finish_reason is not None:
            finish_reason = choice.finish_reason
    if text and not calls:
        print()
    print(f"finish_reason: {finish_reason}")
    if not calls:
        return  # the model answered without the tool

    # The assistant turn that asked for the tools, then one `tool` message per call with its result.
    messages.append(
        {
            "role": "assistant",
            "content": text or None,
            "tool_calls": [
                {
                    "id": call["id"],
                    "type": "function",
                    "function": {"name": call["name"], "arguments": call["arguments"]},
                }
                for call in calls.values()
            ],
        }
    )
    for call in calls.values():
        arguments = json.loads(call["arguments"])  # whole JSON only now, never in the fragments
        print(f"{call['name']} arguments: {json.dumps(arguments)}")
        result = get_weather(**arguments)
        print(f"{call['name']} result: {json.dumps(result)}")
        messages.append({"role": "tool", "tool_call_id": call["id"], "content": json.dumps(result)})

    print("answer: ", end="", flush=True)
    final = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, stream=True)
    finish_reason = None
    for chunk in final:
        if chunk.choices:
            print(chunk.choices[0].delta.content or "", end="", flush=True)
            finish_reason = chunk.choices[0].finish_reason or finish_reason
    print()
    print(f"finish_reason: {finish_reason}")


if __name__ == "__main__":
    main()
