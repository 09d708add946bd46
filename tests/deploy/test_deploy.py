"""deploy/: every manifest valid, the kustomizations rendered, and the pieces agreeing.

Core kinds are validated with kubernetes-validate (Kubernetes 1.32, strict); cert-manager,
Prometheus Operator, Cilium, KEDA and HNC kinds against the schemas shipped in tests/deploy/schemas
(see its README for their sources and licences).
Kustomizations are rendered with `kubectl kustomize` (kustomize built into kubectl); the tenant
KEDA overlay runs through deploy/keda/post-render on a stand-in for the chart's output.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from router.cli import tenancy_options
from router.core.apiservice import apiservice
from router.devtools import pki as certs
from tests.paths import REPO_ROOT

ROOT = REPO_ROOT
DEPLOY = ROOT / "deploy"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
K8S_VERSION = "1.32"
KUBECTL = shutil.which("kubectl")

needs_kubectl = pytest.mark.skipif(
    KUBECTL is None,
    reason="kubectl not found: it renders the kustomizations (`kubectl kustomize`, kustomize "
    "built in); install kubectl >= 1.27 to run these tests",
)

# Every Kustomization under deploy/ (directories with kind: Kustomization). Components are
# rendered through the overlays and the KEDA post-renderer that use them.
KUSTOMIZATIONS = (
    "router",
    "apiservice",
    "upstream-ca",
    "monitoring",
    "overlays/managed-policies",
    "overlays/doctor",
    "hnc/tenant-a",
)


def registered_metrics() -> tuple[frozenset[str], frozenset[str]]:
    """(every sample name family, histogram families) that the code registers."""
    from prometheus_client import CollectorRegistry

    from router.metrics import (
        ClusterMetrics,
        ExpiryWarnings,
        PolicyMetrics,
        ProxyMetrics,
        ReloaderMetrics,
        ReloadState,
    )
    from router.reloader.decide import REASONS

    registry = CollectorRegistry()
    ProxyMetrics(registry)
    ClusterMetrics(registry)
    PolicyMetrics(registry)
    ReloaderMetrics(registry, REASONS)
    ExpiryWarnings(registry, 0)
    ReloadState(registry)
    names: set[str] = set()
    histograms: set[str] = set()
    for family in registry.collect():
        names.add(family.name)
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            histograms.add(family.name)
    return frozenset(names), frozenset(histograms)


RESERVED_METRICS, RESERVED_HISTOGRAMS = registered_metrics()


def test_registered_metrics_include_the_proxy_and_cluster_families() -> None:
    # Guards the helper above: an empty registry would make every dashboard check vacuous.
    assert "metrics_router_requests_total" in RESERVED_METRICS
    assert "metrics_router_reloader_child_up" in RESERVED_METRICS
    assert {
        "metrics_router_request_duration_seconds",
        "metrics_router_stale_answer_age_seconds",
    } == RESERVED_HISTOGRAMS


# Metrics the alerts read from other exporters.
EXTERNAL_METRICS = frozenset({"up", "aggregator_unavailable_apiservice"})

CRD_GROUPS = frozenset(
    {"cert-manager.io", "cilium.io", "monitoring.coreos.com", "keda.sh", "hnc.x-k8s.io"}
)


# --------------------------------------------------------------------------- helpers


def kustomize(directory: Path) -> list[dict[str, Any]]:
    assert KUBECTL is not None
    proc = subprocess.run(
        [KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, f"kubectl kustomize {directory} failed:\n{proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@functools.cache
def _rendered(name: str) -> tuple[dict[str, Any], ...]:
    return tuple(kustomize(DEPLOY / name))


def rendered(name: str) -> list[dict[str, Any]]:
    """A rendered kustomization (cached: each directory is built once per session)."""
    return copy.deepcopy(list(_rendered(name)))


def find(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [
        o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]


def one(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = find(objs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


@functools.cache
def crd_schema(group: str, version: str, kind: str) -> dict[str, Any]:
    directory = SCHEMAS / group
    assert directory.is_dir(), f"no CRD schemas for {group} in {SCHEMAS}"
    json_file = directory / f"{kind.lower()}_{version}.json"
    if json_file.is_file():
        schema: dict[str, Any] = json.loads(json_file.read_text())
        return schema
    for crd_file in sorted(directory.glob("*.yaml")):
        crd = yaml.safe_load(crd_file.read_text())
        if crd["spec"]["names"]["kind"] != kind:
            continue
        for v in crd["spec"]["versions"]:
            if v["name"] == version:
                openapi: dict[str, Any] = v["schema"]["openAPIV3Schema"]
                return openapi
    raise AssertionError(f"no schema for {group}/{version} {kind} in {directory}")


def validate(obj: dict[str, Any]) -> None:
    """Validate one object; raise with its kind and name on failure."""
    api_version, kind = obj["apiVersion"], obj["kind"]
    group, _, version = api_version.rpartition("/")
    where = f"{kind} {obj.get('metadata', {}).get('namespace', '')}/{obj['metadata']['name']}"
    if group in CRD_GROUPS:
        try:
            jsonschema.Draft7Validator(crd_schema(group, version, kind)).validate(obj)
        except jsonschema.ValidationError as exc:
            raise AssertionError(f"{where}: {exc.message} at {list(exc.absolute_path)}") from exc
        return
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        raise AssertionError(f"{where}: {exc}") from exc


def manifest_files() -> Iterator[Path]:
    """YAML files under deploy/ holding Kubernetes objects (not kustomize or Helm config)."""
    for path in sorted(DEPLOY.rglob("*.yaml")):
        if path.name == "kustomization.yaml" or path.name.startswith("values"):
            continue
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        if docs and all(d.get("apiVersion") == "builtin" for d in docs):
            continue  # kustomize transformer configuration
        yield path


def container(deployment: dict[str, Any], index: int = 0) -> dict[str, Any]:
    c: dict[str, Any] = deployment["spec"]["template"]["spec"]["containers"][index]
    return c


def rbac_rules(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for o in objs if o["kind"] in ("Role", "ClusterRole") for r in o.get("rules", [])]


_PROMQL_WORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or"}
    | {"unless", "offset"}
)


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers that are not functions, keywords,
    labels (inside {...} or by/without/on/ignoring lists), strings or range durations."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"\{[^}]*\}", "", s)
    s = re.sub(r"\[[^\]]*\]", "", s)
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", s)
    names: set[str] = set()
    for m in re.finditer(r"(?<![\w$.])[A-Za-z_:][A-Za-z0-9_:]*", s):
        if s[m.end() :].lstrip().startswith("(") or m.group(0) in _PROMQL_WORDS:
            continue
        names.add(m.group(0))
    return names


def known_metric(name: str) -> bool:
    if name in RESERVED_METRICS or name in EXTERNAL_METRICS:
        return True
    base, _, suffix = name.rpartition("_")
    return suffix in ("bucket", "sum", "count") and base in RESERVED_HISTOGRAMS


def alert_exprs() -> list[str]:
    docs = list(yaml.safe_load_all((DEPLOY / "monitoring/prometheusrule.yaml").read_text()))
    rule = one(docs, "PrometheusRule")
    return [r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]]


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(
        (DEPLOY / "monitoring/dashboards/metrics-router.json").read_text()
    )
    return data


def dashboard_exprs() -> list[str]:
    exprs = [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]
    for var in dashboard()["templating"]["list"]:
        query = var.get("query")
        if isinstance(query, dict):
            m = re.match(r"label_values\((\w+)", query.get("query", ""))
            if m:
                exprs.append(m.group(1))
    return exprs


def serve_parser() -> argparse.ArgumentParser:
    from router.cli import serve

    parser = argparse.ArgumentParser(prog="metrics-router serve", exit_on_error=False)
    serve.add_arguments(parser)
    return parser


# --------------------------------------------------------------------------- every manifest


@pytest.mark.parametrize("path", list(manifest_files()), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_manifest_file_validates(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs, f"{path} holds no object"
    for doc in docs:
        validate(doc)


def test_no_key_material_in_deploy() -> None:
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            assert "-----BEGIN" not in path.read_text(), f"{path} contains PEM material"


def test_every_kustomization_is_rendered_by_these_tests() -> None:
    found = set()
    for k in DEPLOY.rglob("kustomization.yaml"):
        if yaml.safe_load(k.read_text()).get("kind", "Kustomization") == "Kustomization":
            found.add(str(k.parent.relative_to(DEPLOY)))
    assert found == set(KUSTOMIZATIONS)


@needs_kubectl
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_kustomization_renders_valid_objects(name: str) -> None:
    objs = rendered(name)
    assert objs
    for obj in objs:
        validate(obj)


def test_readme_applies_every_kustomization() -> None:
    readme = (DEPLOY / "README.md").read_text()
    for name in KUSTOMIZATIONS:
        assert f"kubectl apply -k deploy/{name}" in readme, name


def test_validator_rejects_an_invalid_object() -> None:
    bad = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"bogus": 1}}
    with pytest.raises(AssertionError, match="bogus"):
        validate(bad)
    bad_cert = {
        "apiVersion": "cert-manager.io/v1",
        "kind": "Certificate",
        "metadata": {"name": "x", "namespace": "y"},
        "spec": {"secretName": "x", "issuerRef": {"name": "i"}, "duration": 5},
    }
    with pytest.raises(AssertionError, match="Certificate y/x"):
        validate(bad_cert)


# --------------------------------------------------------------------------- the router


@needs_kubectl
def test_router_deployment_is_hardened() -> None:
    objs = rendered("router")
    dep = one(objs, "Deployment", "metrics-router")
    pod = dep["spec"]["template"]["spec"]
    c = container(dep)
    assert dep["spec"]["replicas"] == 2
    anti = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert (
        anti[0]["podAffinityTerm"]["labelSelector"]["matchLabels"]
        == dep["spec"]["selector"]["matchLabels"]
    )
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 65532
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert c["resources"]["requests"]
    assert c["resources"]["limits"]["memory"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"https": 6443, "metrics": 9090}
    for probe, path in (("livenessProbe", "/livez"), ("readinessProbe", "/readyz")):
        get = c[probe]["httpGet"]
        assert (get["scheme"], get["path"], ports[get["port"]]) == ("HTTPS", path, 6443)
    # Only the router pod gets the token; the account does not hand it out by default.
    assert one(objs, "ServiceAccount", "metrics-router")["automountServiceAccountToken"] is False
    assert pod["automountServiceAccountToken"] is True
    assert pod["serviceAccountName"] == "metrics-router"


@needs_kubectl
def test_router_args_parse_and_point_at_mounted_certificates() -> None:
    objs = rendered("router")
    dep = one(objs, "Deployment", "metrics-router")
    c = container(dep)
    assert c["args"][0] == "serve"
    args, unknown = serve_parser().parse_known_args(c["args"][1:])
    assert unknown == []
    assert args.secure_port == 6443
    assert args.metrics_bind_address == "0.0.0.0:9090"
    # In-cluster: routes and requestheader settings come from the cluster, not flags.
    assert args.routes_file is None
    assert args.kubeconfig is None
    assert args.requestheader_client_ca_file is None
    errors: list[str] = []
    tenancy_options.tenancy_from_args(args, errors)
    assert errors == []

    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    cert_secrets = {o["spec"]["secretName"]: o for o in find(objs, "Certificate")}
    files = {
        "tls_cert_file": ("secret", "metrics-router-serving"),
        "tls_private_key_file": ("secret", "metrics-router-serving"),
        "proxy_client_cert_file": ("secret", "metrics-router-client"),
        "proxy_client_key_file": ("secret", "metrics-router-client"),
        "upstream_ca_file": ("configMap", certs.ROUTER_UPSTREAM_CA_CONFIGMAP),
    }
    for attr, (source, name) in files.items():
        path = getattr(args, attr)
        volume = volumes[mounts[str(path.parent)]]
        if source == "secret":
            assert volume["secret"]["secretName"] == name
            assert name in cert_secrets, f"no Certificate writes Secret {name}"
        else:
            assert volume["configMap"]["name"] == name
            assert path.name in {i["path"] for i in volume["configMap"]["items"]}
    # The same Secret names as `metrics-router certs` writes for clusters without cert-manager.
    assert certs.ROUTER_SERVING_SECRET == "metrics-router-serving"
    assert certs.ROUTER_CLIENT_SECRET == "metrics-router-client"


@needs_kubectl
def test_router_tenant_pattern_names_tenants_like_the_hnc_example() -> None:
    dep = one(rendered("router"), "Deployment", "metrics-router")
    args, _ = serve_parser().parse_known_args(container(dep)["args"][1:])
    pattern = re.compile(args.tenant_pattern)
    root = one(rendered("hnc/tenant-a"), "Namespace")["metadata"]["name"]
    anchors = [a["metadata"]["name"] for a in find(rendered("hnc/tenant-a"), "SubnamespaceAnchor")]
    assert anchors
    for ns in (root, *anchors):
        m = pattern.match(ns)
        assert m is not None, ns
        assert m.group("tenant") == root, ns


@needs_kubectl
def test_router_rolls_out_without_losing_requests() -> None:
    dep = one(rendered("router"), "Deployment", "metrics-router")
    args, _ = serve_parser().parse_known_args(container(dep)["args"][1:])
    # The default pattern is the convention: deploy/ no longer overrides it.
    assert args.tenant_pattern == tenancy_options.DEFAULT_TENANT_PATTERN
    assert args.shutdown_delay_duration >= 5
    pod = dep["spec"]["template"]["spec"]
    needed = args.shutdown_delay_duration + args.shutdown_grace_period
    assert pod["terminationGracePeriodSeconds"] > needed
    probe = container(dep)["readinessProbe"]["httpGet"]
    assert probe["path"] == "/readyz"


@needs_kubectl
def test_router_certificates() -> None:
    objs = rendered("router")
    serving = one(objs, "Certificate", "metrics-router-serving")
    svc = one(objs, "Service", "metrics-router")
    assert (
        f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc"
        in serving["spec"]["dnsNames"]
    )
    assert "server auth" in serving["spec"]["usages"]
    client = one(objs, "Certificate", "metrics-router-client")
    assert client["spec"]["commonName"] == certs.ROUTER_CLIENT_CN
    assert client["spec"]["usages"] == ["client auth", "digital signature"]
    # The client CA is the router's own, never the front-proxy CA, and namespaced.
    issuer = one(objs, "Issuer", client["spec"]["issuerRef"]["name"])
    ca = one(objs, "Certificate", "metrics-router-client-ca")
    assert issuer["spec"]["ca"]["secretName"] == ca["spec"]["secretName"]
    assert ca["spec"]["isCA"] is True
    assert not find(objs, "ClusterIssuer")


@needs_kubectl
def test_router_service_pdb_and_networkpolicy_select_the_pods() -> None:
    objs = rendered("router")
    dep = one(objs, "Deployment", "metrics-router")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    svc = one(objs, "Service", "metrics-router")
    assert svc["spec"]["selector"].items() <= labels.items()
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in svc["spec"]["ports"]}
    assert ports == {"https": (443, "https"), "metrics": (9090, "metrics")}
    pdb = one(objs, "PodDisruptionBudget", "metrics-router")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] == 1
    np = one(objs, "NetworkPolicy")
    assert np["spec"]["podSelector"]["matchLabels"].items() <= labels.items()


@needs_kubectl
def test_router_rbac_is_least_privilege() -> None:
    objs = rendered("router")
    for binding in find(objs, "ClusterRoleBinding") + find(objs, "RoleBinding"):
        assert binding["roleRef"]["name"] != "system:auth-delegator"
    rules = rbac_rules(objs)
    for rule in rules:
        assert "secrets" not in rule["resources"]
        assert "*" not in rule["verbs"]
        assert "*" not in rule["resources"]
    cluster_role = one(objs, "ClusterRole", "metrics-router")
    assert cluster_role["rules"] == [
        {"apiGroups": [""], "resources": ["namespaces", "services"], "verbs": ["list", "watch"]}
    ]
    reader = one(objs, "RoleBinding", "metrics-router-auth-reader")
    assert reader["metadata"]["namespace"] == "kube-system"
    assert reader["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "extension-apiserver-authentication-reader",
    }
    leases = one(objs, "Role", "metrics-router-leader-election")
    assert leases["metadata"]["namespace"] == "metrics-router"
    assert leases["rules"][0]["resources"] == ["leases"]
    writes = {"create", "update", "patch", "delete"}
    write_rules = [r for r in rules if writes & set(r["verbs"])]
    assert write_rules == leases["rules"]


@needs_kubectl
def test_managed_policies_overlay_adds_flag_and_only_policy_writes() -> None:
    base = rendered("router")
    objs = rendered("overlays/managed-policies")
    base_args = container(one(base, "Deployment", "metrics-router"))["args"]
    args = container(one(objs, "Deployment", "metrics-router"))["args"]
    assert args == [*base_args, "--manage-network-policies"]
    role = one(objs, "ClusterRole", "metrics-router-network-policies")
    granted = {
        (g, r) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
    }
    assert granted == {
        ("networking.k8s.io", "networkpolicies"),
        ("cilium.io", "ciliumclusterwidenetworkpolicies"),
    }
    for rule in role["rules"]:
        assert set(rule["verbs"]) == {"get", "list", "watch", "create", "patch", "delete"}
    binding = one(objs, "ClusterRoleBinding", "metrics-router-network-policies")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "metrics-router", "namespace": "metrics-router"}
    ]


@needs_kubectl
def test_doctor_overlay_grants_reads_only_and_leaves_the_router_unchanged() -> None:
    base = rendered("router")
    objs = rendered("overlays/doctor")
    assert container(one(objs, "Deployment", "metrics-router")) == container(
        one(base, "Deployment", "metrics-router")
    )
    role = one(objs, "ClusterRole", "metrics-router-doctor")
    granted = {
        (g, r) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
    }
    # what router/doctor/gather.py reads: checks 1, 4, 6 and 7
    assert granted == {
        ("apiregistration.k8s.io", "apiservices"),
        ("", "services"),
        ("discovery.k8s.io", "endpointslices"),
        ("apps", "deployments"),
        ("networking.k8s.io", "networkpolicies"),
        ("cilium.io", "ciliumclusterwidenetworkpolicies"),
    }
    for rule in role["rules"]:
        assert set(rule["verbs"]) <= {"get", "list"}, rule
    binding = one(objs, "ClusterRoleBinding", "metrics-router-doctor")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "metrics-router", "namespace": "metrics-router"}
    ]


# --------------------------------------------------------------------------- the APIService


@needs_kubectl
def test_apiservice_manifest_matches_render_and_points_at_the_router(
    ca_pem: bytes,
) -> None:
    objs = rendered("apiservice")
    api = one(objs, "APIService", "v1beta1.external.metrics.k8s.io")
    expected = apiservice(ca_pem)
    del expected["spec"]["caBundle"]
    assert api["spec"] == expected["spec"]
    router = rendered("router")
    svc = one(router, "Service")
    spec_svc = api["spec"]["service"]
    assert (spec_svc["namespace"], spec_svc["name"]) == (
        svc["metadata"]["namespace"],
        svc["metadata"]["name"],
    )
    assert spec_svc["port"] in {p["port"] for p in svc["spec"]["ports"] if p["name"] == "https"}
    ns, _, cert_name = api["metadata"]["annotations"]["cert-manager.io/inject-ca-from"].partition(
        "/"
    )
    cert = one(router, "Certificate", cert_name)
    assert cert["metadata"]["namespace"] == ns


@pytest.fixture
def ca_pem() -> bytes:
    return certs.make_ca("test-serving-ca").cert_pem()


@needs_kubectl
def test_upstream_ca_is_a_cluster_issuer_backed_by_a_ca_in_cert_managers_namespace() -> None:
    objs = rendered("upstream-ca")
    issuer = one(objs, "ClusterIssuer", "metrics-router-upstream-ca")
    ca = one(objs, "Certificate", "metrics-router-upstream-ca")
    assert ca["metadata"]["namespace"] == "cert-manager"
    assert ca["spec"]["isCA"] is True
    assert issuer["spec"]["ca"]["secretName"] == ca["spec"]["secretName"]


# --------------------------------------------------------------------------- monitoring


def test_alerts_and_dashboard_reference_only_known_metrics() -> None:
    referenced: set[str] = set()
    for expr in alert_exprs() + dashboard_exprs():
        names = promql_metric_names(expr)
        assert names, f"no metric found in {expr!r}"
        referenced |= names
    unknown = sorted(n for n in referenced if not known_metric(n))
    assert unknown == []


def test_alerts_cover_upstream_errors_certificates_and_sync() -> None:
    names = set().union(*(promql_metric_names(e) for e in alert_exprs()))
    assert {
        "metrics_router_upstream_errors_total",
        "metrics_router_certificate_expiry_timestamp_seconds",
        "metrics_router_synced",
    } <= names


def test_dashboard_shows_requests_errors_latency_routes_reloads_and_certificates() -> None:
    names = set().union(*(promql_metric_names(e) for e in dashboard_exprs()))
    assert {
        "metrics_router_requests_total",
        "metrics_router_upstream_errors_total",
        "metrics_router_request_duration_seconds_bucket",
        "metrics_router_routes",
        "metrics_router_reloads_total",
        "metrics_router_reloader_restarts_total",
        "metrics_router_certificate_expiry_timestamp_seconds",
    } <= names
    ids = [p["id"] for p in dashboard()["panels"]]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        (
            'sum by (tenant, code) (rate(metrics_router_requests_total{code=~"5.."}[5m]))',
            {"metrics_router_requests_total"},
        ),
        ("histogram_quantile(0.99, sum by (le) (rate(a_bucket[$__rate_interval])))", {"a_bucket"}),
        ("min by (c) (x - time()) < 7 * 86400", {"x"}),
        ('absent(up{job="metrics-router"} == 1)', {"up"}),
        ("a / on(tenant) group_left(kind) b unless c", {"a", "b", "c"}),
    ],
)
def test_promql_metric_names(expr: str, names: set[str]) -> None:
    assert promql_metric_names(expr) == names


def test_known_metric() -> None:
    assert known_metric("metrics_router_request_duration_seconds_bucket")
    assert not known_metric("metrics_router_requests_total_bucket")
    assert not known_metric("metrics_router_request_total")


@needs_kubectl
def test_monitoring_objects_match_the_router_service() -> None:
    objs = rendered("monitoring")
    router = rendered("router")
    svc = one(router, "Service", "metrics-router")
    sm = one(objs, "ServiceMonitor", "metrics-router")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"]["matchNames"] == [svc["metadata"]["namespace"]]
    assert sm["spec"]["endpoints"][0]["port"] in {p["name"] for p in svc["spec"]["ports"]}
    cm = one(objs, "ConfigMap", "metrics-router-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["metrics-router.json"]) == dashboard()
    rule = one(objs, "PrometheusRule", "metrics-router")
    for group in rule["spec"]["groups"]:
        for r in group["rules"]:
            assert r["labels"]["severity"] in {"critical", "warning", "info"}, r["alert"]
            assert r["annotations"]["summary"], r["alert"]


# --------------------------------------------------------------------------- HNC tree


@needs_kubectl
def test_hnc_tree() -> None:
    objs = rendered("hnc/tenant-a")
    root = one(objs, "Namespace")
    key, value = tenancy_options.DEFAULT_TENANT_ROOT_LABEL.split("=")
    assert root["metadata"]["labels"][key] == value
    name = root["metadata"]["name"]
    anchors = find(objs, "SubnamespaceAnchor")
    assert {a["metadata"]["name"] for a in anchors} == {f"{name}--dev", f"{name}--sys"}
    assert all(a["metadata"]["namespace"] == name for a in anchors)
    assert one(objs, "HierarchyConfiguration")["metadata"] == {
        "name": "hierarchy",
        "namespace": name,
    }
    assert one(objs, "HierarchicalResourceQuota")["metadata"]["namespace"] == name
    assert one(objs, "ResourceQuota")["metadata"]["namespace"] == name
    admins = one(objs, "RoleBinding")
    assert admins["metadata"]["annotations"]["propagate.hnc.x-k8s.io/treeSelect"] == f"!{name}--sys"


# --------------------------------------------------------------------------- tenant KEDA


def keda_values() -> dict[str, Any]:
    values: dict[str, Any] = {}
    for path in (DEPLOY / "keda/values.yaml", DEPLOY / "keda/tenants/tenant-a/values.yaml"):
        values = _merge(values, yaml.safe_load(path.read_text()) or {})
    return values


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def keda_chart_output(values: dict[str, Any], namespace: str) -> list[dict[str, Any]]:
    """A stand-in for `helm template` of kedacore/keda 2.16 with these values: the objects
    the post-renderer touches, shaped as the chart's templates render them."""
    name = values["operator"]["name"]
    labels = {"app.kubernetes.io/part-of": "keda-operator", **values.get("additionalLabels", {})}
    ms = f"{name}-metrics-apiserver"
    extra = values["extraArgs"]["metricsAdapter"]
    sa = {"kind": "ServiceAccount", "name": name, "namespace": namespace}

    def crole(n: str) -> dict[str, Any]:
        return {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": n, "labels": labels},
            "rules": [{"apiGroups": ["keda.sh"], "resources": ["scaledobjects"], "verbs": ["get"]}],
        }

    def binding(kind: str, n: str, role_kind: str, role: str, subject: dict[str, Any],
                ns: str | None = None) -> dict[str, Any]:  # fmt: skip
        meta: dict[str, Any] = {"name": n, "labels": labels}
        if ns:
            meta["namespace"] = ns
        return {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": kind,
            "metadata": meta,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": role},
            "subjects": [subject],
        }

    def deployment(n: str, c: dict[str, Any], extra_volumes: list[Any]) -> dict[str, Any]:
        return {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": n, "namespace": namespace, "labels": labels},
            "spec": {
                "selector": {"matchLabels": {"app": n}},
                "template": {
                    "metadata": {"labels": {"app": n}},
                    "spec": {
                        "serviceAccountName": name,
                        "containers": [c],
                        "volumes": [
                            {"name": "certificates", "secret": {"secretName": "kedaorg-certs"}},
                            *extra_volumes,
                        ],
                    },
                },
            },
        }

    probe = {"httpGet": {"path": "/healthz", "port": 8081}, "initialDelaySeconds": 25}
    operator = {
        "name": name,
        "image": "registry.example.com/metrics-router-keda:2.16.1-0.1.0",
        "command": ["/keda"],
        "args": [
            "--leader-elect",
            "--cert-dir=/certs",
            f"--operator-service-name={name}",
            f"--metrics-server-service-name={ms}",
        ],
        "ports": [
            {"containerPort": 8080, "name": "http", "protocol": "TCP"},
            {"containerPort": 9666, "name": "metricsservice", "protocol": "TCP"},
        ],
        "livenessProbe": probe,
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": 8081}},
        "volumeMounts": [{"name": "certificates", "mountPath": "/certs", "readOnly": True}],
    }
    metrics_server = {
        "name": ms,
        "image": "ghcr.io/kedacore/keda-metrics-apiserver:2.16.1",
        "args": [
            "/usr/local/bin/keda-adapter",
            "--secure-port=6443",
            "--client-ca-file=/certs/ca.crt",
            "--tls-cert-file=/certs/tls.crt",
            "--tls-private-key-file=/certs/tls.key",
            *(f"--{k}={v}" for k, v in extra.items()),
        ],
        "ports": [{"containerPort": 6443, "name": "https", "protocol": "TCP"}],
        "volumeMounts": [
            {"name": "certificates", "mountPath": "/certs", "readOnly": True},
            *values["volumes"]["metricsApiServer"]["extraVolumeMounts"],
        ],
    }
    issuer = values["certificates"]["certManager"]["issuer"]
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
        },
        crole(name),
        binding("ClusterRoleBinding", name, "ClusterRole", name, sa),
        crole(f"{name}-external-metrics-reader"),
        binding(
            "ClusterRoleBinding",
            f"{name}-hpa-controller-external-metrics",
            "ClusterRole",
            f"{name}-external-metrics-reader",
            {
                "kind": "ServiceAccount",
                "name": "horizontal-pod-autoscaler",
                "namespace": "kube-system",
            },
        ),
        binding(
            "ClusterRoleBinding",
            f"{name}-system-auth-delegator",
            "ClusterRole",
            "system:auth-delegator",
            sa,
        ),
        binding(
            "RoleBinding",
            f"{name}-auth-reader",
            "Role",
            "extension-apiserver-authentication-reader",
            sa,
            ns="kube-system",
        ),
        deployment(name, operator, []),
        deployment(ms, metrics_server, values["volumes"]["metricsApiServer"]["extraVolumes"]),
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": ms,
                "namespace": namespace,
                "labels": {"app.kubernetes.io/name": ms, **labels},
            },
            "spec": {
                "selector": {"app": ms},
                "ports": [{"name": "https", "port": 443, "targetPort": 6443}],
            },
        },
        {
            "apiVersion": "cert-manager.io/v1",
            "kind": "Certificate",
            "metadata": {"name": f"{name}-tls-certificates", "namespace": namespace},
            "spec": {
                "commonName": name,
                "dnsNames": [f"{ms}.{namespace}.svc", f"{ms}.{namespace}.svc.cluster.local"],
                "secretName": values["certificates"].get("secretName", "kedaorg-certs"),
                "usages": ["server auth", "client auth"],
                "issuerRef": {
                    "name": issuer["name"],
                    "kind": issuer["kind"],
                    "group": issuer["group"],
                },
            },
        },
        {
            "apiVersion": "apiregistration.k8s.io/v1",
            "kind": "APIService",
            "metadata": {"name": "v1beta1.external.metrics.k8s.io", "labels": labels},
            "spec": {
                "service": {"name": ms, "namespace": namespace, "port": 443},
                "group": "external.metrics.k8s.io",
                "version": "v1beta1",
                "groupPriorityMinimum": 100,
                "versionPriority": 100,
            },
        },
    ]


