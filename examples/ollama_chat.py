"""Stream a chat through tokenrelay with the official ``ollama`` Python client.

    python examples/ollama_chat.py ["your question"]

tokenrelay speaks Ollama's NDJSON API (``/api/chat``), so the client works with ``host`` set to the gateway's
root, and reaches every model the gateway serves. The last part of the stream has ``done`` set, the reason
and the token counts. Environment: ``TOKENRELAY_URL`` (default http://127.0.0.1:8080), ``TOKENRELAY_MODEL``
(default ``tiny``), ``TOKENRELAY_API_KEY`` (when the gateway has keys).
"""

from __future__ import annotations

import os
import sys

import ollama

URL = os.environ.get("TOKENRELAY_URL", "http://127.0.0.1:8080")
MODEL = os.environ.get("TOKENRELAY_MODEL", "tiny")
API_KEY = os.environ.get("TOKENRELAY_API_KEY", "")


def main() -> None:
    prompt = sys.argv[1] if len(sys.argv) > 1 else "Name three colours."
    # Ollama has no API keys of its own; the client passes extra keyword arguments on to httpx
    headers = {"authorization": f"Bearer {API_KEY}"} if API_KEY else None
    client = ollama.Client(host=URL, headers=headers)
    last = None
    for part in client.chat(model=MODEL, messages=[{"role": "user", "content": prompt}], stream=True):
        print(part.message.content or "", end="", flush=True)
        last = part
    print()
    if last is not None and last.done:
        # done_reason is "stop" or "length"; eval_count is the answer's tokens, prompt_eval_count the prompt's
        print(f"done_reason: {last.done_reason}")
        print(f"usage: prompt_eval_count={last.prompt_eval_count} eval_count={last.eval_count}")


if __name__ == "__main__":
    main()
