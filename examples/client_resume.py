"""The Python client ``tokenrelay.client``: a stream that survives dropped connections.

    python examples/client_resume.py ["Tell me about rivers."]

Streams an answer and, to show what happens on a bad network, drops the connection itself every
``TOKENRELAY_DROP_EVERY`` text pieces (default 8; 0 drops nothing). Each time, the client reopens the stream
at tokenrelay's resume endpoint from the last piece it got, so the printed text has nothing missing and
nothing twice. At the end it prints how the stream ended, the usage and how many times it resumed.

Environment: ``TOKENRELAY_URL`` (default http://127.0.0.1:8080), ``TOKENRELAY_MODEL`` (default ``tiny``),
``TOKENRELAY_API_KEY`` (when the gateway has keys), ``TOKENRELAY_DROP_EVERY``, and ``TOKENRELAY_MOCK``: a
JSON object sent as the ``mock`` field, options for tokenrelay's mock model (docs/mock.md).
"""

from __future__ import annotations

import json
import os
import sys

from tokenrelay.client import Client, StreamError, TextDelta, TokenRelayError

MODEL = os.environ.get("TOKENRELAY_MODEL", "tiny")
DROP_EVERY = int(os.environ.get("TOKENRELAY_DROP_EVERY", "8"))
MOCK = json.loads(os.environ["TOKENRELAY_MOCK"]) if os.environ.get("TOKENRELAY_MOCK") else None


def main() -> int:
    prompt = sys.argv[1] if len(sys.argv) > 1 else "Tell me about rivers."
    extra = {"mock": MOCK} if MOCK else {}
    # Client() reads TOKENRELAY_URL and TOKENRELAY_API_KEY itself
    with (
        Client() as client,
        client.stream(
            model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=200, **extra
        ) as stream,
    ):
        try:
            pieces = 0
            for delta in stream:
                if isinstance(delta, TextDelta):
                    print(delta.text, end="", flush=True)
                    pieces += 1
                    if DROP_EVERY and pieces % DROP_EVERY == 0:
                        stream.drop_connection()  # as if the network failed here
        except StreamError as exc:  # the server ended the stream with an error event
            print(f"\nstream error: {exc.type}: {exc.message}")
            return 1
        except TokenRelayError as exc:  # refused, unreachable, timed out, or could not resume
            print(f"\nfailed: {exc}")
            return 1
        result = stream.result
    print()
    print(f"state: {result.state}, finish_reason: {result.finish_reason}")
    if result.usage:
        print(
            f"usage: {result.usage.prompt_tokens} prompt + {result.usage.completion_tokens} completion tokens"
        )
    print(f"resumed {result.resumes} times (stream {result.stream_id})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
