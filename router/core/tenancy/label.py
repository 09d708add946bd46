"""The ``label`` strategy: a namespace label (HNC can propagate it) names the tenant."""

from __future__ import annotations

from collections.abc import Mapping

from router.core.tenancy.model import Claim, NamespaceInfo
from router.settings import TenancySettings


def claim(
    ns: NamespaceInfo, namespaces_by_name: Mapping[str, NamespaceInfo], settings: TenancySettings
) -> Claim | None:
    """``ns.labels[settings.tenant_label]``; None without a label key or with an empty value."""
    if settings.tenant_label is None:
        return None
    value = ns.labels.get(settings.tenant_label)
    return (str(value), None) if value else None
