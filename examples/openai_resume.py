"""The unchanged ``openai`` SDK, made to resume dropped streams by tokenrelay's transport.

    python examples/openai_resume.py ["Tell me about rivers."]

The five lines that matter are the client's construction: ``ResumingTransport`` goes under the SDK's httpx
client, and every streaming Chat Completions request through it resumes at tokenrelay's resume endpoint
when the connection drops; the loop below never sees the drop. Environment: ``TOKENRELAY_URL`` (default
http://127.0.0.1:8080), ``TOKENRELAY_MODEL`` (default ``tiny``), ``TOKENRELAY_API_KEY``.
"""

from __future__ import annotations

import os
import sys

import httpx
import openai

from tokenrelay.client import ResumingTransport

URL = os.environ.get("TOKENRELAY_URL", "http://127.0.0.1:8080")
MODEL = os.environ.get("TOKENRELAY_MODEL", "tiny")

client = openai.OpenAI(
    base_url=f"{URL}/v1",
    api_key=os.environ.get("TOKENRELAY_API_KEY", "unused"),
    http_client=httpx.Client(transport=ResumingTransport()),
)

prompt = sys.argv[1] if len(sys.argv) > 1 else "Tell me about rivers."
stream = client.chat.completions.create(
    model=MODEL, messages=[{"role": "user", "content": prompt}], stream=True, max_tokens=200
)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
    if chunk.choices and chunk.choices[0].finish_reason:
        print(f"\nfinish_reason: {chunk.choices[0].finish_reason}")
