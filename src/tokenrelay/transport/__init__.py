"""Transports: how bytes reach clients (HTTP SSE today; NDJSON, WebSocket and gRPC to come)."""
