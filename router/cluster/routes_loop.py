"""The control loop: cluster watches -> tenancy resolution -> RouteTable; requestheader follower.

Public API
----------
``ClusterRoutes(api, settings, *, registry, on_table, default=None, backoff=None,
min_interval=0.05)``
    Runs a namespaces Informer (``settings.namespace_selector``) and a services Informer
    (``settings.upstream_service_selector``, all namespaces), recomputes
    ``tenancy.resolve`` when they change, and calls ``on_table(table)`` whenever the RouteTable
    differs from the last one (the first complete sync always calls it). Bursts of events are
    coalesced: a change after a quiet spell is computed at once; during a burst at most one
    recompute per ``min_interval`` (default 0.05 s, or twice the last recompute's duration if
    longer), never one per event. Nothing is
    computed before both informers have completed their first list, so a half-synced view never
    replaces the table. Attributes: ``synced`` (``asyncio.Event``, set after the first table),
    ``resolution`` (the last ``tenancy.Resolution`` or None), ``namespaces`` / ``services``
    (the ``Informer`` objects), ``async run()`` (until cancelled). Each new conflict and each
    newly unrouted tenant is logged once.
``RequestHeaderFollower(api, on_change, *, registry, backoff=None)``
    Watches ``kube-system/extension-apiserver-authentication`` and calls
    ``on_change(RequestHeaderSettings)`` at the first sight and whenever the parsed settings
    change. A missing or unparsable ConfigMap is logged and the last good settings stay in
    force. ``got_first`` (``asyncio.Event``), ``settings`` (last good or None), ``async run()``.
``parse_auth_configmap(data: Mapping[str, str]) -> RequestHeaderSettings``
    Pure. Keys ``requestheader-client-ca-file`` (PEM text, required -> ``client_ca_pem``),
    ``requestheader-allowed-names``, ``requestheader-username-headers``,
    ``requestheader-uid-headers``, ``requestheader-group-headers``,
    ``requestheader-extra-headers-prefix`` (JSON arrays of strings). Missing or empty header
    lists take kube-apiserver's defaults; missing allowed names mean any name. Raises
    ``ValueError`` naming every problem.
``ClusterMetrics`` / ``cluster_metrics(registry) -> ClusterMetrics``
    The cluster metrics, registered once per registry (shared by both classes and by anyone
    else running informers): ``metrics_router_watch_restarts_total{resource}``,
    ``metrics_router_last_sync_timestamp_seconds``, ``metrics_router_route_conflicts_total{kind}``,
    ``metrics_router_synced``. (``metrics_router_routes`` / ``metrics_router_tenants`` belong to
    the proxy metrics, set from the table it is given.)
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from kubernetes_asyncio.client import ApiClient
from prometheus_client import CollectorRegistry, Counter, Gauge

from router.cluster.informer import Informer
from router.cluster.retry import Backoff
from router.config import (
    DEFAULT_EXTRA_PREFIXES,
    DEFAULT_GROUP_HEADERS,
    DEFAULT_UID_HEADERS,
    DEFAULT_USERNAME_HEADERS,
    RequestHeaderSettings,
    TenancySettings,
)
from router.core import tenancy
from router.routes import RouteTable, Upstream

logger = logging.getLogger(__name__)

AUTH_CONFIGMAP_NAMESPACE = "kube-system"
AUTH_CONFIGMAP_NAME = "extension-apiserver-authentication"

__all__ = [
    "AUTH_CONFIGMAP_NAME",
    "AUTH_CONFIGMAP_NAMESPACE",
    "ClusterMetrics",
    "ClusterRoutes",
    "RequestHeaderFollower",
    "cluster_metrics",
    "parse_auth_configmap",
]


# --------------------------------------------------------------------------- metrics


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


# --------------------------------------------------------------------------- routes


class ClusterRoutes:
    """namespaces + metrics Services (watched) -> tenancy.resolve -> on_table(RouteTable)."""

    def __init__(
        self,
        api: ApiClient,
        settings: TenancySettings,
        *,
        registry: CollectorRegistry,
        on_table: Callable[[RouteTable], None],
        default: Upstream | None = None,
        backoff: Callable[[], Backoff] | None = None,
        min_interval: float = 0.05,
    ) -> None:
        self.settings = settings
        self.min_interval = min_interval
        self.default = default
        self.on_table = on_table
        self.metrics = cluster_metrics(registry)
        make_backoff = backoff or Backoff
        self.namespaces = Informer(
            api, "namespaces", label_selector=settings.namespace_selector, backoff=make_backoff()
        )
        self.services = Informer(
            api,
            "services",
            label_selector=settings.upstream_service_selector or None,
            backoff=make_backoff(),
        )
        self.synced = asyncio.Event()
        self.resolution: tenancy.Resolution | None = None
        self.recomputes = 0
        self._dirty = asyncio.Event()
        self._table: RouteTable | None = None
        self._conflicts: frozenset[tenancy.Conflict] = frozenset()
        self._unrouted: dict[str, str] = {}
        # cache key -> (raw object, info): the informers replace objects on change, so an
        # identical object means an unchanged info and recomputes skip re-parsing it.
        self._ns_infos: dict[str, tuple[dict[str, Any], tenancy.NamespaceInfo]] = {}
        self._svc_infos: dict[str, tuple[dict[str, Any], tenancy.ServiceInfo]] = {}

    async def run(self) -> None:
        """Watch and recompute until cancelled."""
        for informer in (self.namespaces, self.services):
            self.metrics.track(informer)
        self.metrics.synced.set(0)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.namespaces.run(self._dirty.set))
                tg.create_task(self.services.run(self._dirty.set))
                tg.create_task(self._loop())
        finally:
            for informer in (self.namespaces, self.services):
                self.metrics.untrack(informer)

    async def _loop(self) -> None:
        while True:
            await self._dirty.wait()
            # Let the rest of this wake-up's events land before computing once for all.
            await asyncio.sleep(0)
            self._dirty.clear()
            if self.namespaces.synced.is_set() and self.services.synced.is_set():
                started = time.perf_counter()
                self.recompute()
                spent = time.perf_counter() - started
                # An idle loop reacts at once; during an event storm it recomputes at most every
                # min_interval, and never spends more than about a third of its time here.
                await asyncio.sleep(max(self.min_interval, 2 * spent))

    def recompute(self) -> tenancy.Resolution:
        """Resolve the informers' current caches and publish the table if it changed."""
        self.recomputes += 1
        namespaces = _infos(self.namespaces.cache, self._ns_infos, tenancy.NamespaceInfo)
        services = _infos(self.services.cache, self._svc_infos, tenancy.ServiceInfo)
        resolution = tenancy.resolve(namespaces, services, self.settings, self.default)
        self.resolution = resolution
        self._report(resolution)
        if self._table is None or resolution.table != self._table:
            self._table = resolution.table
            logger.info(
                "route table updated tenants=%d namespaces=%d unrouted_tenants=%d",
                len(resolution.table.tenants),
                resolution.table.namespace_count,
                len(resolution.unrouted),
            )
            self.on_table(resolution.table)
        if not self.synced.is_set():
            self.synced.set()
            self.metrics.synced.set(1)
        return resolution

    def _report(self, resolution: tenancy.Resolution) -> None:
        current = frozenset(resolution.conflicts)
        for conflict in sorted(current - self._conflicts, key=lambda c: (c.kind, c.subject)):
            logger.warning(
                "route conflict kind=%s subject=%s chosen=%s rejected=%s: %s",
                conflict.kind,
                conflict.subject,
                conflict.chosen,
                ",".join(conflict.rejected),
                conflict.message,
            )
            self.metrics.route_conflicts.labels(conflict.kind).inc()
        self._conflicts = current
        for tenant, reason in sorted(resolution.unrouted.items()):
            if self._unrouted.get(tenant) != reason:
                logger.warning("tenant not routed tenant=%s reason=%r", tenant, reason)
        self._unrouted = dict(resolution.unrouted)


