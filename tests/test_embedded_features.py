"""The embedded model's JSON mode, JSON schemas and tool calls (llama.cpp grammars), and image inputs:
refused by the embedded model in every protocol's own error format, passed through to upstreams.

Every protocol is driven by its own client where one can say what the test needs (the openai SDK for
Chat and Responses, the anthropic SDK, the ollama client, websockets, grpcio). The schemas bound every
string and leave no room for extra keys, so a grammar-constrained answer always fits in ``max_tokens`` (even
at 4 tokens a character) and must parse and validate.
"""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import anthropic
import grpc
import ollama
import openai
import pytest
from jsonschema import Draft202012Validator
from tests.conftest import Server, raw_post
from websockets.sync.client import connect

from tokenrelay.errors import GatewayError
from tokenrelay.events import ToolCallDelta
from tokenrelay.grpc_api import tokenrelay_pb2 as pb
from tokenrelay.grpc_api import tokenrelay_pb2_grpc as pb_grpc
from tokenrelay.openai_wire import FunctionDef, NamedFunction, NamedToolChoice, Tool, UserMessage
from tokenrelay.providers.llamacpp_grammar import CallText, plan
from tokenrelay.request import ChatRequest

PLACE: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "country": {"type": "string", "maxLength": 24},
        "population": {"type": "integer"},  # no minimum: llama.cpp grammars do not bound numbers
    },
    "required": ["city", "country", "population"],
    "additionalProperties": False,
}
WEATHER_ARGS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME_ARGS: dict[str, Any] = {
    "type": "object",
    "properties": {"timezone": {"type": "string", "maxLength": 24}},
    "required": ["timezone"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": WEATHER_ARGS,
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "description": "Get the time in a timezone", "parameters": TIME_ARGS},
}
ASK_WEATHER = "What is the weather in Paris?"
PROMPTS = ["Tell me about a big city.", "Name a city in Japan.", "Describe the capital of Italy."]
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 16).decode()
IMAGE_URL = "https://example.com/cat.png"


def place_ok(text: str) -> dict[str, Any]:
    value = json.loads(text)
    Draft202012Validator(PLACE).validate(value)
    return value  # type: ignore[no-any-return]


def args_ok(arguments: str | dict[str, Any], schema: dict[str, Any] = WEATHER_ARGS) -> None:
    value = json.loads(arguments) if isinstance(arguments, str) else arguments
    Draft202012Validator(schema).validate(value)


@pytest.fixture
def client(gateway: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="k", max_retries=0, timeout=60)


# ------------------------------------------------------------------------------------------- JSON mode


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_output_always_parses_and_validates(client: openai.OpenAI, stream: bool) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "place", "schema": PLACE, "strict": True}}
    for seed, prompt in enumerate(PROMPTS, start=1):  # sampled, not greedy: a different path each time
        kwargs: dict[str, Any] = {
            "model": "tiny",
            "messages": [{"role": "user", "content": prompt}],
            "response_format": fmt,
            "max_tokens": 240,
            "temperature": 0.9,
            "seed": seed,
        }
        if stream:
            chunks = list(client.chat.completions.create(stream=True, **kwargs))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            assert len(chunks) > 5  # token by token
        else:
            reply = client.chat.completions.create(**kwargs)
            text = reply.choices[0].message.content or ""
            finish = [reply.choices[0].finish_reason]
        assert finish == ["stop"], text
        place_ok(text)


@pytest.mark.parametrize("stream", [False, True])
def test_json_object_mode(client: openai.OpenAI, stream: bool) -> None:
    for prompt in ("Name a fruit.", "What is the capital of France?"):
        kwargs: dict[str, Any] = {
            "model": "tiny",
            "messages": [{"role": "user", "content": prompt}],
            "response_format": {"type": "json_object"},
            "max_tokens": 80,
            "temperature": 0,
        }
        if stream:
            chunks = client.chat.completions.create(stream=True, **kwargs)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        else:
            text = client.chat.completions.create(**kwargs).choices[0].message.content or ""
        assert isinstance(json.loads(text), dict), text


def test_json_schema_through_responses(client: openai.OpenAI) -> None:
    fmt = {"format": {"type": "json_schema", "name": "place", "schema": PLACE, "strict": True}}
    resp = client.responses.create(
        model="tiny",
        input=PROMPTS[1],
        text=fmt,
        max_output_tokens=240,
        temperature=0.9,  # type: ignore[arg-type]
    )
    assert resp.status == "completed"
    place_ok(resp.output_text)
    with client.responses.stream(
        model="tiny",
        input="Name a fruit.",
        text={"format": {"type": "json_object"}},
        max_output_tokens=80,
        temperature=0,
    ) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
    assert len(deltas) > 2
    assert isinstance(json.loads("".join(deltas)), dict)


