"""Traffic boundaries: tenants -> NetworkPolicy / CiliumClusterwideNetworkPolicy objects (pure).

A purely computational module: no I/O, no clock, no Kubernetes client. The adapters
(`router.render` writes files, `router.policy_sync` applies to a cluster) call it.

The paths are classified first (talk: "classify the paths first; then choose the primitive"):

| subject (pods)                  | ingress from                | egress to                 |
| ------------------------------- | --------------------------- | ------------------------- |
| tenant KEDA metrics apiserver   | router pods (secure port)   | tenant egress (below)     |
| tenant KEDA operator            | its metrics apiserver (gRPC)| tenant egress (below)     |
| tenant KEDA admission webhooks  | kube-apiserver (webhook)    | DNS, kube-apiserver       |
| router (base policy)            | kube-apiserver (secure      | DNS, kube-apiserver       |
|                                 | port), scraper (metrics)    |                           |
| router (one policy per tenant)  | -                           | the tenant's metrics      |
|                                 |                             | apiserver (secure port)   |

"Tenant egress" = the tenant's own namespaces (any port), DNS (kube-dns, 53 UDP and TCP), the
kube-apiserver, and the tenant's configured event sources (CIDRs; FQDNs with Cilium only),
restricted to the tenant's event-source ports when any are configured. Nothing else is allowed,
so everything cross-tenant is denied for the pods these policies select.

Each tenant's namespaces are selected either by name (`kubernetes.io/metadata.name In [...]`)
or, when the tenant is an HNC subtree, by the HNC label `<root>.tree.hnc.x-k8s.io/depth`
(operator Exists) minus the subtrees of nested tenants (DoesNotExist), so a new subnamespace is
covered without a re-render. Cilium selects namespace labels across namespaces only in the
clusterwide kind, hence `CiliumClusterwideNetworkPolicy`.

Every object carries `app.kubernetes.io/managed-by: metrics-router`; per-tenant objects also
carry `tenancy.metrics-router.io/tenant: <tenant>`; the router's base policy carries
`tenancy.metrics-router.io/component: router` instead (it belongs to no tenant). `plan()` only
ever deletes objects that carry the ownership label.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

import yaml

from router.names import is_dns1123_label, is_dns1123_subdomain
from router.routes import RouteTable

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
HNC_DEPTH_SUFFIX = ".tree.hnc.x-k8s.io/depth"

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

_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_FQDN = re.compile(
    r"^(\*\.)?([a-z0-9_]([-a-z0-9_]*[a-z0-9_])?\.)*[a-z0-9_]([-a-z0-9_]*[a-z0-9_])?\.?$"
)
_SERVICE_HOST = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?\.(?P<ns>[a-z0-9]([-a-z0-9]*[a-z0-9])?)\.svc(\.cluster\.local)?\.?$"
)


class ManifestError(ValueError):
    """Inputs that cannot be rendered safely; ``errors`` lists every problem found."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


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
    if len(tenant) <= 63 and _LABEL_VALUE.match(tenant):
        return tenant
    return tenant_slug(tenant)


def object_name(tenant: str, component: str) -> str:
    """``metrics-router-<tenant slug>-<component>``: a DNS-1123 subdomain of at most 103."""
    return f"{ROUTER_POLICY_NAME}-{tenant_slug(tenant)}-{component}"


def hnc_depth_label(namespace: str) -> str:
    return f"{namespace}{HNC_DEPTH_SUFFIX}"


# --------------------------------------------------------------------------- parsing settings


def _split_list(value: str) -> list[str]:
    return [p.strip() for p in re.split(r"[,\s]+", value) if p.strip()]


def parse_cidr(text: str) -> str:
    """Normalise a CIDR ("10.0.0.1" -> "10.0.0.1/32"); raise ValueError when invalid."""
    try:
        return str(ipaddress.ip_network(text.strip(), strict=False))
    except ValueError:
        raise ValueError(f"CIDR {text!r}: not an IP network") from None


def parse_fqdn(text: str) -> str:
    value = text.strip().lower()
    if len(value) > 253 or not _FQDN.match(value):
        raise ValueError(f"FQDN {text!r}: want a DNS name, optionally '*.' in front")
    return value.rstrip(".")


