"""The web pages in a real browser: headless Debian Chromium driven by Playwright.

The playground streams from the mock and from the embedded model, its stop button cancels the model, and a
dropped connection resumes by itself with the exact text; the dashboard shows a stream while it runs.
Screenshots go to artifacts/.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from playwright.sync_api import Page, expect
from tests.conftest import Server, raw_post, wait_for

SLOW = '{"tokens":60,"tokens_per_second":20}'


def whole_text(gateway: Server, mock: str) -> str:
    body = {"model": "demo", "messages": [{"role": "user", "content": PROMPT}], "mock": json.loads(mock)}
    return str(
        raw_post(gateway.port, "/v1/chat/completions", body).json()["choices"][0]["message"]["content"]
    )


PROMPT = "Write a short note about streaming."


def open_playground(page: Page, gateway: Server, model: str, mock: str | None = None) -> None:
    query = f"?model={model}" + (f"&mock={mock}" if mock else "")
    page.goto(f"{gateway.url}/ui/playground{query}")
    expect(page.locator("#model")).to_have_value(model)


def streamed_text(page: Page) -> str:
    return str(page.locator("#output").get_attribute("data-text") or "")


def test_playground_streams_the_mock_token_by_token(page: Page, gateway: Server) -> None:
    open_playground(page, gateway, "demo", SLOW)
    page.click("#send")
    wait_for(lambda: 0 < len(streamed_text(page).split()) < 60)  # part of it shown while it streams
    expect(page.locator("body")).to_have_attribute("data-state", "idle", timeout=15_000)
    assert streamed_text(page) == whole_text(gateway, SLOW)
    expect(page.locator("#status")).to_contain_text("done (stop)")
    assert page.locator("#output p").count() >= 1  # rendered as Markdown paragraphs


def test_playground_streams_the_embedded_model(page: Page, gateway: Server) -> None:
    open_playground(page, gateway, "tiny")
    page.fill("#prompt", "What is the capital of France?")
    page.click("#send")
    expect(page.locator("body")).to_have_attribute("data-state", "idle", timeout=60_000)
    assert streamed_text(page).strip()
    expect(page.locator("#status")).to_contain_text("done")


def test_stop_cancels_the_generation(page: Page, gateway: Server) -> None:
    before = gateway.mock_cancelled()
    open_playground(page, gateway, "demo", SLOW)
    page.click("#send")
    wait_for(lambda: len(streamed_text(page).split()) >= 5)
    page.click("#stop")
    gateway.wait_cancelled(before)  # the model stopped, not just the page
    shown = len(streamed_text(page).split())
    assert shown < 60
    expect(page.locator("#status")).to_have_text("stopped")


def test_a_dropped_connection_resumes_with_the_exact_text(page: Page, gateway: Server) -> None:
    open_playground(page, gateway, "demo", SLOW)
    page.click("#send")
    wait_for(lambda: len(streamed_text(page).split()) >= 8)
    page.click("#drop")
    expect(page.locator("body")).to_have_attribute("data-resumed", "yes", timeout=10_000)
    expect(page.locator("body")).to_have_attribute("data-state", "idle", timeout=20_000)
    assert streamed_text(page) == whole_text(gateway, SLOW)  # nothing missing, nothing twice


def test_dashboard_shows_a_running_stream(page: Page, gateway: Server) -> None:
    page.goto(f"{gateway.url}/ui/dashboard")
    expect(page.locator("#deployments tr[data-deployment='demo']")).to_have_count(1, timeout=5_000)
    body: dict[str, Any] = {
        "model": "demo",
        "messages": [{"role": "user", "content": "long"}],
        "stream": True,
        "mock": {"tokens": 80, "tokens_per_second": 20},
    }
    runner = threading.Thread(target=raw_post, args=(gateway.port, "/v1/chat/completions", body))
    runner.start()
    expect(page.locator("#active")).not_to_have_text("0", timeout=5_000)
    active_row = page.locator("#deployments tr[data-deployment='demo'] td").nth(1)
    expect(active_row).to_have_text("1", timeout=5_000)
    runner.join(timeout=15)
    expect(page.locator("#active")).to_have_text("0", timeout=5_000)


def test_the_sdk_follows_a_stream_with_eventsource(page: Page, gateway: Server) -> None:
    """EventSource on the resume endpoint: the browser numbers events and reconnects by itself."""
    resp = raw_post(
        gateway.port,
        "/v1/chat/completions",
        {"model": "demo", "messages": [{"role": "user", "content": PROMPT}], "stream": True},
    )
    stream_id = resp.headers["x-stream-id"]
    page.goto(f"{gateway.url}/ui/playground")
    text = page.evaluate(
        """async (id) => {
            const { TokenRelay } = await import("/sdk/tokenrelay.js");
            return await new Promise((resolve, reject) => {
                let text = "";
                new TokenRelay().follow(id, 3, {
                    onToken: (t) => { text += t; },
                    onDone: () => resolve(text),
                    onError: (e) => reject(new Error(e.message)),
                });
            });
        }""",
        stream_id,
    )
    whole = whole_text(gateway, '{"tokens":12}')
    words = whole.split(" ")
    assert text == " ".join(words[3:])  # everything after event 3


def test_the_sdk_reports_a_refused_follow(page: Page, gateway: Server) -> None:
    """EventSource cannot see a 404; the SDK turns the closed source into an onError call."""
    page.goto(f"{gateway.url}/ui/playground")
    error = page.evaluate(
        """async () => {
            const { TokenRelay } = await import("/sdk/tokenrelay.js");
            return await new Promise((resolve) => {
                new TokenRelay().follow("chatcmpl-no-such-stream", 0, {
                    onDone: () => resolve({ type: "unexpected done" }),
                    onError: (e) => resolve(e),
                });
            });
        }"""
    )
    assert error["type"] == "stream_not_found"
    assert "chatcmpl-no-such-stream" in error["message"]


def test_the_sdk_resolves_done_with_the_result_and_stops_on_abort(page: Page, gateway: Server) -> None:
    page.goto(f"{gateway.url}/ui/playground")
    messages = [{"role": "user", "content": PROMPT}]
    finished = page.evaluate(
        """async (body) => {
            const { TokenRelay } = await import("/sdk/tokenrelay.js");
            return await new TokenRelay().chat(body).done;
        }""",
        {"model": "demo", "messages": messages, "mock": {"tokens": 12}},
    )
    assert finished["state"] == "finished"
    assert finished["finishReason"] == "stop"
    assert finished["text"] == whole_text(gateway, '{"tokens":12}')
    assert finished["id"].startswith("chatcmpl-")

    before = gateway.mock_cancelled()
    stopped = page.evaluate(
        """async (body) => {
            const { TokenRelay } = await import("/sdk/tokenrelay.js");
            const controller = new AbortController();
            let tokens = 0;
            const stream = new TokenRelay().chat(body, {
                signal: controller.signal,
                onToken: () => { tokens += 1; if (tokens === 3) controller.abort(); },
            });
            return await stream.done;
        }""",
        {"model": "demo", "messages": messages, "mock": json.loads(SLOW)},
    )
    gateway.wait_cancelled(before)  # aborting the signal stopped the model on the server
    assert stopped["state"] == "stopped"
    assert stopped["finishReason"] is None
    assert 3 <= len(stopped["text"].split()) < 60
