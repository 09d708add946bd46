"""The `--policy-config` file and the egress annotations: parsed, every problem reported."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

import yaml

from router.core.names import is_dns1123_label, is_dns1123_subdomain
from router.core.policy.model import (
    ANNOTATION_EGRESS_CIDRS,
    ANNOTATION_EGRESS_FQDNS,
    ANNOTATION_EGRESS_PORTS,
    LABEL_VALUE,
    EventSources,
    Labels,
    ManifestError,
    PolicyConfig,
    PolicySettings,
    PortSpec,
    TenantOverrides,
)

_LABEL_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")  # fullmatch
_FQDN = re.compile(
    r"(\*\.)?([a-z0-9_]([-a-z0-9_]*[a-z0-9_])?\.)*[a-z0-9_]([-a-z0-9_]*[a-z0-9_])?\.?"
)

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
    if len(value) > 253 or not _FQDN.fullmatch(value):
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
            if not is_label_key(str(k)) or not LABEL_VALUE.fullmatch(str(v)) or len(str(v)) > 63:
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
    return len(name) <= 63 and _LABEL_NAME.fullmatch(name) is not None
