"""router.core.policy: rendering, schemas, golden files, plan, and the tenant boundary property.

The property tests evaluate the rendered policies with a tiny evaluator of NetworkPolicy and
Cilium semantics (below): no rule of any rendered policy may admit a pod of one tenant to or
from a pod of another tenant, while the paths the product needs stay open.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from router.cli.render import output_files, write_output_dir
from router.core.names import is_dns1123_label, is_dns1123_subdomain
from router.core.policy import (
    ANNOTATION_EGRESS_CIDRS,
    ANNOTATION_EGRESS_PORTS,
    CILIUM_API,
    KIND_CILIUM,
    KIND_NETWORKPOLICY,
    KINDS,
    NETWORKPOLICY_API,
    OWNER_LABEL,
    OWNER_VALUE,
    TENANT_LABEL,
    EventSources,
    Manifest,
    ManifestError,
    NamespaceMeta,
    PolicyConfig,
    PolicySettings,
    PortSpec,
    TenantNetwork,
    TenantOverrides,
    is_label_key,
    keda_namespace_for,
    merge_event_sources,
    object_name,
    parse_policy_config,
    plan,
    render,
    tenant_label_value,
    tenant_networks,
    tenant_slug,
)
from router.core.routes import RouteTable, parse_routes_file
from router.core.tenancy import NamespaceInfo, resolve
from router.settings import TenancySettings
from tests.conftest import DESIGN_ROUTES
from tests.core.policy.trees import hnc_namespaces, plain_namespace, talk_tree
from tests.paths import REPO_ROOT

# The CRD schemas the project ships with its tests (tests/deploy/schemas, with their licences).
SCHEMAS = REPO_ROOT / "tests" / "deploy" / "schemas"
CILIUM_SCHEMA = SCHEMAS / "cilium.io" / "ciliumclusterwidenetworkpolicy_v2.json"
GOLDEN = Path(__file__).resolve().parent / "golden"
K8S_VERSION = "1.30"

SETTINGS = PolicySettings(apiserver_cidrs=("172.18.0.2/32",), cluster_cidrs=("10.244.0.0/16",))


# --------------------------------------------------------------------------- cluster fixtures


def metas_of(objs: Iterable[Mapping[str, Any]]) -> dict[str, NamespaceMeta]:
    out = {}
    for o in objs:
        m = o["metadata"]
        out[m["name"]] = NamespaceMeta(
            m["name"],
            MappingProxyType(dict(m.get("labels") or {})),
            MappingProxyType(dict(m.get("annotations") or {})),
        )
    return out


TALK_CONFIG = """
kubeAPIServer:
  cidrs: [172.18.0.2/32]
clusterCIDRs: [10.244.0.0/16, 10.96.0.0/12]
tenants:
  tenant-b:
    egressCIDRs: [198.51.100.7/32]
    egressPorts: ["5672/TCP"]
