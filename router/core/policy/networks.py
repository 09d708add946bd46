"""Tenants (a RouteTable and, from a cluster, namespace metadata) -> TenantNetworks."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from router.core.policy.config import event_sources_from_annotations, merge_event_sources
from router.core.policy.model import NamespaceMeta, PolicyConfig, TenantNetwork, TenantOverrides
from router.core.routes import RouteTable
from router.core.tenancy import hnc
from router.settings import TenancySettings

_SERVICE_HOST = re.compile(
    r"[a-z0-9]([-a-z0-9]*[a-z0-9])?\.(?P<ns>[a-z0-9]([-a-z0-9]*[a-z0-9])?)\.svc(\.cluster\.local)?\.?"
)  # fullmatch


def keda_namespace_for(tenant: str, tls_name: str | None, config: PolicyConfig) -> str:
    """Where the tenant's KEDA runs, first found wins: the policy config file's
    ``tenants.<t>.kedaNamespace``; the namespace in the upstream's TLS name
    ``<svc>.<ns>.svc[.cluster.local]`` (a routes file's ``serverName``, or the Service the
    cluster discovery found); the template ``keda.namespaceTemplate`` (``{tenant}--sys``)."""
    override = config.tenants.get(tenant)
    if override is not None and override.keda_namespace:
        return override.keda_namespace
    m = _SERVICE_HOST.fullmatch((tls_name or "").lower())
    if m:
        return m.group("ns")
    return config.settings.keda_namespace_template.format(tenant=tenant)


def root_namespace_of(tenant: str, namespaces: Sequence[str], hnc_root: str | None) -> str | None:
    """The namespace whose annotations hold the tenant's egress settings: the namespace named
    like the tenant (the HNC root under the hnc strategy), else the HNC root, else the tenant's
    shortest namespace name (``tenant-a`` for ``tenant-a``, ``tenant-a--dev``)."""
    if tenant in namespaces:
        return tenant
    if hnc_root is not None:
        return hnc_root
    return min(namespaces, key=lambda n: (len(n), n)) if namespaces else None


def tenant_networks(
    table: RouteTable,
    config: PolicyConfig,
    namespaces: Mapping[str, NamespaceMeta] | None = None,
    all_tenants: Mapping[str, Sequence[str]] | None = None,
    root_label: tuple[str, str] = TenancySettings().tenant_root_label,
) -> tuple[tuple[TenantNetwork, ...], tuple[str, ...]]:
    """What the renderer needs for every tenant; returns (networks, warnings).

    ``table``: the routes (a routes file, or ``Resolution.table``).
    ``namespaces``: labels and annotations from the cluster (absent with a routes file).
    ``all_tenants``: tenant -> namespaces including tenants without a route (for example
    ``Resolution.tenants``): their KEDA still gets its policies while its Service is missing.
    ``root_label``: the tenant-root label (``TenancySettings.tenant_root_label``); a tenant whose
    namespaces lie below a tenant root of its own is selected by that root's HNC subtree
    (``router.core.tenancy.hnc.selection``), any other by name.
    """
    metas = namespaces or {}
    members_in: dict[str, tuple[str, ...]] = {t.name: tuple(t.namespaces) for t in table.tenants}
    for name, nss in (all_tenants or {}).items():
        members_in.setdefault(name, tuple(nss))
    tls = {t.name: t.upstream.tls_name for t in table.tenants}
    keda = {name: keda_namespace_for(name, tls.get(name), config) for name in members_in}
    members = {n: tuple(sorted(set(nss) | {keda[n]})) for n, nss in members_in.items()}
    owner: dict[str, str] = {}
    for name in sorted(members):
        for ns in members[name]:
            owner.setdefault(ns, name)
    labels = {n: m.labels for n, m in metas.items()}
    warnings: list[str] = []
    out: list[TenantNetwork] = []
    for name in sorted(members):
        all_ns = members[name]
        root, exclude, extra = hnc.selection(name, all_ns, labels, owner, root_label)
        root_ns = root_namespace_of(name, members_in[name], root)
        annotations: TenantOverrides | None = None
        if config.namespace_annotations and root_ns is not None and root_ns in metas:
            _, annotations, problems = event_sources_from_annotations(
                metas[root_ns].annotations, f"tenant {name}: namespace {root_ns}"
            )
            warnings.extend(problems)
        sources = merge_event_sources(config.tenants.get(name), annotations, config.defaults)
        out.append(
            TenantNetwork(
                name=name,
                namespaces=all_ns,
                keda_namespace=keda[name],
                hnc_root=root,
                hnc_exclude=exclude,
                extra_namespaces=extra,
                event_sources=sources,
            )
        )
    return tuple(out), tuple(warnings)
