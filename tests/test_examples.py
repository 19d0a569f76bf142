"""The runnable examples in examples/, each run as its own process against a real gateway.

Every example gets the environment a user would set (``TOKENRELAY_URL``, ``TOKENRELAY_MODEL=demo``, ...), and
what it prints is compared with what the gateway answers to the same request without streaming, so an
example that breaks, or drifts from the product, fails here. The browser page runs in Debian's Chromium.
"""

from __future__ import annotations

import ast
import functools
import http.server
import itertools
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import Page, Request, expect
from tests.chaos_proxy import ChaosProxy
from tests.conftest import ROOT, Server, raw_post
from tests.test_client import contained

EXAMPLES = ROOT / "examples"
MODEL = "demo"  # the mock: fast, and the same prompt always gives the same text


def run_example(
    gateway: Server, name: str, *args: str, env: dict[str, str] | None = None, ok: bool = True
) -> str:
    """Run ``examples/<name>`` the way its docstring says, returning stdout (stderr too when ``ok`` is
    False); with ``ok`` it must exit 0."""
    program = EXAMPLES / name
    cmd = ["bash", str(program)] if name.endswith(".sh") else [sys.executable, str(program)]
    base = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENRELAY_", "OLLAMA_"))}
    proc = subprocess.run(
        [*cmd, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={
            **base,
            "TOKENRELAY_URL": gateway.url,
            "TOKENRELAY_MODEL": MODEL,
            "TOKENRELAY_GRPC": f"127.0.0.1:{gateway.grpc_port}",
            **(env or {}),
        },
    )
    if ok:
        assert proc.returncode == 0, f"{name} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout
    return proc.stdout + proc.stderr


def reference(gateway: Server, messages: list[dict[str, Any]] | str, **extra: Any) -> dict[str, Any]:
    """The gateway's non-streaming answer to the same request: what the example must have printed."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    resp = raw_post(gateway.port, "/v1/chat/completions", {"model": MODEL, "messages": messages, **extra})
    assert resp.status == 200, resp.body
    body: dict[str, Any] = resp.json()
    return body


def answer(ref: dict[str, Any]) -> tuple[str, str, dict[str, int]]:
    """Text, finish reason and usage of a non-streaming answer."""
    choice = ref["choices"][0]
    usage = ref["usage"]
    assert usage["completion_tokens"] > 0 and usage["prompt_tokens"] > 0
    return str(choice["message"]["content"]), str(choice["finish_reason"]), usage


def test_curl_streams_then_answers_whole(gateway: Server) -> None:
    prompt = 'Say "hi" to C:\\temp'  # quotes and a backslash: the script escapes them for JSON itself
    text, finish, usage = answer(reference(gateway, prompt))
    out = run_example(gateway, "curl.sh", prompt)
    assert out.startswith("### streaming\n") and "\n### not streaming\n" in out
    streamed, whole = out.removeprefix("### streaming\n").split("\n### not streaming\n")

    data = [line[6:] for line in streamed.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    pieces = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    assert "".join(p for p in pieces if p) == text
    assert len([p for p in pieces if p]) > 1  # streamed in pieces, not one blob
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert [f for f in finishes if f] == [finish] == ["stop"]
    assert chunks[-1]["choices"] == []  # include_usage: the last chunk carries the counts
    assert chunks[-1]["usage"]["completion_tokens"] == usage["completion_tokens"]
    assert chunks[-1]["usage"]["total_tokens"] == usage["total_tokens"]

    body = json.loads(whole)
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"] == text
    assert body["choices"][0]["finish_reason"] == "stop" and body["usage"] == usage


def test_curl_stops_with_the_error_on_an_unknown_model(gateway: Server) -> None:
    out = run_example(gateway, "curl.sh", env={"TOKENRELAY_MODEL": "no-such-model"}, ok=False)
    assert "model_not_found" in out  # the gateway's JSON error shows ...
    assert "### not streaming" not in out  # ... and the script stops there (set -e and --fail-with-body)


def test_openai_chat(gateway: Server) -> None:
    prompt = "Name three colours."
    text, finish, usage = answer(reference(gateway, prompt))
    out = run_example(gateway, "openai_chat.py", prompt)
    assert out == (
        f"{text}\nfinish_reason: {finish}\n"
        f"usage: prompt_tokens={usage['prompt_tokens']} completion_tokens={usage['completion_tokens']} "
        f"total_tokens={usage['total_tokens']}\n"
    )


def test_openai_responses(gateway: Server) -> None:
    prompt = "Describe a river."
    text, _finish, usage = answer(reference(gateway, prompt))
    out = run_example(gateway, "openai_responses.py", prompt)
    assert out == (
        f"{text}\nstatus: completed\n"
        f"usage: input_tokens={usage['prompt_tokens']} output_tokens={usage['completion_tokens']} "
        f"total_tokens={usage['total_tokens']}\n"
    )


def test_anthropic_messages(gateway: Server) -> None:
    prompt = "Tell me about mountains."
    text, _finish, usage = answer(reference(gateway, prompt))
    out = run_example(gateway, "anthropic_messages.py", prompt)
    assert out == (
        f"{text}\nstop_reason: end_turn\n"
        f"usage: input_tokens={usage['prompt_tokens']} output_tokens={usage['completion_tokens']}\n"
    )


def test_ollama_chat(gateway: Server) -> None:
    prompt = "What is a lake?"
    text, finish, usage = answer(reference(gateway, prompt))
    out = run_example(gateway, "ollama_chat.py", prompt)
    assert out == (
        f"{text}\ndone_reason: {finish}\n"
        f"usage: prompt_eval_count={usage['prompt_tokens']} eval_count={usage['completion_tokens']}\n"
    )


def test_websocket_chat_runs_two_streams_on_one_socket(gateway: Server) -> None:
    prompts = ["Name three colours.", "Name three rivers."]
    refs = [answer(reference(gateway, p)) for p in prompts]
    assert refs[0][0] != refs[1][0]  # otherwise a mix-up of the two streams could pass
    out = run_example(gateway, "websocket_chat.py", *prompts)
    lines = out.splitlines()
    for n, (text, finish, usage) in enumerate(refs, 1):
        rid = f"r{n}"
        pieces = [ast.literal_eval(ln.split(": ", 1)[1]) for ln in lines if ln.startswith(f"{rid} token: ")]
        assert "".join(pieces) == text  # the live token messages add up to the answer
        assert f"{rid} text: {text}" in lines
        assert f"{rid} finish_reason: {finish}" in lines
        assert (
            f"{rid} usage: prompt_tokens={usage['prompt_tokens']} "
            f"completion_tokens={usage['completion_tokens']} total_tokens={usage['total_tokens']}"
        ) in lines


def test_grpc_chat(gateway: Server) -> None:
    prompt = "Why is the sky blue?"
    text, finish, usage = answer(reference(gateway, prompt))
    out = run_example(gateway, "grpc_chat.py", prompt)
    assert out == (
        f"{text}\n"
        f"usage: prompt_tokens={usage['prompt_tokens']} completion_tokens={usage['completion_tokens']} "
        f"total_tokens={usage['total_tokens']}\nfinish_reason: {finish}\n"
    )


def test_grpc_chat_reports_a_refused_call(gateway: Server) -> None:
    out = run_example(gateway, "grpc_chat.py", env={"TOKENRELAY_MODEL": "no-such-model"}, ok=False)
    assert "gRPC error NOT_FOUND" in out


def test_tool_calling_streams_the_arguments_then_answers(gateway: Server) -> None:
    prompt = "What is the weather in Paris?"
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    mock = {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}
    first = reference(gateway, prompt, tools=tools, mock=mock)
    text, finish, _usage = answer(first)
    assert finish == "tool_calls"
    [call] = first["choices"][0]["message"]["tool_calls"]

    out = run_example(gateway, "tool_calling_openai.py", prompt, env={"TOKENRELAY_MOCK_TOOLS": "1"})
    lines = out.splitlines()
    # the text the model wrote before calling, then the call announced with its id and name
    assert lines[:2] == [text, f"tool call 0: get_weather (id {call['id']})"]
    fragments = [ast.literal_eval(ln.removeprefix("  arguments += ")) for ln in lines if ln.startswith("  ")]
    assert len(fragments) > 1  # the arguments arrived in pieces ...
    assert "".join(fragments) == call["function"]["arguments"]  # ... that add up to the whole call
    arguments = json.loads(call["function"]["arguments"])
    assert arguments == {"city": "Paris"}
    assert "finish_reason: tool_calls" in lines
    assert f"get_weather arguments: {json.dumps(arguments)}" in lines

    # the round trip: the tool's result went back and the model answered the whole conversation
    [result_line] = [ln for ln in lines if ln.startswith("get_weather result: ")]
    result = result_line.removeprefix("get_weather result: ")
    assert json.loads(result)["city"] == "Paris"
    conversation = [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": text, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": result},
    ]
    final_text, final_finish, _ = answer(reference(gateway, conversation, tools=tools))
    assert lines[-2:] == [f"answer: {final_text}", f"finish_reason: {final_finish}"]
    assert final_finish == "stop"


def test_tool_calling_asks_the_mock_only_when_told(gateway: Server) -> None:
    """Without TOKENRELAY_MOCK_TOOLS the request is what a real model would get: the mock, not asked to
    call the tool, just answers."""
    prompt = "What is the weather in Rome?"
    text, finish, _ = answer(reference(gateway, prompt))
    out = run_example(gateway, "tool_calling_openai.py", prompt)
    assert out == f"{text}\nfinish_reason: {finish}\n"


def test_client_resume_survives_its_own_dropped_connections(gateway: Server) -> None:
    prompt = "Tell me about rivers."
    mock = {"tokens": 40, "tokens_per_second": 50}
    text, finish, usage = answer(reference(gateway, prompt, max_tokens=200, mock=mock))
    env = {"TOKENRELAY_MOCK": json.dumps(mock), "TOKENRELAY_DROP_EVERY": "5"}
    lines = run_example(gateway, "client_resume.py", prompt, env=env).splitlines()
    assert lines[0] == text  # nothing missing, nothing twice, across the drops
    assert lines[1] == f"state: finished, finish_reason: {finish}"
    assert (
        lines[2] == f"usage: {usage['prompt_tokens']} prompt + {usage['completion_tokens']} completion tokens"
    )
    resumed = re.fullmatch(r"resumed (\d+) times \(stream chatcmpl-\S+\)", lines[3])
    assert resumed is not None
    assert int(resumed[1]) >= 3


def test_client_tools_shows_the_arguments_taking_shape(gateway: Server) -> None:
    prompt = "What is the weather in Paris?"
    arguments = {"city": "Paris", "days": 3, "units": {"temperature": "celsius"}}
    mock = {"tool_calls": [{"name": "get_forecast", "arguments": arguments}], "tool_chunk_chars": 6}
    tools = [{"type": "function", "function": {"name": "get_forecast", "parameters": {"type": "object"}}}]
    text, finish, _ = answer(reference(gateway, prompt, tools=tools, mock=mock))
    lines = run_example(gateway, "client_tools.py", prompt, env={"TOKENRELAY_MOCK_TOOLS": "1"}).splitlines()
    pieces = [ast.literal_eval(ln.removeprefix("text: ")) for ln in lines if ln.startswith("text: ")]
    assert "".join(pieces) == text
    assert "tool call 0: get_forecast" in lines
    partials = [json.loads(ln.removeprefix("  partial: ")) for ln in lines if ln.startswith("  partial: ")]
    assert len(partials) > 4
    grown = [p for p in partials if p is not None]
    assert all(contained(a, b) for a, b in itertools.pairwise(grown))  # it only ever grows ...
    assert grown[-1] == arguments  # ... into the whole call
    assert f"call get_forecast({json.dumps(arguments)})" in lines
    assert lines[-1] == f"finish_reason: {finish}" == "finish_reason: tool_calls"


def test_openai_resume_survives_connections_cut_at_random(gateway: Server) -> None:
    prompt = "Tell me about rivers."
    text, finish, _ = answer(reference(gateway, prompt, max_tokens=200))
    with ChaosProxy(gateway.port, seed=3, cut_bytes=(150, 1200)) as proxy:
        # the example, unchanged, talks to the gateway through a proxy that cuts each connection
        out = run_example(gateway, "openai_resume.py", prompt, env={"TOKENRELAY_URL": proxy.url})
    assert out == f"{text}\nfinish_reason: {finish}\n"
    assert proxy.cuts >= 2


def test_readme_lists_every_example() -> None:
    readme = (EXAMPLES / "README.md").read_text()
    names = sorted(p.name for p in EXAMPLES.iterdir() if p.is_file() and p.name != "README.md")
    assert "curl.sh" in names and "eventsource.html" in names
    listed = re.findall(r"^- \[`([^`]+)`\]\(\1\): \S", readme, re.MULTILINE)  # one line each, saying what
    assert [n for n in names if n not in listed] == []
    assert "<!-- client examples -->" in readme


# -- the browser page ---------------------------------------------------------------------------------


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # keep the test output clean
        pass


@pytest.fixture(scope="module")
def page_server() -> Iterator[str]:
    """examples/ served on its own port: a page on another origin than the gateway, as a user's would be."""
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(EXAMPLES))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("opened", ["http", "file"])
def test_eventsource_page_streams_then_replays(
    page: Page, gateway: Server, page_server: str, opened: str
) -> None:
    prompt = "Write a short note about streaming."
    text, finish, _ = answer(reference(gateway, prompt))
    page_file = EXAMPLES / "eventsource.html"
    where = f"{page_server}/eventsource.html" if opened == "http" else page_file.as_uri()
    requests: list[Request] = []
    page.on("request", lambda r: requests.append(r))  # (Playwright cannot take a bound builtin)
    page.goto(f"{where}?base={gateway.url}")
    expect(page.locator("body")).to_have_attribute("data-state", "idle", timeout=10_000)  # the SDK loaded
    assert not page.url.startswith(gateway.url)  # another origin: CORS lets it through
    page.fill("#model", MODEL)
    page.fill("#prompt", prompt)
    page.click("#send")
    expect(page.locator("body")).to_have_attribute("data-state", "done", timeout=15_000)

    stream_id = page.locator("#stream-id").inner_text()
    assert stream_id.startswith("chatcmpl-")
    assert page.locator("#live").inner_text() == text
    assert page.locator("#replay").inner_text() == text  # the whole stream again, from event 0
    expect(page.locator("#live")).to_have_attribute("data-finish", finish)
    expect(page.locator("#replay")).to_have_attribute("data-finish", finish)
    # the replay was an EventSource on the resume endpoint, not another request to the model
    replays = [r for r in requests if r.url == f"{gateway.url}/v1/streams/{stream_id}?after=0"]
    assert [r.resource_type for r in replays] == ["eventsource"]
    assert len([r for r in requests if r.url.endswith("/v1/chat/completions") and r.method == "POST"]) == 1


def test_eventsource_page_shows_a_refused_request(page: Page, gateway: Server, page_server: str) -> None:
    page.goto(f"{page_server}/eventsource.html?base={gateway.url}&model=no-such-model")
    expect(page.locator("body")).to_have_attribute("data-state", "idle", timeout=10_000)
    page.click("#send")
    expect(page.locator("body")).to_have_attribute("data-state", "error", timeout=10_000)
    expect(page.locator("#error")).to_contain_text("no-such-model")
    assert page.locator("#replay").inner_text() == ""
