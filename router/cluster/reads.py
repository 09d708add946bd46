"""One-shot cluster reads for `render` (and the policy loop): tenancy and apiserver CIDRs."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from kubernetes_asyncio.client import ApiClient

from router.cluster import client as kube
from router.core.policy import (
    NamespaceMeta,
)
from router.core.routes import RouteTable
from router.core.tenancy import NamespaceInfo, ServiceInfo, resolve
from router.settings import TenancySettings

logger = logging.getLogger(__name__)


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


async def list_tenancy_inputs(
    api: ApiClient, tenancy: TenancySettings
) -> tuple[list[dict[str, Any]], list[ServiceInfo]]:
    """One-shot list of what the tenancy reads: the selected namespaces (raw objects) and, unless
    an upstream template is set, the KEDA metrics Services. Raises KubeError."""
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
    return raw_ns, services


async def load_cluster_tenancy(api: ApiClient, tenancy: TenancySettings) -> ClusterTenancy:
    """One-shot read of namespaces and KEDA metrics Services, resolved like `serve` does."""
    raw_ns, services = await list_tenancy_inputs(api, tenancy)
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