def _infos(
    cache: Mapping[str, dict[str, Any]],
    memo: dict[str, tuple[dict[str, Any], Any]],
    cls: Any,
) -> list[Any]:
    out = []
    fresh: dict[str, tuple[dict[str, Any], Any]] = {}
    for key, obj in cache.items():
        hit = memo.get(key)
        info = hit[1] if hit is not None and hit[0] is obj else cls.from_object(obj)
        fresh[key] = (obj, info)
        out.append(info)
    memo.clear()
    memo.update(fresh)
    return out


# --------------------------------------------------------------------------- requestheader


def _string_list(data: Mapping[str, str], key: str, errors: list[str]) -> tuple[str, ...] | None:
    raw = data.get(key)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = json.loads(raw)
    except ValueError as exc:
        errors.append(f"{key}: not a JSON array: {exc}")
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        errors.append(f"{key}: want a JSON array of strings")
        return None
    return tuple(value)


def parse_auth_configmap(data: Mapping[str, str]) -> RequestHeaderSettings:
    """RequestHeaderSettings from the extension-apiserver-authentication ConfigMap's data."""
    errors: list[str] = []
    ca = data.get("requestheader-client-ca-file")
    if not ca or "-----BEGIN CERTIFICATE-----" not in ca:
        errors.append(
            "requestheader-client-ca-file: missing or not PEM certificates (the cluster has no "
            "front-proxy CA configured)"
        )
    allowed = _string_list(data, "requestheader-allowed-names", errors)
    users = _string_list(data, "requestheader-username-headers", errors)
    uids = _string_list(data, "requestheader-uid-headers", errors)
    groups = _string_list(data, "requestheader-group-headers", errors)
    extras = _string_list(data, "requestheader-extra-headers-prefix", errors)
    if errors:
        raise ValueError("; ".join(errors))
    assert ca is not None
    return RequestHeaderSettings(
        client_ca_file=None,
        client_ca_pem=ca.encode(),
        allowed_names=allowed or (),
        username_headers=users or DEFAULT_USERNAME_HEADERS,
        uid_headers=uids or DEFAULT_UID_HEADERS,
        group_headers=groups or DEFAULT_GROUP_HEADERS,
        extra_headers_prefixes=extras or DEFAULT_EXTRA_PREFIXES,
    )


