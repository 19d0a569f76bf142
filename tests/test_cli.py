"""The tokenrelay command against a running gateway."""

from __future__ import annotations

import subprocess
import sys

import openai
from tests.conftest import Server


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tokenrelay", *args], capture_output=True, text=True, timeout=60
    )


def test_chat_prints_the_streamed_answer(gateway: Server) -> None:
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0)
    expected = client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "hello there"}]
    )
    out = run("chat", "hello there", "--model", "demo", "--url", gateway.url)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected.choices[0].message.content


def test_chat_reports_errors(gateway: Server) -> None:
    out = run("chat", "hi", "--model", "missing", "--url", gateway.url)
    assert out.returncode == 1
    assert "404" in out.stderr and "missing" in out.stderr


def test_models_lists_names(gateway: Server) -> None:
    out = run("models", "--url", gateway.url)
    assert out.returncode == 0
    for name in ("tiny", "demo", "gpt"):
        assert name in out.stdout