def _parse_items(
    values: Iterable[Any], parse: Any, where: str, problems: list[str]
) -> tuple[Any, ...]:
    out = []
    for v in values:
        try:
            out.append(parse(str(v)))
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
    return tuple(sorted(set(out)))


def event_sources_from_annotations(
    annotations: Mapping[str, str], where: str
) -> tuple[EventSources, TenantOverrides, list[str]]:
    """Read the egress annotations; invalid entries are dropped and reported."""
    problems: list[str] = []
    cidrs = fqdns = ports = None
    if ANNOTATION_EGRESS_CIDRS in annotations:
        cidrs = _parse_items(
            _split_list(annotations[ANNOTATION_EGRESS_CIDRS]), parse_cidr, where, problems
        )
    if ANNOTATION_EGRESS_FQDNS in annotations:
        fqdns = _parse_items(
            _split_list(annotations[ANNOTATION_EGRESS_FQDNS]), parse_fqdn, where, problems
        )
    if ANNOTATION_EGRESS_PORTS in annotations:
        ports = _parse_items(
            _split_list(annotations[ANNOTATION_EGRESS_PORTS]), PortSpec.parse, where, problems
        )
    found = TenantOverrides(cidrs=cidrs, fqdns=fqdns, ports=ports)
    return EventSources(cidrs or (), fqdns or (), ports or ()), found, problems


def merge_event_sources(
    file_tenant: TenantOverrides | None,
    annotations: TenantOverrides | None,
    defaults: EventSources,
) -> EventSources:
    """Per key: the policy config file's tenant entry wins, then the root namespace's
    annotation, then the file's ``defaults``."""
    layers = [x for x in (file_tenant, annotations) if x is not None]

    def pick(attr: str) -> tuple[Any, ...]:
        for layer in layers:
            value = getattr(layer, attr)
            if value is not None:
                return tuple(value)
        return tuple(getattr(defaults, attr))

    return EventSources(cidrs=pick("cidrs"), fqdns=pick("fqdns"), ports=pick("ports"))


_POLICY_CONFIG_KEYS = {
    "router", "scraper", "keda", "dns", "kubeAPIServer", "clusterCIDRs",
    "namespaceAnnotations", "defaults", "tenants",
}  # fmt: skip