def test_json_through_ollama(gateway: Server) -> None:
    client = ollama.Client(host=gateway.url, timeout=60)
    options = {"temperature": 0.9, "seed": 7, "num_predict": 240}
    reply = client.chat(
        model="tiny", messages=[{"role": "user", "content": PROMPTS[2]}], format=PLACE, options=options
    )
    assert reply.done_reason == "stop"
    place_ok(reply.message.content or "")
    parts = list(
        client.generate(
            model="tiny",
            prompt="Name a fruit.",
            format="json",
            stream=True,
            options={"temperature": 0, "num_predict": 80},
        )
    )
    assert isinstance(json.loads("".join(p.response for p in parts)), dict)


@pytest.mark.parametrize(
    ("schema", "why"),
    [
        ({"type": "no-such-type"}, "Unrecognized schema"),
        ({"$ref": "https://example.com/schema.json"}, "Only local '$ref's"),
        ({"type": "string", "maxLength": 50000}, "too large"),
    ],
)
def test_a_schema_llama_cpp_cannot_enforce_is_a_400(
    gateway: Server, schema: dict[str, Any], why: str
) -> None:
    messages = [{"role": "user", "content": "hi"}]
    chat = raw_post(
        gateway.port,
        "/v1/chat/completions",
        {
            "model": "tiny",
            "stream": True,
            "messages": messages,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        },
    )
    assert chat.status == 400, chat.body
    error = chat.json()["error"]
    assert error["type"] == "invalid_request_error" and why in error["message"]
    assert error["param"] == "response_format.json_schema.schema"
    responses = raw_post(
        gateway.port,
        "/v1/responses",
        {
            "model": "tiny",
            "input": "hi",
            "text": {"format": {"type": "json_schema", "name": "x", "schema": schema}},
        },
    )
    assert responses.status == 400 and responses.json()["error"]["param"] == "text.format.schema"
    olla = raw_post(gateway.port, "/api/chat", {"model": "tiny", "messages": messages, "format": schema})
    assert olla.status == 400 and why in olla.json()["error"]


def test_grammars_are_built_once_per_schema(gateway: Server) -> None:
    """A bad schema is the cheapest probe: the second request with it is answered from the cache."""

    def builds() -> int:
        return int(gateway.get_json("/stats")["models"]["tiny"]["grammar_builds"])

    schema = {"title": uuid.uuid4().hex, "type": "no-such-type"}
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
    }
    before = builds()
    assert raw_post(gateway.port, "/v1/chat/completions", body).status == 400
    assert builds() == before + 1
    reordered = {"type": "no-such-type", "title": schema["title"]}  # the same schema in canonical form
    body["response_format"]["json_schema"]["schema"] = reordered  # type: ignore[index]
    assert raw_post(gateway.port, "/v1/chat/completions", body).status == 400
    assert builds() == before + 1


def test_json_mode_is_passed_to_openai_upstreams(
    client: openai.OpenAI, gateway: Server, mock_upstream: Server
) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "place", "schema": PLACE, "strict": True}}
    client.chat.completions.create(
        model="gpt",
        messages=[{"role": "user", "content": "hi"}],
        response_format=fmt,  # type: ignore[arg-type]
        extra_body={"mock": {"text": "{}"}},
    )
    assert mock_upstream.get_json("/mock/stats")["last_request"]["body"]["response_format"] == fmt
    client.responses.create(
        model="gpt",
        input="hi",
        text={"format": {"type": "json_schema", "name": "place", "schema": PLACE, "strict": True}},
        extra_body={"mock": {"text": "{}"}},
    )
    assert mock_upstream.get_json("/mock/stats")["last_request"]["body"]["response_format"] == fmt
    ollama.Client(host=gateway.url, timeout=30).chat(
        model="gpt", messages=[{"role": "user", "content": "hi"}], format="json"
    )
    sent = mock_upstream.get_json("/mock/stats")["last_request"]["body"]
    assert sent["response_format"] == {"type": "json_object"}


# ------------------------------------------------------------------------------------------ tool calls


