"""Prometheus metrics of the request path, on an injected registry.

Label children are cached so the hot path does one dict lookup, not ``labels()`` parsing.
"""

from __future__ import annotations

import time
from importlib import metadata

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


STALE_AGE_BUCKETS = (1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class ProxyMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
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
        # Stale answers (router/core/stale.py): served instead of an upstream failure.
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