"""


def talk_networks() -> tuple[TenantNetwork, ...]:
    objs, services = talk_tree()
    resolution = resolve(
        [NamespaceInfo.from_object(o) for o in objs.values()],
        services,
        TenancySettings(strategies=("hnc",)),
    )
    config = parse_policy_config(TALK_CONFIG)
    networks, warnings = tenant_networks(
        resolution.table, config, metas_of(objs.values()), resolution.tenants
    )
    assert warnings == ()
    return networks


# --------------------------------------------------------------------------- the evaluator


def selector_matches(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """Kubernetes label selector semantics ({} matches everything)."""
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or ():
        key, op, values = e["key"], e["operator"], e.get("values") or []
        if op == "In":
            ok = key in labels and labels[key] in values
        elif op == "NotIn":
            ok = key not in labels or labels[key] not in values
        elif op == "Exists":
            ok = key in labels
        elif op == "DoesNotExist":
            ok = key not in labels
        else:  # pragma: no cover - would be a renderer bug
            raise AssertionError(f"unknown operator {op}")
        if not ok:
            return False
    return True


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    labels: Mapping[str, str]
    ip: str


@dataclass(frozen=True)
class World:
    pods: tuple[Pod, ...]
    ns_labels: Mapping[str, Mapping[str, str]]
    tenant_of_ns: Mapping[str, str]

    def tenant(self, pod: Pod) -> str | None:
        return self.tenant_of_ns.get(pod.namespace)


class NetworkPolicyEvaluator:
    """networking.k8s.io/v1 semantics: a pod selected by a policy of a direction is isolated in
    that direction and only the union of the rules admits traffic."""

    def __init__(self, policies: Sequence[Mapping[str, Any]], world: World) -> None:
        self.policies = policies
        self.world = world

    def selects(self, policy: Mapping[str, Any], pod: Pod) -> bool:
        return policy["metadata"]["namespace"] == pod.namespace and selector_matches(
            policy["spec"]["podSelector"], pod.labels
        )

    def peer_matches(self, peer: Mapping[str, Any], policy_ns: str, pod: Pod) -> bool:
        if "ipBlock" in peer:
            ip = ipaddress.ip_address(pod.ip)
            block = peer["ipBlock"]
            return ip in ipaddress.ip_network(block["cidr"]) and not any(
                ip in ipaddress.ip_network(e) for e in block.get("except") or ()
            )
        ns_sel = peer.get("namespaceSelector")
        if ns_sel is None:
            if pod.namespace != policy_ns:
                return False
        elif not selector_matches(ns_sel, self.world.ns_labels[pod.namespace]):
            return False
        pod_sel = peer.get("podSelector")
        return pod_sel is None or selector_matches(pod_sel, pod.labels)

    def rule_peers(self, rule: Mapping[str, Any], key: str, policy_ns: str, pod: Pod) -> bool:
        peers = rule.get(key)
        return not peers or any(self.peer_matches(p, policy_ns, pod) for p in peers)

    @staticmethod
    def ports_match(rule: Mapping[str, Any], port: int, protocol: str) -> bool:
        ports = rule.get("ports")
        if not ports:
            return True
        return any(
            p.get("protocol", "TCP") == protocol
            and p["port"] <= port <= p.get("endPort", p["port"])
            for p in ports
        )

    def rule_pairs(self) -> Iterable[tuple[str, Pod, Pod]]:
        """(policy name, source, destination) for every pair any rule admits (any port)."""
        pods = self.world.pods
        for pol in self.policies:
            ns = pol["metadata"]["namespace"]
            selected = [p for p in pods if self.selects(pol, p)]
            for rule in pol["spec"].get("egress") or ():
                peers = [p for p in pods if self.rule_peers(rule, "to", ns, p)]
                yield from ((pol["metadata"]["name"], s, d) for s in selected for d in peers)
            for rule in pol["spec"].get("ingress") or ():
                peers = [p for p in pods if self.rule_peers(rule, "from", ns, p)]
                yield from ((pol["metadata"]["name"], s, d) for d in selected for s in peers)

    def allowed(self, src: Pod, dst: Pod, port: int, protocol: str = "TCP") -> bool:
        for direction, subject, other, key in (
            ("Egress", src, dst, "to"),
            ("Ingress", dst, src, "from"),
        ):
            pols = [
                p
                for p in self.policies
                if direction in p["spec"]["policyTypes"] and self.selects(p, subject)
            ]
            if pols and not any(
                self.rule_peers(r, key, p["metadata"]["namespace"], other)
                and self.ports_match(r, port, protocol)
                for p in pols
                for r in p["spec"].get(direction.lower()) or ()
            ):
                return False
        return True


class CiliumEvaluator:
    """CiliumClusterwideNetworkPolicy semantics for pod-to-pod paths (entities and CIDR rules
    never select cluster endpoints; only the kube-apiserver entity is rendered)."""

    def __init__(self, policies: Sequence[Mapping[str, Any]], world: World) -> None:
        self.policies = policies
        self.world = world

    def labels(self, pod: Pod) -> dict[str, str]:
        out = {"k8s:io.kubernetes.pod.namespace": pod.namespace}
        out |= {f"k8s:{k}": v for k, v in pod.labels.items()}
        out |= {
            f"k8s:io.cilium.k8s.namespace.labels.{k}": v
            for k, v in self.world.ns_labels[pod.namespace].items()
        }
        return out

    def selects(self, policy: Mapping[str, Any], pod: Pod) -> bool:
        return selector_matches(policy["spec"]["endpointSelector"], self.labels(pod))

    def rule_peers(self, rule: Mapping[str, Any], prefix: str, pod: Pod) -> bool:
        for entity in rule.get(f"{prefix}Entities") or ():
            assert entity == "kube-apiserver", entity
        sels = rule.get(f"{prefix}Endpoints") or ()
        return any(selector_matches(s, self.labels(pod)) for s in sels)

    @staticmethod
    def ports_match(rule: Mapping[str, Any], port: int, protocol: str) -> bool:
        if "toPorts" not in rule:
            return True
        for pr in rule["toPorts"]:
            for p in pr["ports"]:
                lo = int(p["port"])
                if p.get("protocol", "ANY") in (protocol, "ANY") and lo <= port <= p.get(
                    "endPort", lo
                ):
                    return True
        return False

    def rule_pairs(self) -> Iterable[tuple[str, Pod, Pod]]:
        pods = self.world.pods
        for pol in self.policies:
            selected = [p for p in pods if self.selects(pol, p)]
            for rule in pol["spec"].get("egress") or ():
                peers = [p for p in pods if self.rule_peers(rule, "to", p)]
                yield from ((pol["metadata"]["name"], s, d) for s in selected for d in peers)
            for rule in pol["spec"].get("ingress") or ():
                peers = [p for p in pods if self.rule_peers(rule, "from", p)]
                yield from ((pol["metadata"]["name"], s, d) for d in selected for s in peers)

    def allowed(self, src: Pod, dst: Pod, port: int, protocol: str = "TCP") -> bool:
        for direction, subject, other, prefix in (
            ("egress", src, dst, "to"),
            ("ingress", dst, src, "from"),
        ):
            pols = [p for p in self.policies if direction in p["spec"] and self.selects(p, subject)]
            if pols and not any(
                self.rule_peers(r, prefix, other) and self.ports_match(r, port, protocol)
                for p in pols
                for r in p["spec"][direction]
            ):
                return False
        return True


def evaluator(kind: str, manifests: Sequence[Manifest], world: World) -> Any:
    bodies = [m.body for m in manifests]
    if kind == KIND_NETWORKPOLICY:
        return NetworkPolicyEvaluator(bodies, world)
    return CiliumEvaluator(bodies, world)


# --------------------------------------------------------------------------- world generator

KEDA_POD_LABELS = {
    "operator": {"app.kubernetes.io/name": "keda-operator"},
    "metrics": {"app.kubernetes.io/name": "keda-operator-metrics-apiserver"},
    "webhooks": {"app.kubernetes.io/name": "keda-admission-webhooks"},
}
IMPERSONATIONS = [
    {},
    {"app": "web"},
    *KEDA_POD_LABELS.values(),
    {"app.kubernetes.io/name": "metrics-router"},
    {"app.kubernetes.io/name": "prometheus"},
    {"k8s-app": "kube-dns"},
]
EVENT_CIDRS = ["0.0.0.0/0", "10.0.0.0/8", "203.0.113.0/24", "10.244.7.0/24", "::/0"]
TENANT_LABEL_KEY = "example.com/tenant"


@dataclass(frozen=True)
class Scenario:
    objs: dict[str, dict[str, Any]]
    tenancy: TenancySettings
    seed: int  # which labels the workload pods carry (some impersonate KEDA or the router)


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    n = draw(st.integers(2, 3))
    parents: dict[str, str | None] = {}
    roots = [f"t{i}" for i in range(n)]
    for r in roots:
        parents[r] = None
        nodes = [r]
        for j in range(draw(st.integers(0, 3))):
            parents[f"{r}-c{j}"] = draw(st.sampled_from(nodes))
            nodes.append(f"{r}-c{j}")
        if draw(st.booleans()):
            parents[f"{r}--sys"] = r  # KEDA inside the tenant's tree
    extra_labels: dict[str, dict[str, str]] = {}
    # A namespace inside t0's tree that the label strategy gives to t1 (when it goes first).
    if draw(st.booleans()):
        spot = draw(
            st.sampled_from(sorted(k for k in parents if k.startswith("t0") and "--" not in k))
        )
        parents["x-foreign"] = spot
        extra_labels["x-foreign"] = {TENANT_LABEL_KEY: "t1"}
        if draw(st.booleans()):
            parents["x-foreign-c"] = "x-foreign"  # ...with a child that stays t0's
        if draw(st.booleans()):
            parents["x-foreign-d"] = "x-foreign"
            extra_labels["x-foreign-d"] = {TENANT_LABEL_KEY: "t1"}
    annotations = {}
    for r in roots:
        cidrs = draw(st.lists(st.sampled_from(EVENT_CIDRS), max_size=3, unique=True))
        ports = draw(st.lists(st.sampled_from(["443", "5672/TCP", "8000-8100/UDP"]), max_size=2))
        annotations[r] = {
            ANNOTATION_EGRESS_CIDRS: ",".join(cidrs),
            ANNOTATION_EGRESS_PORTS: ",".join(ports),
        }
    objs = hnc_namespaces(parents, roots, extra_labels, annotations)
    for r in roots:
        objs.setdefault(f"{r}--sys", plain_namespace(f"{r}--sys"))  # KEDA outside the tree
    for extra in ("kube-system", "metrics-router", "monitoring", "unrelated"):
        objs[extra] = plain_namespace(extra)
    strategies = draw(st.sampled_from([("hnc", "label"), ("label", "hnc")]))
    tenancy = TenancySettings(
        strategies=strategies,
        tenant_label=TENANT_LABEL_KEY,
        upstream_template="https://keda-operator-metrics-apiserver.{tenant}--sys.svc:443",
    )
    return Scenario(objs, tenancy, draw(st.integers(0, 2**32)))


def build(scenario: Scenario, kind: str) -> tuple[tuple[Manifest, ...], World, dict[str, str]]:
    objs = scenario.objs
    resolution = resolve(
        [NamespaceInfo.from_object(o) for o in objs.values()], [], scenario.tenancy
    )
    networks, _ = tenant_networks(
        resolution.table,
        PolicyConfig(settings=SETTINGS),
        metas_of(objs.values()),
        resolution.tenants,
    )
    manifests = render(networks, SETTINGS, kind).manifests
    tenant_of_ns = {ns: t.name for t in networks for ns in t.namespaces}
    keda = {t.name: t.keda_namespace for t in networks}
    pods: list[Pod] = []
    ip = iter(ipaddress.ip_network("10.244.0.0/16").hosts())
    rng = random.Random(scenario.seed)
    for ns in sorted(objs):
        labels = rng.choice(IMPERSONATIONS)
        pods.append(Pod(f"{ns}/workload", ns, labels, str(next(ip))))
        pods.append(Pod(f"{ns}/plain", ns, {"app": "web"}, str(next(ip))))
    for tenant, ns in keda.items():
        for role, labels in KEDA_POD_LABELS.items():
            pods.append(Pod(f"{tenant}/{role}", ns, labels, str(next(ip))))
    pods.append(
        Pod("router", "metrics-router", {"app.kubernetes.io/name": "metrics-router"}, str(next(ip)))
    )
    pods.append(Pod("dns", "kube-system", {"k8s-app": "kube-dns"}, str(next(ip))))
    world = World(
        tuple(pods),
        {ns: o["metadata"]["labels"] for ns, o in objs.items()},
        tenant_of_ns,
    )
    return manifests, world, keda


# --------------------------------------------------------------------------- the property


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario=scenarios())
def test_no_rule_admits_a_path_between_tenants(kind: str, scenario: Scenario) -> None:
    manifests, world, keda = build(scenario, kind)
    ev = evaluator(kind, manifests, world)
    crossing = [
        (name, s.name, d.name)
        for name, s, d in ev.rule_pairs()
        if world.tenant(s) and world.tenant(d) and world.tenant(s) != world.tenant(d)
    ]
    assert crossing == []
    # The boundary holds because the KEDA pods are isolated, not by accident:
    by_name = {p.name: p for p in world.pods}
    router, dns = by_name["router"], by_name["dns"]
    tenants = sorted(keda)
    for t in tenants:
        op, ms = by_name[f"{t}/operator"], by_name[f"{t}/metrics"]
        assert ev.allowed(router, ms, 6443)
        assert ev.allowed(ms, op, 9666)
        assert ev.allowed(op, dns, 53, "UDP")
        own = [p for p in world.pods if world.tenant(p) == t and p.name.endswith("/plain")]
        assert own
        assert all(ev.allowed(op, p, 8080) for p in own)
        for other in tenants:
            if other == t:
                continue
            theirs = [p for p in world.pods if world.tenant(p) == other]
            assert not any(ev.allowed(op, p, port) for p in theirs for port in (443, 8080, 9666))
            assert not any(ev.allowed(p, ms, 6443) for p in theirs)
            assert not any(ev.allowed(p, op, 9666) for p in theirs)
        assert not ev.allowed(by_name["unrelated/plain"], ms, 6443)


# --------------------------------------------------------------------------- schemas


def all_renderings() -> Iterable[tuple[str, Manifest]]:
    networks = talk_networks()
    for kind in KINDS:
        for m in render(networks, SETTINGS, kind).manifests:
            yield kind, m


def test_networkpolicies_validate_against_kubernetes_schema() -> None:
    manifests = [m for k, m in all_renderings() if k == KIND_NETWORKPOLICY]
    assert len(manifests) == 9  # the router's + 4 per tenant
    for m in manifests:
        kubernetes_validate.validate(dict(m.body), K8S_VERSION, strict=True)


def test_kubernetes_validate_catches_a_broken_networkpolicy() -> None:
    m = next(m for k, m in all_renderings() if k == KIND_NETWORKPOLICY)
    broken = json.loads(json.dumps(m.body))
    broken["spec"]["podSelector"] = "everything"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


@pytest.fixture(scope="module")
def cilium_validator() -> jsonschema.Draft7Validator:
    schema = json.loads(CILIUM_SCHEMA.read_text())
    return jsonschema.Draft7Validator(schema)


def test_cilium_policies_validate_against_the_crd_schema(
    cilium_validator: jsonschema.Draft7Validator,
) -> None:
    manifests = [m for k, m in all_renderings() if k == KIND_CILIUM]
    assert len(manifests) == 9
    for m in manifests:
        errors = sorted(cilium_validator.iter_errors(m.body), key=str)
        assert errors == [], f"{m.key}: {[e.message for e in errors]}"
    broken = json.loads(json.dumps(manifests[0].body))
    broken["spec"]["egress"][0]["toPorts"] = [{"ports": [{"port": "53", "protocol": "ICMP"}]}]
    assert list(cilium_validator.iter_errors(broken))


@pytest.mark.parametrize("kind", KINDS)
def test_every_object_is_owned_labelled_and_validly_named(kind: str) -> None:
    for k, m in all_renderings():
        if k != kind:
            continue
        meta = m.body["metadata"]
        labels = meta["labels"]
        assert labels[OWNER_LABEL] == OWNER_VALUE
        if m.tenant is not None:
            assert labels[TENANT_LABEL] == m.tenant
        assert is_dns1123_subdomain(meta["name"])
        for key, value in labels.items():
            assert is_label_key(key)
            assert len(value) <= 63
        # An empty peer list would mean "everyone" in a NetworkPolicy rule.
        for direction, peer_key in (("ingress", "from"), ("egress", "to")):
            for rule in m.body["spec"].get(direction) or ():
                if kind == KIND_NETWORKPOLICY:
                    assert rule.get(peer_key), (m.key, rule)
                else:
                    assert any(k.startswith(peer_key) and v for k, v in rule.items()), rule


# --------------------------------------------------------------------------- golden files


@pytest.mark.parametrize("kind", KINDS)
def test_golden_files_for_the_talk_tree(kind: str) -> None:
    """UPDATE_GOLDEN=1 rewrites tests/core/policy/golden/<kind>/ from the current renderer."""
    manifests = render(talk_networks(), parse_policy_config(TALK_CONFIG).settings, kind).manifests
    directory = GOLDEN / kind
    if os.environ.get("UPDATE_GOLDEN") == "1":
        write_output_dir(directory, manifests, kind)
    expected = {p.name: p.read_text() for p in sorted(directory.glob("*.yaml"))}
    assert expected, f"no golden files in {directory}; run with UPDATE_GOLDEN=1"
    assert output_files(manifests, kind) == expected


def test_talk_tree_selects_tenants_by_hnc_label_and_reads_root_annotations() -> None:
    a, b = talk_networks()
    assert (a.name, a.keda_namespace, a.hnc_root, a.extra_namespaces) == (
        "tenant-a", "tenant-a--sys", "tenant-a", ()
    )  # fmt: skip
    assert a.event_sources == EventSources(
        ("203.0.113.0/24",), ("*.s3.amazonaws.com", "sqs.eu-west-1.amazonaws.com"), (PortSpec(443),)
    )
    # the file's tenants.tenant-b entry, not an annotation
    assert b.event_sources == EventSources(("198.51.100.7/32",), (), (PortSpec(5672),))


def test_rendering_is_independent_of_input_order() -> None:
    networks = list(talk_networks())
    first = render(networks, SETTINGS, KIND_NETWORKPOLICY)
    networks.reverse()
    again = render(networks, SETTINGS, KIND_NETWORKPOLICY)
    assert output_files(first.manifests, KIND_NETWORKPOLICY) == output_files(
        again.manifests, KIND_NETWORKPOLICY
    )


# --------------------------------------------------------------------------- specific rules


def routes(text: str) -> RouteTable:
    return parse_routes_file(text)


def test_routes_file_tenants_are_selected_by_name_and_keda_namespace_derived() -> None:
    networks, _ = tenant_networks(routes(DESIGN_ROUTES), PolicyConfig(settings=SETTINGS))
    a, b = networks
    assert a.keda_namespace == "tenant-a--sys"  # from serverName
    assert b.keda_namespace == "b--sys"  # from the template
    assert a.namespaces == ("tenant-a", "tenant-a--dev", "tenant-a--sys")
    assert a.hnc_root is None
    np = next(
        m for m in render(networks, SETTINGS, KIND_NETWORKPOLICY).manifests
        if m.key.name == "metrics-router-a-keda-operator"
    )  # fmt: skip
    assert np.body["spec"]["egress"][0]["to"] == [
        {
            "namespaceSelector": {
                "matchExpressions": [
                    {
                        "key": "kubernetes.io/metadata.name",
                        "operator": "In",
                        "values": ["tenant-a", "tenant-a--dev", "tenant-a--sys"],
                    }
                ]
            }
        }
    ]


def test_keda_namespace_precedence() -> None:
    config = parse_policy_config(
        "tenants: {a: {kedaNamespace: keda-a}}\nkeda: {namespaceTemplate: 'k-{tenant}'}"
    )
    assert keda_namespace_for("a", "svc.other.svc", config) == "keda-a"
    assert keda_namespace_for("b", "svc.ns-b.svc.cluster.local", config) == "ns-b"
    assert keda_namespace_for("b", "127.0.0.1", config) == "k-b"
    assert keda_namespace_for("b", None, config) == "k-b"


def test_file_wins_over_annotation_which_wins_over_defaults() -> None:
    defaults = EventSources(("192.0.2.0/24",), ("d.example",), (PortSpec(1),))
    file_entry = TenantOverrides(cidrs=("198.51.100.0/24",))
    annotation = TenantOverrides(cidrs=("203.0.113.0/24",), fqdns=("a.example",))
    merged = merge_event_sources(file_entry, annotation, defaults)
    assert merged == EventSources(("198.51.100.0/24",), ("a.example",), (PortSpec(1),))
    assert merge_event_sources(None, None, defaults) == defaults
    # an explicitly empty annotation turns a default off
    assert merge_event_sources(None, TenantOverrides(ports=()), defaults).ports == ()


def test_annotations_can_be_switched_off_and_bad_entries_are_reported() -> None:
    objs = {
        "tenant-a": plain_namespace("tenant-a"),
    }
    objs["tenant-a"]["metadata"]["annotations"] = {
        ANNOTATION_EGRESS_CIDRS: "203.0.113.0/24,not-a-cidr",
        ANNOTATION_EGRESS_PORTS: "443,99999",
    }
    table = routes(
        "tenants: {tenant-a: {namespaces: [tenant-a], upstream: 'https://x.tenant-a.svc'}}"
    )
    networks, warnings = tenant_networks(
        table, PolicyConfig(settings=SETTINGS), metas_of(objs.values())
    )
    assert networks[0].event_sources.cidrs == ("203.0.113.0/24",)
    assert networks[0].event_sources.ports == (PortSpec(443),)
    assert len(warnings) == 2
    assert "not-a-cidr" in warnings[0]
    assert "99999" in warnings[1]
    off = PolicyConfig(settings=SETTINGS, namespace_annotations=False)
    networks, warnings = tenant_networks(table, off, metas_of(objs.values()))
    assert networks[0].event_sources == EventSources()
    assert warnings == ()


def test_event_source_cidrs_exclude_the_cluster_network_and_fqdns_need_cilium() -> None:
    net = TenantNetwork(
        "a",
        ("tenant-a", "tenant-a--sys"),
        "tenant-a--sys",
        event_sources=EventSources(("0.0.0.0/0", "10.244.9.0/24"), ("sqs.example.com",), ()),
    )
    rendering = render([net], SETTINGS, KIND_NETWORKPOLICY)
    assert any("10.244.9.0/24" in w and "inside the cluster" in w for w in rendering.warnings)
    assert any("FQDNs" in w for w in rendering.warnings)
    op = next(m for m in rendering.manifests if m.key.name.endswith("keda-operator"))
    assert op.body["spec"]["egress"][-1] == {
        "to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.244.0.0/16"]}}]
    }
    cilium = render([net], SETTINGS, KIND_CILIUM)
    assert not any("FQDNs" in w for w in cilium.warnings)
    op = next(m for m in cilium.manifests if m.key.name.endswith("keda-operator"))
    assert op.body["spec"]["egress"][-1] == {"toFQDNs": [{"matchName": "sqs.example.com"}]}
    dns_rule = op.body["spec"]["egress"][1]
    assert dns_rule["toPorts"][0]["rules"] == {"dns": [{"matchPattern": "*"}]}


def test_nested_foreign_subtree_is_cut_out_of_the_hnc_selector() -> None:
    parents = {"t0": None, "t0-c": "t0", "x": "t0", "x-c": "x", "t1": None}
    objs = hnc_namespaces(
        parents, ("t0", "t1"), {"x": {TENANT_LABEL_KEY: "t1"}, "x-c": {TENANT_LABEL_KEY: "t1"}}
    )
    tenancy = TenancySettings(strategies=("label", "hnc"), tenant_label=TENANT_LABEL_KEY,
                              upstream_template="https://k.{tenant}--sys.svc")  # fmt: skip
    res = resolve([NamespaceInfo.from_object(o) for o in objs.values()], [], tenancy)
    assert res.tenants["t1"] == ("t1", "x", "x-c")
    networks, _ = tenant_networks(
        res.table, PolicyConfig(settings=SETTINGS), metas_of(objs.values()), res.tenants
    )
    t0 = networks[0]
    assert (t0.hnc_root, t0.hnc_exclude, t0.extra_namespaces) == ("t0", ("x",), ("t0--sys",))


def test_foreign_namespace_above_our_own_falls_back_to_names() -> None:
    parents = {"t0": None, "x": "t0", "x-c": "x"}
    objs = hnc_namespaces(parents, ("t0",), {"x": {TENANT_LABEL_KEY: "t1"}})
    tenancy = TenancySettings(strategies=("label", "hnc"), tenant_label=TENANT_LABEL_KEY,
                              upstream_template="https://k.{tenant}--sys.svc")  # fmt: skip
    res = resolve([NamespaceInfo.from_object(o) for o in objs.values()], [], tenancy)
    networks, _ = tenant_networks(
        res.table, PolicyConfig(settings=SETTINGS), metas_of(objs.values()), res.tenants
    )
    t0 = next(n for n in networks if n.name == "t0")
    assert t0.hnc_root is None
    assert t0.namespaces == ("t0", "t0--sys", "x-c")


@pytest.mark.parametrize(
    ("networks", "settings_", "message"),
    [
        (
            [
                TenantNetwork("a", ("a", "shared"), "shared"),
                TenantNetwork("b", ("b", "shared"), "shared"),
            ],
            SETTINGS,
            "belongs to tenants 'a' and 'b'",
        ),
        ([TenantNetwork("a", ("a", "metrics-router"), "a")], SETTINGS, "router's namespace"),
        ([TenantNetwork("a", ("a",), "a")], PolicySettings(), "kube-apiserver's addresses"),
        ([TenantNetwork("a", ("a",), "a--sys")], SETTINGS, "not listed"),
    ],
)
def test_render_refuses_unsafe_inputs(
    networks: list[TenantNetwork], settings_: PolicySettings, message: str
) -> None:
    with pytest.raises(ManifestError, match=message):
        render(networks, settings_, KIND_NETWORKPOLICY)


# --------------------------------------------------------------------------- names


@settings(max_examples=200, deadline=None)
@given(tenant=st.text(min_size=1, max_size=300))
@example(tenant="0\n")  # `$` matches before a final newline: names use fullmatch
def test_names_and_labels_are_valid_for_any_tenant_name(tenant: str) -> None:
    slug = tenant_slug(tenant)
    assert is_dns1123_label(slug)
    for component in (
        "keda-operator",
        "keda-metrics-apiserver",
        "keda-admission-webhooks",
        "router-egress",
    ):
        name = object_name(tenant, component)
        assert is_dns1123_subdomain(name)
        assert len(name) <= 253
    value = tenant_label_value(tenant)
    assert len(value) <= 63
    if tenant != value:
        assert slug == value


def test_long_and_odd_tenant_names_are_hash_truncated_distinctly() -> None:
    long_a, long_b = "a" * 80, "a" * 79 + "b"
    assert tenant_slug(long_a) != tenant_slug(long_b)
    assert len(tenant_slug(long_a)) <= 63
    assert tenant_slug("Team_Blue") != tenant_slug("team-blue")
    assert tenant_slug("tenant-a") == "tenant-a"
    assert tenant_label_value("Team_Blue") == "Team_Blue"  # a valid label value stays


# --------------------------------------------------------------------------- config parsing


def test_policy_config_full_example() -> None:
    config = parse_policy_config(
        """
