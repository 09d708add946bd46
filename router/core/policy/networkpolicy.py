"""Intents -> networking.k8s.io/v1 NetworkPolicy objects."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from router.core.policy.intents import (
    Cidrs,
    Intent,
    KubeAPIServer,
    Peer,
    Pods,
    Rule,
    TenantNamespaces,
)
from router.core.policy.metadata import (
    hnc_expressions,
    labels_dict,
    names_expression,
    object_metadata,
    subnet_of,
)
from router.core.policy.model import (
    NAMESPACE_NAME_LABEL,
    NETWORKPOLICY_API,
    Manifest,
    ObjectKey,
    PolicySettings,
    PortSpec,
)


def _np_ports(ports: Iterable[PortSpec]) -> list[dict[str, Any]]:
    out = []
    for p in sorted(set(ports)):
        entry: dict[str, Any] = {"protocol": p.protocol, "port": p.port}
        if p.end_port is not None:
            entry["endPort"] = p.end_port
        out.append(entry)
    return out


def _np_peers(peer: Peer, s: PolicySettings) -> list[dict[str, Any]]:
    if isinstance(peer, Pods):
        if peer.namespace is not None:
            ns_sel: dict[str, Any] = {"matchLabels": {NAMESPACE_NAME_LABEL: peer.namespace}}
        else:
            ns_sel = {"matchLabels": labels_dict(peer.namespace_labels)}
        return [
            {
                "namespaceSelector": ns_sel,
                "podSelector": {"matchLabels": labels_dict(peer.pod_labels)},
            }
        ]
    if isinstance(peer, TenantNamespaces):
        t = peer.tenant
        if t.hnc_root is None:
            return [{"namespaceSelector": names_expression(NAMESPACE_NAME_LABEL, t.namespaces)}]
        peers = [{"namespaceSelector": hnc_expressions(t, "")}]
        if t.extra_namespaces:
            peers.append(
                {"namespaceSelector": names_expression(NAMESPACE_NAME_LABEL, t.extra_namespaces)}
            )
        return peers
    if isinstance(peer, KubeAPIServer):
        return [{"ipBlock": {"cidr": c}} for c in sorted(s.apiserver_cidrs)]
    if isinstance(peer, Cidrs):
        out = []
        for c in peer.cidrs:
            block: dict[str, Any] = {"cidr": c}
            # Pod and Service networks inside the block are cut out: an ipBlock may match pod
            # IPs in some implementations, and another tenant's pods must never match.
            excepts = sorted(k for k in s.cluster_cidrs if k != c and subnet_of(k, c))
            if excepts:
                block["except"] = excepts
            out.append({"ipBlock": block})
        return out
    return []  # Fqdns: not expressible (dropped with a warning before)


def to_networkpolicy(intent: Intent, s: PolicySettings) -> Manifest:
    api_version, kind = NETWORKPOLICY_API

    def rules(rs: tuple[Rule, ...], direction: str) -> list[dict[str, Any]]:
        out = []
        for r in rs:
            peers = [p for peer in r.peers for p in _np_peers(peer, s)]
            rule: dict[str, Any] = {direction: peers}
            if r.ports:
                rule["ports"] = _np_ports(r.ports)
            out.append(rule)
        return out

    spec: dict[str, Any] = {"podSelector": {"matchLabels": labels_dict(intent.pods)}}
    types = []
    if intent.ingress is not None:
        spec["ingress"] = rules(intent.ingress, "from")
        types.append("Ingress")
    if intent.egress is not None:
        spec["egress"] = rules(intent.egress, "to")
        types.append("Egress")
    spec["policyTypes"] = types
    body = {
        "apiVersion": api_version,
        "kind": kind,
        "metadata": object_metadata(intent.name, intent.namespace, intent),
        "spec": spec,
    }
    key = ObjectKey(api_version, kind, intent.namespace, intent.name)
    return Manifest(key, body, intent.tenant, intent.description)
