"""Object metadata and namespace selectors shared by both renderers."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

from router.core.policy.intents import Intent
from router.core.policy.model import (
    COMPONENT_LABEL,
    OWNER_LABEL,
    OWNER_VALUE,
    TENANT_LABEL,
    TENANT_NAME_ANNOTATION,
    Labels,
    TenantNetwork,
    tenant_label_value,
)
from router.core.tenancy import hnc


def labels_dict(labels: Labels) -> dict[str, str]:
    return dict(sorted(labels))


def object_metadata(name: str, namespace: str | None, intent: Intent) -> dict[str, Any]:
    labels = {OWNER_LABEL: OWNER_VALUE, COMPONENT_LABEL: intent.component}
    annotations: dict[str, str] = {}
    if intent.tenant is not None:
        labels[TENANT_LABEL] = tenant_label_value(intent.tenant)
        if labels[TENANT_LABEL] != intent.tenant:
            annotations[TENANT_NAME_ANNOTATION] = intent.tenant
    meta: dict[str, Any] = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    meta["labels"] = dict(sorted(labels.items()))
    if annotations:
        meta["annotations"] = annotations
    return meta


def names_expression(key: str, namespaces: Iterable[str]) -> dict[str, Any]:
    return {"matchExpressions": [{"key": key, "operator": "In", "values": sorted(namespaces)}]}


def hnc_expressions(t: TenantNetwork, prefix: str) -> dict[str, Any]:
    assert t.hnc_root is not None
    exprs: list[dict[str, Any]] = [
        {"key": prefix + hnc.depth_label(t.hnc_root), "operator": "Exists"}
    ]
    exprs += [
        {"key": prefix + hnc.depth_label(x), "operator": "DoesNotExist"} for x in t.hnc_exclude
    ]
    return {"matchExpressions": exprs}


def subnet_of(inner: str, outer: str) -> bool:
    a, b = ipaddress.ip_network(inner), ipaddress.ip_network(outer)
    if isinstance(a, ipaddress.IPv4Network) and isinstance(b, ipaddress.IPv4Network):
        return a.subnet_of(b)
    if isinstance(a, ipaddress.IPv6Network) and isinstance(b, ipaddress.IPv6Network):
        return a.subnet_of(b)
    return False