def parse_policy_config(text: str) -> PolicyConfig:
    """Parse the `--policy-config` YAML; ManifestError lists every problem.

    ```yaml
    router: {namespace: metrics-router, podLabels: {app.kubernetes.io/name: metrics-router},
             securePort: 6443, metricsPort: 9090}
    scraper: {namespaceLabels: {kubernetes.io/metadata.name: monitoring},
              podLabels: {app.kubernetes.io/name: prometheus}}
    keda:
      namespaceTemplate: "{tenant}--sys"
      metricsServer: {podLabels: {...}, port: 6443}
      operator: {podLabels: {...}, grpcPort: 9666}
      admissionWebhooks: {podLabels: {...}, port: 9443}
    dns: {namespace: kube-system, podLabels: {k8s-app: kube-dns}, port: 53}
    kubeAPIServer: {cidrs: [172.18.0.2/32], ports: [443, 6443], ciliumEntities: [kube-apiserver]}
    clusterCIDRs: [10.244.0.0/16, 10.96.0.0/12]
    namespaceAnnotations: true      # read tenancy.metrics-router.io/egress-* on tenant roots
    defaults: {egressCIDRs: [], egressFQDNs: [], egressPorts: []}
    tenants:
      a: {egressCIDRs: [203.0.113.0/24], egressFQDNs: [sqs.eu-west-1.amazonaws.com],
          egressPorts: ["443/TCP"], kedaNamespace: tenant-a--sys}
    ```
    """
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ManifestError([f"policy config: not valid YAML: {exc}"]) from exc
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ManifestError(["policy config: want a mapping at the top"])
    errors = [
        f"policy config: unknown key {k!r}"
        for k in sorted(set(map(str, doc)) - _POLICY_CONFIG_KEYS)
    ]
    reader = _Reader(errors)
    base = PolicySettings()
    router = reader.mapping(doc, "router")
    scraper = reader.mapping(doc, "scraper")
    keda = reader.mapping(doc, "keda")
    ms = reader.mapping(keda, "metricsServer", "keda.")
    op = reader.mapping(keda, "operator", "keda.")
    wh = reader.mapping(keda, "admissionWebhooks", "keda.")
    dns = reader.mapping(doc, "dns")
    api = reader.mapping(doc, "kubeAPIServer")
    settings = PolicySettings(
        router_namespace=reader.namespace(router, "namespace", base.router_namespace, "router."),
        router_pod_labels=reader.labels(router, "podLabels", base.router_pod_labels, "router."),
        secure_port=reader.port(router, "securePort", base.secure_port, "router."),
        metrics_port=reader.port(router, "metricsPort", base.metrics_port, "router."),
        scraper_namespace_labels=reader.labels(
            scraper, "namespaceLabels", base.scraper_namespace_labels, "scraper."
        ),
        scraper_pod_labels=reader.labels(scraper, "podLabels", base.scraper_pod_labels, "scraper."),
        metrics_server_pod_labels=reader.labels(
            ms, "podLabels", base.metrics_server_pod_labels, "keda.metricsServer."
        ),
        metrics_server_port=reader.port(
            ms, "port", base.metrics_server_port, "keda.metricsServer."
        ),
        operator_pod_labels=reader.labels(
            op, "podLabels", base.operator_pod_labels, "keda.operator."
        ),
        operator_grpc_port=reader.port(op, "grpcPort", base.operator_grpc_port, "keda.operator."),
        webhook_pod_labels=reader.labels(
            wh, "podLabels", base.webhook_pod_labels, "keda.admissionWebhooks."
        ),
        webhook_port=reader.port(wh, "port", base.webhook_port, "keda.admissionWebhooks."),
        dns_namespace=reader.namespace(dns, "namespace", base.dns_namespace, "dns."),
        dns_pod_labels=reader.labels(dns, "podLabels", base.dns_pod_labels, "dns."),
        dns_port=reader.port(dns, "port", base.dns_port, "dns."),
        apiserver_cidrs=reader.items(api, "cidrs", parse_cidr, "kubeAPIServer.") or (),
        apiserver_ports=tuple(
            sorted(
                {
                    int(p.port)
                    for p in reader.items(api, "ports", PortSpec.parse, "kubeAPIServer.") or ()
                }
            )
        )
        or base.apiserver_ports,
        apiserver_entities=tuple(
            str(e) for e in reader.list(api, "ciliumEntities", "kubeAPIServer.")
        )
        or base.apiserver_entities,
        cluster_cidrs=reader.items(doc, "clusterCIDRs", parse_cidr, "") or (),
        keda_namespace_template=str(keda.get("namespaceTemplate", base.keda_namespace_template)),
    )
    if "{tenant}" not in settings.keda_namespace_template:
        errors.append("policy config: keda.namespaceTemplate must contain '{tenant}'")
    annotations = doc.get("namespaceAnnotations", True)
    if not isinstance(annotations, bool):
        errors.append("policy config: namespaceAnnotations: want true or false")
        annotations = True
    defaults_doc = reader.mapping(doc, "defaults")
    defaults = reader.overrides(defaults_doc, "defaults.", allow_namespace=False)
    tenants: dict[str, TenantOverrides] = {}
    tenants_doc = reader.mapping(doc, "tenants")
    for name, spec in tenants_doc.items():
        where = f"tenants.{name}."
        if not isinstance(spec, dict):
            errors.append(f"policy config: {where[:-1]}: want a mapping")
            continue
        tenants[str(name)] = reader.overrides(spec, where, allow_namespace=True)
    if errors:
        raise ManifestError(errors)
    return PolicyConfig(
        settings=settings,
        defaults=EventSources(defaults.cidrs or (), defaults.fqdns or (), defaults.ports or ()),
        tenants=MappingProxyType(dict(sorted(tenants.items()))),
        namespace_annotations=annotations,
    )


