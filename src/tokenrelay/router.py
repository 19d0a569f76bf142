"""Router: which deployments serve a request's model, in which order.

A model name is a deployment (one entry of the config's ``models``); its ``fallbacks`` name the other
deployments (of the same model elsewhere, or other models) to try after it, in order. Each deployment has a
circuit breaker; one whose breaker is open is skipped. Running the attempts (retries, backoff, timeouts,
mid-stream failover) is ``failover.py``'s job; latency-aware choice (issue 6) grows here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from tokenrelay.breaker import CircuitBreaker
from tokenrelay.errors import GatewayError
from tokenrelay.events import Event
from tokenrelay.failover import failover_stream
from tokenrelay.providers.base import Provider
from tokenrelay.request import ChatRequest


class Deployment:
    __slots__ = ("breaker", "cfg", "name", "provider")

    def __init__(self, provider: Provider) -> None:
        self.provider = provider
        self.cfg = provider.cfg
        self.name = provider.cfg.name
        self.breaker = CircuitBreaker(provider.cfg.breaker)


class Route:
    """Where one stream is being served; the failover loop updates it as it moves."""

    __slots__ = ("attempts", "deployment", "failovers")

    def __init__(self, deployment: str) -> None:
        self.deployment = deployment
        self.attempts = 0
        self.failovers = 0  # mid-stream continuations on another deployment


class Router:
    def __init__(self, providers: dict[str, Provider]) -> None:
        self.providers = providers
        self.deployments = {name: Deployment(p) for name, p in providers.items()}

    def chain(self, model: str) -> list[Deployment]:
        """The deployment named ``model`` and then its fallbacks, in order."""
        primary = self.deployments.get(model)
        if primary is None:
            raise GatewayError(
                404,
                f"The model '{model}' does not exist. Models served here: {', '.join(self.providers)}.",
                type="invalid_request_error",
                param="model",
                code="model_not_found",
            )
        return [primary, *(self.deployments[name] for name in primary.cfg.fallbacks)]

    def stream(
        self, req: ChatRequest, sent: list[Event], route: Route | None = None
    ) -> AsyncIterator[list[Event]]:
        """The request's event batches with retries and failover; ``sent`` is the stream's log (what the
        client has been sent), read when the stream must continue elsewhere. Raises ``GatewayError`` now for
        an unknown model."""
        chain = self.chain(req.model)
        return failover_stream(chain, req, sent, route or Route(chain[0].name))

    def stats(self) -> dict[str, Any]:
        return {name: d.breaker.stats() for name, d in self.deployments.items()}
