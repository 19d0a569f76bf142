"""Stream a Chat Completion through tokenrelay with the official ``openai`` SDK.

    python examples/openai_chat.py ["your question"]

Prints the answer as its tokens arrive, then the finish reason and the token usage. The SDK needs nothing
from tokenrelay but its ``base_url``. Environment: ``TOKENRELAY_URL`` (default http://127.0.0.1:8080),
``TOKENRELAY_MODEL`` (default ``tiny``, the embedded model), ``TOKENRELAY_API_KEY`` (when the gateway has
keys).
"""

from __future__ import annotations

import os
import sys

from openai import OpenAI

URL = os.environ.get("TOKENRELAY_URL", "http://127.0.0.1:8080")
MODEL = os.environ.get("TOKENRELAY_MODEL", "tiny")
# The SDK insists on a key; an open gateway ignores it.
API_KEY = os.environ.get("TOKENRELAY_API_KEY", "unused")


def main() -> None:
    prompt = sys.argv[1] if len(sys.argv) > 1 else "Name three colours."
    client = OpenAI(base_url=f"{URL}/v1", api_key=API_KEY)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": prompt}],
        stream=True,
        # one more chunk at the end, with empty `choices`, carries the token counts
        stream_options={"include_usage": True},
    )
    finish_reason = None
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if not chunk.choices:  # the usage chunk
            continue
        choice = chunk.choices[0]
        if choice.delta.content:
            # flush: show each token now, not when the line ends
            print(choice.delta.content, end="", flush=True)
        if choice.finish_reason is not None:
            finish_reason = choice.finish_reason
    print()
    print(f"finish_reason: {finish_reason}")
    if usage is not None:
        print(
            f"usage: prompt_tokens={usage.prompt_tokens} completion_tokens={usage.completion_tokens} "
            f"total_tokens={usage.total_tokens}"
        )


if __name__ == "__main__":
    main()
