"""Keep the cluster's NetworkPolicies equal to the rendered ones (leader only).

Adapter around the pure `router.core.policy`: server-side apply of what differs (field manager
``metrics-router``, ``force=true``), deletion of owned objects no tenant wants (listed with the
ownership label selector, and `core.policy.plan` deletes nothing without that label), retry with
backoff, a periodic resync that reverts hand edits, and leader election on a
``coordination.k8s.io/v1`` Lease so that several router replicas never fight.

Wiring it into ``serve`` (the composition root)::

    add_policy_arguments(parser)          # policy_options, next to the serve flags
    settings = policy_settings_from_args(args, errors)  # None without --manage-network-policies
    ...
    sync = PolicySync(api, kind=settings.kind, settings=settings, registry=registry)

    def on_table(table):                                   # ClusterRoutes(..., on_table=on_table)
        proxy_swap(table)                                  # whatever serve does with the table
        sync.update(routes.resolution or table, routes.namespaces.cache)

    tg.create_task(sync.run())                             # next to routes.run()
    ...
    await sync.stop()     # on SIGTERM, before cancelling the TaskGroup; run() then returns
                          # after releasing the Lease, so a standby replica takes over at once

``update(tenants, namespaces)`` takes the tenancy ``Resolution`` (or a ``RouteTable``, e.g. from a
routes file) and is cheap and synchronous: it stores the input and wakes the loop. Pass the
namespaces Informer's ``cache`` mapping itself: it is re-read at every pass, so an edit of a
root namespace's egress annotations, which does not change the RouteTable (``on_table`` is not
called), is applied at the next resync at the latest. ``NamespaceInfo`` objects work too (their
roots' annotations are then fetched). Nothing is written before the first ``update()``, so an
empty start never prunes. Cancelling the ``run()`` task also releases the Lease. The policy
config file is re-read when it changes. Writes need the cluster API even when routes come from
a file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from kubernetes_asyncio.client import ApiClient

from router import logs
from router.cluster import client as kube
from router.cluster.lease import LeaderElector
from router.cluster.reads import discover_apiserver_cidrs, list_all, namespace_meta
from router.cluster.retry import Backoff
from router.core.policy import (
    CILIUM_API,
    KIND_CILIUM,
    KIND_NETWORKPOLICY,
    NETWORKPOLICY_API,
    OWNER_SELECTOR,
    ManifestError,
    NamespaceMeta,
    ObjectKey,
    PolicyConfig,
    key_of,
    parse_policy_config,
    plan,
    render,
    root_namespace_of,
    tenant_networks,
)
from router.core.routes import RouteTable
from router.core.tenancy import NamespaceInfo, Resolution
from router.metrics import PolicyMetrics
from router.settings import LeaderElectionSettings, TenancySettings

logger = logging.getLogger(__name__)

FIELD_MANAGER = "metrics-router"

# kind -> (api_version, plural resource, namespaced)
RESOURCES: Mapping[str, tuple[str, str, bool]] = MappingProxyType(
    {
        KIND_NETWORKPOLICY: (NETWORKPOLICY_API[0], "networkpolicies", True),
        KIND_CILIUM: (CILIUM_API[0], "ciliumclusterwidenetworkpolicies", False),
    }
)


@dataclass(frozen=True, slots=True)
class PolicySyncSettings:
    kind: str = KIND_NETWORKPOLICY
    config: PolicyConfig = field(default_factory=PolicyConfig)
    config_path: Path | None = None
    resync_period: float = 300.0
    leader_election: LeaderElectionSettings = field(default_factory=LeaderElectionSettings)
    backoff_initial: float = 1.0
    backoff_maximum: float = 60.0
    # The tenancy's tenant-root label: tenants below a root of their own are selected by HNC.
    tenant_root_label: tuple[str, str] = TenancySettings().tenant_root_label


Namespaces = Mapping[str, Mapping[str, Any]] | Iterable[Mapping[str, Any] | NamespaceInfo]


@dataclass(frozen=True, slots=True)
class SyncInputs:
    """The latest tenants as given to update()."""

    table: RouteTable
    all_tenants: Mapping[str, tuple[str, ...]]
    # A live mapping (an Informer cache, read at every pass) or a snapshot taken by update().
    namespaces: Mapping[str, Mapping[str, Any]] | tuple[Mapping[str, Any] | NamespaceInfo, ...]

    def metas(self) -> tuple[dict[str, NamespaceMeta], frozenset[str]]:
        """Namespace metadata now, and the names given without annotations (NamespaceInfo)."""
        objs = self.namespaces.values() if isinstance(self.namespaces, Mapping) else self.namespaces
        metas: dict[str, NamespaceMeta] = {}
        partial: set[str] = set()
        for obj in objs:
            meta = namespace_meta(obj)
            metas[meta.name] = meta
            if isinstance(obj, NamespaceInfo):
                partial.add(meta.name)
        return metas, frozenset(partial)


@dataclass(frozen=True, slots=True)
class SyncResult:
    applied: tuple[ObjectKey, ...] = ()
    failed: tuple[ObjectKey, ...] = ()
    pruned: tuple[ObjectKey, ...] = ()
    error: str | None = None  # the pass stopped early (render refused, list failed, not leader)

    @property
    def ok(self) -> bool:
        return self.error is None and not self.failed


class PolicySync:
    """Applies the latest tenants' policies and prunes the rest; see the module docstring."""

    def __init__(
        self,
        api: ApiClient,
        *,
        kind: str,
        settings: PolicySyncSettings,
        metrics: PolicyMetrics,
    ) -> None:
        if kind not in RESOURCES:
            raise ValueError(f"unknown policy kind {kind!r}")
        self.api = api
        self.kind = kind
        self.settings = settings
        self.metrics = metrics
        self.config = settings.config
        self._config_stamp = self._stamp()
        self._input: SyncInputs | None = None
        self._dirty = asyncio.Event()
        self._stopping = asyncio.Event()
        self._leader = asyncio.Event()
        self._follower = asyncio.Event()
        self._passes = 0
        self.last_result: SyncResult | None = None
        self._backoff = Backoff(initial=settings.backoff_initial, maximum=settings.backoff_maximum)
        self._apiserver_cidrs: tuple[str, ...] = ()
        self._last_warnings: tuple[str, ...] = ()
        le = settings.leader_election
        self.elector: LeaderElector | None = None
        if le.enabled:
            self.elector = LeaderElector(api, le, self._on_leader_change)
            self._on_leader_change(False)
        else:
            self._on_leader_change(True)

    # -- input ---------------------------------------------------------------------------

    def update(self, tenants: Resolution | RouteTable, namespaces: Namespaces = ()) -> None:
        """Store the latest tenants and wake the loop (cheap; call on every change).

        ``namespaces``: a mapping such as ``Informer.cache`` is kept and read again at every
        pass (so label and annotation edits count at the next resync at the latest); any
        other iterable of raw Namespace objects or ``NamespaceInfo`` is copied now.
        """
        if isinstance(tenants, Resolution):
            table, all_tenants = tenants.table, tenants.tenants
        else:
            table, all_tenants = tenants, MappingProxyType({})
        source = namespaces if isinstance(namespaces, Mapping) else tuple(namespaces)
        self._input = SyncInputs(table, all_tenants, source)
        self._dirty.set()

    def _on_leader_change(self, leader: bool) -> None:
        self.metrics.leader.set(1 if leader else 0)
        if leader:
            self._follower.clear()
            self._leader.set()
            self._dirty.set()  # sync at once on taking over
        else:
            self._leader.clear()
            self._follower.set()

    async def wait_leader(self, leader: bool = True) -> None:
        """Until this replica is (or, with False, is not) the leader."""
        await (self._leader if leader else self._follower).wait()

    @property
    def is_leader(self) -> bool:
        return self._leader.is_set()

    # -- running -------------------------------------------------------------------------

    async def run(self) -> None:
        """Elect, then sync on every update and every resync period, until stop()."""
        elector = asyncio.create_task(self.elector.run()) if self.elector else None
        try:
            await self._loop()
        finally:
            if elector is not None:
                elector.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await elector
            if self.elector is not None:
                await asyncio.shield(self.elector.release())

    async def stop(self) -> None:
        """Ask run() to finish (it releases the Lease on the way out)."""
        self._stopping.set()

    async def _wait_any(self, *events: asyncio.Event, limit: float | None = None) -> None:
        waiters = [asyncio.ensure_future(e.wait()) for e in events]
        try:
            await asyncio.wait(waiters, timeout=limit, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)

    async def _loop(self) -> None:
        while not self._stopping.is_set():
            if not self.is_leader or self._input is None:
                self._dirty.clear()
                await self._wait_any(self._stopping, self._dirty)
                continue
            self._dirty.clear()
            result = await self.sync_once()
            if result.ok:
                self._backoff.reset()
                delay = self.settings.resync_period
            else:
                delay = self._backoff.next()
                logger.warning(
                    "policy sync incomplete; will retry",
                    extra=logs.fields(
                        delay=round(delay, 2), failed=len(result.failed), error=result.error
                    ),
                )
            await self._wait_any(self._stopping, self._dirty, limit=delay)

    @property
    def passes(self) -> int:
        """Sync passes completed so far (``last_result`` holds the latest one's result)."""
        return self._passes

    async def _finish(self, result: SyncResult) -> SyncResult:
        self.last_result = result
        self._passes += 1
        return result

    # -- one pass ------------------------------------------------------------------------

    def _stamp(self) -> tuple[int, int] | None:
        path = self.settings.config_path
        if path is None:
            return None
        try:
            st = path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def _reload_config(self) -> None:
        stamp = self._stamp()
        if stamp is None or stamp == self._config_stamp or self.settings.config_path is None:
            return
        self._config_stamp = stamp
        try:
            self.config = parse_policy_config(self.settings.config_path.read_text())
            logger.info(
                "policy config reloaded", extra=logs.fields(path=str(self.settings.config_path))
            )
        except (OSError, ManifestError) as exc:
            logger.error(
                "policy config not reloaded; keeping the last good one",
                extra=logs.fields(error=str(exc)),
            )

    async def _annotations(self, inputs: SyncInputs) -> dict[str, NamespaceMeta]:
        """Namespace metadata with annotations fetched for roots given without them."""
        metas, partial = inputs.metas()
        if not self.config.namespace_annotations or not partial:
            return metas
        members: dict[str, Sequence[str]] = dict(inputs.all_tenants)
        for t in inputs.table.tenants:
            members.setdefault(t.name, t.namespaces)
        for name, nss in sorted(members.items()):
            root = root_namespace_of(name, nss, None)
            if root is None or root not in partial:
                continue
            try:
                obj = await kube.request(
                    self.api, "GET", kube.resource_path("namespaces", name=root)
                )
                metas[root] = namespace_meta(obj)
            except kube.KubeNotFound:
                continue
        return metas

    async def sync_once(self) -> SyncResult:
        """Render, list owned objects, apply what differs, prune what nobody wants."""
        inputs = self._input
        if inputs is None:
            return await self._finish(SyncResult(error="no tenants yet"))
        if not self.is_leader:
            return await self._finish(SyncResult(error="not the leader"))
        self._reload_config()
        config = self.config
        api_version, plural, namespaced = RESOURCES[self.kind]
        try:
            if self.kind == KIND_NETWORKPOLICY and not config.settings.apiserver_cidrs:
                try:
                    self._apiserver_cidrs = await discover_apiserver_cidrs(self.api)
                except kube.KubeError:
                    if not self._apiserver_cidrs:
                        raise
                    logger.warning("kube-apiserver addresses not refreshed; using the last ones")
                cidrs = self._apiserver_cidrs
                config = replace(config, settings=replace(config.settings, apiserver_cidrs=cidrs))
            metas = await self._annotations(inputs)
            networks, warnings = tenant_networks(
                inputs.table, config, metas, inputs.all_tenants, self.settings.tenant_root_label
            )
            rendering = render(networks, config.settings, self.kind)
            actual = await list_all(
                self.api,
                kube.resource_path(plural, api_version=api_version),
                [("labelSelector", OWNER_SELECTOR)],
            )
            # List items of built-in kinds come without apiVersion/kind: fill them in, or no
            # key would match the desired ones.
            kind_name = NETWORKPOLICY_API[1] if self.kind == KIND_NETWORKPOLICY else CILIUM_API[1]
            for obj in actual:
                obj.setdefault("apiVersion", api_version)
                obj.setdefault("kind", kind_name)
        except ManifestError as exc:
            logger.error(
                "policies not rendered; cluster left as is", extra=logs.fields(errors=exc.errors)
            )
            return await self._finish(SyncResult(error=str(exc)))
        except kube.KubeError as exc:
            return await self._finish(SyncResult(error=f"reading the cluster: {exc}"))
        notes = (*warnings, *rendering.warnings)
        if notes != self._last_warnings:  # once per change, not at every resync
            self._last_warnings = notes
            for w in notes:
                logger.warning("policy warning: %s", w)
        todo = plan(rendering.manifests, actual)
        applied: list[ObjectKey] = []
        failed: list[ObjectKey] = []
        pruned: list[ObjectKey] = []
        for m in todo.apply:
            if not self.is_leader:
                return await self._finish(SyncResult(tuple(applied), tuple(failed), (), "lost"))
            path = self._path(m.key, plural, api_version, namespaced)
            try:
                await kube.request(
                    self.api,
                    "PATCH",
                    path,
                    query=[("fieldManager", FIELD_MANAGER), ("force", "true")],
                    body=dict(m.body),
                    content_type=kube.APPLY_PATCH,
                )
            except kube.KubeError as exc:
                self.metrics.applies.labels("failure").inc()
                failed.append(m.key)
                logger.warning(
                    "policy apply failed", extra=logs.fields(object=str(m.key), error=str(exc))
                )
                continue
            self.metrics.applies.labels("success").inc()
            applied.append(m.key)
            logger.info("policy applied", extra=logs.fields(object=str(m.key)))
        by_key = {key_of(o): o for o in actual}
        for key in todo.delete:
            if not self.is_leader:
                break
            uid = (by_key[key].get("metadata") or {}).get("uid")
            options: dict[str, Any] = {"apiVersion": "v1", "kind": "DeleteOptions"}
            if uid:
                options["preconditions"] = {"uid": uid}
            try:
                await kube.request(
                    self.api,
                    "DELETE",
                    self._path(key, plural, api_version, namespaced),
                    body=options,
                )
            except kube.KubeNotFound:
                pass
            except kube.KubeError as exc:
                failed.append(key)
                logger.warning(
                    "policy prune failed", extra=logs.fields(object=str(key), error=str(exc))
                )
                continue
            self.metrics.prunes.inc()
            pruned.append(key)
            logger.info("policy pruned", extra=logs.fields(object=str(key)))
        return await self._finish(SyncResult(tuple(applied), tuple(failed), tuple(pruned)))

    @staticmethod
    def _path(key: ObjectKey, plural: str, api_version: str, namespaced: bool) -> str:
        return kube.resource_path(
            plural,
            api_version=api_version,
            namespace=key.namespace if namespaced else None,
            name=key.name,
        )