def test_tool_call_streams_as_chat_deltas(client: openai.OpenAI, chunk_validator: Any) -> None:
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": ASK_WEATHER}],
            tools=[WEATHER],  # type: ignore[list-item]
            tool_choice="required",
            max_tokens=160,
            stream=True,
        )
    )
    for chunk in chunks:
        chunk_validator.validate(chunk.model_dump(exclude_unset=True))
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]
    first = calls[0]
    assert first.index == 0 and first.type == "function"
    assert first.id and first.id.startswith("call_")
    assert first.function and first.function.name == "get_weather" and first.function.arguments == ""
    assert all(tc.id is None and tc.function and tc.function.name is None for tc in calls[1:])
    assert len(calls) > 3  # the arguments stream as the model writes them
    args_ok("".join(tc.function.arguments or "" for tc in calls if tc.function))
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "tool_calls"
    ]
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)


def test_named_tool_choice_picks_that_tool(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "What time is it in Tokyo?"}],
        tools=[WEATHER, TIME],  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        max_tokens=160,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.function.name == "get_time"  # type: ignore[union-attr]
    args_ok(call.function.arguments, TIME_ARGS)  # type: ignore[union-attr]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "hi"}],
            tools=[WEATHER],  # type: ignore[list-item]
            tool_choice={"type": "function", "function": {"name": "get_time"}},
        )
    assert info.value.body["param"] == "tool_choice.function.name"  # type: ignore[index]


def test_tool_call_in_a_conversation_then_an_answer(client: openai.OpenAI) -> None:
    """A call, its result, and the model's text answer: the earlier call is shown to the model as JSON."""
    reply = client.chat.completions.create(
        model="tiny",
        messages=[
            {"role": "user", "content": ASK_WEATHER},
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {
                            "name": "get_weather",
                            "arguments": '{"city": "Paris", "unit": "celsius"}',
                        },
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees and sunny"},
        ],
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="none",
        max_tokens=16,
        temperature=0,
    )
    assert reply.choices[0].message.content and not reply.choices[0].message.tool_calls


def test_tool_choice_auto_gives_text_or_a_valid_call(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": ASK_WEATHER}],
        tools=[WEATHER],  # type: ignore[list-item]
        max_tokens=60,
        temperature=0,
    )
    choice = reply.choices[0]
    if choice.message.tool_calls:  # a 135M model seldom decides to call by itself
        assert choice.finish_reason == "tool_calls"
        args_ok(choice.message.tool_calls[0].function.arguments)  # type: ignore[union-attr]
    else:
        assert choice.message.content and not choice.message.content.startswith("{")


def test_tool_parameters_with_local_refs(client: openai.OpenAI) -> None:
    """A parameters schema's own ``#/$defs/...`` references still resolve once it sits inside the call."""
    params = {
        "type": "object",
        "$defs": {"unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "properties": {"city": {"type": "string", "maxLength": 24}, "unit": {"$ref": "#/$defs/unit"}},
        "required": ["city", "unit"],
        "additionalProperties": False,
    }
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": params}}
    reply = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": ASK_WEATHER}],
        tools=[tool, TIME],  # type: ignore[list-item]
        tool_choice="required",
        max_tokens=160,
    )
    (call,) = reply.choices[0].message.tool_calls or []
    schema = params if call.function.name == "get_weather" else TIME_ARGS  # type: ignore[union-attr]
    args_ok(call.function.arguments, schema)  # type: ignore[union-attr]


