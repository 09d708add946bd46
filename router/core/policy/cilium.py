"""Intents -> cilium.io/v2 CiliumClusterwideNetworkPolicy objects (namespace labels are
selected across namespaces only in the clusterwide kind)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from router.core.policy.intents import Cidrs, Intent, KubeAPIServer, Pods, Rule, TenantNamespaces
from router.core.policy.metadata import hnc_expressions, names_expression, object_metadata
from router.core.policy.model import CILIUM_API, Manifest, ObjectKey, PolicySettings, PortSpec

CILIUM_NAMESPACE_KEY = "k8s:io.kubernetes.pod.namespace"
CILIUM_NAMESPACE_LABEL_PREFIX = "k8s:io.cilium.k8s.namespace.labels."


def _cilium_ports(ports: Iterable[PortSpec], dns_visibility: bool = False) -> list[dict[str, Any]]:
    out = []
    for p in sorted(set(ports)):
        entry: dict[str, Any] = {"port": str(p.port), "protocol": p.protocol}
        if p.end_port is not None:
            entry["endPort"] = p.end_port
        out.append(entry)
    rule: dict[str, Any] = {"ports": out}
    if dns_visibility:
        rule["rules"] = {"dns": [{"matchPattern": "*"}]}
    return [rule]


def _cilium_pods(peer: Pods) -> dict[str, Any]:
    labels = {f"k8s:{k}": v for k, v in peer.pod_labels}
    if peer.namespace is not None:
        labels[CILIUM_NAMESPACE_KEY] = peer.namespace
    else:
        labels |= {CILIUM_NAMESPACE_LABEL_PREFIX + k: v for k, v in peer.namespace_labels}
    return {"matchLabels": dict(sorted(labels.items()))}


def _cilium_rules(r: Rule, s: PolicySettings, egress: bool) -> list[dict[str, Any]]:
    """One Cilium rule per peer type (a Cilium rule allows one kind of peer)."""
    to = "to" if egress else "from"
    out: list[dict[str, Any]] = []
    for peer in r.peers:
        if isinstance(peer, Pods):
            out.append({f"{to}Endpoints": [_cilium_pods(peer)]})
        elif isinstance(peer, TenantNamespaces):
            t = peer.tenant
            if t.hnc_root is None:
                sels = [names_expression(CILIUM_NAMESPACE_KEY, t.namespaces)]
            else:
                sels = [hnc_expressions(t, CILIUM_NAMESPACE_LABEL_PREFIX)]
                if t.extra_namespaces:
                    sels.append(names_expression(CILIUM_NAMESPACE_KEY, t.extra_namespaces))
            out.append({f"{to}Endpoints": sels})
        elif isinstance(peer, KubeAPIServer):
            out.append({f"{to}Entities": sorted(s.apiserver_entities)})
            if s.apiserver_cidrs:
                out.append({f"{to}CIDRSet": [{"cidr": c} for c in sorted(s.apiserver_cidrs)]})
        elif isinstance(peer, Cidrs):
            out.append({f"{to}CIDRSet": [{"cidr": c} for c in peer.cidrs]})
        elif egress:  # Fqdns
            out.append(
                {"toFQDNs": [{"matchPattern" if "*" in f else "matchName": f} for f in peer.names]}
            )
    if r.ports:
        ports = _cilium_ports(r.ports, r.dns_visibility)
        for rule in out:
            # Egress to the apiserver entity: whatever port it listens on (no port filter).
            if not (egress and "toEntities" in rule):
                rule["toPorts"] = ports
    return out


def to_cilium(intent: Intent, s: PolicySettings) -> Manifest:
    api_version, kind = CILIUM_API
    spec: dict[str, Any] = {
        "description": intent.description,
        "endpointSelector": _cilium_pods(Pods(intent.pods, intent.namespace)),
    }
    if intent.ingress is not None:
        spec["ingress"] = [x for r in intent.ingress for x in _cilium_rules(r, s, egress=False)]
    if intent.egress is not None:
        spec["egress"] = [x for r in intent.egress for x in _cilium_rules(r, s, egress=True)]
    body = {
        "apiVersion": api_version,
        "kind": kind,
        "metadata": object_metadata(intent.name, None, intent),
        "spec": spec,
    }
    return Manifest(
        ObjectKey(api_version, kind, "", intent.name), body, intent.tenant, intent.description
    )
