"""Namespace -> tenant -> upstream (pure): one module per strategy (``hnc``, ``label``,
``pattern``), the HNC root rule in ``hnc``, upstreams in ``upstreams``, the whole resolution
in ``resolve``."""

from router.core.tenancy.hnc import HNC_DEPTH_SUFFIX
from router.core.tenancy.model import (
    SERVE_STALE_ANNOTATION,
    Conflict,
    NamespaceInfo,
    Resolution,
    ServiceInfo,
)
from router.core.tenancy.resolve import resolve, tenant_of

__all__ = [
    "HNC_DEPTH_SUFFIX",
    "SERVE_STALE_ANNOTATION",
    "Conflict",
    "NamespaceInfo",
    "Resolution",
    "ServiceInfo",
    "resolve",
    "tenant_of",
]
