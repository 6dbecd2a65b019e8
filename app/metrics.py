"""Prometheus metrics, on a registry of the app's own (tests build many apps per process)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from app.llm.client import UpstreamClient
    from app.store import PoolStore
    from retrievers.cache import CachedEmbedder

_FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_SLOW = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class _StoreCollector(Collector):
    """Job counts and pool sizes, read when Prometheus scrapes."""

    def __init__(self, store: PoolStore, cache: CachedEmbedder) -> None:
        self.store = store
        self.cache = cache

    def collect(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily(
            "iclserve_jobs", "Jobs by kind and status", labels=["kind", "status"]
        )
        for (kind, status), count in sorted(self.store.job_counts().items()):
            jobs.add_metric([kind, status], count)
        yield jobs
        pools = GaugeMetricFamily(
            "iclserve_pool_examples", "Examples in the loaded version of each pool", labels=["pool"]
        )
        for pool, size in sorted(self.store.pool_sizes().items()):
            pools.add_metric([pool], size)
        yield pools
        cache = GaugeMetricFamily(
            "iclserve_query_cache_lookups", "Query-embedding cache lookups", labels=["result"]
        )
        cache.add_metric(["hit"], self.cache.hits)
        cache.add_metric(["miss"], self.cache.misses)
        yield cache


class _BreakerCollector(Collector):
    """Circuit-breaker state of each upstream, read when Prometheus scrapes."""

    def __init__(self, upstream: UpstreamClient) -> None:
        self.upstream = upstream

    def collect(self) -> Iterator[Metric]:
        breakers = sorted(self.upstream.breakers.items())
        state = GaugeMetricFamily(
            "iclserve_upstream_breaker_state",
            "Circuit breaker per upstream: 0 closed, 1 half-open, 2 open",
            labels=["upstream"],
        )
        refused = CounterMetricFamily(
            "iclserve_upstream_breaker_refused",
            "Calls refused at once (503) because the upstream's breaker was open",
            labels=["upstream"],
        )
        opened = CounterMetricFamily(
            "iclserve_upstream_breaker_opened",
            "Times the upstream's breaker opened",
            labels=["upstream"],
        )
        for name, breaker in breakers:
            state.add_metric([name], int(breaker.state))
            refused.add_metric([name], breaker.refused)
            opened.add_metric([name], breaker.opened)
        yield state
        yield refused
        yield opened


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # Changed by the request middleware on the event loop only, so plain numbers suffice.
        self.requests_in_flight = 0
        Gauge(
            "iclserve_requests_in_flight",
            "HTTP requests being served now",
            registry=self.registry,
        ).set_function(lambda: self.requests_in_flight)
        self.requests = Histogram(
            "iclserve_request_seconds",
            "HTTP request latency by route",
            ["method", "route", "status"],
            buckets=_SLOW,
            registry=self.registry,
        )
        self.stages = Histogram(
            "iclserve_selection_stage_seconds",
            "Selection stage timings",
            ["stage"],
            buckets=_FAST,
            registry=self.registry,
        )
        self.upstream = Histogram(
            "iclserve_upstream_seconds",
            "Upstream call latency by upstream and outcome",
            ["upstream", "outcome"],
            buckets=_SLOW,
            registry=self.registry,
        )
        self.upstream_errors = Counter(
            "iclserve_upstream_errors",
            "Upstream calls that did not succeed",
            ["upstream", "outcome"],
            registry=self.registry,
        )
        self.jobs = Histogram(
            "iclserve_job_seconds",
            "Job durations by kind and outcome",
            ["kind", "outcome"],
            buckets=_SLOW,
            registry=self.registry,
        )

    def request_started(self) -> None:
        self.requests_in_flight += 1

    def request_answered(self) -> None:
        self.requests_in_flight -= 1

    def bind(self, store: PoolStore, cache: CachedEmbedder) -> None:
        self.registry.register(_StoreCollector(store, cache))

    def bind_upstream(self, upstream: UpstreamClient) -> None:
        self.registry.register(_BreakerCollector(upstream))

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).observe(seconds)

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.stages.labels(stage).observe(seconds)

    def observe_upstream(self, upstream: str, outcome: str, seconds: float) -> None:
        self.upstream.labels(upstream, outcome).observe(seconds)
        if outcome != "ok":
            self.upstream_errors.labels(upstream, outcome).inc()

    def observe_job(self, kind: str, outcome: str, seconds: float) -> None:
        self.jobs.labels(kind, outcome).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