def tenant_namespaced(objs: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {
        (o["kind"], o["metadata"]["name"])
        for o in objs
        if o["metadata"].get("namespace", "kube-system") != "kube-system"
    }


def post_render(overlay: Path, objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [str(overlay.parents[1] / "post-render"), str(overlay)],
        input=yaml.safe_dump_all(objs),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@pytest.fixture(scope="module")
def keda_tenant_a() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(chart stand-in, post-rendered) for tenant-a's release in tenant-a--sys."""
    if KUBECTL is None:
        pytest.skip("kubectl not found: the post-renderer runs `kubectl kustomize`")
    chart = keda_chart_output(keda_values(), "tenant-a--sys")
    return chart, post_render(DEPLOY / "keda/tenants/tenant-a", chart)


def test_keda_values_trust_the_router() -> None:
    values = keda_values()
    extra = values["extraArgs"]["metricsAdapter"]
    assert extra["requestheader-allowed-names"] == certs.ROUTER_CLIENT_CN
    ca_file = Path(extra["requestheader-client-ca-file"])
    mounts = {
        m["mountPath"]: m["name"]
        for m in values["volumes"]["metricsApiServer"]["extraVolumeMounts"]
    }
    volume = next(
        v for v in values["volumes"]["metricsApiServer"]["extraVolumes"]
        if v["name"] == mounts[str(ca_file.parent)]
    )  # fmt: skip
    assert volume["configMap"]["name"] == certs.UPSTREAM_CLIENT_CA_CONFIGMAP
    assert ca_file.name in {i["path"] for i in volume["configMap"]["items"]}
    cm = values["certificates"]["certManager"]
    assert cm["enabled"] is True
    assert values["certificates"]["autoGenerated"] is False
    assert cm["issuer"]["generate"] is False
    assert cm["issuer"]["kind"] == "ClusterIssuer"
    if KUBECTL is not None:
        one(rendered("upstream-ca"), "ClusterIssuer", cm["issuer"]["name"])
    assert values["crds"]["install"] is False
    assert values["webhooks"]["enabled"] is False
    # The router's default Service discovery label is derived from operator.name.
    assert f"app.kubernetes.io/name={values['operator']['name']}-metrics-apiserver" == (
        tenancy_options.DEFAULT_UPSTREAM_SERVICE_SELECTOR
    )


def test_keda_post_render_drops_the_apiservice_and_validates(
    keda_tenant_a: tuple[list[dict[str, Any]], list[dict[str, Any]]],
) -> None:
    chart, out = keda_tenant_a
    assert find(chart, "APIService")
    assert not find(out, "APIService")
    for obj in out:
        validate(obj)
    # Namespaced objects keep the chart's names (KEDA's own flags refer to them).
    assert tenant_namespaced(chart) == tenant_namespaced(out)


def test_keda_operator_runs_under_the_reloader(
    keda_tenant_a: tuple[list[dict[str, Any]], list[dict[str, Any]]],
) -> None:
    from router.cli import reloader as reloader_cli

    chart, out = keda_tenant_a
    before = container(one(chart, "Deployment", "keda-operator"))
    c = container(one(out, "Deployment", "keda-operator"))
    assert c["args"] == before["args"]
    command = c["command"]
    assert command[:2] == ["metrics-router", "reloader"]
    assert command[-2:] == ["--", before["command"][0]]
    parser = argparse.ArgumentParser(prog="metrics-router reloader", exit_on_error=False)
    reloader_cli.add_arguments(parser)
    args = parser.parse_args(command[2:] + c["args"])
    cfg, errors = reloader_cli.config_from_args(args)
    assert errors == []
    assert cfg is not None
    assert cfg.tenant == "tenant-a"
    assert cfg.settings.command == (before["command"][0], *before["args"])
    assert cfg.settings.env_name == "WATCH_NAMESPACE"
    # The tenant name agrees with the pattern strategy and with the HNC root.
    match = re.match(args.tenant_pattern, "tenant-a--dev")
    assert match is not None
    assert match.group("tenant") == "tenant-a"
    # Own port, not one KEDA uses; liveness asks the reloader, readiness stays on KEDA.
    ports = {p["containerPort"]: p.get("name") for p in c["ports"]}
    assert cfg.health_port == 8090
    assert ports[8090] == "reloader"
    assert cfg.health_port not in {p["containerPort"] for p in before["ports"]} | {8081}
    assert c["livenessProbe"]["httpGet"]["port"] == cfg.health_port
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"] == before["readinessProbe"]


def test_keda_cluster_scoped_names_carry_the_tenant(
    keda_tenant_a: tuple[list[dict[str, Any]], list[dict[str, Any]]],
) -> None:
    _, out = keda_tenant_a
    cluster_scoped = [o for o in out if "namespace" not in o["metadata"]]
    assert cluster_scoped
    for obj in cluster_scoped:
        assert obj["metadata"]["name"].endswith("-tenant-a"), obj["metadata"]["name"]
    kube_system = [o for o in out if o["metadata"].get("namespace") == "kube-system"]
    assert [o["metadata"]["name"] for o in kube_system] == ["keda-operator-auth-reader-tenant-a"]
    cluster_roles = {o["metadata"]["name"] for o in find(out, "ClusterRole")}
    for b in find(out, "ClusterRoleBinding"):
        ref = b["roleRef"]["name"]
        assert ref in cluster_roles or ref == "system:auth-delegator", ref
    reloader = one(out, "ClusterRoleBinding", "metrics-router-reloader-tenant-a")
    assert reloader["subjects"] == [
        {"kind": "ServiceAccount", "name": "keda-operator", "namespace": "tenant-a--sys"}
    ]
    assert one(out, "ClusterRole", "metrics-router-reloader-tenant-a")["rules"] == [
        {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]}
    ]


@needs_kubectl
def test_keda_overlay_copied_for_a_second_tenant_does_not_collide(
    tmp_path: Path, keda_tenant_a: tuple[list[dict[str, Any]], list[dict[str, Any]]]
) -> None:
    # The documented way to add a tenant: copy tenants/tenant-a, replace "tenant-a".
    keda = tmp_path / "keda"
    shutil.copytree(DEPLOY / "keda", keda)
    src, dst = keda / "tenants/tenant-a", keda / "tenants/tenant-b"
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_text(f.read_text().replace("tenant-a", "tenant-b"))
    out_b = post_render(dst, keda_chart_output(keda_values(), "tenant-b--sys"))
    _, out_a = keda_tenant_a

    def cluster_ids(objs: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
        return {
            (o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"])
            for o in objs
            if o["metadata"].get("namespace", "kube-system") == "kube-system"
        }

    assert cluster_ids(out_a)
    assert cluster_ids(out_b)
    assert cluster_ids(out_a).isdisjoint(cluster_ids(out_b))
    command = container(one(out_b, "Deployment", "keda-operator"))["command"]
    assert "--tenant=tenant-b" in command


@needs_kubectl
def test_keda_post_render_usage_error() -> None:
    proc = subprocess.run(
        [str(DEPLOY / "keda/post-render")], input="", capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2
    assert "usage" in proc.stderr


# --------------------------------------------------------------------------- images


def _stages(dockerfile: str) -> list[list[str]]:
    stages: list[list[str]] = []
    for line in dockerfile.replace("\\\n", " ").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def _arg_default(dockerfile: str, name: str) -> str:
    m = re.search(rf"^ARG {name}=(\S+)$", dockerfile, re.MULTILINE)
    assert m, f"ARG {name} has no default"
    return m.group(1)


def test_dockerfile() -> None:
    text = (ROOT / "Dockerfile").read_text()
    base = _arg_default(text, "PYTHON_IMAGE")
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?(@sha256:[0-9a-f]{64})?", base), base
    stages = _stages(text)
    assert len(stages) >= 2, "multi-stage build expected"
    final = stages[-1]
    assert final[0] == "FROM ${PYTHON_IMAGE}"
    assert "USER 65532:65532" in final
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    entry = next(
        json.loads(line[len("ENTRYPOINT ") :]) for line in final if line.startswith("ENTRYPOINT")
    )
    assert entry == ["metrics-router"]
    assert "metrics-router" in scripts
    # Only the built venv reaches the runtime image: no pip, compilers or source tree.
    runtime = " ".join(final)
    assert "pip install" not in runtime
    assert "apt-get" not in runtime
    copies = [line for line in final if line.startswith("COPY")]
    assert copies
    assert all(line.startswith("COPY --from=build ") for line in copies)


def test_dockerignore_sends_only_the_package() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    assert {"!pyproject.toml", "!router/"} <= set(lines)
    copied = re.findall(
        r"^COPY (?!--from)(.+) \S+$", (ROOT / "Dockerfile").read_text(), re.MULTILINE
    )
    for sources in copied:
        for src in sources.split():
            assert f"!{src.rstrip('/')}" in lines or f"!{src}" in lines or f"!{src}/" in lines, src


def test_operator_image_matches_the_keda_values() -> None:
    text = (DEPLOY / "keda/Dockerfile.operator").read_text()
    keda_version = _arg_default(text, "KEDA_VERSION")
    image = keda_values()["image"]["keda"]
    assert image["tag"].startswith(f"{keda_version}-")
    final = _stages(text)[-1]
    assert "COPY --from=keda /keda /keda" in final
    assert "USER 65532:65532" in final
