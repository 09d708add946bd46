"""The routes loop: cluster watches -> tenancy resolution -> RouteTable.

Public API
----------
``ClusterRoutes(api, settings, *, metrics, on_table, default=None, backoff=None,
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
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from kubernetes_asyncio.client import ApiClient

from router import logs
from router.cluster.informer import Informer
from router.cluster.retry import Backoff
from router.core import tenancy
from router.core.routes import RouteTable, Upstream
from router.metrics import ClusterMetrics
from router.settings import TenancySettings

logger = logging.getLogger(__name__)

__all__ = ["ClusterRoutes"]


class ClusterRoutes:
    """namespaces + metrics Services (watched) -> tenancy.resolve -> on_table(RouteTable)."""

    def __init__(
        self,
        api: ApiClient,
        settings: TenancySettings,
        *,
        metrics: ClusterMetrics,
        on_table: Callable[[RouteTable], None],
        default: Upstream | None = None,
        backoff: Callable[[], Backoff] | None = None,
        min_interval: float = 0.05,
    ) -> None:
        self.settings = settings
        self.min_interval = min_interval
        self.default = default
        self.on_table = on_table
        self.metrics = metrics
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

    @property
    def namespace_objects(self) -> Mapping[str, dict[str, Any]]:
        """The watched namespaces (raw objects by name), read-only: the policy loop reads their
        annotations."""
        return self.namespaces.cache

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
                "route table updated",
                extra=logs.fields(
                    tenants=len(resolution.table.tenants),
                    namespaces=resolution.table.namespace_count,
                    unrouted_tenants=len(resolution.unrouted),
                ),
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
                "route conflict: %s",
                conflict.message,
                extra=logs.fields(
                    kind=conflict.kind,
                    subject=conflict.subject,
                    chosen=conflict.chosen,
                    rejected=",".join(conflict.rejected),
                ),
            )
            self.metrics.route_conflicts.labels(conflict.kind).inc()
        self._conflicts = current
        for tenant, reason in sorted(resolution.unrouted.items()):
            if self._unrouted.get(tenant) != reason:
                logger.warning("tenant not routed", extra=logs.fields(tenant=tenant, reason=reason))
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
