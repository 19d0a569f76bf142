"""Structured JSON-lines logging: one line per request at its end, never one per chunk.

Lines logged below WARNING on the event loop's thread (the access log, mostly) are gathered and written
together at most ``FLUSH_SECONDS`` later: one write for many requests instead of a write and a flush
each. Warnings and errors, and anything from another thread, are written at once (after what waits).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
import time

import msgspec


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return msgspec.json.encode(line).decode()


class GatheringHandler(logging.StreamHandler):  # type: ignore[type-arg]
    FLUSH_SECONDS = 0.1

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.pending: list[str] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self.loop_thread = 0
        self.due: asyncio.TimerHandle | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Gather the lines this loop's thread logs from now on."""
        self.loop, self.loop_thread = loop, threading.get_ident()

    def emit(self, record: logging.LogRecord) -> None:
        gather = self.loop is not None and threading.get_ident() == self.loop_thread
        if not gather or record.levelno >= logging.WARNING:
            self.flush()
            super().emit(record)
            return
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        with self.lock:  # type: ignore[union-attr]  # another thread may be flushing
            self.pending.append(line)
        if self.due is None:
            assert self.loop is not None
            self.due = self.loop.call_later(self.FLUSH_SECONDS, self._due)

    def _due(self) -> None:
        self.due = None
        self.flush()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            if self.pending:
                lines, self.pending = self.pending, []
                with contextlib.suppress(Exception):  # stderr is gone: nothing to tell it to
                    self.stream.write("\n".join(lines) + "\n")
        super().flush()


def bind_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Called once the server's event loop runs (the app's lifespan start-up)."""
    for handler in logging.getLogger("tokenrelay").handlers:
        if isinstance(handler, GatheringHandler):
            handler.bind(loop)


def flush() -> None:
    for handler in logging.getLogger("tokenrelay").handlers:
        handler.flush()


def setup_logging(level: str = "info") -> None:
    handler = GatheringHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("tokenrelay")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    logging.Formatter.converter = time.gmtime
