"""The OpenAI <-> Anthropic translation module on its own: requests both ways, stop reasons, usage."""

from __future__ import annotations

import msgspec
import pytest

from tokenrelay import anthropic_mapping as mapping
from tokenrelay.anthropic_wire import MessagesRequest
from tokenrelay.errors import GatewayError
from tokenrelay.events import Usage
from tokenrelay.openai_wire import (
    AssistantMessage,
    AudioPart,
    ImagePart,
    InputAudio,
    SystemMessage,
    ToolMessage,
    UserMessage,
)

ANTHROPIC_REQUEST = {
    "model": "m",
    "max_tokens": 64,
    "system": [{"type": "text", "text": "Be terse."}],
    "stop_sequences": ["END"],
    "temperature": 0.5,
    "top_k": 5,
    "metadata": {"user_id": "u1"},
    "tools": [{"name": "weather", "description": "d", "input_schema": {"type": "object"}}],
    "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
    "messages": [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "QUJD"}},
            ],
        },
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "s"},
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "t1", "name": "weather", "input": {"city": "Oslo"}},
                {"type": "tool_use", "id": "t2", "name": "weather", "input": {"city": "Rome"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "t1", "content": "cold"},
                {
                    "type": "tool_result",
                    "tool_use_id": "t2",
                    "content": [{"type": "text", "text": "no"}],
                    "is_error": True,
                },
                {"type": "text", "text": "And now?"},
            ],
        },
    ],
}


def decode(body: dict[str, object]) -> MessagesRequest:
    return msgspec.convert(body, MessagesRequest)


def test_anthropic_request_to_internal() -> None:
    req = mapping.request_to_internal(decode(ANTHROPIC_REQUEST))
    kinds = [type(m) for m in req.messages]
    assert kinds == [SystemMessage, UserMessage, AssistantMessage, ToolMessage, ToolMessage, UserMessage]
    user = req.messages[1]
    assert isinstance(user, UserMessage) and isinstance(user.content, list)
    image = user.content[1]
    assert isinstance(image, ImagePart) and image.image_url.url == "data:image/jpeg;base64,QUJD"
    assistant = req.messages[2]
    assert isinstance(assistant, AssistantMessage)
    assert assistant.content == "Checking." and assistant.reasoning_content == "hmm"
    assert [(c.id, c.function.arguments) for c in assistant.tool_calls or []] == [
        ("t1", '{"city":"Oslo"}'),
        ("t2", '{"city":"Rome"}'),
    ]
    results = req.messages[3:5]
    assert [(m.tool_call_id, m.content) for m in results] == [("t1", "cold"), ("t2", "Error: no")]  # type: ignore[union-attr]
    assert req.tool_choice == "required" and req.parallel_tool_calls is False
    assert req.stop == ["END"] and req.top_k == 5 and req.user == "u1" and req.max_tokens == 64


def test_round_trip_back_to_anthropic() -> None:
    req = mapping.request_to_internal(decode(ANTHROPIC_REQUEST))
    body = mapping.request_to_anthropic(req, "claude-x", 1000)
    assert body["system"] == "Be terse."
    assert body["max_tokens"] == 64 and body["model"] == "claude-x" and body["stream"] is True
    assert [t["role"] for t in body["messages"]] == ["user", "assistant", "user"]
    assert body["messages"][0]["content"][1] == {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/jpeg", "data": "QUJD"},
    }
    assert [b["type"] for b in body["messages"][1]["content"]] == ["text", "tool_use", "tool_use"]
    assert body["messages"][1]["content"][1]["input"] == {"city": "Oslo"}
    last = body["messages"][2]["content"]
    assert [b["type"] for b in last] == ["tool_result", "tool_result", "text"]
    assert body["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    assert body["tools"] == [{"name": "weather", "description": "d", "input_schema": {"type": "object"}}]
    assert body["stop_sequences"] == ["END"] and body["top_k"] == 5 and body["metadata"] == {"user_id": "u1"}


@pytest.mark.parametrize(
    ("stop", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("model_context_window_exceeded", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        ("something_new", "stop"),
        (None, "stop"),
    ],
)
def test_stop_reason_to_finish_reason(stop: str | None, finish: str) -> None:
    assert mapping.finish_reason(stop) == finish


@pytest.mark.parametrize("finish", ["stop", "length", "tool_calls", "content_filter"])
def test_finish_reasons_survive_a_round_trip(finish: str) -> None:
    assert mapping.finish_reason(mapping.stop_reason(finish)) == finish


def test_usage_counts_cached_tokens_once() -> None:
    usage = mapping.usage_from_anthropic(input_tokens=10, output_tokens=7, cache_creation=3, cache_read=20)
    assert usage == Usage(prompt_tokens=33, completion_tokens=7, cached_tokens=20)
    back = mapping.usage_to_anthropic(Usage(prompt_tokens=33, completion_tokens=7, cached_tokens=20))
    assert back["input_tokens"] == 13 and back["cache_read_input_tokens"] == 20 and back["output_tokens"] == 7


@pytest.mark.parametrize(
    ("status", "etype"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (404, "not_found_error"),
        (413, "request_too_large"),
        (429, "rate_limit_error"),
        (502, "api_error"),
        (503, "overloaded_error"),
        (529, "overloaded_error"),
    ],
)
def test_error_types_by_status(status: int, etype: str) -> None:
    assert mapping.error_body(status, "m") == {"type": "error", "error": {"type": etype, "message": "m"}}


def test_requests_anthropic_cannot_take_fail_early() -> None:
    req = mapping.request_to_internal(
        decode({**ANTHROPIC_REQUEST, "messages": [{"role": "user", "content": "x"}]})
    )
    req.messages.append(UserMessage(content=[AudioPart(input_audio=InputAudio(data="", format="wav"))]))
    with pytest.raises(GatewayError) as info:
        mapping.request_to_anthropic(req, "m", 10)
    assert (
        info.value.status == 400 and info.value.param == "messages[2].content[0]"
    )  # [0] is the system prompt
    with pytest.raises(GatewayError) as info:
        mapping.request_to_internal(
            decode({**ANTHROPIC_REQUEST, "tools": [{"name": "s", "type": "web_search_20250305"}]})
        )
    assert info.value.param == "tools[0].type"
