"""The ``mock`` provider: the mock script (``tokenrelay.mock``) run inside the gateway.

Faults become what the ``openai`` provider would report for the same upstream behaviour, so a demo or a
user's test sees exactly the end states a real upstream failure produces.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec

from tokenrelay.config import ModelConfig
from tokenrelay.events import Error, Event
from tokenrelay.mock import Fault, MockStats, parse_options, run_script
from tokenrelay.providers.base import Provider, Push
from tokenrelay.request import ChatRequest

FAULT_ERRORS = {
    "cut": Error(
        type="upstream_disconnect", message="upstream closed the stream before it finished", status=502
    ),
    "malformed": Error(type="upstream_error", message="upstream sent a malformed chunk", status=502),
}


class MockProvider(Provider):
    kind = "mock"

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.stats_data = MockStats()
        parse_options(cfg.options, None)  # a bad option in the config fails at start, not per request

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), **self.stats_data.__dict__}

    async def stream(self, req: ChatRequest, push: Push | None = None) -> AsyncIterator[list[Event]]:
        opts = parse_options(self.cfg.options, req.mock)
        # what this deployment was asked (a failover's continuation shows its assistant prefix here)
        self.stats_data.last_request = {
            "messages": msgspec.to_builtins(req.messages),
            "max_tokens": req.max_tokens,
        }
        async for item in run_script(opts, req, self.stats_data):
            if isinstance(item, Fault):
                yield [FAULT_ERRORS[item.kind]]
                return
            yield item
