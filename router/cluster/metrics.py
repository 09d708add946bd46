"""Metrics of the cluster loops: the watches (shared by the routes loop and the follower)
and the NetworkPolicy loop.

``ClusterMetrics`` / ``cluster_metrics(registry) -> ClusterMetrics``
    The cluster metrics, registered once per registry (shared by both classes and by anyone
    else running informers): ``metrics_router_watch_restarts_total{resource}``,
    ``metrics_router_last_sync_timestamp_seconds``, ``metrics_router_route_conflicts_total{kind}``,
    ``metrics_router_synced``. (``metrics_router_routes`` / ``metrics_router_tenants`` belong to
    the proxy metrics, set from the table it is given.)
``PolicyMetrics(registry)``
    ``metrics_router_policy_applies{result}``, ``metrics_router_policy_prunes``,
    ``metrics_router_leader``.
"""

from __future__ import annotations

import weakref

from prometheus_client import CollectorRegistry, Counter, Gauge

from router.cluster.informer import Informer

__all__ = ["ClusterMetrics", "PolicyMetrics", "cluster_metrics"]


class ClusterMetrics:
    """Metrics of the cluster watches. Use ``cluster_metrics(registry)`` to share one set."""

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
        self._informers: list[Informer] = []
        self.last_sync.set_function(self._stalest)

    def track(self, informer: Informer) -> None:
        """Count the informer's restarts and include it in the last sync time."""
        self._informers.append(informer)
        child = self.watch_restarts.labels(informer.resource)
        previous = informer.on_restart

        def on_restart(reason: str) -> None:
            child.inc()
            if previous is not None:
                previous(reason)

        informer.on_restart = on_restart

    def untrack(self, informer: Informer) -> None:
        if informer in self._informers:
            self._informers.remove(informer)

    def _stalest(self) -> float:
        times = [i.last_sync for i in self._informers]
        if not times or any(t is None for t in times):
            return 0.0
        return min(t for t in times if t is not None)


_METRICS: weakref.WeakKeyDictionary[CollectorRegistry, ClusterMetrics] = weakref.WeakKeyDictionary()


def cluster_metrics(registry: CollectorRegistry) -> ClusterMetrics:
    """The ClusterMetrics of this registry, created on first use."""
    metrics = _METRICS.get(registry)
    if metrics is None:
        metrics = _METRICS[registry] = ClusterMetrics(registry)
    return metrics


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
