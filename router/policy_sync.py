"""Keep the cluster's NetworkPolicies equal to the rendered ones (leader only).

Adapter around the pure `router.manifests`: server-side apply of what differs (field manager
``metrics-router``, ``force=true``), deletion of owned objects no tenant wants (listed with the
ownership label selector, and `manifests.plan` deletes nothing without that label), retry with
backoff, a periodic resync that reverts hand edits, and leader election on a
``coordination.k8s.io/v1`` Lease so that several router replicas never fight.

Wiring it into ``serve`` (the composition root)::

    add_policy_arguments(parser)                           # next to the serve flags
    settings = policy_settings_from_args(args, errors)     # None without --manage-network-policies
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

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

from kubernetes_asyncio.client import ApiClient
from prometheus_client import CollectorRegistry, Counter, Gauge

from router import kube
from router.config import TenancySettings
from router.manifests import (
    CILIUM_API,
    KIND_CILIUM,
    KIND_NETWORKPOLICY,
    KINDS,
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
from router.options import parse_duration
from router.routes import RouteTable
from router.tenancy import NamespaceInfo, Resolution, ServiceInfo, resolve

logger = logging.getLogger(__name__)

FIELD_MANAGER = "metrics-router"
LEASE_API = "coordination.k8s.io/v1"

# kind -> (api_version, plural resource, namespaced)
RESOURCES: Mapping[str, tuple[str, str, bool]] = MappingProxyType(
    {
        KIND_NETWORKPOLICY: (NETWORKPOLICY_API[0], "networkpolicies", True),
        KIND_CILIUM: (CILIUM_API[0], "ciliumclusterwidenetworkpolicies", False),
    }
)


# --------------------------------------------------------------------------- settings and flags


@dataclass(frozen=True, slots=True)
class LeaderElectionSettings:
    enabled: bool = True
    namespace: str = "metrics-router"
    lease_name: str = "metrics-router"
    identity: str = ""  # default: $POD_NAME or the host name, plus a random suffix
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0


@dataclass(frozen=True, slots=True)
class PolicySyncSettings:
    kind: str = KIND_NETWORKPOLICY
    config: PolicyConfig = field(default_factory=PolicyConfig)
    config_path: Path | None = None
    resync_period: float = 300.0
    leader_election: LeaderElectionSettings = field(default_factory=LeaderElectionSettings)
    backoff_initial: float = 1.0
    backoff_maximum: float = 60.0


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


def add_policy_arguments(parser: argparse.ArgumentParser) -> None:
    """NetworkPolicy flags of `serve` (see docs/network-policies.md)."""
    g = parser.add_argument_group("network policies")
    g.add_argument(
        "--manage-network-policies",
        action="store_true",
        help="apply the tenants' NetworkPolicies with server-side apply and prune owned ones "
        "no tenant wants (needs the cluster API)",
    )
    g.add_argument(
        "--network-policy-kind",
        choices=KINDS,
        default=KIND_NETWORKPOLICY,
        help="networkpolicy (networking.k8s.io/v1) or cilium (CiliumClusterwideNetworkPolicy); "
        "default %(default)s",
    )
    g.add_argument("--policy-config", type=Path, help="policy config YAML (re-read on change)")
    g.add_argument(
        "--policy-resync-period",
        default="5m",
        help="re-apply everything this often, reverting hand edits (default %(default)s)",
    )
    g.add_argument(
        "--leader-elect",
        type=_bool,
        nargs="?",
        const=True,
        default=True,
        help="only the holder of the Lease writes policies (default true; "
        "--leader-elect=false for a single replica)",
    )
    g.add_argument("--leader-election-namespace", default="metrics-router")
    g.add_argument("--leader-election-lease-name", default="metrics-router")
    g.add_argument("--leader-elect-lease-duration", default="15s")
    g.add_argument("--leader-elect-renew-deadline", default="10s")
    g.add_argument("--leader-elect-retry-period", default="2s")


def default_identity() -> str:
    return f"{os.environ.get('POD_NAME') or socket.gethostname()}_{uuid.uuid4().hex[:8]}"


def policy_settings_from_args(
    args: argparse.Namespace, errors: list[str]
) -> PolicySyncSettings | None:
    """Settings from the flags, or None without --manage-network-policies; problems are
    appended to ``errors`` (the policy config file is read and checked here)."""
    if not args.manage_network_policies:
        return None
    durations: dict[str, float] = {}
    for flag in (
        "policy_resync_period",
        "leader_elect_lease_duration",
        "leader_elect_renew_deadline",
        "leader_elect_retry_period",
    ):
        name = "--" + flag.replace("_", "-")
        try:
            durations[flag] = parse_duration(str(getattr(args, flag)))
            if durations[flag] <= 0:
                errors.append(f"{name}: must be > 0")
        except ValueError as exc:
            errors.append(f"{name}: {exc}")
            durations[flag] = 1.0
    le = LeaderElectionSettings(
        enabled=bool(args.leader_elect),
        namespace=args.leader_election_namespace,
        lease_name=args.leader_election_lease_name,
        identity=default_identity(),
        lease_duration=durations["leader_elect_lease_duration"],
        renew_deadline=durations["leader_elect_renew_deadline"],
        retry_period=durations["leader_elect_retry_period"],
    )
    if not le.retry_period < le.renew_deadline < le.lease_duration:
        errors.append(
            "leader election: want --leader-elect-retry-period < --leader-elect-renew-deadline "
            "< --leader-elect-lease-duration"
        )
    config = PolicyConfig()
    if args.policy_config is not None:
        try:
            config = parse_policy_config(Path(args.policy_config).read_text())
        except OSError as exc:
            errors.append(f"--policy-config: {exc}")
        except ManifestError as exc:
            errors.extend(f"--policy-config {args.policy_config}: {e}" for e in exc.errors)
    return PolicySyncSettings(
        kind=args.network_policy_kind,
        config=config,
        config_path=args.policy_config,
        resync_period=durations["policy_resync_period"],
        leader_election=le,
    )


# --------------------------------------------------------------------------- metrics


class PolicyMetrics:
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


# --------------------------------------------------------------------------- cluster reads


async def list_all(
    api: ApiClient, path: str, query: Sequence[tuple[str, str]] = ()
) -> list[dict[str, Any]]:
    """Every item of a collection (paged)."""
    items: list[dict[str, Any]] = []
    cont = ""
    while True:
        page = [*query, ("limit", "500"), *([("continue", cont)] if cont else [])]
        body = await kube.request(api, "GET", path, query=page)
        items.extend((body or {}).get("items") or ())
        cont = ((body or {}).get("metadata") or {}).get("continue") or ""
        if not cont:
            return items


def namespace_meta(obj: Mapping[str, Any] | NamespaceInfo) -> NamespaceMeta:
    if isinstance(obj, NamespaceInfo):
        return NamespaceMeta(obj.name, obj.labels)
    meta = obj.get("metadata") or {}
    return NamespaceMeta(
        str(meta.get("name", "")),
        MappingProxyType(dict(meta.get("labels") or {})),
        MappingProxyType(dict(meta.get("annotations") or {})),
    )


@dataclass(frozen=True, slots=True)
class ClusterTenancy:
    table: RouteTable
    namespaces: Mapping[str, NamespaceMeta]
    all_tenants: Mapping[str, tuple[str, ...]]


async def load_cluster_tenancy(api: ApiClient, tenancy: TenancySettings) -> ClusterTenancy:
    """One-shot read of namespaces and KEDA metrics Services, resolved like `serve` does."""
    ns_query = [("labelSelector", tenancy.namespace_selector)] if tenancy.namespace_selector else []
    raw_ns = await list_all(api, kube.resource_path("namespaces"), ns_query)
    services: list[ServiceInfo] = []
    if tenancy.upstream_template is None:
        raw_svc = await list_all(
            api,
            kube.resource_path("services"),
            [("labelSelector", tenancy.upstream_service_selector)],
        )
        services = [ServiceInfo.from_object(s) for s in raw_svc]
    resolution = resolve([NamespaceInfo.from_object(n) for n in raw_ns], services, tenancy)
    metas = {m.name: m for m in map(namespace_meta, raw_ns)}
    return ClusterTenancy(resolution.table, metas, resolution.tenants)


async def discover_apiserver_cidrs(api: ApiClient) -> tuple[str, ...]:
    """The kube-apiserver's endpoint addresses (default/kubernetes) as /32 or /128 CIDRs."""
    addresses: set[str] = set()
    try:
        slices = await list_all(
            api,
            kube.resource_path(
                "endpointslices", api_version="discovery.k8s.io/v1", namespace="default"
            ),
            [("labelSelector", "kubernetes.io/service-name=kubernetes")],
        )
        for s in slices:
            for ep in s.get("endpoints") or ():
                addresses.update(map(str, ep.get("addresses") or ()))
    except kube.KubeNotFound:
        pass
    if not addresses:
        endpoints = await kube.request(
            api, "GET", kube.resource_path("endpoints", namespace="default", name="kubernetes")
        )
        for subset in (endpoints or {}).get("subsets") or ():
            addresses.update(str(a.get("ip")) for a in subset.get("addresses") or ())
    cidrs = set()
    for a in addresses:
        with contextlib.suppress(ValueError):
            cidrs.add(str(ipaddress.ip_network(a)))
    if not cidrs:
        raise kube.KubeApiError(404, "NotFound", "no addresses for the default/kubernetes Service")
    return tuple(sorted(cidrs))