router: {namespace: mr, podLabels: {app: mr}, securePort: 8443, metricsPort: 9100}
scraper: {namespaceLabels: {team: obs}, podLabels: {app: prom}}
keda:
  namespaceTemplate: "keda-{tenant}"
  metricsServer: {podLabels: {app: ms}, port: 7443}
  operator: {podLabels: {app: op}, grpcPort: 9000}
  admissionWebhooks: {podLabels: {app: wh}, port: 9444}
dns: {namespace: dns, podLabels: {app: coredns}, port: 5353}
kubeAPIServer: {cidrs: [10.0.0.1], ports: [6443], ciliumEntities: [kube-apiserver, remote-node]}
clusterCIDRs: [10.244.0.0/16]
namespaceAnnotations: false
defaults: {egressPorts: ["443"]}
tenants:
  a: {egressCIDRs: [203.0.113.0/24], egressFQDNs: ["*.example.com"], kedaNamespace: ka}
"""
    )
    s = config.settings
    assert (s.router_namespace, s.router_pod_labels, s.secure_port, s.metrics_port) == (
        "mr", (("app", "mr"),), 8443, 9100
    )  # fmt: skip
    assert s.apiserver_cidrs == ("10.0.0.1/32",)
    assert s.apiserver_ports == (6443,)
    assert s.apiserver_entities == ("kube-apiserver", "remote-node")
    assert (s.dns_namespace, s.dns_port, s.keda_namespace_template) == (
        "dns",
        5353,
        "keda-{tenant}",
    )
    assert config.namespace_annotations is False
    assert config.defaults.ports == (PortSpec(443),)
    assert config.tenants["a"] == TenantOverrides(
        ("203.0.113.0/24",), ("*.example.com",), None, "ka"
    )


def test_policy_config_reports_every_error() -> None:
    with pytest.raises(ManifestError) as info:
        parse_policy_config(
            "bogus: 1\nrouter: {securePort: 70000, namespace: Not_Valid}\n"
            "clusterCIDRs: [x]\ntenants: {a: {egressPorts: ['1/ICMP'], what: 1}}\n"
            "keda: {namespaceTemplate: nope}\n"
        )
    text = "\n".join(info.value.errors)
    for needle in ("bogus", "securePort", "namespace", "'x'", "ICMP", "what", "namespaceTemplate"):
        assert needle in text
    assert parse_policy_config("") == PolicyConfig()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("443", PortSpec(443)),
        ("53/udp", PortSpec(53, "UDP")),
        ("8000-8100/TCP", PortSpec(8000, "TCP", 8100)),
    ],
)
def test_port_spec_parse(text: str, expected: PortSpec) -> None:
    assert PortSpec.parse(text) == expected


@pytest.mark.parametrize("text", ["0", "70000", "9-3", "x", "80/ICMP", "1-70000"])
def test_port_spec_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="port"):
        PortSpec.parse(text)


# --------------------------------------------------------------------------- plan


def cluster_copy(m: Manifest, **extra_meta: Any) -> dict[str, Any]:
    obj: dict[str, Any] = json.loads(json.dumps(m.body))
    obj["metadata"] |= {"uid": "u", "resourceVersion": "7", **extra_meta}
    return obj


def test_plan_applies_missing_and_changed_leaves_equal_ones_and_prunes_only_owned() -> None:
    manifests = render(talk_networks(), SETTINGS, KIND_NETWORKPOLICY).manifests
    kept, edited, missing = manifests[0], manifests[1], manifests[2]
    hand_edited = cluster_copy(edited)
    hand_edited["spec"]["egress"] = []
    stale = cluster_copy(manifests[3])
    stale["metadata"]["name"] = "metrics-router-gone-keda-operator"
    foreign = cluster_copy(manifests[4])
    foreign["metadata"]["name"] = "someone-elses"
    foreign["metadata"]["labels"] = {"app.kubernetes.io/managed-by": "helm"}
    actual = [cluster_copy(kept, managedFields=[]), hand_edited, stale, foreign]
    actual += [cluster_copy(m) for m in manifests[3:]]
    result = plan(manifests, actual)
    assert [m.key for m in result.apply] == sorted([edited.key, missing.key])
    assert [k.name for k in result.delete] == ["metrics-router-gone-keda-operator"]
    # Nothing to do when the cluster holds everything.
    assert plan(manifests, [cluster_copy(m) for m in manifests]).apply == ()


@settings(max_examples=50, deadline=None)
@given(
    labels=st.dictionaries(
        st.sampled_from([OWNER_LABEL, "other", TENANT_LABEL]), st.text(max_size=20)
    )
)
def test_plan_never_deletes_an_object_without_the_ownership_label(labels: dict[str, str]) -> None:
    obj = {
        "apiVersion": NETWORKPOLICY_API[0],
        "kind": NETWORKPOLICY_API[1],
        "metadata": {"name": "x", "namespace": "y", "labels": labels},
    }
    deleted = plan([], [obj]).delete
    assert bool(deleted) == (labels.get(OWNER_LABEL) == OWNER_VALUE)
    cilium = {"apiVersion": CILIUM_API[0], "kind": CILIUM_API[1], "metadata": {"name": "x"}}
    assert plan([], [cilium]).delete == ()
