"""Prometheus metrics of the request path, on an injected registry.

Label children are cached so the hot path does one dict lookup, not ``labels()`` parsing.

In one process (the default ``--workers 1``) a request's own figures (requests by tenant and
code, its duration, the tenant's in-flight count) cost no locked increment: they are counted in
plain ints and added to their families when the registry is collected (a scrape), by a
collector registered ahead of them. With ``--workers N`` the values live in files the metrics
port sums across processes, so every request writes through, as before.
"""

from __future__ import annotations

import bisect
import math
import os
import time
from collections.abc import Callable, Iterable
from importlib import metadata
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


STALE_AGE_BUCKETS = (1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0)
# Histogram's upper bounds, +Inf included: bisect_left finds the bucket `amount <= bound`.
_LATENCY_BOUNDS = (*LATENCY_BUCKETS, math.inf)


def _multiprocess() -> bool:
    return "PROMETHEUS_MULTIPROC_DIR" in os.environ or "prometheus_multiproc_dir" in os.environ


class _Flush:
    """A collector that exposes nothing: collecting it adds the counted figures to their
    families, which the registry collects after it."""

    def __init__(self, flush: Callable[[], None]) -> None:
        self._flush = flush

    def describe(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterable[Metric]:
        self._flush()
        return ()


class ProxyMetrics:
    def __init__(self, registry: CollectorRegistry, *, batched: bool | None = None) -> None:
        """``batched``: count per-request figures in plain ints until a scrape (default: when
        Prometheus' multiprocess mode is off)."""
        self.registry = registry
        self.batched = not _multiprocess() if batched is None else batched
        # (tenant, code) -> requests; tenant -> [count per bucket ..., sum of seconds]
        self._pending_requests: dict[tuple[str, int], int] = {}
        self._pending_duration: dict[str, list[Any]] = {}
        if self.batched:
            registry.register(_Flush(self.flush))
        self.requests = Counter(
            "metrics_router_requests_total",
            "Requests answered, by tenant ('' when none was resolved) and HTTP code.",
            ["tenant", "code"],
            registry=registry,
        )
        self.duration = Histogram(
            "metrics_router_request_duration_seconds",
            "Time to answer a proxied request, by tenant.",
            ["tenant"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.upstream_errors = Counter(
            "metrics_router_upstream_errors_total",
            "Upstream failures by tenant and kind (unreachable, timeout, tls, protocol, ...).",
            ["tenant", "kind"],
            registry=registry,
        )
        self.inflight = Gauge(
            "metrics_router_inflight_requests",
            "Requests in flight to each tenant's upstream.",
            ["tenant"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.routes = Gauge(
            "metrics_router_routes",
            "Namespaces routed to a tenant.",
            registry=registry,
            multiprocess_mode="liveall",
        )
        self.tenants = Gauge(
            "metrics_router_tenants",
            "Tenants with a route.",
            registry=registry,
            multiprocess_mode="liveall",
        )
        self.reloads = Counter(
            "metrics_router_reloads_total",
            "Reloads of routes and certificates by source and result (success, failure).",
            ["source", "result"],
            registry=registry,
        )
        self.cert_expiry = Gauge(
            "metrics_router_certificate_expiry_timestamp_seconds",
            "Expiry (Unix time) of each certificate the router uses.",
            ["certificate"],
            registry=registry,
            multiprocess_mode="min",
        )
        self.unauthorized = Counter(
            "metrics_router_unauthorized_requests_total",
            "Requests refused before routing, by reason.",
            ["reason"],
            registry=registry,
        )
        # What `metrics-router doctor` shows as the router's version and uptime.
        self.build_info = Gauge(
            "metrics_router_build_info",
            "Always 1; the version label says which metrics-router runs.",
            ["version"],
            registry=registry,
            multiprocess_mode="max",
        )
        self.build_info.labels(version()).set(1)
        self.start_time = Gauge(
            "metrics_router_start_time_seconds",
            "Unix time the router started.",
            registry=registry,
            multiprocess_mode="min",
        )
        self.start_time.set(time.time())
        # Stale answers (router/stale.py): served instead of an upstream failure.
        self.stale_answers = Counter(
            "metrics_router_stale_answers_total",
            "Failed requests answered with the caller's own last good answer, by tenant and "
            "reason (unreachable, timeout, tls, protocol, upstream_500, upstream_503, overloaded).",
            ["tenant", "reason"],
            registry=registry,
        )
        self.stale_age = Histogram(
            "metrics_router_stale_answer_age_seconds",
            "Age of the last good answers served instead of a failure, by tenant.",
            ["tenant"],
            buckets=STALE_AGE_BUCKETS,
            registry=registry,
        )
        self.upstream_tls_errors = Counter(
            "metrics_router_upstream_tls_errors_total",
            "Upstream TLS failures (kind tls) by tenant and cause: expired-certificate, "
            "unknown-ca, hostname-mismatch, client-certificate-rejected, other.",
            ["tenant", "cause"],
            registry=registry,
        )
        self.tls_handshake_failures = Counter(
            "metrics_router_tls_handshake_failures_total",
            "TLS handshakes refused or failed at the secure port, by reason: unknown-ca, "
            "expired-certificate, bad-certificate, no-shared-cipher, not-tls, timeout, eof, other.",
            ["reason"],
            registry=registry,
        )
        self.connections_refused = Counter(
            "metrics_router_connections_refused_total",
            "Connections closed at accept, before TLS, by reason (max-connections).",
            ["reason"],
            registry=registry,
        )
        self.connection_timeouts = Counter(
            "metrics_router_connection_timeouts_total",
            "Client connections closed because a phase deadline passed, by phase: handshake, "
            "head, body, write, idle.",
            ["phase"],
            registry=registry,
        )
        self._requests: dict[tuple[str, int], Counter] = {}
        self._duration: dict[str, Histogram] = {}

    def observe(self, tenant: str, code: int, seconds: float | None) -> None:
        if self.batched:
            key = (tenant, code)
            pending = self._pending_requests
            pending[key] = pending.get(key, 0) + 1
            if seconds is not None:
                counts = self._pending_duration.get(tenant)
                if counts is None:
                    counts = self._pending_duration[tenant] = [0] * len(_LATENCY_BOUNDS) + [0.0]
                counts[bisect.bisect_left(_LATENCY_BOUNDS, seconds)] += 1
                counts[-1] += seconds
            return
        self._observe(tenant, code, seconds)

    def flush(self) -> None:
        """Add what ``observe`` counted to the families (a scrape does this first)."""
        requests, self._pending_requests = self._pending_requests, {}
        for (tenant, code), n in requests.items():
            self._request_child(tenant, code).inc(n)
        durations, self._pending_duration = self._pending_duration, {}
        for tenant, counts in durations.items():
            hist = self._duration_child(tenant)
            # Histogram keeps one value per bucket (made cumulative when collected) and a sum:
            # add to them what observe() would have, in one step per bucket.
            for i, n in enumerate(counts[:-1]):
                if n:
                    hist._buckets[i].inc(n)
            hist._sum.inc(counts[-1])

    def track_inflight(self, tenant: str, count: Callable[[], int]) -> Any:
        """The tenant's in-flight gauge: None when batched (the gauge reads ``count`` when
        collected), else the child to ``inc()`` and ``dec()`` around each request."""
        child = self.inflight.labels(tenant)
        if self.batched:
            child.set_function(lambda: float(count()))
            return None
        return child

    def _request_child(self, tenant: str, code: int) -> Any:
        key = (tenant, code)
        child = self._requests.get(key)
        if child is None:
            child = self._requests[key] = self.requests.labels(tenant, str(code))
        return child

    def _duration_child(self, tenant: str) -> Any:
        hist = self._duration.get(tenant)
        if hist is None:
            hist = self._duration[tenant] = self.duration.labels(tenant)
        return hist

    def _observe(self, tenant: str, code: int, seconds: float | None) -> None:
        key = (tenant, code)
        child = self._requests.get(key)
        if child is None:
            child = self._requests[key] = self.requests.labels(tenant, str(code))
        child.inc()
        if seconds is not None:
            hist = self._duration.get(tenant)
            if hist is None:
                hist = self._duration[tenant] = self.duration.labels(tenant)
            hist.observe(seconds)

    def observe_stale(self, tenant: str, reason: str, age: float) -> None:
        self.stale_answers.labels(tenant, reason).inc()
        self.stale_age.labels(tenant).observe(age)


def version() -> str:
    """The installed package's version ("unknown" when run from a bare source tree)."""
    try:
        return metadata.version("tenant-metrics-router")
    except metadata.PackageNotFoundError:
        return "unknown"