class RequestHeaderFollower:
    """Follows kube-system/extension-apiserver-authentication; on_change(settings) on change."""

    def __init__(
        self,
        api: ApiClient,
        on_change: Callable[[RequestHeaderSettings], None],
        *,
        registry: CollectorRegistry,
        backoff: Backoff | None = None,
    ) -> None:
        self.on_change = on_change
        self.metrics = cluster_metrics(registry)
        self.informer = Informer(
            api,
            "configmaps",
            namespace=AUTH_CONFIGMAP_NAMESPACE,
            field_selector=f"metadata.name={AUTH_CONFIGMAP_NAME}",
            backoff=backoff,
        )
        self.got_first = asyncio.Event()
        self.settings: RequestHeaderSettings | None = None
        self._problem: str | None = None

    async def run(self) -> None:
        self.metrics.track(self.informer)
        try:
            await self.informer.run(self._changed)
        finally:
            self.metrics.untrack(self.informer)

    def _changed(self) -> None:
        obj = self.informer.cache.get(f"{AUTH_CONFIGMAP_NAMESPACE}/{AUTH_CONFIGMAP_NAME}")
        if obj is None:
            self._warn(f"ConfigMap {AUTH_CONFIGMAP_NAMESPACE}/{AUTH_CONFIGMAP_NAME} not found")
            return
        try:
            settings = parse_auth_configmap(obj.get("data") or {})
        except ValueError as exc:
            self._warn(f"ConfigMap {AUTH_CONFIGMAP_NAMESPACE}/{AUTH_CONFIGMAP_NAME}: {exc}")
            return
        self._problem = None
        if settings == self.settings:
            return
        self.settings = settings
        logger.info(
            "requestheader settings from ConfigMap allowed_names=%s username_headers=%s "
            "group_headers=%s extra_headers_prefixes=%s",
            ",".join(settings.allowed_names) or "(any)",
            ",".join(settings.username_headers),
            ",".join(settings.group_headers),
            ",".join(settings.extra_headers_prefixes),
        )
        self.on_change(settings)
        self.got_first.set()

    def _warn(self, problem: str) -> None:
        if problem != self._problem:
            kept = "keeping the last good settings" if self.settings else "no settings yet"
            logger.error("requestheader settings unusable (%s): %s", kept, problem)
        self._problem = problem