# --------------------------------------------------------------------------- leader election


def _micro_time(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    """client-go's Lease lock: acquire when free or expired, renew, release on shutdown.

    Expiry is judged on this replica's monotonic clock from the moment it last saw the Lease
    record change (as client-go does), so clock skew between replicas does not matter.
    """

    def __init__(
        self,
        api: ApiClient,
        settings: LeaderElectionSettings,
        on_change: Callable[[bool], None],
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.api = api
        self.s = settings
        self.identity = settings.identity or default_identity()
        self.on_change = on_change
        self.clock = clock
        self.wall_clock = wall_clock
        self.is_leader = False
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0
        self._last_renew = 0.0
        self._path = kube.resource_path(
            "leases", api_version=LEASE_API, namespace=settings.namespace, name=settings.lease_name
        )

    def _spec(self, transitions: int, acquire: str | None) -> dict[str, Any]:
        now = _micro_time(self.wall_clock())
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": max(1, math.ceil(self.s.lease_duration)),
            "acquireTime": acquire or now,
            "renewTime": now,
            "leaseTransitions": transitions,
        }

    async def try_acquire_or_renew(self) -> bool:
        """One attempt; True when this replica holds the Lease afterwards."""
        try:
            lease = await kube.request(self.api, "GET", self._path)
        except kube.KubeNotFound:
            body = {
                "apiVersion": LEASE_API,
                "kind": "Lease",
                "metadata": {"name": self.s.lease_name, "namespace": self.s.namespace},
                "spec": self._spec(0, None),
            }
            collection = self._path.rsplit("/", 1)[0]
            try:
                await kube.request(self.api, "POST", collection, body=body)
            except kube.KubeConflict:
                return False  # another replica created it first
            return True
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        record = (holder, spec.get("renewTime"), spec.get("leaseDurationSeconds"))
        now = self.clock()
        if record != self._observed:
            self._observed, self._observed_at = record, now
        duration = float(spec.get("leaseDurationSeconds") or self.s.lease_duration)
        if holder and holder != self.identity and now < self._observed_at + duration:
            return False  # held by another replica and not expired
        transitions = int(spec.get("leaseTransitions") or 0)
        if holder != self.identity:
            transitions += 1
        lease["spec"] = self._spec(
            transitions, spec.get("acquireTime") if holder == self.identity else None
        )
        try:
            await kube.request(self.api, "PUT", self._path, body=lease)
        except kube.KubeConflict:
            return False  # someone else wrote it in between
        return True

    def _set(self, leader: bool) -> None:
        if leader != self.is_leader:
            self.is_leader = leader
            logger.info(
                "leader election %s lease=%s/%s identity=%s",
                "acquired" if leader else "lost",
                self.s.namespace,
                self.s.lease_name,
                self.identity,
            )
            self.on_change(leader)

    async def step(self) -> None:
        """One round: try to acquire or renew; step down when the renew deadline passed."""
        try:
            ok = await self.try_acquire_or_renew()
        except kube.KubeError as exc:
            logger.warning("leader election: lease request failed error=%s", exc)
            ok = None
        now = self.clock()
        if ok:
            self._last_renew = now
            self._set(True)
        elif ok is False or now - self._last_renew > self.s.renew_deadline:
            self._set(False)

    async def run(self) -> None:
        """Acquire and renew every retry period until cancelled."""
        while True:
            await self.step()
            await asyncio.sleep(self.s.retry_period)

    async def release(self) -> None:
        """Give the Lease up (holder cleared), so another replica takes over at once."""
        if not self.is_leader:
            return
        self._set(False)
        try:
            lease = await kube.request(self.api, "GET", self._path)
            if (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            now = _micro_time(self.wall_clock())
            lease["spec"] |= {
                "holderIdentity": "",
                "leaseDurationSeconds": 1,
                "renewTime": now,
                "acquireTime": now,
            }
            await kube.request(self.api, "PUT", self._path, body=lease)
            logger.info("leader election released lease=%s/%s", self.s.namespace, self.s.lease_name)
        except kube.KubeError as exc:
            logger.warning("leader election: release failed error=%s", exc)


# --------------------------------------------------------------------------- sync


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
        registry: CollectorRegistry,
    ) -> None:
        if kind not in RESOURCES:
            raise ValueError(f"unknown policy kind {kind!r}")
        self.api = api
        self.kind = kind
        self.settings = settings
        self.metrics = PolicyMetrics(registry)
        self.config = settings.config
        self._config_stamp = self._stamp()
        self._input: SyncInputs | None = None
        self._dirty = asyncio.Event()
        self._stopping = asyncio.Event()
        self._leader = asyncio.Event()
        self._follower = asyncio.Event()
        self._passes = 0
        self._pass_done = asyncio.Condition()
        self.last_result: SyncResult | None = None
        self._backoff = kube.Backoff(
            initial=settings.backoff_initial, maximum=settings.backoff_maximum
        )
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
                    "policy sync incomplete; will retry delay=%.2fs failed=%d error=%s",
                    delay,
                    len(result.failed),
                    result.error,
                )
            await self._wait_any(self._stopping, self._dirty, limit=delay)

    async def wait_passes(self, n: int) -> None:
        """Until at least ``n`` sync passes have completed (for tests and diagnostics)."""
        async with self._pass_done:
            await self._pass_done.wait_for(lambda: self._passes >= n)

    @property
    def passes(self) -> int:
        return self._passes

    async def _finish(self, result: SyncResult) -> SyncResult:
        self.last_result = result
        async with self._pass_done:
            self._passes += 1
            self._pass_done.notify_all()
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
            logger.info("policy config reloaded path=%s", self.settings.config_path)
        except (OSError, ManifestError) as exc:
            logger.error("policy config not reloaded; keeping the last good one error=%s", exc)

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
            networks, warnings = tenant_networks(inputs.table, config, metas, inputs.all_tenants)
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
            logger.error("policies not rendered; cluster left as is errors=%s", exc.errors)
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
                logger.warning("policy apply failed object=%s error=%s", m.key, exc)
                continue
            self.metrics.applies.labels("success").inc()
            applied.append(m.key)
            logger.info("policy applied object=%s", m.key)
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
                logger.warning("policy prune failed object=%s error=%s", key, exc)
                continue
            self.metrics.prunes.inc()
            pruned.append(key)
            logger.info("policy pruned object=%s", key)
        return await self._finish(SyncResult(tuple(applied), tuple(failed), tuple(pruned)))

    @staticmethod
    def _path(key: ObjectKey, plural: str, api_version: str, namespaced: bool) -> str:
        return kube.resource_path(
            plural,
            api_version=api_version,
            namespace=key.namespace if namespaced else None,
            name=key.name,
        )
