"""The embedded model (SmolLM2-135M-Instruct via llama.cpp) streamed through the gateway for real."""

from __future__ import annotations

import time
from typing import Any

import openai
from tests.conftest import Server
from tests.test_stream_lifecycle import open_stream, read_until, wait_for


def test_streams_from_the_embedded_model(gateway: Server, chunk_validator: Any) -> None:
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0, timeout=60)
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            stream=True,
            max_tokens=24,
            temperature=0,
            stream_options={"include_usage": True},
        )
    )
    for chunk in chunks:
        chunk_validator.validate(chunk.model_dump(exclude_unset=True))
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(texts) >= 3  # token by token, not one blob
    text = "".join(texts)
    assert text.strip()
    assert "Paris" in text
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish in (["stop"], ["length"])
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens > 10 and 0 < usage.completion_tokens <= 24


def test_disconnect_stops_generation(gateway: Server) -> None:
    before = gateway.get_json("/stats")["models"]["tiny"]["cancelled"]
    sock = open_stream(
        gateway.port,
        {
            "model": "tiny",
            "stream": True,
            "max_tokens": 500,
            "temperature": 0.8,
            "messages": [{"role": "user", "content": "Write a very long story."}],
        },
    )
    seen = read_until(sock, b'"content"').count(b'"content"')
    sock.close()
    wait_for(lambda: gateway.get_json("/stats")["models"]["tiny"]["cancelled"] > before, timeout=5)
    stopped_at = gateway.get_json("/stats")["models"]["tiny"]["last_cancel_tokens"]
    assert stopped_at < seen + 40  # far from the 500 it was asked for
    # the engine is free at once for the next request
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0, timeout=60)
    t0 = time.monotonic()
    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert time.monotonic() - t0 < 5


def test_requests_queue_while_the_engine_is_busy(gateway: Server) -> None:
    import concurrent.futures

    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0, timeout=60)

    def ask(i: int) -> str:
        out = client.chat.completions.create(
            model="tiny", max_tokens=8, temperature=0, messages=[{"role": "user", "content": f"Count to {i}"}]
        )
        return out.choices[0].message.content or ""

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, range(4)))
    assert all(a.strip() for a in answers)


def test_an_assistant_prefix_is_continued_not_restarted(gateway: Server) -> None:
    """What mid-stream failover sends the embedded model: the text so far as an open assistant turn."""
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0, timeout=60)
    question: list[Any] = [{"role": "user", "content": "Write two sentences about the sea."}]

    def answer(messages: list[Any]) -> str:
        reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=40, temperature=0)
        return reply.choices[0].message.content or ""

    full = answer(question)
    words = full.split(" ")
    assert len(words) > 6
    prefix = " ".join(words[: len(words) // 2])
    rest = answer([*question, {"role": "assistant", "content": prefix}])
    assert not rest.lstrip().startswith(words[0])  # not a new answer from the start
    assert rest.split()[0] == words[len(words) // 2]  # greedy decoding picks up with the same next word
