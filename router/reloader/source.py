"""The Kubernetes namespace source: the tenant's namespaces, fed to ``Reloader.update``.

Uses the shared ``router.cluster.informer.Informer`` (list+watch, relist on 410, backoff, cache
kept through API outages, so an outage leaves the child running with the last known set) and
the shared tenancy rules (``router.core.tenancy``):

- ``--tenant T``: every namespace is watched (only ``--namespace-selector``, when also given,
  narrows the watch) and membership is recomputed from the whole cache on each change, so a
  namespace whose tenant label, name pattern or HNC root changes leaves the set;
- ``--namespace-selector`` alone: the watch is label-selected. The API server sends DELETED for
  an object that stops matching a label-selected watch (and ADDED when it starts to), and a relist
  returns only matching objects, so a namespace that loses the label leaves the cache and the set.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from kubernetes_asyncio.client import ApiClient

from router import logs
from router.cluster.informer import Informer
from router.cluster.retry import Backoff
from router.core.tenancy import NamespaceInfo, tenant_of
from router.reloader.decide import watch_namespace_value
from router.settings import TenancySettings

logger = logging.getLogger(__name__)


def select_namespaces(
    objects: Iterable[Mapping[str, Any]], tenant: str | None, tenancy: TenancySettings
) -> frozenset[str]:
    """Names of the tenant's namespaces among raw Namespace objects (pure).

    With ``tenant`` None every object given is selected (the API's label selector chose them).
    """
    infos = [NamespaceInfo.from_object(obj) for obj in objects]
    if tenant is None:
        return frozenset(info.name for info in infos)
    by_name = {info.name: info for info in infos}
    return frozenset(info.name for info in infos if tenant_of(info, by_name, tenancy) == tenant)


class NamespaceSource:
    """Watches namespaces and feeds the tenant's set to ``sink`` (e.g. ``Reloader.update``).

    Informer events only mark the view dirty; one task recomputes the set, so a burst of events
    (or the initial list of 10,000 namespaces) costs one computation.
    """

    def __init__(
        self,
        api: ApiClient,
        sink: Callable[[frozenset[str]], None],
        *,
        tenant: str | None,
        tenancy: TenancySettings,
        backoff: Backoff | None = None,
        on_restart: Callable[[str], None] | None = None,
    ) -> None:
        if tenant is None and not tenancy.namespace_selector:
            raise ValueError("a tenant or a namespace selector is required")
        self.tenant = tenant
        self.tenancy = tenancy
        self.informer = Informer(
            api,
            "namespaces",
            label_selector=tenancy.namespace_selector,
            backoff=backoff,
            on_restart=on_restart,
        )
        self._sink = sink
        self._dirty = asyncio.Event()
        self.last: frozenset[str] | None = None

    async def run(self) -> None:
        """Until cancelled; an unexpected error (a bug, not an API outage) propagates."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self.informer.run(self._dirty.set))
            group.create_task(self._publish())

    async def _publish(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            selected = select_namespaces(self.informer.cache.values(), self.tenant, self.tenancy)
            if selected != self.last:
                logger.info(
                    "namespaces selected",
                    extra=logs.fields(
                        tenant=self.tenant or "-",
                        selector=self.tenancy.namespace_selector or "-",
                        namespaces=watch_namespace_value(selected) or "<none>",
                    ),
                )
            self.last = selected
            self._sink(selected)
