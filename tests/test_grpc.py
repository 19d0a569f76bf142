"""The gRPC API with a grpcio client: StreamChat, Complete, bidirectional Chat, cancel, health."""

from __future__ import annotations

import json
import queue
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tests.conftest import Server

from tokenrelay.grpc_api import tokenrelay_pb2 as pb
from tokenrelay.grpc_api import tokenrelay_pb2_grpc as pb_grpc


@pytest.fixture
def channel(gateway: Server) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.Channel) -> pb_grpc.TokenRelayStub:
    return pb_grpc.TokenRelayStub(channel)


def hello(model: str, mock: dict[str, object] | None = None, rid: str = "") -> pb.ChatRequest:
    return pb.ChatRequest(
        request_id=rid,
        model=model,
        messages=[pb.Message(role="user", content="hi")],
        mock_json=json.dumps(mock) if mock else "",
    )


def test_health_serving(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service="tokenrelay.v1.TokenRelay"), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("model", ["demo", "gpt", "claude"])
def test_stream_chat(stub: pb_grpc.TokenRelayStub, model: str) -> None:
    events = list(stub.StreamChat(hello(model, {"text": "alpha beta gamma"}), timeout=15))
    kinds = [e.WhichOneof("kind") for e in events]
    assert kinds == ["text", "text", "text", "usage", "finish_reason"]
    assert "".join(e.text for e in events) == "alpha beta gamma"
    assert events[-1].finish_reason == "stop" and events[-2].usage.completion_tokens == 3
    assert len({e.stream_id for e in events}) == 1 and events[0].stream_id.startswith("chatcmpl-")


def test_complete_and_tools(stub: pb_grpc.TokenRelayStub) -> None:
    req = hello("gpt", {"text": "Checking.", "tool_calls": [{"name": "lookup", "arguments": {"q": 1}}]})
    req.tools.append(pb.Tool(name="lookup", parameters_json='{"type": "object"}'))
    done = stub.Complete(req, timeout=15)
    assert done.text == "Checking." and done.finish_reason == "tool_calls"
    assert [(c.name, json.loads(c.arguments)) for c in done.tool_calls] == [("lookup", {"q": 1})]
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens


def test_errors_are_statuses_before_and_events_after(stub: pb_grpc.TokenRelayStub) -> None:
    with pytest.raises(grpc.RpcError) as info:
        list(stub.StreamChat(hello("nope"), timeout=5))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    with pytest.raises(grpc.RpcError) as info:
        stub.Complete(pb.ChatRequest(model="demo"), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "messages" in info.value.details()  # type: ignore[attr-defined]
    with pytest.raises(grpc.RpcError) as info:
        list(stub.StreamChat(hello("demo", {"error_status": 429, "retry_after": 1}), timeout=5))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    events = list(stub.StreamChat(hello("demo", {"text": "a b c d", "cut_after": 2}), timeout=5))
    assert [e.WhichOneof("kind") for e in events] == ["text", "text", "error"]
    assert events[-1].error.type == "upstream_disconnect"


def test_cancelling_the_call_stops_the_model(stub: pb_grpc.TokenRelayStub, gateway: Server) -> None:
    before = gateway.mock_cancelled()
    call = stub.StreamChat(hello("demo", {"tokens": 200, "tokens_per_second": 50}), timeout=30)
    got = [next(call) for _ in range(3)]
    call.cancel()
    assert all(e.text for e in got)
    gateway.wait_cancelled(before)


def test_bidirectional_chat_with_a_cancel(stub: pb_grpc.TokenRelayStub, gateway: Server) -> None:
    before = gateway.mock_cancelled()
    outbox: queue.Queue[pb.ChatClientMessage | None] = queue.Queue()

    def requests() -> Iterator[pb.ChatClientMessage]:
        while (msg := outbox.get()) is not None:
            yield msg

    slow = {"tokens": 40, "tokens_per_second": 40}
    outbox.put(pb.ChatClientMessage(request=hello("demo", slow, rid="a")))
    outbox.put(pb.ChatClientMessage(request=hello("demo", {**slow, "tokens": 10}, rid="b")))
    seen: dict[str, list[pb.Event]] = {"a": [], "b": []}
    ended: set[str] = set()
    responses = stub.Chat(requests(), timeout=30)
    for event in responses:
        seen[event.request_id].append(event)
        if event.request_id == "a" and len(seen["a"]) == 3:
            outbox.put(pb.ChatClientMessage(cancel=pb.Cancel(request_id="a")))
        if event.WhichOneof("kind") in ("finish_reason", "error"):
            ended.add(event.request_id)
            if ended == {"a", "b"}:
                outbox.put(None)
    assert seen["a"][-1].error.type == "cancelled"
    assert len([e for e in seen["a"] if e.text]) < 10
    assert seen["b"][-1].finish_reason == "stop"
    assert len("".join(e.text for e in seen["b"]).split()) == 10  # b went on to its end
    gateway.wait_cancelled(before)
