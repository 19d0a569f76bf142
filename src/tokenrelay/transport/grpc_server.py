"""gRPC transport (``proto/tokenrelay/grpc_api/tokenrelay.proto``), served by grpcio's asyncio server.

Runs inside each gateway worker, on the worker's own event loop and gateway, on ``--grpc-port``
(workers share the port through SO_REUSEPORT, as they share the HTTP port). A request's typed fields (or
its ``body_json``) become an OpenAI Chat body and go through the same decoder as HTTP, so validation and
its field names are identical. Events map one to one onto ``Event`` messages; a batch is written message by
message (gRPC frames each one anyway). Cancelling the call cancels the stream at once; on the bidirectional
``Chat`` a ``Cancel`` message stops one request while the others go on. The standard health service
reports SERVING once the gateway is ready.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import msgspec
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tokenrelay.errors import GatewayError, invalid
from tokenrelay.events import Error, Event, Finish, ReasoningDelta, TextDelta, ToolCallDelta, Usage
from tokenrelay.gateway import Gateway
from tokenrelay.grpc_api import tokenrelay_pb2 as pb
from tokenrelay.grpc_api import tokenrelay_pb2_grpc as pb_grpc
from tokenrelay.protocol import openai_chat
from tokenrelay.protocol.base import Collected
from tokenrelay.protocol.padding import padding
from tokenrelay.request import ChatRequest
from tokenrelay.session import StreamSession

log = logging.getLogger("tokenrelay.grpc")

STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def status_code(status: int) -> grpc.StatusCode:
    return STATUS_CODES.get(
        status, grpc.StatusCode.INTERNAL if status >= 500 else grpc.StatusCode.INVALID_ARGUMENT
    )


def _json_field(text: str, name: str) -> Any:
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError as exc:
        raise invalid(f"'{name}' is not valid JSON: {exc}", param=name) from exc


def to_request(msg: pb.ChatRequest) -> ChatRequest:
    """The typed request (or its ``body_json``) through the OpenAI Chat decoder."""
    if msg.body_json:
        req = openai_chat.decode_request(msg.body_json.encode())
        req.stream = True
        return req
    body: dict[str, Any] = {"model": msg.model, "stream": True, "messages": []}
    for m in msg.messages:
        entry: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.name:
            entry["name"] = m.name
        if m.tool_call_id:
            entry["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            entry["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in m.tool_calls
            ]
            entry["content"] = m.content or None
        body["messages"].append(entry)
    for name in ("max_tokens", "temperature", "top_p", "seed"):
        if msg.HasField(name):
            body[name] = getattr(msg, name)
    if msg.stop:
        body["stop"] = list(msg.stop)
    if msg.tools:
        body["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": t.name,
                    **({"description": t.description} if t.description else {}),
                    **(
                        {"parameters": _json_field(t.parameters_json, "tools.parameters_json")}
                        if t.parameters_json
                        else {}
                    ),
                },
            }
            for t in msg.tools
        ]
    if msg.tool_choice:
        choice = msg.tool_choice
        body["tool_choice"] = (
            choice
            if choice in ("auto", "none", "required")
            else {"type": "function", "function": {"name": choice}}
        )
    if msg.mock_json:
        body["mock"] = _json_field(msg.mock_json, "mock_json")
    if msg.obfuscation:
        body["stream_options"] = {"include_obfuscation": True}
    return openai_chat.decode_request(msgspec.json.encode(body))


def _usage(u: Usage) -> pb.Usage:
    return pb.Usage(
        prompt_tokens=u.prompt_tokens,
        completion_tokens=u.completion_tokens,
        total_tokens=u.total_tokens,
        cached_tokens=u.cached_tokens,
        reasoning_tokens=u.reasoning_tokens,
    )


def to_message(request_id: str, stream_id: str, ev: Event, pad: bool = False) -> pb.Event:
    if type(ev) is TextDelta:
        if pad:
            extra = padding(len(ev.text.encode()))
            return pb.Event(request_id=request_id, stream_id=stream_id, text=ev.text, obfuscation=extra)
        return pb.Event(request_id=request_id, stream_id=stream_id, text=ev.text)
    if type(ev) is ToolCallDelta:
        call = pb.ToolCallDelta(index=ev.index, id=ev.id or "", name=ev.name or "", arguments=ev.arguments)
        return pb.Event(request_id=request_id, stream_id=stream_id, tool_call=call)
    if type(ev) is ReasoningDelta:
        return pb.Event(request_id=request_id, stream_id=stream_id, reasoning=ev.text)
    if type(ev) is Usage:
        return pb.Event(request_id=request_id, stream_id=stream_id, usage=_usage(ev))
    if type(ev) is Finish:
        return pb.Event(request_id=request_id, stream_id=stream_id, finish_reason=ev.reason)
    assert type(ev) is Error
    err = pb.Error(
        type=ev.type, message=ev.message, status=ev.status, code=ev.code or "", param=ev.param or ""
    )
    return pb.Event(request_id=request_id, stream_id=stream_id, error=err)


async def _abort(context: grpc.aio.ServicerContext[Any, Any], err: GatewayError) -> None:
    detail = f"{err.message} (param: {err.param})" if err.param else err.message
    await context.abort(status_code(err.status), detail)


class TokenRelayService(pb_grpc.TokenRelayServicer):
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def _open(self, msg: pb.ChatRequest, context: grpc.aio.ServicerContext[Any, Any]) -> StreamSession:
        metadata = dict(context.invocation_metadata() or ())
        credential = metadata.get("authorization") or metadata.get("x-api-key")
        raw = credential.encode() if isinstance(credential, str) else credential
        return await self.gateway.start_stream(to_request(msg), raw)

    async def StreamChat(  # the RPCs' names
        self, request: pb.ChatRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.Event]:
        try:
            session = await self._open(request, context)
            await session.wait_started(3600)
            if session.pre_error is not None:
                raise session.pre_error
        except GatewayError as err:
            await _abort(context, err)
            return
        follower = session.follow()
        pad = session.request.obfuscation is True
        try:
            while (batch := await follower.next_batch()) is not None:
                for ev in batch:
                    yield to_message(request.request_id, session.id, ev, pad)
        finally:
            follower.close()
            self.gateway.client_left(session)  # a no-op once done; else the disconnect policy applies

    async def Complete(
        self, request: pb.ChatRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Completion:
        try:
            session = await self._open(request, context)
            follower = session.follow()
            try:
                while await follower.next_batch() is not None:
                    pass
            finally:
                follower.close()
                self.gateway.client_left(session)
            if session.pre_error is not None:
                raise session.pre_error
            got = Collected().add(session.events)
            got.raise_error()
        except GatewayError as err:
            await _abort(context, err)
            raise AssertionError("unreachable: abort raises") from None
        return pb.Completion(
            id=session.id,
            model=session.request.model,
            text="".join(got.text),
            reasoning="".join(got.reasoning),
            tool_calls=[
                pb.ToolCall(id=c["id"], name=c["name"], arguments=c["arguments"]) for c in got.tool_calls()
            ],
            finish_reason=got.finish or "stop",
            usage=_usage(got.usage),
        )

    async def Chat(
        self,
        request_iterator: AsyncIterator[pb.ChatClientMessage],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.Event]:
        out: asyncio.Queue[pb.Event | None] = asyncio.Queue(256)
        sessions: dict[str, StreamSession] = {}
        tasks: set[asyncio.Task[None]] = set()

        async def follow(rid: str, session: StreamSession) -> None:
            follower = session.follow()
            pad = session.request.obfuscation is True
            try:
                while (batch := await follower.next_batch()) is not None:
                    for ev in batch:
                        await out.put(to_message(rid, session.id, ev, pad))
                if session.pre_error is not None:
                    await out.put(to_message(rid, session.id, session.pre_error.to_event()))
            finally:
                follower.close()
                sessions.pop(rid, None)
                self.gateway.client_left(session)

        async def read() -> None:
            async for msg in request_iterator:
                if msg.HasField("cancel"):
                    target = sessions.get(msg.cancel.request_id)
                    if target is not None:
                        target.cancel()
                    continue
                req = msg.request
                rid = req.request_id
                try:
                    if not rid:
                        raise invalid("Each request on Chat needs a request_id.", param="request_id")
                    if rid in sessions:
                        raise invalid(f"request_id {rid!r} is already in flight.", param="request_id")
                    session = await self._open(req, context)
                except GatewayError as err:
                    await out.put(to_message(rid, "", err.to_event()))
                    continue
                sessions[rid] = session
                task = asyncio.get_running_loop().create_task(follow(rid, session))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.gather(*tasks, return_exceptions=True)  # the client is done sending
            await out.put(None)

        reader = asyncio.get_running_loop().create_task(read())
        try:
            while (event := await out.get()) is not None:
                yield event
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()  # each follower closes, then its stream's disconnect policy applies


class GrpcServer:
    """The gRPC server of one worker; started and stopped with the HTTP app's lifespan."""

    def __init__(self, gateway: Gateway, host: str, port: int) -> None:
        self.gateway = gateway
        tls = gateway.config.server
        self.key_pair = (
            (Path(tls.ssl_keyfile).read_bytes(), Path(tls.ssl_certfile).read_bytes())
            if tls.ssl_certfile and tls.ssl_keyfile
            else None
        )
        self.address = f"{host}:{port}"
        self.server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()
        self._watch: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
        pb_grpc.add_TokenRelayServicer_to_server(TokenRelayService(self.gateway), self.server)  # type: ignore[no-untyped-call]
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if self.key_pair is not None:
            self.server.add_secure_port(self.address, grpc.ssl_server_credentials([self.key_pair]))
        else:
            self.server.add_insecure_port(self.address)
        await self.server.start()
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        self._watch = asyncio.get_running_loop().create_task(self._mark_ready())
        log.info("gRPC on %s", self.address)

    async def _mark_ready(self) -> None:
        await self.gateway.started()
        if not self.gateway.ready:
            return  # a model failed to load: /readyz says which; health stays NOT_SERVING
        for name in ("", "tokenrelay.v1.TokenRelay"):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        if self.server is not None:
            await self.server.stop(grace=1)