def test_tool_call_through_responses(client: openai.OpenAI) -> None:
    tool = {"type": "function", "name": "get_weather", "parameters": WEATHER_ARGS}
    with client.responses.stream(
        model="tiny",
        input=ASK_WEATHER,
        tools=[tool],  # type: ignore[list-item]
        tool_choice="required",
        max_output_tokens=160,
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert len(deltas) > 3
    (item,) = [o for o in final.output if o.type == "function_call"]
    assert item.name == "get_weather" and item.call_id.startswith("call_")
    assert item.arguments == "".join(deltas)
    args_ok(item.arguments)
    assert final.status == "completed"


def test_tool_call_through_anthropic(gateway: Server) -> None:
    client = anthropic.Anthropic(base_url=gateway.url, api_key="k", max_retries=0, timeout=60)
    tool = {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "input_schema": WEATHER_ARGS,
    }
    with client.messages.stream(
        model="tiny",
        max_tokens=160,
        messages=[{"role": "user", "content": ASK_WEATHER}],
        tools=[tool],  # type: ignore[list-item]
        tool_choice={"type": "any"},
    ) as stream:
        fragments = [
            e for e in stream if e.type == "content_block_delta" and e.delta.type == "input_json_delta"
        ]
        message = stream.get_final_message()
    assert len(fragments) > 3
    assert message.stop_reason == "tool_use"
    (block,) = message.content
    assert block.type == "tool_use" and block.name == "get_weather"
    args_ok(block.input)  # type: ignore[arg-type]


def test_tool_call_through_ollama(gateway: Server) -> None:
    """Ollama has no tool_choice; tokenrelay takes OpenAI's as an extension (the ollama client cannot send
    it, so the request is raw; every line must still be what the ollama client reads)."""
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": ASK_WEATHER}],
        "tools": [WEATHER],
        "tool_choice": "required",
        "options": {"num_predict": 160},
    }
    resp = raw_post(gateway.port, "/api/chat", body)
    assert resp.status == 200
    lines = [ollama.ChatResponse.model_validate_json(line) for line in resp.body.splitlines()]
    calls = [c for line in lines for c in line.message.tool_calls or ()]
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    args_ok(dict(calls[0].function.arguments))
    assert lines[-1].done and lines[-1].done_reason == "stop"


def test_tool_call_through_websocket(gateway: Server) -> None:
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": ASK_WEATHER}],
        "tools": [WEATHER],
        "tool_choice": "required",
        "max_tokens": 160,
    }
    fragments = []
    with connect(f"ws://127.0.0.1:{gateway.port}/v1/ws/chat") as ws:
        ws.send(json.dumps({"type": "request", "id": "t", "body": body}))
        while True:
            msg = json.loads(ws.recv(timeout=60))
            if msg["type"] == "tool_call":
                fragments.append(msg)
            elif msg["type"] in ("done", "error"):
                break
    assert msg["type"] == "done" and msg["finish_reason"] == "tool_calls", msg
    assert fragments[0]["call_id"].startswith("call_") and fragments[0]["name"] == "get_weather"
    args_ok("".join(f["arguments"] for f in fragments))


def test_tool_call_through_grpc(gateway: Server) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
        stub = pb_grpc.TokenRelayStub(channel)
        req = pb.ChatRequest(
            model="tiny",
            messages=[pb.Message(role="user", content=ASK_WEATHER)],
            tools=[pb.Tool(name="get_weather", parameters_json=json.dumps(WEATHER_ARGS))],
            tool_choice="required",
            max_tokens=160,
        )
        events = list(stub.StreamChat(req, timeout=60))
    calls = [e.tool_call for e in events if e.WhichOneof("kind") == "tool_call"]
    assert calls[0].id.startswith("call_") and calls[0].name == "get_weather"
    args_ok("".join(c.arguments for c in calls))
    assert events[-1].finish_reason == "tool_calls"


# -------------------------------------------------------------------------------------------- images


def test_images_to_the_embedded_model_are_400s_in_each_protocol(gateway: Server) -> None:
    chat = raw_post(
        gateway.port,
        "/v1/chat/completions",
        {
            "model": "tiny",
            "stream": True,
            "messages": [
                {"role": "system", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is this?"},
                        {"type": "image_url", "image_url": {"url": IMAGE_URL}},
                    ],
                },
            ],
        },
    )
    assert chat.status == 400 and chat.headers["content-type"].startswith("application/json")
    error = chat.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "unsupported_content"
    assert error["param"] == "messages[1].content[1]" and "does not accept images" in error["message"]

    responses = raw_post(
        gateway.port,
        "/v1/responses",
        {
            "model": "tiny",
            "stream": True,
            "instructions": "Be brief.",  # becomes a system message: the param still counts input items
            "input": [
                {
                    "role": "user",
                    "content": [
                        {"type": "input_image", "image_url": IMAGE_URL},
                        {"type": "input_text", "text": "What is this?"},
                    ],
                }
            ],
        },
    )
    assert responses.status == 400
    assert responses.json()["error"]["param"] == "input[0].content[0]"

    claude = raw_post(
        gateway.port,
        "/v1/messages",
        {
            "model": "tiny",
            "max_tokens": 10,
            "stream": True,
            "system": "Be brief.",
            "messages": [
                {"role": "user", "content": "Look."},
                {"role": "assistant", "content": "Where?"},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Here:"},
                        {
                            "type": "image",
                            "source": {"type": "base64", "media_type": "image/png", "data": PNG},
                        },
                    ],
                },
            ],
        },
    )
    assert claude.status == 400
    body = claude.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] == "messages[2].content[1]" and "images" in body["error"]["message"]

    olla = raw_post(
        gateway.port,
        "/api/chat",
        {"model": "tiny", "messages": [{"role": "user", "content": "What is this?", "images": [PNG]}]},
    )
    assert olla.status == 400 and "does not accept images" in olla.json()["error"]
    gen = raw_post(gateway.port, "/api/generate", {"model": "tiny", "prompt": "What?", "images": [PNG]})
    assert gen.status == 400 and "does not accept images" in gen.json()["error"]


