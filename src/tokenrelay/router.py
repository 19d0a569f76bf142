"""Router: which deployments serve a request's model, in which order.

A model name is a deployment (one entry of the config's ``models``); its ``fallbacks`` name the other
deployments (of the same model elsewhere, or other models) to try after it, in order. Each deployment has a
circuit breaker; one whose breaker is open is skipped. Running the attempts (retries, backoff, timeouts,
mid-stream failover) is ``failover.py``'s job.

A *router* (``routers`` in the config, and ``router`` over every model unless one is named so) is a model
name that orders its deployments per request by a strategy, and the order is the failover chain:
``latency`` (expected time to the answer, learned from live traffic: an exponentially weighted first-token
time plus the request's tokens at an exponentially weighted tokens per second, both per deployment),
``cost`` (the deployment's ``price``), ``least_busy`` (fewest streams running), ``weighted`` (random by
``weights``) or ``priority`` (as listed). Deployments whose breaker is open are left out.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from typing import Any

from tokenrelay.breaker import CircuitBreaker
from tokenrelay.config import RouterConfig
from tokenrelay.errors import GatewayError
from tokenrelay.events import Event
from tokenrelay.failover import failover_stream
from tokenrelay.providers.base import Provider, Push
from tokenrelay.request import ChatRequest

EWMA_ALPHA = 0.2  # weight of the newest stream in the learned latency figures
EXPECTED_TOKENS = 256  # answer length assumed for the latency score when max_tokens is not set


class Deployment:
    __slots__ = ("active", "breaker", "cfg", "name", "provider", "samples", "tps", "ttft")

    def __init__(self, provider: Provider) -> None:
        self.provider = provider
        self.cfg = provider.cfg
        self.name = provider.cfg.name
        self.breaker = CircuitBreaker(provider.cfg.breaker)
        self.active = 0  # attempts running on it now
        self.ttft: float | None = None  # seconds, exponentially weighted
        self.tps: float | None = None  # output tokens per second, exponentially weighted
        self.samples = 0

    def learn(self, ttft: float | None, tps: float | None) -> None:
        """One finished stream's first-token time and output rate."""
        self.samples += 1
        if ttft is not None:
            self.ttft = ttft if self.ttft is None else self.ttft + EWMA_ALPHA * (ttft - self.ttft)
        if tps is not None:
            self.tps = tps if self.tps is None else self.tps + EWMA_ALPHA * (tps - self.tps)

    def expected_seconds(self, tokens: int) -> float:
        """Learned time to a whole answer of ``tokens``; 0 before any traffic, so a new deployment is
        tried (and learned) first."""
        if self.ttft is None:
            return 0.0
        return self.ttft + (tokens / self.tps if self.tps else 0.0)

    def describe(self) -> dict[str, Any]:
        return {
            "deployment": self.name,
            "healthy": self.breaker.state != "open",
            "breaker": self.breaker.state,
            "active": self.active,
            "first_token_ms": round(self.ttft * 1000, 2) if self.ttft is not None else None,
            "tokens_per_second": round(self.tps, 1) if self.tps is not None else None,
            "samples": self.samples,
        }


class Route:
    """Where one stream is being served; the failover loop updates it as it moves."""

    __slots__ = ("attempts", "decision", "deployment", "failovers", "push")

    def __init__(self, deployment: str) -> None:
        self.deployment = deployment
        self.push: Push | None = None  # the stream session's synchronous intake, once a session owns it
        self.decision: Decision | None = None  # set when a router chose the deployments
        self.attempts = 0
        self.failovers = 0  # mid-stream continuations on another deployment


class Decision:
    """How a router ordered its deployments for one request (``POST /v1/auto/route`` shows it)."""

    __slots__ = ("candidates", "router", "strategy")

    def __init__(self, router: str, strategy: str, candidates: list[dict[str, Any]]) -> None:
        self.router = router
        self.strategy = strategy
        self.candidates = candidates

    def body(self, chosen: str) -> dict[str, Any]:
        return {
            "router": self.router,
            "strategy": self.strategy,
            "chosen": chosen,
            "candidates": self.candidates,
        }


class Router:
    def __init__(self, providers: dict[str, Provider], routers: list[RouterConfig] | None = None) -> None:
        self.providers = providers
        self.deployments = {name: Deployment(p) for name, p in providers.items()}
        self.routers = {r.name: r for r in routers or ()}
        if "router" not in self.routers and "router" not in providers:
            self.routers["router"] = RouterConfig(name="router", deployments=list(providers))

    def order(self, req: ChatRequest) -> tuple[list[Deployment], Decision]:
        """A router's deployments for this request, best first, healthy ones only (all of them when none
        is healthy: an open breaker still lets its half-open probe through when the cool-down is over)."""
        cfg = self.routers[req.model]
        deployments = [self.deployments[name] for name in cfg.deployments]
        healthy = [d for d in deployments if d.breaker.state != "open"] or deployments
        tokens = req.max_tokens or EXPECTED_TOKENS
        scores: dict[str, float] = {}
        if cfg.strategy == "latency":
            scores = {d.name: d.expected_seconds(tokens) for d in healthy}
        elif cfg.strategy == "cost":
            for d in healthy:
                price = d.cfg.price
                scores[d.name] = (price.input * 500 + price.output * tokens) / 1e6 if price else 0.0
        elif cfg.strategy == "least_busy":
            scores = {d.name: float(d.active) for d in healthy}
        elif cfg.strategy == "weighted":
            # a weighted random order: each key is U^(1/w), largest first (Efraimidis-Spirakis)
            scores = {
                d.name: -(random.random() ** (1 / max(cfg.weights.get(d.name, 1.0), 1e-9))) for d in healthy
            }
        else:  # priority: as listed
            scores = {d.name: float(i) for i, d in enumerate(healthy)}
        position = {d.name: i for i, d in enumerate(healthy)}
        ranked = sorted(healthy, key=lambda d: (scores[d.name], position[d.name]))
        candidates = [
            {**d.describe(), "score": round(scores[d.name], 6) if d.name in scores else None}
            for d in deployments
        ]
        return ranked, Decision(cfg.name, cfg.strategy, candidates)

    def names(self) -> list[str]:
        """Every model name a client may ask for: deployments, then routers."""
        return [*self.providers, *self.routers]

    def chain(self, model: str) -> list[Deployment]:
        """The deployment named ``model`` and then its fallbacks, in order."""
        primary = self.deployments.get(model)
        if primary is None:
            raise GatewayError(
                404,
                f"The model '{model}' does not exist. Models served here: {', '.join(self.names())}.",
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
        decision = None
        if req.model in self.routers:
            chain, decision = self.order(req)
        else:
            chain = self.chain(req.model)
        route = route or Route(chain[0].name)
        route.decision = decision
        return failover_stream(chain, req, sent, route)

    def stats(self) -> dict[str, Any]:
        return {name: d.breaker.stats() for name, d in self.deployments.items()}
