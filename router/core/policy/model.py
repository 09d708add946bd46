"""The policy vocabulary: labels, kinds, the renderer's inputs and outputs, object names."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from router.core.errors import ConfigError
from router.core.names import is_dns1123_label

OWNER_LABEL = "app.kubernetes.io/managed-by"
OWNER_VALUE = "metrics-router"
OWNER_SELECTOR = f"{OWNER_LABEL}={OWNER_VALUE}"
TENANT_LABEL = "tenancy.metrics-router.io/tenant"
COMPONENT_LABEL = "tenancy.metrics-router.io/component"
TENANT_NAME_ANNOTATION = "tenancy.metrics-router.io/tenant-name"

ANNOTATION_EGRESS_CIDRS = "tenancy.metrics-router.io/egress-cidrs"
ANNOTATION_EGRESS_FQDNS = "tenancy.metrics-router.io/egress-fqdns"
ANNOTATION_EGRESS_PORTS = "tenancy.metrics-router.io/egress-ports"

NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"

KIND_NETWORKPOLICY = "networkpolicy"
KIND_CILIUM = "cilium"
KINDS = (KIND_NETWORKPOLICY, KIND_CILIUM)

NETWORKPOLICY_API = ("networking.k8s.io/v1", "NetworkPolicy")
CILIUM_API = ("cilium.io/v2", "CiliumClusterwideNetworkPolicy")

COMPONENT_OPERATOR = "keda-operator"
COMPONENT_METRICS_SERVER = "keda-metrics-apiserver"
COMPONENT_WEBHOOKS = "keda-admission-webhooks"
COMPONENT_ROUTER_EGRESS = "router-egress"
COMPONENT_ROUTER = "router"
ROUTER_POLICY_NAME = "metrics-router"

PROTOCOLS = ("TCP", "UDP", "SCTP")

Labels = tuple[tuple[str, str], ...]

LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")  # fullmatch


class ManifestError(ConfigError, ValueError):
    """Inputs that cannot be rendered safely; ``errors`` lists every problem found."""


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True, slots=True, order=True)
class PortSpec:
    """An L4 port or port range: "443", "5672/TCP", "8000-8100/UDP"."""

    port: int
    protocol: str = "TCP"
    end_port: int | None = None

    @classmethod
    def parse(cls, text: str) -> PortSpec:
        """Parse PORT[-END][/PROTOCOL]; raise ValueError with a readable message."""
        raw = text.strip()
        number, _, protocol = raw.partition("/")
        protocol = protocol.upper() or "TCP"
        if protocol not in PROTOCOLS:
            raise ValueError(f"port {raw!r}: protocol must be one of {', '.join(PROTOCOLS)}")
        first, dash, last = number.partition("-")
        try:
            port = int(first)
            end = int(last) if dash else None
        except ValueError:
            raise ValueError(f"port {raw!r}: want PORT[-END][/PROTOCOL]") from None
        if not 1 <= port <= 65535 or (end is not None and not port < end <= 65535):
            raise ValueError(f"port {raw!r}: out of range")
        return cls(port=port, protocol=protocol, end_port=end)

    def __str__(self) -> str:
        rng = f"{self.port}-{self.end_port}" if self.end_port else str(self.port)
        return f"{rng}/{self.protocol}"


@dataclass(frozen=True, slots=True)
class EventSources:
    """A tenant's external event sources (egress of its KEDA operator and metrics server)."""

    cidrs: tuple[str, ...] = ()
    fqdns: tuple[str, ...] = ()
    ports: tuple[PortSpec, ...] = ()  # empty: any port to the CIDRs / FQDNs


@dataclass(frozen=True, slots=True)
class TenantNetwork:
    """What the renderer needs to know about one tenant.

    ``namespaces`` are all the tenant's namespaces (its KEDA namespace included). With
    ``hnc_root`` set they are selected as the HNC subtree of that root minus the subtrees of
    ``hnc_exclude`` (nested tenants), plus ``extra_namespaces`` by name (those outside the
    subtree, e.g. a KEDA namespace that is not an HNC child). Without it, by name.
    """

    name: str
    namespaces: tuple[str, ...]
    keda_namespace: str
    hnc_root: str | None = None
    hnc_exclude: tuple[str, ...] = ()
    extra_namespaces: tuple[str, ...] = ()
    event_sources: EventSources = field(default_factory=EventSources)


