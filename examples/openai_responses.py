"""Stream an answer through tokenrelay's OpenAI Responses API with the official ``openai`` SDK.

    python examples/openai_responses.py ["your question"]

``client.responses.stream`` gives typed events; the text arrives as ``response.output_text.delta``, and
``get_final_response()`` returns the finished response (status and usage) once the stream is over.
tokenrelay's Responses endpoint is stateless: send the whole conversation in ``input`` each time
(``previous_response_id`` is refused). Environment: ``TOKENRELAY_URL`` (default http://127.0.0.1:8080),
``TOKENRELAY_MODEL`` (default ``tiny``), ``TOKENRELAY_API_KEY`` (when the gateway has keys).
"""

from __future__ import annotations

import os
import sys

from openai import OpenAI

URL = os.environ.get("TOKENRELAY_URL", "http://127.0.0.1:8080")
MODEL = os.environ.get("TOKENRELAY_MODEL", "tiny")
API_KEY = os.environ.get("TOKENRELAY_API_KEY", "unused")  # the SDK insists on one; open gateways ignore it


def main() -> None:
    prompt = sys.argv[1] if len(sys.argv) > 1 else "Name three colours."
    client = OpenAI(base_url=f"{URL}/v1", api_key=API_KEY)
    with client.responses.stream(model=MODEL, input=prompt) as stream:
        for event in stream:
            # other events (response.created, output_item.added, ...) mark the structure of the answer
            if event.type == "response.output_text.delta":
                print(event.delta, end="", flush=True)
        response = stream.get_final_response()
    print()
    # "completed", or "incomplete" when max_output_tokens cut the answer short
    print(f"status: {response.status}")
    if response.usage is not None:
        print(
            f"usage: input_tokens={response.usage.input_tokens} "
            f"output_tokens={response.usage.output_tokens} total_tokens={response.usage.total_tokens}"
        )


if __name__ == "__main__":
    main()
