"""Namespaces + KEDA metrics Services + settings -> tenants and a RouteTable (pure)."""

from router.core.tenancy.resolve import (
    HNC_DEPTH_SUFFIX,
    Conflict,
    NamespaceInfo,
    Resolution,
    ServiceInfo,
    resolve,
    tenant_of,
)

__all__ = [
    "HNC_DEPTH_SUFFIX",
    "Conflict",
    "NamespaceInfo",
    "Resolution",
    "ServiceInfo",
    "resolve",
    "tenant_of",
]
