"""The ``pattern`` strategy: a regular expression on the namespace name with a ``tenant`` group.

As in the talk's NGINX config: ``^tenant-(?P<tenant>[a-z0-9]+)(--.+)?$``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import lru_cache

from router.core.tenancy.model import Claim, NamespaceInfo
from router.settings import TenancySettings


@lru_cache(maxsize=32)
def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def claim(
    ns: NamespaceInfo, namespaces_by_name: Mapping[str, NamespaceInfo], settings: TenancySettings
) -> Claim | None:
    """The ``tenant`` group of ``settings.tenant_pattern`` searched in the name (anchors as
    written); None when it does not match or the group is empty."""
    match = _compile(settings.tenant_pattern).search(ns.name)
    if match is None:
        return None
    tenant = match.groupdict().get("tenant")
    return (tenant, None) if tenant else None
