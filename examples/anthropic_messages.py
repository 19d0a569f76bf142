"""Stream an answer through tokenrelay with the official ``anthropic`` SDK (the Messages API).

    python examples/anthropic_messages.py ["your question"]

The SDK's ``base_url`` is the gateway's root (it adds ``/v1/messages`` itself), and any model the gateway
serves answers, not only Claude: tokenrelay translates the request for it. Environment: ``TOKENRELAY_URL``
(default http://127.0.0.1:8080), ``TOKENRELAY_MODEL`` (default ``tiny``), ``TOKENRELAY_API_KEY`` (when the
gateway has keys).
"""

from __future__ import annotations

import os
import sys

import anthropic

URL = os.environ.get("TOKENRELAY_URL", "http://127.0.0.1:8080")
MODEL = os.environ.get("TOKENRELAY_MODEL", "tiny")
API_KEY = os.environ.get("TOKENRELAY_API_KEY", "unused")  # the SDK insists on one; open gateways ignore it


def main() -> None:
    prompt = sys.argv[1] if len(sys.argv) > 1 else "Name three colours."
    client = anthropic.Anthropic(base_url=URL, api_key=API_KEY)
    with client.messages.stream(
        model=MODEL,
        max_tokens=512,  # required by the Messages API
        messages=[{"role": "user", "content": prompt}],
    ) as stream:
        for text in stream.text_stream:
            print(text, end="", flush=True)
        message = stream.get_final_message()
    print()
    # end_turn, max_tokens, stop_sequence or tool_use
    print(f"stop_reason: {message.stop_reason}")
    # the real counts come with the stream's end (message_delta); the SDK puts them on the final message
    print(f"usage: input_tokens={message.usage.input_tokens} output_tokens={message.usage.output_tokens}")


if __name__ == "__main__":
    main()