def test_images_to_the_embedded_model_over_sdks_websocket_and_grpc(
    client: openai.OpenAI, gateway: Server
) -> None:
    content = [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": IMAGE_URL}},
    ]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": content}],  # type: ignore[misc, list-item]
            stream=True,
        )
    assert info.value.body["param"] == "messages[0].content[1]"  # type: ignore[index]
    claude = anthropic.Anthropic(base_url=gateway.url, api_key="k", max_retries=0, timeout=30)
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.create(
            model="tiny",
            max_tokens=10,
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image", "source": {"type": "url", "url": IMAGE_URL}}],
                }
            ],
        )
    with pytest.raises(ollama.ResponseError) as olla:
        ollama.Client(host=gateway.url, timeout=30).chat(
            model="tiny", messages=[{"role": "user", "content": "What?", "images": [PNG]}]
        )
    assert olla.value.status_code == 400
    body = {"model": "tiny", "messages": [{"role": "user", "content": content}]}
    with connect(f"ws://127.0.0.1:{gateway.port}/v1/ws/chat") as ws:
        ws.send(json.dumps({"type": "request", "id": "img", "body": body}))
        msg = json.loads(ws.recv(timeout=30))
    assert msg["type"] == "error" and msg["id"] == "img"
    assert (
        msg["error"]["param"] == "messages[0].content[1]" and msg["error"]["type"] == "invalid_request_error"
    )
    with grpc.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
        stub = pb_grpc.TokenRelayStub(channel)
        with pytest.raises(grpc.RpcError) as rpc:
            list(stub.StreamChat(pb.ChatRequest(body_json=json.dumps(body)), timeout=30))
    assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "images" in rpc.value.details()  # type: ignore[attr-defined]


def upstream_body(mock_upstream: Server) -> dict[str, Any]:
    return mock_upstream.get_json("/mock/stats")["last_request"]["body"]  # type: ignore[no-any-return]


def test_images_pass_through_to_upstreams(
    client: openai.OpenAI, gateway: Server, mock_upstream: Server
) -> None:
    ok = {"mock": {"text": "ok"}}
    # Chat -> OpenAI upstream: the part unchanged
    part = {"type": "image_url", "image_url": {"url": IMAGE_URL, "detail": "low"}}
    client.chat.completions.create(
        model="gpt",
        messages=[{"role": "user", "content": [{"type": "text", "text": "What?"}, part]}],  # type: ignore[misc, list-item]
        extra_body=ok,
    )
    assert upstream_body(mock_upstream)["messages"][0]["content"][1] == part
    # Chat (a data URL) -> Anthropic upstream: a base64 image block
    data_url = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}
    client.chat.completions.create(
        model="claude",
        messages=[{"role": "user", "content": [{"type": "text", "text": "What?"}, data_url]}],  # type: ignore[misc, list-item]
        extra_body=ok,
    )
    assert upstream_body(mock_upstream)["messages"][0]["content"][1] == {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": PNG},
    }
    # Anthropic (base64) -> OpenAI upstream: a data URL
    claude = anthropic.Anthropic(base_url=gateway.url, api_key="k", max_retries=0, timeout=30)
    claude.messages.create(
        model="gpt",
        max_tokens=10,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What?"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
                ],
            }
        ],
        extra_body=ok,
    )
    assert upstream_body(mock_upstream)["messages"][0]["content"][1] == {
        "type": "image_url",
        "image_url": {"url": f"data:image/png;base64,{PNG}"},
    }
    # Responses -> Anthropic upstream: a URL image block
    client.responses.create(
        model="claude",
        input=[
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "What?"},
                    {"type": "input_image", "image_url": IMAGE_URL, "detail": "auto"},
                ],
            }
        ],
        extra_body=ok,
    )
    assert upstream_body(mock_upstream)["messages"][0]["content"][1] == {
        "type": "image",
        "source": {"type": "url", "url": IMAGE_URL},
    }
    # Ollama -> OpenAI upstream: a data URL with the media type read from the bytes
    ollama.Client(host=gateway.url, timeout=30).chat(
        model="gpt", messages=[{"role": "user", "content": "What?", "images": [PNG]}]
    )
    assert upstream_body(mock_upstream)["messages"][0]["content"][1] == {
        "type": "image_url",
        "image_url": {"url": f"data:image/png;base64,{PNG}"},
    }