class _Reader:
    """Typed reads from a YAML mapping; problems are appended to ``errors``."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors

    def _err(self, where: str, key: str, message: str) -> None:
        self.errors.append(f"policy config: {where}{key}: {message}")

    def mapping(self, doc: Mapping[str, Any], key: str, where: str = "") -> dict[str, Any]:
        value = doc.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            self._err(where, key, "want a mapping")
            return {}
        return value

    def list(self, doc: Mapping[str, Any], key: str, where: str) -> list[Any]:
        value = doc.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            self._err(where, key, "want a list")
            return []
        return value

    def port(self, doc: Mapping[str, Any], key: str, default: int, where: str) -> int:
        value = doc.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            self._err(where, key, f"{value!r} is not a port")
            return default
        return value

    def namespace(self, doc: Mapping[str, Any], key: str, default: str, where: str) -> str:
        value = doc.get(key, default)
        if not isinstance(value, str) or not is_dns1123_label(value):
            self._err(where, key, f"{value!r} is not a namespace name")
            return default
        return value

    def labels(self, doc: Mapping[str, Any], key: str, default: Labels, where: str) -> Labels:
        value = doc.get(key)
        if value is None:
            return default
        if not isinstance(value, dict) or not value:
            self._err(where, key, "want a non-empty mapping of labels")
            return default
        out = []
        for k, v in value.items():
            if not is_label_key(str(k)) or not _LABEL_VALUE.match(str(v)) or len(str(v)) > 63:
                self._err(where, key, f"{k}={v} is not a valid label")
            out.append((str(k), str(v)))
        return tuple(sorted(out))

    def items(
        self, doc: Mapping[str, Any], key: str, parse: Any, where: str
    ) -> tuple[Any, ...] | None:
        if key not in doc:
            return None
        problems: list[str] = []
        out = _parse_items(self.list(doc, key, where), parse, f"{where}{key}", problems)
        self.errors.extend(f"policy config: {p}" for p in problems)
        return out

    def overrides(
        self, doc: Mapping[str, Any], where: str, *, allow_namespace: bool
    ) -> TenantOverrides:
        known = {"egressCIDRs", "egressFQDNs", "egressPorts"} | (
            {"kedaNamespace"} if allow_namespace else set()
        )
        for k in sorted(set(map(str, doc)) - known):
            self._err(where, k, "unknown key")
        keda_ns = doc.get("kedaNamespace")
        if keda_ns is not None and (not isinstance(keda_ns, str) or not is_dns1123_label(keda_ns)):
            self._err(where, "kedaNamespace", f"{keda_ns!r} is not a namespace name")
            keda_ns = None
        return TenantOverrides(
            cidrs=self.items(doc, "egressCIDRs", parse_cidr, where),
            fqdns=self.items(doc, "egressFQDNs", parse_fqdn, where),
            ports=self.items(doc, "egressPorts", PortSpec.parse, where),
            keda_namespace=keda_ns,
        )


def is_label_key(key: str) -> bool:
    """A label key: optional DNS-subdomain prefix and '/', then a name of at most 63."""
    prefix, slash, name = key.rpartition("/")
    if slash and not is_dns1123_subdomain(prefix):
        return False
    return len(name) <= 63 and _LABEL_NAME.match(name) is not None


# --------------------------------------------------------------------------- tenants in


def keda_namespace_for(tenant: str, tls_name: str | None, config: PolicyConfig) -> str:
    """Where the tenant's KEDA runs, first found wins: the policy config file's
    ``tenants.<t>.kedaNamespace``; the namespace in the upstream's TLS name
    ``<svc>.<ns>.svc[.cluster.local]`` (a routes file's ``serverName``, or the Service the
    cluster discovery found); the template ``keda.namespaceTemplate`` (``{tenant}--sys``)."""
    override = config.tenants.get(tenant)
    if override is not None and override.keda_namespace:
        return override.keda_namespace
    m = _SERVICE_HOST.match((tls_name or "").lower())
    if m:
        return m.group("ns")
    return config.settings.keda_namespace_template.format(tenant=tenant)


def root_namespace_of(tenant: str, namespaces: Sequence[str], hnc_root: str | None) -> str | None:
    """The namespace whose annotations hold the tenant's egress settings: the namespace named
    like the tenant (the HNC root under the hnc strategy), else the HNC root, else the tenant's
    shortest namespace name (``tenant-a`` for ``tenant-a``, ``tenant-a--dev``)."""
    if tenant in namespaces:
        return tenant
    if hnc_root is not None:
        return hnc_root
    return min(namespaces, key=lambda n: (len(n), n)) if namespaces else None


def tenant_networks(
    table: RouteTable,
    config: PolicyConfig,
    namespaces: Mapping[str, NamespaceMeta] | None = None,
    all_tenants: Mapping[str, Sequence[str]] | None = None,
) -> tuple[tuple[TenantNetwork, ...], tuple[str, ...]]:
    """What the renderer needs for every tenant; returns (networks, warnings).

    ``table``: the routes (a routes file, or ``Resolution.table``).
    ``namespaces``: labels and annotations from the cluster (absent with a routes file).
    ``all_tenants``: tenant -> namespaces including tenants without a route (for example
    ``Resolution.tenants``): their KEDA still gets its policies while its Service is missing.
    """
    metas = namespaces or {}
    members_in: dict[str, tuple[str, ...]] = {t.name: tuple(t.namespaces) for t in table.tenants}
    for name, nss in (all_tenants or {}).items():
        members_in.setdefault(name, tuple(nss))
    tls = {t.name: t.upstream.tls_name for t in table.tenants}
    keda = {name: keda_namespace_for(name, tls.get(name), config) for name in members_in}
    members = {n: tuple(sorted(set(nss) | {keda[n]})) for n, nss in members_in.items()}
    owner: dict[str, str] = {}
    for name in sorted(members):
        for ns in members[name]:
            owner.setdefault(ns, name)
    warnings: list[str] = []
    out: list[TenantNetwork] = []
    for name in sorted(members):
        all_ns = members[name]
        root, exclude, extra = _hnc_selection(name, all_ns, metas, owner)
        root_ns = root_namespace_of(name, members_in[name], root)
        annotations: TenantOverrides | None = None
        if config.namespace_annotations and root_ns is not None and root_ns in metas:
            _, annotations, problems = event_sources_from_annotations(
                metas[root_ns].annotations, f"tenant {name}: namespace {root_ns}"
            )
            warnings.extend(problems)
        sources = merge_event_sources(config.tenants.get(name), annotations, config.defaults)
        out.append(
            TenantNetwork(
                name=name,
                namespaces=all_ns,
                keda_namespace=keda[name],
                hnc_root=root,
                hnc_exclude=exclude,
                extra_namespaces=extra,
                event_sources=sources,
            )
        )
    return tuple(out), tuple(warnings)


def _hnc_selection(
    tenant: str,
    namespaces: tuple[str, ...],
    metas: Mapping[str, NamespaceMeta],
    owner: Mapping[str, str],
) -> tuple[str | None, tuple[str, ...], tuple[str, ...]]:
    """(root, excluded subtrees, namespaces by name) when the tenant is an HNC subtree whose
    foreign members can all be cut out; (None, (), ()) otherwise (select by name)."""

    def labels(ns: str) -> Mapping[str, str]:
        meta = metas.get(ns)
        return meta.labels if meta is not None else {}

    def in_tree(ns: str, root: str) -> bool:
        return hnc_depth_label(root) in labels(ns)

    ours = set(namespaces)
    # HNC labels every namespace with its own depth label "0". The root is the tenant
    # namespace whose subtree holds the most of the tenant's namespaces: the topmost one
    # (ties between disjoint subtrees: the first name; the others are then selected by name).
    candidates = [r for r in namespaces if labels(r).get(hnc_depth_label(r)) == "0"]
    if not candidates:
        return None, (), ()
    root = min(candidates, key=lambda r: (-sum(in_tree(ns, r) for ns in namespaces), r))
    subtree = [ns for ns in metas if in_tree(ns, root)]
    exclude: set[str] = set()
    for ns in sorted(subtree):
        if owner.get(ns, tenant) == tenant:
            continue
        # The topmost ancestor of the foreign namespace, below the root, whose subtree holds
        # none of our namespaces: cutting it out removes the foreign namespace only.
        ancestors = [
            a
            for a in metas
            if a != root and in_tree(ns, a) and in_tree(a, root)
            and not any(in_tree(o, a) for o in ours)
        ]  # fmt: skip
        if not ancestors:
            return None, (), ()
        exclude.add(max(ancestors, key=lambda a: (int(labels(ns).get(hnc_depth_label(a), "0")), a)))
    extra = tuple(
        ns for ns in namespaces if not in_tree(ns, root) or any(in_tree(ns, x) for x in exclude)
    )
    # Drop excluded subtrees nested inside other excluded subtrees (redundant).
    minimal = tuple(
        sorted(x for x in exclude if not any(y != x and in_tree(x, y) for y in exclude))
    )
    return root, minimal, extra


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


# --------------------------------------------------------------------------- rendering


def validate_inputs(tenants: Sequence[TenantNetwork], settings: PolicySettings, kind: str) -> None:
    """Refuse inputs whose policies would cross tenants or be invalid (ManifestError)."""
    errors: list[str] = []
    if kind not in KINDS:
        errors.append(f"unknown policy kind {kind!r} (want {', '.join(KINDS)})")
    if kind == KIND_NETWORKPOLICY and not settings.apiserver_cidrs:
        errors.append(
            "the kube-apiserver's addresses are unknown: set kubeAPIServer.cidrs in the policy "
            "config (from a cluster they are read from the default/kubernetes EndpointSlices)"
        )
    slugs: dict[str, str] = {}
    owner: dict[str, str] = {}
    for t in tenants:
        slug = tenant_slug(t.name)
        if slug in slugs:
            errors.append(f"tenants {slugs[slug]!r} and {t.name!r} map to the same name {slug!r}")
        slugs[slug] = t.name
        for ns in t.namespaces:
            if not is_dns1123_label(ns):
                errors.append(f"tenant {t.name!r}: {ns!r} is not a namespace name")
            if ns in owner:
                errors.append(f"namespace {ns!r} belongs to tenants {owner[ns]!r} and {t.name!r}")
            owner[ns] = t.name
        if t.keda_namespace not in t.namespaces:
            errors.append(f"tenant {t.name!r}: KEDA namespace {t.keda_namespace!r} not listed")
        if settings.router_namespace in t.namespaces:
            errors.append(f"tenant {t.name!r} claims the router's namespace")
    if errors:
        raise ManifestError(errors)


def render(tenants: Sequence[TenantNetwork], settings: PolicySettings, kind: str) -> Rendering:
    """Every policy object for ``tenants`` and the router, sorted by key (ManifestError)."""
    ordered = sorted(tenants, key=lambda t: t.name)
    validate_inputs(ordered, settings, kind)
    warnings: list[str] = []
    usable = []
    for t in ordered:
        sources, problems = _usable_sources(t, settings, kind)
        warnings.extend(problems)
        usable.append(replace(t, event_sources=sources))
    translate = _to_networkpolicy if kind == KIND_NETWORKPOLICY else _to_cilium
    manifests = sorted((translate(i, settings) for i in classify(usable, settings)), key=_key)
    return Rendering(tuple(manifests), tuple(warnings))


def _key(m: Manifest) -> ObjectKey:
    return m.key


def _usable_sources(
    t: TenantNetwork, settings: PolicySettings, kind: str
) -> tuple[EventSources, list[str]]:
    problems: list[str] = []
    fqdns = t.event_sources.fqdns
    if fqdns and kind == KIND_NETWORKPOLICY:
        problems.append(
            f"tenant {t.name!r}: egress FQDNs {', '.join(fqdns)} need the cilium kind; "
            "NetworkPolicy has no DNS names (use egress CIDRs)"
        )
        fqdns = ()
    cidrs = []
    for c in t.event_sources.cidrs:
        inside = [k for k in settings.cluster_cidrs if _subnet_of(c, k)]
        if inside:
            problems.append(
                f"tenant {t.name!r}: egress CIDR {c} lies inside the cluster network "
                f"{inside[0]}; dropped (event sources are outside the cluster)"
            )
            continue
        cidrs.append(c)
    return replace(t.event_sources, cidrs=tuple(cidrs), fqdns=fqdns), problems


def _subnet_of(inner: str, outer: str) -> bool:
    a, b = ipaddress.ip_network(inner), ipaddress.ip_network(outer)
    if isinstance(a, ipaddress.IPv4Network) and isinstance(b, ipaddress.IPv4Network):
        return a.subnet_of(b)
    if isinstance(a, ipaddress.IPv6Network) and isinstance(b, ipaddress.IPv6Network):
        return a.subnet_of(b)
    return False


def _labels_dict(labels: Labels) -> dict[str, str]:
    return dict(sorted(labels))


def _metadata(name: str, namespace: str | None, intent: Intent) -> dict[str, Any]:
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


def _names_expression(key: str, namespaces: Iterable[str]) -> dict[str, Any]:
    return {"matchExpressions": [{"key": key, "operator": "In", "values": sorted(namespaces)}]}


def _hnc_expressions(t: TenantNetwork, prefix: str) -> dict[str, Any]:
    assert t.hnc_root is not None
    exprs: list[dict[str, Any]] = [
        {"key": prefix + hnc_depth_label(t.hnc_root), "operator": "Exists"}
    ]
    exprs += [
        {"key": prefix + hnc_depth_label(x), "operator": "DoesNotExist"} for x in t.hnc_exclude
    ]
    return {"matchExpressions": exprs}


# NetworkPolicy ---------------------------------------------------------------


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
            ns_sel = {"matchLabels": _labels_dict(peer.namespace_labels)}
        return [
            {
                "namespaceSelector": ns_sel,
                "podSelector": {"matchLabels": _labels_dict(peer.pod_labels)},
            }
        ]
    if isinstance(peer, TenantNamespaces):
        t = peer.tenant
        if t.hnc_root is None:
            return [{"namespaceSelector": _names_expression(NAMESPACE_NAME_LABEL, t.namespaces)}]
        peers = [{"namespaceSelector": _hnc_expressions(t, "")}]
        if t.extra_namespaces:
            peers.append(
                {"namespaceSelector": _names_expression(NAMESPACE_NAME_LABEL, t.extra_namespaces)}
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
            excepts = sorted(k for k in s.cluster_cidrs if k != c and _subnet_of(k, c))
            if excepts:
                block["except"] = excepts
            out.append({"ipBlock": block})
        return out
    return []  # Fqdns: not expressible (dropped with a warning before)


def _to_networkpolicy(intent: Intent, s: PolicySettings) -> Manifest:
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

    spec: dict[str, Any] = {"podSelector": {"matchLabels": _labels_dict(intent.pods)}}
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
        "metadata": _metadata(intent.name, intent.namespace, intent),
        "spec": spec,
    }
    key = ObjectKey(api_version, kind, intent.namespace, intent.name)
    return Manifest(key, body, intent.tenant, intent.description)


# Cilium ----------------------------------------------------------------------

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
                sels = [_names_expression(CILIUM_NAMESPACE_KEY, t.namespaces)]
            else:
                sels = [_hnc_expressions(t, CILIUM_NAMESPACE_LABEL_PREFIX)]
                if t.extra_namespaces:
                    sels.append(_names_expression(CILIUM_NAMESPACE_KEY, t.extra_namespaces))
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


def _to_cilium(intent: Intent, s: PolicySettings) -> Manifest:
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
        "metadata": _metadata(intent.name, None, intent),
        "spec": spec,
    }
    return Manifest(
        ObjectKey(api_version, kind, "", intent.name), body, intent.tenant, intent.description
    )


# --------------------------------------------------------------------------- plan


def is_owned(obj: Mapping[str, Any]) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return bool(labels.get(OWNER_LABEL) == OWNER_VALUE)


def key_of(obj: Mapping[str, Any]) -> ObjectKey:
    meta = obj.get("metadata") or {}
    return ObjectKey(
        str(obj.get("apiVersion", "")),
        str(obj.get("kind", "")),
        str(meta.get("namespace") or ""),
        str(meta.get("name", "")),
    )


def _contains(actual: Any, desired: Any) -> bool:
    """Whether ``actual`` holds every field of ``desired`` (lists compared whole)."""
    if isinstance(desired, Mapping):
        return isinstance(actual, Mapping) and all(
            k in actual and _contains(actual[k], v) for k, v in desired.items()
        )
    if isinstance(desired, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(desired)
            and all(_contains(a, d) for a, d in zip(actual, desired, strict=True))
        )
    return bool(actual == desired)


def plan(desired: Iterable[Manifest], actual: Iterable[Mapping[str, Any]]) -> Plan:
    """Apply what is missing or differs; delete owned objects nobody wants.

    An actual object without the ownership label is never deleted, whatever the caller listed.
    An object is re-applied when any desired field differs (a hand edit is reverted), and left
    alone when the cluster already holds every desired field (fields others own are ignored).
    """
    want = {m.key: m for m in desired}
    have = {key_of(o): o for o in actual}
    apply = tuple(
        want[k] for k in sorted(want) if k not in have or not _contains(have[k], want[k].body)
    )
    delete = tuple(k for k in sorted(have) if k not in want and is_owned(have[k]))
    return Plan(apply=apply, delete=delete)


def to_yaml(body: Mapping[str, Any]) -> str:
    """Stable YAML for one object (keys in the order rendered, which is deterministic)."""
    return yaml.safe_dump(
        _plain(body), sort_keys=False, default_flow_style=False, allow_unicode=True, width=1 << 16
    )


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
