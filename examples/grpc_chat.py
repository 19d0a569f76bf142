"""Stream a chat over tokenrelay's gRPC API with ``grpcio`` and the stubs in ``tokenrelay.grpc_api``.

    tokenrelay serve --grpc-port 50051 ...
    python examples/grpc_chat.py ["your question"]

``StreamChat`` is server streaming: one ``ChatRequest`` in, its ``Event``s out as they are generated. Each
event is one of ``text``, ``reasoning``, ``tool_call``, ``usage``, then ``finish_reason`` (the last event
of a stream that ended well) or ``error`` (the last of one that failed midway). A failure before the first
event is the call's status instead (NOT_FOUND for an unknown model, INVALID_ARGUMENT naming the field, ...).
Cancelling the call stops the model. Environment: ``TOKENRELAY_GRPC`` (host:port, default
127.0.0.1:50051), ``TOKENRELAY_MODEL`` (default ``tiny``), ``TOKENRELAY_API_KEY`` (when the gateway has keys).
"""

from __future__ import annotations

import os
import sys

import grpc

from tokenrelay.grpc_api import tokenrelay_pb2 as pb
from tokenrelay.grpc_api import tokenrelay_pb2_grpc as pb_grpc

TARGET = os.environ.get("TOKENRELAY_GRPC", "127.0.0.1:50051")
MODEL = os.environ.get("TOKENRELAY_MODEL", "tiny")
API_KEY = os.environ.get("TOKENRELAY_API_KEY", "")


def main() -> None:
    prompt = sys.argv[1] if len(sys.argv) > 1 else "Name three colours."
    # the key travels as call metadata, the way the HTTP APIs carry it in a header
    metadata = [("authorization", f"Bearer {API_KEY}")] if API_KEY else None
    request = pb.ChatRequest(model=MODEL, messages=[pb.Message(role="user", content=prompt)])
    # a TLS gateway (--ssl-certfile) needs grpc.secure_channel(TARGET, grpc.ssl_channel_credentials(...))
    with grpc.insecure_channel(TARGET) as channel:
        stub = pb_grpc.TokenRelayStub(channel)
        line_open = False  # text printed since the last newline
        try:
            for event in stub.StreamChat(request, metadata=metadata, timeout=300):
                kind = event.WhichOneof("kind")
                if kind == "text":
                    print(event.text, end="", flush=True)
                    line_open = True
                    continue
                if line_open:
                    print()
                    line_open = False
                if kind == "usage":
                    usage = event.usage
                    print(
                        f"usage: prompt_tokens={usage.prompt_tokens} "
                        f"completion_tokens={usage.completion_tokens} total_tokens={usage.total_tokens}"
                    )
                elif kind == "finish_reason":
                    print(f"finish_reason: {event.finish_reason}")
                elif kind == "error":
                    sys.exit(f"stream failed: {event.error.type}: {event.error.message}")
        except grpc.RpcError as err:  # refused before the first event
            sys.exit(f"gRPC error {err.code().name}: {err.details()}")


if __name__ == "__main__":
    main()
