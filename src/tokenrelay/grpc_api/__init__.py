"""Code generated from ``proto/tokenrelay/grpc_api/tokenrelay.proto`` (``make proto``); do not edit."""
