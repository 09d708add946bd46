"""Namespace trees for the policy suites: HNC-labelled namespaces, and the talk's tenancy model."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

from router.core.policy import (
    ANNOTATION_EGRESS_CIDRS,
    ANNOTATION_EGRESS_FQDNS,
    ANNOTATION_EGRESS_PORTS,
)
from router.core.tenancy import ServiceInfo

ROOT_LABEL = "tenancy.metrics-router.io/root"
HNC = ".tree.hnc.x-k8s.io/depth"


def hnc_namespaces(
    parents: Mapping[str, str | None],
    roots: Iterable[str] = (),
    extra_labels: Mapping[str, Mapping[str, str]] | None = None,
    annotations: Mapping[str, Mapping[str, str]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Raw Namespace objects labelled as HNC labels them: each ancestor and itself, by depth.
    A namespace missing from ``parents`` values' keys is an HNC-less namespace."""
    objs: dict[str, dict[str, Any]] = {}
    root_set = set(roots)
    for name, parent in parents.items():
        labels = {"kubernetes.io/metadata.name": name, f"{name}{HNC}": "0"}
        depth, cur = 1, parent
        while cur is not None:
            labels[f"{cur}{HNC}"] = str(depth)
            depth, cur = depth + 1, parents.get(cur)
        if name in root_set:
            labels[ROOT_LABEL] = "true"
        labels.update((extra_labels or {}).get(name, {}))
        meta: dict[str, Any] = {"name": name, "labels": labels}
        if annotations and name in annotations:
            meta["annotations"] = dict(annotations[name])
        objs[name] = {"apiVersion": "v1", "kind": "Namespace", "metadata": meta}
    return objs


def plain_namespace(name: str, labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": name,
            "labels": {"kubernetes.io/metadata.name": name, **(labels or {})},
        },
    }


def talk_tree() -> tuple[dict[str, dict[str, Any]], list[ServiceInfo]]:
    """The talk's tenancy model: tenant roots with children and a `--sys` namespace for KEDA."""
    parents: dict[str, str | None] = {
        "tenant-a": None,
        "tenant-a--ns1": "tenant-a",
        "tenant-a--ns2": "tenant-a",
        "tenant-a--sys": "tenant-a",
        "tenant-b": None,
        "tenant-b--ns1": "tenant-b",
        "tenant-b--sys": "tenant-b",
    }
    objs = hnc_namespaces(
        parents,
        roots=("tenant-a", "tenant-b"),
        annotations={
            "tenant-a": {
                ANNOTATION_EGRESS_CIDRS: "203.0.113.0/24",
                ANNOTATION_EGRESS_FQDNS: "sqs.eu-west-1.amazonaws.com, *.s3.amazonaws.com",
                ANNOTATION_EGRESS_PORTS: "443",
            }
        },
    )
    for extra in ("kube-system", "metrics-router", "monitoring"):
        objs[extra] = plain_namespace(extra)
    services = [
        ServiceInfo(
            ns,
            "keda-operator-metrics-apiserver",
            MappingProxyType({"app.kubernetes.io/name": "keda-operator-metrics-apiserver"}),
            (("https", 443),),
        )
        for ns in ("tenant-a--sys", "tenant-b--sys")
    ]
    return objs, services
