"""The reloader's metrics, on the registry it is given."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from router.reloader.decide import REASONS


class ReloaderMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
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
        for reason in REASONS:
            self.restarts.labels(reason)
