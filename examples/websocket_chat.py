"""Several chat streams on one WebSocket with the ``websockets`` library, in tokenrelay's own protocol.

    python examples/websocket_chat.py ["first question" ["second question" ...]]

Every question goes out at once on one socket (``/v1/ws/chat``), each as a ``request`` message with an id of
our choosing; the answers come back interleaved, every message tagged with its request's id, until each
request has had its ``done`` (or ``error``). Each message is one JSON text frame (docs/protocols.md):

    -> {"type": "request", "id": "r1", "body": {<a Chat Completions request; stream is implied>}}
    <- {"type": "token", "id": "r1", "text": "..."}
    <- {"type": "done", "id": "r1", "finish_reason": "stop", "usage": {...}}

``{"type": "cancel", "id": "r1"}`` would stop one stream and leave the others running. Environment:
``TOKENRELAY_URL`` (default http://127.0.0.1:8080; https becomes wss), ``TOKENRELAY_MODEL`` (default
``tiny``), ``TOKENRELAY_API_KEY`` (when the gateway has keys).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from websockets.sync.client import connect

URL = os.environ.get("TOKENRELAY_URL", "http://127.0.0.1:8080")
MODEL = os.environ.get("TOKENRELAY_MODEL", "tiny")
API_KEY = os.environ.get("TOKENRELAY_API_KEY", "")


def main() -> None:
    prompts = sys.argv[1:] or ["Name three colours.", "Name three rivers."]
    ws_url = URL.replace("http", "ws", 1) + "/v1/ws/chat"  # http -> ws, https -> wss
    headers = {"authorization": f"Bearer {API_KEY}"} if API_KEY else None
    answers: dict[str, str] = {}
    endings: dict[str, dict[str, Any]] = {}
    with connect(ws_url, additional_headers=headers) as ws:
        for n, prompt in enumerate(prompts, 1):
            rid = f"r{n}"
            answers[rid] = ""
            body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}]}
            ws.send(json.dumps({"type": "request", "id": rid, "body": body}))
        while len(endings) < len(prompts):
            msg = json.loads(ws.recv(timeout=120))
            rid = msg["id"]
            if msg["type"] == "token":
                answers[rid] += msg["text"]
                # repr shows each piece exactly, spaces included, as it arrives
                print(f"{rid} token: {msg['text']!r}", flush=True)
            elif msg["type"] in ("done", "error"):
                endings[rid] = msg
    failed = False
    for rid, answer in answers.items():
        end = endings[rid]
        print(f"{rid} text: {answer}")
        if end["type"] == "error":
            print(f"{rid} error: {end['error']['type']}: {end['error']['message']}")
            failed = True
            continue
        print(f"{rid} finish_reason: {end['finish_reason']}")
        usage = end["usage"]
        if usage is not None:
            print(
                f"{rid} usage: prompt_tokens={usage['prompt_tokens']} "
                f"completion_tokens={usage['completion_tokens']} total_tokens={usage['total_tokens']}"
            )
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
