"""Every Prometheus metric family of the router, on the registry it is given.

The composition root (router.app, or router.cli.reloader for the reloader's own process) builds
each family once on its one registry and passes it to whoever counts: no module-global state.

``ProxyMetrics``      the request path (label children cached: the hot path does one dict
                      lookup, not ``labels()`` parsing).
``ExpiryWarnings``    certificates close to expiry; ``ReloadState``: the last load of each source.
``ClusterMetrics``    the cluster watches (routes loop and requestheader follower).
``PolicyMetrics``     the NetworkPolicy loop; ``ReloaderMetrics``: the KEDA reloader.
``metrics_handler(view)``, ``routes_handler(live)``
                      GET /metrics (the exposition of a registry) and GET /routes (the live
                      table as JSON), for the metrics ports of `serve` and `reloader`.

Label children are cached so the hot path does one dict lookup, not ``labels()`` parsing.

In one process (the default ``--workers 1``) a request's own figures (requests by tenant and
code, its duration, the tenant's in-flight count) cost no locked increment: they are counted in
plain ints and added to their families when the registry is collected (a scrape), by a
collector registered ahead of them. With ``--workers N`` the values live in files the metrics
port sums across processes, so every request writes through, as before.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics_core import Metric

from router import logs
from router.core.live_routes import LiveRoutes
from router.core.version import version

logger = logging.getLogger("router.app")

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


class ExpiryWarnings:
    """Certificates close to expiry: a gauge per certificate and one warning per expiry."""

    def __init__(self, registry: CollectorRegistry, window: float) -> None:
        self.window = window
        self.expiring = Gauge(
            "metrics_router_certificate_expiring_soon",
            "1 when the certificate expires within --certificate-expiry-warning, else 0.",
            ["certificate"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self._warned: dict[str, datetime] = {}

    def check(self, name: str, not_after: datetime, now: datetime | None = None) -> bool:
        left = (not_after - (now or datetime.now(UTC))).total_seconds()
        soon = left < self.window
        self.expiring.labels(name).set(1 if soon else 0)
        if soon and self._warned.get(name) != not_after:
            self._warned[name] = not_after
            logger.warning(
                "certificate expires soon",
                extra=logs.fields(
                    certificate=name,
                    not_after=not_after.strftime("%Y-%m-%dT%H:%M:%SZ"),
                    hours_left=round(left / 3600, 1),
                ),
            )
        return soon


class ReloadState:
    """Whether the last attempt to load each source succeeded: a bad file stays bad without
    new failures being counted (they are counted once per distinct error), so alerts read
    this gauge rather than the failure counter's increase."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.ok = Gauge(
            "metrics_router_last_reload_successful",
            "1 when the last load of the source (serving, proxy-client, routes, requestheader) "
            "succeeded, 0 while the router serves with the last good version.",
            ["source"],
            registry=registry,
            multiprocess_mode="livemin",
        )

    def set(self, source: str, ok: bool) -> None:
        self.ok.labels(source).set(1 if ok else 0)


class Watched(Protocol):
    """What ClusterMetrics reads of a watch (router.cluster.informer.Informer)."""

    resource: str
    last_sync: float | None
    on_restart: Callable[[str], None] | None


class ClusterMetrics:
    """Metrics of the cluster watches, shared by the routes loop and the requestheader follower:
    the composition root builds one and passes it to both."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.watch_restarts = Counter(
            "metrics_router_watch_restarts_total",
            "List/watch failures (410 Gone relists and errors) by resource.",
            ["resource"],
            registry=registry,
        )
        self.last_sync = Gauge(
            "metrics_router_last_sync_timestamp_seconds",
            "Unix time the stalest cluster watch last confirmed its view (list, event, "
            "bookmark or reconnect).",
            registry=registry,
        )
        self.route_conflicts = Counter(
            "metrics_router_route_conflicts_total",
            "Conflicts resolved deterministically (namespace: two tenants claim it; service: "
            "two metrics Services for one tenant), counted when first seen.",
            ["kind"],
            registry=registry,
        )
        self.synced = Gauge(
            "metrics_router_synced",
            "1 once the route table has been computed from a complete first sync, else 0.",
            registry=registry,
        )
        for kind in ("namespace", "service"):
            self.route_conflicts.labels(kind)
        self._informers: list[Watched] = []
        self.last_sync.set_function(self._stalest)

    def track(self, informer: Watched) -> None:
        """Count the informer's restarts and include it in the last sync time."""
        self._informers.append(informer)
        child = self.watch_restarts.labels(informer.resource)
        previous = informer.on_restart

        def on_restart(reason: str) -> None:
            child.inc()
            if previous is not None:
                previous(reason)

        informer.on_restart = on_restart

    def untrack(self, informer: Watched) -> None:
        if informer in self._informers:
            self._informers.remove(informer)

    def _stalest(self) -> float:
        times = [i.last_sync for i in self._informers]
        if not times or any(t is None for t in times):
            return 0.0
        return min(t for t in times if t is not None)


class PolicyMetrics:
    """Metrics of the NetworkPolicy loop (applies, prunes, leadership)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.applies = Counter(
            "metrics_router_policy_applies",
            "Server-side applies of owned policy objects by result (success, failure).",
            ["result"],
            registry=registry,
        )
        self.prunes = Counter(
            "metrics_router_policy_prunes",
            "Owned policy objects deleted because no tenant wants them.",
            registry=registry,
        )
        self.leader = Gauge(
            "metrics_router_leader",
            "1 while this replica holds the policy Lease (and may write policies).",
            registry=registry,
        )
        for result in ("success", "failure"):
            self.applies.labels(result)


class ReloaderMetrics:
    """Metrics of `metrics-router reloader` (its own process and registry); ``reasons`` are
    the restart reasons the decision knows (router.reloader.decide.REASONS)."""

    def __init__(self, registry: CollectorRegistry, reasons: Iterable[str]) -> None:
        self.registry = registry
        self.restarts = Counter(
            "metrics_router_reloader_restarts_total",
            "Restarts of the child by reason: namespaces (the set changed), crash (it exited "
            "on its own).",
            ["reason"],
            registry=registry,
        )
        self.namespaces = Gauge(
            "metrics_router_reloader_namespaces",
            "Namespaces currently selected for WATCH_NAMESPACE (0 holds the child stopped).",
            registry=registry,
        )
        self.child_up = Gauge(
            "metrics_router_reloader_child_up", "1 while the child process runs.", registry=registry
        )
        for reason in reasons:
            self.restarts.labels(reason)


Handler = Callable[[web.Request], Awaitable[web.Response]]


def metrics_handler(view: Callable[[], CollectorRegistry]) -> Handler:
    """GET /metrics: the exposition of ``view()`` (rendered off the event loop)."""

    async def handle(request: web.Request) -> web.Response:
        body = await asyncio.get_running_loop().run_in_executor(None, generate_latest, view())
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    return handle


def routes_handler(live: LiveRoutes) -> Handler:
    """GET /routes: the live route table, its source and each tenant's recent errors."""

    async def handle(request: web.Request) -> web.Response:
        return web.Response(
            text=json.dumps(live.snapshot(), indent=2) + "\n", content_type="application/json"
        )

    return handle
