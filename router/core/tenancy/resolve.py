"""Namespaces + KEDA metrics Services + settings -> tenants and a RouteTable (pure).

Each strategy is a module of this package (``hnc``, ``label``, ``pattern``) with a ``claim``
function; upstreams are built in ``upstreams``; the data types live in ``model``.

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

Strategies (``TenancySettings.strategies``, tried in order, first answer wins)
--------------------------------------------------------------------------
``hnc``
    HNC labels a namespace ``<ancestor>.tree.hnc.x-k8s.io/depth: "<n>"`` for itself (``0``) and
    every ancestor (``n`` = distance). The tenant is the topmost ancestor (itself included) that
    carries ``settings.tenant_root_label`` (KEY=VALUE), named after that root namespace; nested
    roots are reported as a ``"namespace"`` conflict. See ``router.core.tenancy.hnc``, the one
    home of this rule (the NetworkPolicy renderer selects subtrees by it too).
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

from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType

from router.core.routes import RouteTable, Tenant, Upstream
from router.core.tenancy import hnc, label, pattern
from router.core.tenancy.model import (
    Claim,
    Conflict,
    NamespaceInfo,
    Resolution,
    ServiceInfo,
)
from router.core.tenancy.upstreams import service_upstream, template_upstream
from router.settings import TenancySettings

Strategy = Callable[[NamespaceInfo, Mapping[str, NamespaceInfo], TenancySettings], Claim | None]

STRATEGY_CLAIMS: Mapping[str, Strategy] = MappingProxyType(
    {"hnc": hnc.claim, "label": label.claim, "pattern": pattern.claim}
)


def _claim(
    ns: NamespaceInfo, namespaces_by_name: Mapping[str, NamespaceInfo], settings: TenancySettings
) -> Claim | None:
    for strategy in settings.strategies:
        claim = STRATEGY_CLAIMS.get(strategy)
        got = claim(ns, namespaces_by_name, settings) if claim is not None else None
        if got is not None:
            return got
    return None


def tenant_of(
    ns: NamespaceInfo, namespaces_by_name: Mapping[str, NamespaceInfo], settings: TenancySettings
) -> str | None:
    """The tenant of ``ns`` by the first strategy that answers, or None (no tenant)."""
    got = _claim(ns, namespaces_by_name, settings)
    return got[0] if got is not None else None


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
        claim = _claim(by_name[name], by_name, settings)
        if claim is None:
            continue
        if claim[1] is not None:
            conflicts.append(claim[1])
        ns_tenant[name] = claim[0]
        members.setdefault(claim[0], []).append(name)

    upstreams: dict[str, Upstream] = {}
    stale_for: dict[str, float | None] = {}  # from the chosen Service's annotation
    unrouted: dict[str, str] = {}
    if settings.upstream_template is not None:
        for tenant in sorted(members):
            got = template_upstream(settings.upstream_template, tenant)
            if isinstance(got, Upstream):
                upstreams[tenant] = got
            else:
                unrouted[tenant] = got
    else:
        candidates: dict[str, list[ServiceInfo]] = {}
        for svc in services:
            owner = ns_tenant.get(svc.namespace)
            if owner is not None:
                candidates.setdefault(owner, []).append(svc)
        for tenant in sorted(members):
            svcs = sorted(candidates.get(tenant, ()), key=lambda s: (s.namespace, s.name))
            if not svcs:
                unrouted[tenant] = "no metrics Service in any namespace of the tenant"
                continue
            reasons: list[str] = []
            chosen: ServiceInfo | None = None
            for svc in svcs:
                got = service_upstream(svc)
                if isinstance(got, Upstream):
                    upstreams[tenant] = got
                    stale_for[tenant] = svc.serve_stale_for
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
        Tenant(t, tuple(members[t]), upstreams[t], stale_for.get(t)) for t in sorted(upstreams)
    )
    # Each namespace has exactly one tenant here, so from_tenants cannot find a conflict.
    table = RouteTable.from_tenants(tenants, default=default)
    return Resolution(
        table=table,
        tenants=MappingProxyType({t: tuple(members[t]) for t in sorted(members)}),
        conflicts=tuple(conflicts),
        unrouted=MappingProxyType(unrouted),
    )