@dataclass(frozen=True, slots=True)
class PolicySettings:
    """Cluster-wide facts the policies refer to (the `policy config` file's top level)."""

    router_namespace: str = "metrics-router"
    router_pod_labels: Labels = (("app.kubernetes.io/name", "metrics-router"),)
    secure_port: int = 6443
    metrics_port: int = 9090
    scraper_namespace_labels: Labels = ((NAMESPACE_NAME_LABEL, "monitoring"),)
    scraper_pod_labels: Labels = (("app.kubernetes.io/name", "prometheus"),)
    metrics_server_pod_labels: Labels = (
        ("app.kubernetes.io/name", "keda-operator-metrics-apiserver"),
    )
    metrics_server_port: int = 6443
    operator_pod_labels: Labels = (("app.kubernetes.io/name", "keda-operator"),)
    operator_grpc_port: int = 9666
    webhook_pod_labels: Labels = (("app.kubernetes.io/name", "keda-admission-webhooks"),)
    webhook_port: int = 9443
    dns_namespace: str = "kube-system"
    dns_pod_labels: Labels = (("k8s-app", "kube-dns"),)
    dns_port: int = 53
    # NetworkPolicy kind: the kube-apiserver as ipBlocks (its endpoint addresses); empty = must
    # be discovered from the cluster (default/kubernetes EndpointSlices) before rendering.
    apiserver_cidrs: tuple[str, ...] = ()
    apiserver_ports: tuple[int, ...] = (443, 6443)
    # Cilium kind: the entities standing for the kube-apiserver.
    apiserver_entities: tuple[str, ...] = ("kube-apiserver",)
    # Pod and Service networks: excluded from event-source ipBlocks so that an event-source
    # CIDR such as 0.0.0.0/0 never admits another tenant's pods (NetworkPolicy kind).
    cluster_cidrs: tuple[str, ...] = ()
    keda_namespace_template: str = "{tenant}--sys"


@dataclass(frozen=True, slots=True)
class TenantOverrides:
    """Per-tenant keys of the policy config file; None = not set there."""

    cidrs: tuple[str, ...] | None = None
    fqdns: tuple[str, ...] | None = None
    ports: tuple[PortSpec, ...] | None = None
    keda_namespace: str | None = None


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """The parsed `--policy-config` file (every key optional)."""

    settings: PolicySettings = field(default_factory=PolicySettings)
    defaults: EventSources = field(default_factory=EventSources)
    tenants: Mapping[str, TenantOverrides] = field(default_factory=lambda: MappingProxyType({}))
    namespace_annotations: bool = True


@dataclass(frozen=True, slots=True)
class NamespaceMeta:
    """The parts of a Namespace the renderer reads: HNC labels and the egress annotations."""

    name: str
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    annotations: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


# --------------------------------------------------------------------------- outputs


@dataclass(frozen=True, slots=True, order=True)
class ObjectKey:
    api_version: str
    kind: str
    namespace: str  # "" for cluster-scoped objects
    name: str

    def __str__(self) -> str:
        where = f"{self.namespace}/" if self.namespace else ""
        return f"{self.kind}/{where}{self.name}"


@dataclass(frozen=True, slots=True)
class Manifest:
    """One rendered object. ``body`` is JSON-compatible; treat it as read-only."""

    key: ObjectKey
    body: Mapping[str, Any]
    tenant: str | None  # None: the router's base policy
    description: str


@dataclass(frozen=True, slots=True)
class Rendering:
    manifests: tuple[Manifest, ...]
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Plan:
    """What to change so that the cluster holds exactly the desired owned objects."""

    apply: tuple[Manifest, ...]
    delete: tuple[ObjectKey, ...]


# --------------------------------------------------------------------------- names


def _digest(value: str, n: int = 10) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:n]


def tenant_slug(tenant: str) -> str:
    """A DNS-1123 label (<= 63) standing for ``tenant``: the name itself when it is one.

    Otherwise lower-cased, invalid characters replaced, truncated, and a hash of the original
    appended, so different tenants never share a slug in practice.
    """
    if is_dns1123_label(tenant):
        return tenant
    cleaned = re.sub(r"[^a-z0-9-]+", "-", tenant.lower()).strip("-")[:52].strip("-")
    return f"{cleaned}-{_digest(tenant)}" if cleaned else f"t-{_digest(tenant)}"


def tenant_label_value(tenant: str) -> str:
    """The value of the tenant label: the name when it is a valid label value, else its slug."""
    if len(tenant) <= 63 and LABEL_VALUE.fullmatch(tenant):
        return tenant
    return tenant_slug(tenant)


def object_name(tenant: str, component: str) -> str:
    """``metrics-router-<tenant slug>-<component>``: a DNS-1123 subdomain of at most 103."""
    return f"{ROUTER_POLICY_NAME}-{tenant_slug(tenant)}-{component}"
