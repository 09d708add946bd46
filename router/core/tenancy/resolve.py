"""Namespaces + KEDA metrics Services + settings -> tenants and a RouteTable (pure).

A purely computational module: no I/O, no clock, no aiohttp / kubernetes_asyncio /
prometheus_client. The reconciler feeds it the raw API objects its informers hold; the namespace
reloader and the NetworkPolicy renderer use the same resolution.

Public API
----------
``NamespaceInfo(name, labels)``
    A namespace as far as tenancy cares. ``NamespaceInfo.from_object(obj)`` takes the raw API
    JSON dict (``metadata.name``, ``metadata.labels``).
``ServiceInfo(namespace, name, labels, ports)``
    A Service; ``ports`` is a tuple of ``(port name or None, port number)``.
    ``ServiceInfo.from_object(obj)`` takes the raw API JSON dict.
``tenant_of(ns, namespaces_by_name, settings) -> str | None``
    The tenant of one namespace: the first of ``settings.strategies`` that gives an answer.
``resolve(namespaces, services, settings, default=None) -> Resolution``
    Everything at once. Never raises on cluster data: problems become ``Conflict`` records
    and entries in ``Resolution.unrouted``.
``Resolution``
    ``table`` (RouteTable), ``tenants`` (tenant -> sorted namespaces, routed or not),
    ``conflicts`` (tuple of ``Conflict``), ``unrouted`` (tenant -> why it has no route).
``Conflict(kind, subject, chosen, rejected, message)``
    ``kind`` is ``"namespace"`` (two tenants claim a namespace) or ``"service"`` (two metrics
    Services for one tenant). Hashable, so a caller can log each one once.
``HNC_DEPTH_SUFFIX``
    ``".tree.hnc.x-k8s.io/depth"``.

Strategies (``TenancySettings.strategies``, tried in order, first answer wins)
--------------------------------------------------------------------------
``hnc``
    HNC labels a namespace ``<ancestor>.tree.hnc.x-k8s.io/depth: "<n>"`` for itself (``0``) and
    every ancestor (``n`` = distance). The candidates are those ancestors (itself included) that
    carry ``settings.tenant_root_label`` (KEY=VALUE). The tenant is the candidate with the
    LARGEST depth, i.e. the topmost root in the tree; the tenant's name is that root namespace's
    name. When several candidates exist (nested roots) the others are reported as a
    ``"namespace"`` conflict. Only namespaces the caller knows (``namespaces_by_name``) can be
    recognised as roots, so a ``--namespace-selector`` must not hide the roots.
``label``
    ``ns.labels[settings.tenant_label]`` names the tenant (skipped when no label key is set or
    the value is empty).
``pattern``
    ``settings.tenant_pattern`` is searched in the namespace name (anchors as written); its
    ``tenant`` group names the tenant. Example ``^tenant-(?P<tenant>[a-z0-9]+)(--.+)?$``.

Tenant -> upstream
------------------
With ``settings.upstream_template`` set, the URL is ``template.format(tenant=T)`` and Services
are not consulted. Otherwise the upstream is a discovered Service (the caller passes only Services
matching ``--upstream-service-selector``) in any namespace of the tenant:
``https://<svc>.<ns>.svc:<port>``, TLS server name ``<svc>.<ns>.svc``; the port is the one named
``https``, else 443 if the Service has it, else the first port. Several Services for one tenant:
the first by ``(namespace, name)`` wins and a ``"service"`` conflict records the rest. A tenant
without a usable upstream is not routed; ``Resolution.unrouted`` says why.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from types import MappingProxyType
from typing import Any, Literal

from router.routes import RoutesError, RouteTable, Tenant, Upstream
from router.settings import TenancySettings

HNC_DEPTH_SUFFIX = ".tree.hnc.x-k8s.io/depth"

_EMPTY: Mapping[str, str] = MappingProxyType({})

__all__ = [
    "HNC_DEPTH_SUFFIX",
    "Conflict",
    "NamespaceInfo",
    "Resolution",
    "ServiceInfo",
    "resolve",
    "tenant_of",
]


def _labels(obj: Mapping[str, Any]) -> Mapping[str, str]:
    meta = obj.get("metadata") or {}
    labels = meta.get("labels")
    return labels if isinstance(labels, Mapping) else _EMPTY


@dataclass(frozen=True, slots=True)
class NamespaceInfo:
    """A namespace: its name and labels (treat ``labels`` as read-only)."""

    name: str
    labels: Mapping[str, str] = field(default_factory=lambda: _EMPTY)

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> NamespaceInfo:
        """From a raw Namespace JSON dict. The labels mapping is shared, not copied."""
        return cls(name=str(obj["metadata"]["name"]), labels=_labels(obj))


@dataclass(frozen=True, slots=True)
class ServiceInfo:
    """A Service: where it is, its labels, and its ports as ``(name or None, port)``."""

    namespace: str
    name: str
    labels: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    ports: tuple[tuple[str | None, int], ...] = ()

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> ServiceInfo:
        """From a raw Service JSON dict; ports without a numeric ``port`` are skipped."""
        meta = obj["metadata"]
        spec = obj.get("spec") or {}
        ports: list[tuple[str | None, int]] = []
        for p in spec.get("ports") or ():
            number = p.get("port")
            if isinstance(number, int) and not isinstance(number, bool):
                name = p.get("name")
                ports.append((str(name) if name else None, number))
        return cls(
            namespace=str(meta.get("namespace", "")),
            name=str(meta["name"]),
            labels=_labels(obj),
            ports=tuple(ports),
        )

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def port(self) -> int | None:
        """The port to use: named ``https``, else 443 if present, else the first; None if none."""
        if not self.ports:
            return None
        for name, number in self.ports:
            if name == "https":
                return number
        for _, number in self.ports:
            if number == 443:
                return number
        return self.ports[0][1]


@dataclass(frozen=True, slots=True)
class Conflict:
    """A claim that lost. ``chosen`` won over every entry of ``rejected``."""

    kind: Literal["namespace", "service"]
    subject: str  # the namespace (kind namespace) or the tenant (kind service)
    chosen: str
    rejected: tuple[str, ...]
    message: str


@dataclass(frozen=True, slots=True)
class Resolution:
    table: RouteTable
    tenants: Mapping[str, tuple[str, ...]]  # tenant -> sorted namespaces (routed or not)
    conflicts: tuple[Conflict, ...] = ()
    unrouted: Mapping[str, str] = field(
        default_factory=lambda: _EMPTY
    )  # tenant -> reason it has no route


# --------------------------------------------------------------------------- namespace -> tenant


@lru_cache(maxsize=32)
def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _hnc_roots(
    ns: NamespaceInfo, namespaces_by_name: Mapping[str, NamespaceInfo], settings: TenancySettings
) -> list[tuple[int, str]]:
    """Tenant-root ancestors of ns (itself included) as (depth, name), topmost first."""
    root_key, root_value = settings.tenant_root_label
    roots: list[tuple[int, str]] = []
    for key, value in ns.labels.items():
        if not key.endswith(HNC_DEPTH_SUFFIX):
            continue
        ancestor = key[: -len(HNC_DEPTH_SUFFIX)]
        try:
            depth = int(value)
        except (TypeError, ValueError):
            continue
        info = namespaces_by_name.get(ancestor)
        if info is not None and info.labels.get(root_key) == root_value:
            roots.append((depth, ancestor))
    # Largest depth first (the topmost root); equal depths (malformed labels) by name.
    roots.sort(key=lambda r: (-r[0], r[1]))
    return roots


def _tenant_and_conflict(
    ns: NamespaceInfo, namespaces_by_name: Mapping[str, NamespaceInfo], settings: TenancySettings
) -> tuple[str | None, Conflict | None]:
    for strategy in settings.strategies:
        if strategy == "hnc":
            roots = _hnc_roots(ns, namespaces_by_name, settings)
            if not roots:
                continue
            chosen = roots[0][1]
            conflict = None
            if len(roots) > 1:
                rejected = tuple(name for _, name in roots[1:])
                conflict = Conflict(
                    kind="namespace",
                    subject=ns.name,
                    chosen=chosen,
                    rejected=rejected,
                    message=f"namespace {ns.name!r} is below several tenant roots "
                    f"({', '.join([chosen, *rejected])}); the topmost, {chosen!r}, wins",
                )
            return chosen, conflict
        if strategy == "label":
            if settings.tenant_label is None:
                continue
            value = ns.labels.get(settings.tenant_label)
            if value:
                return str(value), None
        elif strategy == "pattern":
            match = _compile(settings.tenant_pattern).search(ns.name)
            if match is not None:
                tenant = match.groupdict().get("tenant")
                if tenant:
                    return tenant, None
    return None, None


def tenant_of(
    ns: NamespaceInfo, namespaces_by_name: Mapping[str, NamespaceInfo], settings: TenancySettings
) -> str | None:
    """The tenant of ``ns`` by the first strategy that answers, or None (no tenant)."""
    return _tenant_and_conflict(ns, namespaces_by_name, settings)[0]


# --------------------------------------------------------------------------- tenant -> upstream


def _service_upstream(svc: ServiceInfo) -> Upstream | str:
    port = svc.port()
    if port is None:
        return f"Service {svc.key} has no ports"
    return _service_url(svc.namespace, svc.name, port)


# Parsing and validating an upstream URL costs tens of microseconds; with 1,000 tenants that
# would dominate every recompute, so both builders are memoised (pure functions of their args).
@lru_cache(maxsize=16384)
def _service_url(namespace: str, name: str, port: int) -> Upstream | str:
    host = f"{name}.{namespace}.svc"
    try:
        return Upstream.parse(f"https://{host}:{port}", host)
    except RoutesError as exc:
        return f"Service {namespace}/{name}: {exc}"


@lru_cache(maxsize=16384)
def _template_upstream(template: str, tenant: str) -> Upstream | str:
    try:
        url = template.format(tenant=tenant)
    except (KeyError, IndexError, ValueError) as exc:
        return f"--upstream-template cannot be formatted: {exc!r}"
    try:
        return Upstream.parse(url)
    except RoutesError as exc:
        return f"--upstream-template gives {exc}"


def resolve(
    namespaces: Iterable[NamespaceInfo],
    services: Iterable[ServiceInfo],
    settings: TenancySettings,
    default: Upstream | None = None,
) -> Resolution:
    """Tenants, their upstreams and the RouteTable for the given cluster state.

    Deterministic: the same inputs in any order give an equal Resolution. Never raises for
    cluster data; see the module docstring for the conflict rules.
    """
    by_name: dict[str, NamespaceInfo] = {}
    for ns in namespaces:
        by_name[ns.name] = ns
    members: dict[str, list[str]] = {}
    ns_tenant: dict[str, str] = {}
    conflicts: list[Conflict] = []
    for name in sorted(by_name):
        tenant, conflict = _tenant_and_conflict(by_name[name], by_name, settings)
        if conflict is not None:
            conflicts.append(conflict)
        if tenant is None:
            continue
        ns_tenant[name] = tenant
        members.setdefault(tenant, []).append(name)

    upstreams: dict[str, Upstream] = {}
    unrouted: dict[str, str] = {}
    if settings.upstream_template is not None:
        for tenant in sorted(members):
            got = _template_upstream(settings.upstream_template, tenant)
            if isinstance(got, Upstream):
                upstreams[tenant] = got
            else:
                unrouted[tenant] = got
    else:
        candidates: dict[str, list[ServiceInfo]] = {}
        for svc in services:
            tenant = ns_tenant.get(svc.namespace)
            if tenant is not None:
                candidates.setdefault(tenant, []).append(svc)
        for tenant in sorted(members):
            svcs = sorted(candidates.get(tenant, ()), key=lambda s: (s.namespace, s.name))
            if not svcs:
                unrouted[tenant] = "no metrics Service in any namespace of the tenant"
                continue
            reasons: list[str] = []
            chosen: ServiceInfo | None = None
            for svc in svcs:
                got = _service_upstream(svc)
                if isinstance(got, Upstream):
                    upstreams[tenant] = got
                    chosen = svc
                    break
                reasons.append(got)
            if chosen is None:
                unrouted[tenant] = "; ".join(reasons)
                continue
            rejected = tuple(s.key for s in svcs if s is not chosen)
            if rejected:
                conflicts.append(
                    Conflict(
                        kind="service",
                        subject=tenant,
                        chosen=chosen.key,
                        rejected=rejected,
                        message=f"tenant {tenant!r} has {len(svcs)} metrics Services; "
                        f"{chosen.key} wins (first usable by namespace/name), "
                        f"ignored: {', '.join(rejected)}",
                    )
                )

    tenants = tuple(
        Tenant(name=t, namespaces=tuple(members[t]), upstream=upstreams[t])
        for t in sorted(upstreams)
    )
    # Each namespace has exactly one tenant here, so from_tenants cannot find a conflict.
    table = RouteTable.from_tenants(tenants, default=default)
    return Resolution(
        table=table,
        tenants=MappingProxyType({t: tuple(members[t]) for t in sorted(members)}),
        conflicts=tuple(conflicts),
        unrouted=MappingProxyType(unrouted),
    )
