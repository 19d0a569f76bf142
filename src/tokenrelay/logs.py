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


def _line(created: float, level: str, logger: str, msg: str, fields: object, exc: str | None = None) -> str:
    """One log line: the JSON object both ``JsonFormatter`` and ``info_line`` write."""
    line: dict[str, object] = {"ts": round(created, 3), "level": level, "logger": logger, "msg": msg}
    if isinstance(fields, dict):
        line.update(fields)
    if exc:
        line["exc"] = exc
    return msgspec.json.encode(line).decode()


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        exc = self.formatException(record.exc_info) if record.exc_info else None
        fields = getattr(record, "fields", None)
        return _line(record.created, record.levelname.lower(), record.name, record.getMessage(), fields, exc)


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
        self.gather(line)

    def gather(self, line: str) -> None:
        """A line formatted by the caller, gathered like ``emit`` gathers one (loop thread, below WARNING)."""
        with self.lock:  # type: ignore[union-attr]
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


def info_line(logger: logging.Logger, msg: str, fields: dict[str, object]) -> None:
    """``logger.info(msg, extra={"fields": fields})``, the same line, for the hot path (the access log): when
    the line would only reach our own gathering handler, it is formatted here and queued, skipping the
    logging machinery (a record, its caller's frame, filters, locks: about a tenth of a short request's
    CPU in a profile). Anything else (a handler or filter added by a user, another thread) takes the
    standard way."""
    handler = _only_gatherer(logger)
    if handler is None or threading.get_ident() != handler.loop_thread:
        logger.info(msg, extra={"fields": fields})
        return
    handler.gather(_line(time.time(), "info", logger.name, msg, fields))


def _only_gatherer(logger: logging.Logger) -> GatheringHandler | None:
    """The bound gathering handler that alone receives ``logger``'s INFO lines, if that is the case."""
    if logger.filters or logger.handlers or not logger.propagate:
        return None
    parent = logger.parent
    if parent is None or parent.name != "tokenrelay" or parent.filters or len(parent.handlers) != 1:
        return None
    handler = parent.handlers[0]
    if type(handler) is not GatheringHandler or handler.filters or handler.loop is None:
        return None
    if handler.level > logging.INFO or type(handler.formatter) is not JsonFormatter:
        return None
    return handler