# ------------------------------------------------------------------------- the pieces, without a model


def split_every_way(text: str) -> list[list[str]]:
    """The text cut into tokens a few different ways: one character each, pairs, and all at once."""
    return [list(text), [text[i : i + 2] for i in range(0, len(text), 2)], [text]]


@pytest.mark.parametrize(
    "arguments",
    ['{"city": "Paris", "unit": "celsius"}', '{"q": "a \\"}\\" b", "n": [1, {"x": []}]}', "{}", "42", '"s}"'],
)
def test_call_text_streams_the_arguments_however_the_tokens_fall(arguments: str) -> None:
    text = '{"name": "get_weather", "arguments": ' + arguments + " } "
    for pieces in split_every_way(text):
        call = CallText(free_text=False)
        out = [d for d in map(call.feed, pieces) if d is not None]
        assert all(isinstance(d, ToolCallDelta) for d in out)
        deltas: list[ToolCallDelta] = out  # type: ignore[assignment]
        assert deltas[0].name == "get_weather" and deltas[0].id == call.call_id
        assert call.call_id.startswith("call_") and all(d.id is None for d in deltas[1:])
        assert "".join(d.arguments for d in deltas) == arguments
        assert call.done


def test_call_text_lets_plain_text_through_when_text_is_allowed() -> None:
    call = CallText(free_text=True)
    assert [call.feed(t) for t in ("The", " weather", " {is}")] == ["The", " weather", " {is}"]
    assert not call.started and not call.done
    call = CallText(free_text=True)
    assert call.feed(' {"name"') == ' {"name"'  # the grammar's text branch: a call starts with "{" itself
    call = CallText(free_text=True)
    assert call.feed('{"') is None and call.feed('name": "f", "arguments": {}}') is not None and call.done


def request(**fields: Any) -> ChatRequest:
    return ChatRequest(model="tiny", messages=[UserMessage(content="hi")], **fields)


def test_plan_names_the_field_at_fault() -> None:
    tool = Tool(function=FunctionDef(name="f", parameters={"$ref": "http://example.com/s.json"}))
    with pytest.raises(GatewayError) as info:
        plan(request(tools=[tool], tool_choice="required"))
    assert info.value.param == "tools[0].function.parameters"
    named = NamedToolChoice(function=NamedFunction(name="g"))
    with pytest.raises(GatewayError) as info:
        plan(request(tools=[Tool(function=FunctionDef(name="f"))], tool_choice=named))
    assert info.value.param == "tool_choice.function.name"
    with pytest.raises(GatewayError) as info:
        plan(request(response_format={"type": "yaml"}))
    assert info.value.param == "response_format.type"
    assert plan(request(response_format={"type": "text"})) is None
    assert plan(request(tools=[tool], tool_choice="none")) is None  # no call, so no schema to check


def test_plan_moves_local_refs_with_the_parameters() -> None:
    params = {"$defs": {"u": {"type": "string"}}, "properties": {"u": {"$ref": "#/$defs/u"}}}
    tools = [Tool(function=FunctionDef(name=n, parameters=params)) for n in ("f", "g")]
    constraint = plan(request(tools=tools, tool_choice="required"))
    assert constraint is not None and constraint.tools and not constraint.free_text
    second = constraint.schema["oneOf"][1]
    assert second["properties"] == {"name": {"const": "g"}, "arguments": {"$ref": "#/$defs/tool-1"}}
    assert constraint.schema["$defs"]["tool-1"] == {  # each tool's definitions under names of its own
        "$defs": {"t1-u": {"type": "string"}},
        "properties": {"u": {"$ref": "#/$defs/tool-1/$defs/t1-u"}},
    }
    auto = plan(request(tools=tools[:1]))  # no tool_choice with tools: auto, so text is allowed too
    assert auto is not None and auto.free_text and "oneOf" not in auto.schema
