"""The provider contract: a model backend that turns one ``ChatRequest`` into batches of events.

``stream()`` is an async generator with three rules the stream session relies on:
1. A failure before the upstream accepted the request is raised as ``GatewayError`` before any yield,
   so the client still gets a real HTTP status.
2. The first yield is an empty batch meaning "accepted" (the upstream answered 200, the engine queued
   the job); response headers and keep-alives may start from then on.
3. Every later yield is what one upstream read produced; the last batch ends with ``Usage`` (if known)
   then ``Finish``, or with ``Error``. Cancelling the generator's task must stop the upstream work.

The push lane (optional): ``stream(req, push)`` may, once it has yielded ``[]`` (accepted), hand
non-terminal batches to ``push`` from inside its socket callback instead of yielding them, while the
generator waits. That saves the stream's task a wake-up and a trip up the generator chain per
chunk. The terminal batch is always yielded. When ``push`` returns ``False`` the provider stops pushing
and yields ``[]`` next (the session then waits for a slow reader), and may push again after that.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Callable
from typing import Any, ClassVar

from tokenrelay.config import ModelConfig
from tokenrelay.events import Event
from tokenrelay.request import ChatRequest

Push = Callable[[list[Event]], bool]


class Provider(abc.ABC):
    kind: ClassVar[str]

    def __init__(self, cfg: ModelConfig) -> None:
        self.cfg = cfg
        self.ready = False

    async def start(self) -> None:
        """Load and warm up; ``/readyz`` waits for every provider's start. Default: nothing to load."""
        self.ready = True

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections, threads and models."""

    def stats(self) -> dict[str, Any]:
        """What ``GET /stats`` shows for this model."""
        return {"kind": self.kind, "ready": self.ready}

    @abc.abstractmethod
    def stream(self, req: ChatRequest, push: Push | None = None) -> AsyncIterator[list[Event]]: ...
