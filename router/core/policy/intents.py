"""Classify the paths first: which pods talk to which, per tenant and for the router."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from router.core.policy.model import (
    COMPONENT_METRICS_SERVER,
    COMPONENT_OPERATOR,
    COMPONENT_ROUTER,
    COMPONENT_ROUTER_EGRESS,
    COMPONENT_WEBHOOKS,
    ROUTER_POLICY_NAME,
    Labels,
    PolicySettings,
    PortSpec,
    TenantNetwork,
    object_name,
)

# --------------------------------------------------------------------------- classification


@dataclass(frozen=True, slots=True)
class Pods:
    """Pods with ``pod_labels`` in the namespace named ``namespace``, or (namespace None) in
    every namespace carrying ``namespace_labels``."""

    pod_labels: Labels
    namespace: str | None = None
    namespace_labels: Labels = ()


@dataclass(frozen=True, slots=True)
class TenantNamespaces:
    """Every pod in a tenant's namespaces."""

    tenant: TenantNetwork


@dataclass(frozen=True, slots=True)
class KubeAPIServer:
    """The kube-apiserver: ipBlocks (NetworkPolicy) or Cilium entities (plus CIDRs if known)."""


@dataclass(frozen=True, slots=True)
class Cidrs:
    """Addresses outside the cluster."""

    cidrs: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Fqdns:
    """DNS names (Cilium only)."""

    names: tuple[str, ...]


Peer = Pods | TenantNamespaces | KubeAPIServer | Cidrs | Fqdns


@dataclass(frozen=True, slots=True)
class Rule:
    """Traffic to (egress) or from (ingress) any of ``peers``, on ``ports`` (empty: any)."""

    peers: tuple[Peer, ...]
    ports: tuple[PortSpec, ...] = ()
    dns_visibility: bool = False  # Cilium: pass DNS answers through its proxy (for toFQDNs)


@dataclass(frozen=True, slots=True)
class Intent:
    """One policy, kind-independent: which pods, and the only paths allowed in and out.

    ``ingress`` / ``egress`` None: that direction is not restricted by this policy.
    """

    name: str
    tenant: str | None
    component: str
    namespace: str
    pods: Labels
    ingress: tuple[Rule, ...] | None
    egress: tuple[Rule, ...] | None
    description: str


def classify(tenants: Sequence[TenantNetwork], settings: PolicySettings) -> tuple[Intent, ...]:
    """The allowed paths for the router and every tenant (the table in the module docstring).

    ``tenants`` are expected to have passed `validate_inputs` and `_usable_sources`.
    """
    s = settings
    dns = Rule(
        (Pods(s.dns_pod_labels, s.dns_namespace),),
        (PortSpec(s.dns_port, "UDP"), PortSpec(s.dns_port, "TCP")),
    )
    apiserver = Rule((KubeAPIServer(),), tuple(PortSpec(p) for p in s.apiserver_ports))
    router_pods = Pods(s.router_pod_labels, s.router_namespace)
    intents = [
        Intent(
            name=ROUTER_POLICY_NAME,
            tenant=None,
            component=COMPONENT_ROUTER,
            namespace=s.router_namespace,
            pods=s.router_pod_labels,
            ingress=(
                Rule((KubeAPIServer(),), (PortSpec(s.secure_port),)),
                Rule(
                    (Pods(s.scraper_pod_labels, None, s.scraper_namespace_labels),),
                    (PortSpec(s.metrics_port),),
                ),
            ),
            egress=(dns, apiserver),
            description="router: ingress from the kube-apiserver (secure port) and the "
            "scraper (metrics port); egress to DNS and the kube-apiserver",
        )
    ]
    for t in tenants:
        ns = t.keda_namespace
        src = t.event_sources
        tenant_egress = [
            Rule((TenantNamespaces(t),)),
            replace(dns, dns_visibility=bool(src.fqdns)),
            apiserver,
        ]
        if src.cidrs:
            tenant_egress.append(Rule((Cidrs(src.cidrs),), src.ports))
        if src.fqdns:
            tenant_egress.append(Rule((Fqdns(src.fqdns),), src.ports))
        egress = tuple(tenant_egress)
        what = "egress to the tenant, DNS, the kube-apiserver and the tenant's event sources"
        intents += [
            Intent(
                name=object_name(t.name, COMPONENT_METRICS_SERVER),
                tenant=t.name,
                component=COMPONENT_METRICS_SERVER,
                namespace=ns,
                pods=s.metrics_server_pod_labels,
                ingress=(Rule((router_pods,), (PortSpec(s.metrics_server_port),)),),
                egress=egress,
                description=f"tenant {t.name}: KEDA metrics apiserver accepts only the router; "
                + what,
            ),
            Intent(
                name=object_name(t.name, COMPONENT_OPERATOR),
                tenant=t.name,
                component=COMPONENT_OPERATOR,
                namespace=ns,
                pods=s.operator_pod_labels,
                ingress=(
                    Rule(
                        (Pods(s.metrics_server_pod_labels, ns),),
                        (PortSpec(s.operator_grpc_port),),
                    ),
                ),
                egress=egress,
                description=f"tenant {t.name}: KEDA operator accepts only its metrics "
                "apiserver (gRPC); " + what,
            ),
            Intent(
                name=object_name(t.name, COMPONENT_WEBHOOKS),
                tenant=t.name,
                component=COMPONENT_WEBHOOKS,
                namespace=ns,
                pods=s.webhook_pod_labels,
                ingress=(Rule((KubeAPIServer(),), (PortSpec(s.webhook_port),)),),
                egress=(dns, apiserver),
                description=f"tenant {t.name}: KEDA admission webhooks accept only the "
                "kube-apiserver; egress to DNS and the kube-apiserver",
            ),
            Intent(
                name=object_name(t.name, COMPONENT_ROUTER_EGRESS),
                tenant=t.name,
                component=COMPONENT_ROUTER_EGRESS,
                namespace=s.router_namespace,
                pods=s.router_pod_labels,
                ingress=None,
                egress=(
                    Rule(
                        (Pods(s.metrics_server_pod_labels, ns),),
                        (PortSpec(s.metrics_server_port),),
                    ),
                ),
                description=f"router: egress to tenant {t.name}'s KEDA metrics apiserver",
            ),
        ]
    return tuple(intents)
