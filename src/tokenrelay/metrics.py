"""Prometheus metrics at ``GET /metrics`` (prometheus-client).

Labels are bounded: model and deployment names come from the config, protocol from the registered
protocols, status from HTTP codes, error kinds from a fixed list (anything else counts as ``other``). What
the gateway already holds (active streams, queues, breakers) is read when scraped, by a collector, instead
of being updated on the hot path. Per stream: one observation at its first token and a few at its end. The
inter-token gaps are counted per stream (``GapCounts``: a bisect and an integer add per batch) and added to
their histogram every 256 batches and at the stream's end: ``Histogram.observe`` walks the buckets under a
lock, which was about 3 % of the relay's CPU when done per batch.

With ``--workers N`` the counters and histograms of every worker are added up (prometheus_client's
multiprocess mode: ``tokenrelay serve`` gives the workers a fresh ``PROMETHEUS_MULTIPROC_DIR``, each
writes its values to files there, and a scrape reads them all). The gauges of what the gateway holds
now (active streams, queues, breakers) are read from the worker that answers the scrape.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from tokenrelay.gateway import Gateway

ERROR_KINDS = frozenset(
    {
        "upstream_disconnect",
        "upstream_error",
        "upstream_unavailable",
        "timeout",
        "cancelled",
        "client_too_slow",
        "rate_limit_error",
        "overloaded_error",
        "invalid_request_error",
        "internal_error",
        "engine_error",
    }
)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
GAP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 5)
RATE_BUCKETS = (1, 5, 10, 25, 50, 100, 200, 500, 1000, 5000)
BREAKER_STATES = ("closed", "half-open", "open")

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._state: _GatewayState | None = None
        r = self.registry
        self.first_token = Histogram(
            "tokenrelay_first_token_seconds",
            "Time from the request to the first token, per stream",
            ("model", "deployment", "protocol"),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            "tokenrelay_inter_token_seconds",
            "Time between successive event batches of a stream",
            ("model",),
            buckets=GAP_BUCKETS,
            registry=r,
        )
        self.tokens_per_second = Histogram(
            "tokenrelay_output_tokens_per_second",
            "Output tokens per second of a stream, from its first token to its end",
            ("model", "deployment"),
            buckets=RATE_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "tokenrelay_requests",
            "Requests by model, deployment, protocol and status",
            ("model", "deployment", "protocol", "status"),
            registry=r,
        )
        self.errors = Counter(
            "tokenrelay_stream_errors",
            "Streams that ended in an error, by kind",
            ("model", "kind"),
            registry=r,
        )
        self.resumes = Counter("tokenrelay_resumes", "Resumed streams (GET /v1/streams/{id})", registry=r)
        self.failovers = Counter(
            "tokenrelay_failovers", "Mid-stream continuations on another deployment", ("model",), registry=r
        )
        self.overhead = Histogram(
            "tokenrelay_overhead_seconds",
            "Time the gateway spends on a request before the model is asked (decode, admission, routing)",
            ("protocol",),
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05),
            registry=r,
        )

        self._children: dict[tuple[Any, ...], Any] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, cached: the label sets are few and reused by every stream."""
        key = (id(metric), *labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def attach(self, gateway: Gateway) -> None:
        self._state = _GatewayState(gateway)
        self.registry.register(self._state)

    def render(self) -> bytes:
        shared = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if not shared:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=shared)  # type: ignore[no-untyped-call]  # all workers
        if self._state is not None:
            registry.register(self._state)
        return generate_latest(registry)

    @staticmethod
    def kind(error_type: str) -> str:
        return error_type if error_type in ERROR_KINDS else "other"


class _GatewayState(Collector):
    """What the gateway holds, read at scrape time."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def collect(self) -> Iterator[Metric]:
        gw = self.gateway
        active = GaugeMetricFamily("tokenrelay_active_streams", "Streams running now", labels=["model"])
        counts: dict[str, int] = {}
        for session in gw.streams.values():
            counts[session.request.model] = counts.get(session.request.model, 0) + 1
        for model in gw.providers:
            active.add_metric([model], counts.get(model, 0))
        yield active
        paused = GaugeMetricFamily("tokenrelay_paused_streams", "Streams waiting on a slow reader")
        paused.add_metric([], sum(1 for s in gw.streams.values() if s.paused is not None))
        yield paused
        waiting = GaugeMetricFamily(
            "tokenrelay_queue_length", "Requests waiting for a slot", labels=["model"]
        )
        wait = GaugeMetricFamily(
            "tokenrelay_queue_wait_mean_seconds",
            "Mean wait of requests admitted after queueing",
            labels=["model"],
        )
        for name, gate in gw.gates.items():
            stats = gate.stats()
            waiting.add_metric([name], stats["waiting"])
            wait.add_metric([name], stats["mean_wait_ms"] / 1000)
        yield waiting
        yield wait
        breaker = GaugeMetricFamily(
            "tokenrelay_breaker_state",
            "1 for the state each deployment's breaker is in",
            labels=["deployment", "state"],
        )
        for name, dep in gw.router.deployments.items():
            for state in BREAKER_STATES:
                breaker.add_metric([name, state], 1.0 if dep.breaker.state == state else 0.0)
        yield breaker


class GapCounts:
    """One stream's inter-batch gaps for a histogram child, added to it in bulk (``flush``).

    Uses prometheus_client's histogram internals (``_upper_bounds``, ``_buckets``, ``_sum``: the same
    names since 0.4); ``tests/test_metrics.py`` reads the result through ``/metrics``."""

    __slots__ = ("bounds", "child", "counts", "n", "total")

    FLUSH_EVERY = 256

    def __init__(self, child: Any) -> None:
        self.child = child
        self.bounds: list[float] = child._upper_bounds  # ends with +Inf: every gap has a bucket
        self.counts = [0] * len(self.bounds)
        self.total = 0.0
        self.n = 0

    def observe(self, gap: float) -> None:
        self.counts[bisect_left(self.bounds, gap)] += 1  # the first bound >= gap, as observe() picks
        self.total += gap
        self.n += 1
        if self.n >= self.FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        if not self.n:
            return
        child = self.child
        for i, count in enumerate(self.counts):
            if count:
                child._buckets[i].inc(count)
                self.counts[i] = 0
        child._sum.inc(self.total)
        self.total = 0.0
        self.n = 0
