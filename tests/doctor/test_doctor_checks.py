"""The doctor's pure checks: a healthy snapshot passes, and each planted fault fails with the
expected title, evidence and fix (one table row per fault)."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from dataclasses import replace
from types import MappingProxyType
from typing import Any

import pytest

from router.doctor import checks, report
from router.doctor.checks import CheckResult, run_checks
from router.doctor.snapshot import (
    CertInfo,
    Cluster,
    Endpoints,
    Policies,
    PolicyObject,
    RequestHeader,
    RouterState,
    RoutesFile,
    ServingProbe,
    Snapshot,
    Tenancy,
    TrustProbe,
    UpstreamService,
)

NOW = 1_800_000_000.0
DAY = 86400.0
CA_DER = b"\x30\x03front-proxy-ca"
CA_PEM = (
    b"-----BEGIN CERTIFICATE-----\n" + base64.b64encode(CA_DER) + b"\n-----END CERTIFICATE-----\n"
)
OTHER_PEM = (
    b"-----BEGIN CERTIFICATE-----\n" + base64.b64encode(b"other") + b"\n-----END CERTIFICATE-----\n"
)
TENANTS = {
    "tenant-a": ("tenant-a", "tenant-a--dev", "tenant-a--sys"),
    "tenant-b": ("tenant-b", "tenant-b--sys"),
}


def apiservice(**spec: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "v1beta1.external.metrics.k8s.io",
            "labels": {"app.kubernetes.io/name": "metrics-router"},
        },
        "spec": {
            "group": "external.metrics.k8s.io",
            "version": "v1beta1",
            "service": {"namespace": "metrics-router", "name": "metrics-router", "port": 443},
            "caBundle": base64.b64encode(CA_PEM).decode(),
            **spec,
        },
        "status": {"conditions": [{"type": "Available", "status": "True", "reason": "Passed"}]},
    }


def deployment(
    ns: str,
    name: str,
    args: list[str],
    env: dict[str, str] | None = None,
    command: list[str] | None = None,
) -> dict[str, Any]:
    container: dict[str, Any] = {"name": name, "args": args}
    if command is not None:
        container["command"] = command
    if env is not None:
        container["env"] = [{"name": k, "value": v} for k, v in env.items()]
    return {
        "metadata": {"name": name, "namespace": ns, "labels": {"app.kubernetes.io/name": name}},
        "spec": {"template": {"spec": {"containers": [container]}}},
    }


def keda(
    tenant: str,
    watch: str | None = None,
    operator_args: tuple[str, ...] = ("--enable-cert-rotation=false",),
    server_args: tuple[str, ...] | None = None,
) -> list[dict[str, Any]]:
    ns = f"{tenant}--sys"
    env = {"WATCH_NAMESPACE": watch if watch is not None else ",".join(TENANTS[tenant])}
    if server_args is None:
        server_args = (
            "--requestheader-client-ca-file=/var/run/metrics-router-client-ca/ca.crt",
            "--requestheader-allowed-names=metrics-router",
        )
    return [
        deployment(ns, "keda-operator", list(operator_args), env),
        deployment(ns, "keda-operator-metrics-apiserver", list(server_args)),
    ]


def policy(tenant: str | None, name: str, port: int = 6443) -> PolicyObject:
    body = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": name,
            "namespace": "tenant-a--sys",
            "labels": {"app.kubernetes.io/managed-by": "metrics-router"},
        },
        "spec": {"ingress": [{"ports": [{"port": port, "protocol": "TCP"}]}]},
    }
    return PolicyObject(f"NetworkPolicy/tenant-a--sys/{name}", MappingProxyType(body), tenant)


WANTED = (
    policy(None, "metrics-router"),
    policy("tenant-a", "metrics-router-tenant-a-keda-metrics-apiserver"),
    policy("tenant-b", "metrics-router-tenant-b-keda-metrics-apiserver"),
)


def leaf(**kw: Any) -> CertInfo:
    base: dict[str, Any] = {
        "subject_cn": "metrics-router",
        "issuer_cn": "router-serving-ca",
        "not_before": NOW - 10 * DAY,
        "not_after": NOW + 80 * DAY,
        "dns_names": ("metrics-router.metrics-router.svc",),
    }
    base.update(kw)
    return CertInfo(**base)


def healthy_cluster() -> Cluster:
    upstreams = {
        t: UpstreamService(
            f"{t}--sys",
            "keda-operator-metrics-apiserver",
            f"https://keda-operator-metrics-apiserver.{t}--sys.svc:443",
            f"keda-operator-metrics-apiserver.{t}--sys.svc",
            (6443,),
        )
        for t in TENANTS
    }
    return Cluster(
        apiservice_name="v1beta1.external.metrics.k8s.io",
        router_namespace="metrics-router",
        router_service_name="metrics-router",
        apiservices=(apiservice(),),
        router_service={
            "spec": {"ports": [{"name": "https", "port": 443}, {"name": "metrics", "port": 9090}]}
        },
        router_endpoints=Endpoints(("10.0.0.5:6443",)),
        serving=(ServingProbe("10.0.0.5:6443", "metrics-router.metrics-router.svc", leaf()),),
        auth_configmap={
            "data": {
                "requestheader-client-ca-file": CA_PEM.decode(),
                "requestheader-allowed-names": '["front-proxy-client"]',
                "requestheader-username-headers": '["X-Remote-User"]',
                "requestheader-group-headers": '["X-Remote-Group"]',
                "requestheader-extra-headers-prefix": '["X-Remote-Extra-"]',
            }
        },
        tenancy=Tenancy(
            tenants=MappingProxyType(TENANTS),
            upstreams=MappingProxyType(upstreams),
            untenanted=MappingProxyType({"kube-system": "pattern: no match"}),
        ),
        endpoints=MappingProxyType(
            {
                f"{u.namespace}/{u.name}": Endpoints((f"10.1.0.{i}:6443",))
                for i, u in enumerate(upstreams.values())
            }
        ),
        policies=(
            Policies("networkpolicy", MappingProxyType({w.key: w.body for w in WANTED}), WANTED),
            Policies("cilium", MappingProxyType({}), ()),
        ),
        deployments=tuple(d for t in TENANTS for d in keda(t)),
    )


METRICS = """\
# TYPE metrics_router_build_info gauge
metrics_router_build_info{version="0.1.0"} 1.0
# TYPE metrics_router_start_time_seconds gauge
metrics_router_start_time_seconds %f
# TYPE metrics_router_reloads_total counter
metrics_router_reloads_total{source="routes",result="success"} 2.0
metrics_router_reloads_total{source="routes",result="failure"} %f
# TYPE metrics_router_certificate_expiry_timestamp_seconds gauge
metrics_router_certificate_expiry_timestamp_seconds{certificate="serving"} %f
"""


def router_state(
    failures: float = 0, expiry: float = NOW + 80 * DAY, error_at: float | None = None
) -> RouterState:
    text = METRICS % (NOW - 3600, failures, expiry)
    tenants: list[dict[str, Any]] = [{"tenant": t, "lastUpstreamError": None} for t in TENANTS]
    if error_at is not None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(error_at))
        tenants[0]["lastUpstreamError"] = {"at": stamp, "kind": "tls", "message": "bad certificate"}
    return RouterState("http://127.0.0.1:9090", metrics_text=text, routes={"tenants": tenants})


def trust(tenant: str, **kw: Any) -> TrustProbe:
    base: dict[str, Any] = {
        "tenant": tenant,
        "upstream": f"https://keda-operator-metrics-apiserver.{tenant}--sys.svc:443",
        "server_name": f"keda-operator-metrics-apiserver.{tenant}--sys.svc",
        "address": "10.1.0.1:6443",
        "handshake_ok": True,
        "status": 200,
    }
    base.update(kw)
    return TrustProbe(**base)


def healthy() -> Snapshot:
    return Snapshot(
        now=NOW,
        cluster=healthy_cluster(),
        trust=tuple(trust(t) for t in TENANTS),
        router=router_state(),
    )


def failed(results: list[CheckResult]) -> list[CheckResult]:
    return [r for r in results if r.status == "fail"]


def test_healthy_snapshot_passes_every_check() -> None:
    results = run_checks(healthy())
    assert failed(results) == []
    assert checks.exit_code(results) == 0
    sections = {r.section for r in results if r.status == "ok"}
    assert sections == {s for s, _ in checks.SECTIONS}
    text = report.text(results)
    assert "\u2717" not in text
    assert "0 failed" in text


def test_routes_file_mode_skips_cluster_checks() -> None:
    snap = Snapshot(
        now=NOW,
        routes_file=RoutesFile("routes.yaml", MappingProxyType({"a": ("tenant-a",)})),
        trust=(trust("a"),),
        router=router_state(),
    )
    results = run_checks(snap)
    by_section = {s: {r.status for r in results if r.section == s} for s, _ in checks.SECTIONS}
    for s in ("apiservice", "serving", "requestheader", "traffic", "keda"):
        assert by_section[s] == {"skipped"}, s
    for s in ("routes", "trust", "router"):
        assert by_section[s] == {"ok"}, s


def cluster(**changes: Any) -> Callable[[Snapshot], Snapshot]:
    def plant(s: Snapshot) -> Snapshot:
        assert s.cluster is not None
        return replace(s, cluster=replace(s.cluster, **changes))

    return plant


def tenancy(**changes: Any) -> Callable[[Snapshot], Snapshot]:
    def plant(s: Snapshot) -> Snapshot:
        assert s.cluster is not None
        return replace(s, cluster=replace(s.cluster, tenancy=replace(s.cluster.tenancy, **changes)))

    return plant


def cm_data(**changes: str) -> Callable[[Snapshot], Snapshot]:
    def plant(s: Snapshot) -> Snapshot:
        assert s.cluster is not None
        assert s.cluster.auth_configmap is not None
        data = {**s.cluster.auth_configmap["data"], **changes}
        return replace(s, cluster=replace(s.cluster, auth_configmap={"data": data}))

    return plant


def flags(**changes: Any) -> Callable[[Snapshot], Snapshot]:
    base: dict[str, Any] = {
        "from_flags": True,
        "client_ca_pem": CA_PEM,
        "allowed_names": ("front-proxy-client",),
    }
    base.update(changes)
    return cluster(requestheader=RequestHeader(**base))


def tenant_probe(tenant: str, **kw: Any) -> Callable[[Snapshot], Snapshot]:
    def plant(s: Snapshot) -> Snapshot:
        return replace(
            s, trust=tuple(trust(p.tenant, **kw) if p.tenant == tenant else p for p in s.trust)
        )

    return plant


def with_policies(
    actual: dict[str, Any], wanted: tuple[PolicyObject, ...] = WANTED, **kw: Any
) -> Callable[[Snapshot], Snapshot]:
    return cluster(policies=(Policies("networkpolicy", MappingProxyType(actual), wanted, **kw),))


def with_keda(tenant: str, **kw: Any) -> Callable[[Snapshot], Snapshot]:
    def plant(s: Snapshot) -> Snapshot:
        assert s.cluster is not None
        others = tuple(
            d for d in s.cluster.deployments if d["metadata"]["namespace"] != f"{tenant}--sys"
        )
        return replace(
            s, cluster=replace(s.cluster, deployments=others + tuple(keda(tenant, **kw)))
        )

    return plant


def second_apiservice(s: Snapshot) -> Snapshot:
    v1 = apiservice(version="v1")
    v1["metadata"]["name"] = "v1.external.metrics.k8s.io"
    return cluster(apiservices=(apiservice(), v1))(s)


def chart_recreated(s: Snapshot) -> Snapshot:
    obj = apiservice(
        service={
            "namespace": "tenant-a--sys",
            "name": "keda-operator-metrics-apiserver",
            "port": 443,
        }
    )
    obj["metadata"]["labels"] = {
        "app.kubernetes.io/part-of": "keda-operator",
        "app.kubernetes.io/managed-by": "Helm",
    }
    obj["metadata"]["annotations"] = {
        "meta.helm.sh/release-name": "keda",
        "meta.helm.sh/release-namespace": "tenant-a--sys",
    }
    return cluster(apiservices=(obj,))(s)


def unavailable(s: Snapshot) -> Snapshot:
    obj = apiservice()
    obj["status"] = {
        "conditions": [
            {
                "type": "Available",
                "status": "False",
                "reason": "FailedDiscoveryCheck",
                "message": "failing or missing response from https://10.0.0.5:6443",
            }
        ]
    }
    return cluster(apiservices=(obj,))(s)


def differs() -> dict[str, Any]:
    actual = {w.key: w.body for w in WANTED}
    key = WANTED[1].key
    body = json.loads(json.dumps(dict(actual[key]), default=dict))
    body["spec"]["ingress"][0]["ports"][0]["port"] = 8080
    actual[key] = body
    return actual


FAULTS: list[tuple[str, Callable[[Snapshot], Snapshot], str, str, str]] = [
    # (id, plant, failing title contains, evidence contains, fix contains)
    (
        "apiservice-missing",
        cluster(apiservices=()),
        "APIService v1beta1.external.metrics.k8s.io exists",
        "not found",
        "deploy/apiservice",
    ),
    (
        "apiservice-unavailable",
        unavailable,
        "is Available",
        "reason=FailedDiscoveryCheck",
        "serving-certificate",
    ),
    (
        "apiservice-second-version",
        second_apiservice,
        "No other object claims",
        "v1.external.metrics.k8s.io also serves",
        "kubectl delete apiservice",
    ),
    (
        "apiservice-recreated-by-chart",
        chart_recreated,
        "points at metrics-router/metrics-router",
        "tenant tenant-a",
        "post-renderer",
    ),
    (
        "apiservice-recreated-by-chart-claims",
        chart_recreated,
        "No other object claims",
        "re-created by a KEDA chart (Helm release keda in tenant-a--sys)",
        "deploy/keda/component",
    ),
    (
        "apiservice-port",
        cluster(
            apiservices=(
                apiservice(
                    service={"namespace": "metrics-router", "name": "metrics-router", "port": 8443}
                ),
            )
        ),
        "points at",
        "8443",
        "spec.service.port",
    ),
    (
        "router-service-missing",
        cluster(router_service=None),
        "points at",
        "not found",
        "deploy/router",
    ),
    (
        "cabundle-mismatch",
        cluster(
            serving=(
                ServingProbe(
                    "10.0.0.5:6443",
                    "metrics-router.metrics-router.svc",
                    leaf(),
                    ca_error="certificate verify failed: unable to get local issuer certificate",
                ),
            )
        ),
        "caBundle verifies",
        "unable to get local issuer",
        "inject-ca-from",
    ),
    (
        "serving-san-missing",
        cluster(
            serving=(
                ServingProbe(
                    "10.0.0.5:6443",
                    "metrics-router.metrics-router.svc",
                    leaf(dns_names=("localhost",)),
                ),
            )
        ),
        "names metrics-router.metrics-router.svc",
        "DNS SANs: localhost",
        "dnsNames",
    ),
    (
        "serving-expiring",
        cluster(
            serving=(
                ServingProbe(
                    "10.0.0.5:6443",
                    "metrics-router.metrics-router.svc",
                    leaf(not_after=NOW + 2 * 3600),
                ),
            )
        ),
        "not about to expire",
        "expires in 2h",
        "renew",
    ),
    (
        "serving-no-endpoint",
        cluster(serving=()),
        "Serving certificate",
        "no ready endpoint",
        "rollout status",
    ),
    (
        "configmap-missing",
        cluster(auth_configmap=None),
        "match kube-system/extension-apiserver-authentication",
        "not found",
        "extension-apiserver-authentication-reader",
    ),
    (
        "configmap-no-ca",
        cm_data(**{"requestheader-client-ca-file": ""}),
        "match kube-system",
        "no requestheader-client-ca-file",
        "--requestheader-client-ca-file",
    ),
    (
        "flags-other-ca",
        flags(client_ca_pem=OTHER_PEM),
        "match kube-system",
        "does not hold the ConfigMap's requestheader CA",
        "drop the --requestheader-* flags",
    ),
    (
        "flags-disjoint-names",
        flags(allowed_names=("aggregator",)),
        "match kube-system",
        "shares no name",
        "drop the --requestheader-* flags",
    ),
    (
        "flags-other-headers",
        flags(username_headers=("X-Forwarded-User",)),
        "match kube-system",
        "--requestheader-username-headers",
        "ConfigMap's values",
    ),
    (
        "tenant-unrouted",
        tenancy(
            unrouted=MappingProxyType(
                {"tenant-b": "no metrics Service in any namespace of the tenant"}
            )
        ),
        "tenant tenant-b: upstream",
        "no metrics Service",
        "--upstream-service-selector",
    ),
    (
        "no-ready-endpoints",
        cluster(
            endpoints=MappingProxyType(
                {"tenant-a--sys/keda-operator-metrics-apiserver": Endpoints((), ("10.1.0.9:6443",))}
            )
        ),
        "tenant tenant-a: upstream",
        "no ready endpoint (1 not ready)",
        "kubectl -n tenant-a--sys get pods",
    ),
    (
        "namespace-claimed-twice",
        tenancy(
            conflicts=(
                "namespace 'tenant-a--dev' is below several tenant roots (tenant-a, tenant-x)",
            )
        ),
        "No namespace is claimed twice",
        "several tenant roots",
        "remove the extra tenant-root label",
    ),
    (
        "namespace-left-without-tenant",
        tenancy(
            selector="tenancy.io/managed=true",
            untenanted=MappingProxyType({"team-x": "pattern: the name does not match"}),
        ),
        "Every namespace of the selector",
        "team-x: pattern",
        "label these namespaces",
    ),
    (
        "no-tenants",
        tenancy(tenants=MappingProxyType({})),
        "At least one tenant",
        "no namespace resolves",
        "--tenant-root-label",
    ),
    (
        "trust-401",
        tenant_probe(
            "tenant-a", status=401, status_reason="Unauthorized", status_message="Unauthorized"
        ),
        "tenant tenant-a: discovery GET",
        "does not allow its CN metrics-router",
        "--requestheader-allowed-names=metrics-router",
    ),
    (
        "trust-client-ca-refused",
        tenant_probe(
            "tenant-b",
            handshake_ok=False,
            failure="client-cert-refused",
            message="TLS alert TLSV1_ALERT_UNKNOWN_CA",
            status=None,
        ),
        "tenant tenant-b: TLS handshake",
        "does not trust the router's client CA",
        "--requestheader-client-ca-file",
    ),
    (
        "trust-unreachable",
        tenant_probe(
            "tenant-a", handshake_ok=False, failure="unreachable", message="timed out", status=None
        ),
        "tenant tenant-a: TLS handshake",
        "cannot connect: timed out",
        "NetworkPolicy",
    ),
    (
        "trust-server-cert",
        tenant_probe(
            "tenant-a",
            handshake_ok=False,
            failure="server-cert",
            message="Hostname mismatch",
            status=None,
        ),
        "tenant tenant-a: TLS handshake",
        "refuses the tenant's serving certificate",
        "--upstream-ca-file",
    ),
    (
        "trust-403",
        tenant_probe("tenant-a", status=403, status_reason="Forbidden"),
        "tenant tenant-a: discovery GET",
        "HTTP 403 Forbidden",
        "system:discovery",
    ),
    (
        "policy-missing",
        with_policies({w.key: w.body for w in WANTED[:2]}),
        "exist and match",
        "missing: NetworkPolicy/tenant-a--sys/metrics-router-tenant-b",
        "--manage-network-policies",
    ),
    (
        "policy-differs",
        with_policies(differs()),
        "exist and match",
        "differs from the rendering",
        "metrics-router render",
    ),
    (
        "policy-extra",
        with_policies({**{w.key: w.body for w in WANTED}, "NetworkPolicy/x/old": {}}),
        "exist and match",
        "owned but no longer wanted: NetworkPolicy/x/old",
        "--manage-network-policies",
    ),
    (
        "policy-blocks-tenant",
        with_policies({w.key: w.body for w in WANTED[:2]}),
        "tenant tenant-b: the router may reach",
        "missing or differs",
        "--manage-network-policies",
    ),
    (
        "policy-wrong-port",
        with_policies({w.key: w.body for w in WANTED}, metrics_server_port=443),
        "tenant tenant-a: the router may reach its metrics server on :443",
        "sends to :6443",
        "keda.metricsServer.port",
    ),
    (
        "keda-patches-apiservice",
        with_keda("tenant-a", operator_args=("--enable-cert-rotation=true",)),
        "does not patch the shared APIService",
        "--enable-cert-rotation=true",
        "--enable-apiservice-patching=false",
    ),
    (
        "keda-watch-empty",
        with_keda("tenant-a", watch=""),
        "watches only its tenant's namespaces",
        "WATCH_NAMESPACE is empty",
        "metrics-router reloader --tenant tenant-a",
    ),
    (
        "keda-watch-other-tenant",
        with_keda("tenant-a", watch="tenant-a,tenant-b"),
        "watches only its tenant's namespaces",
        "tenant-b (tenant tenant-b)",
        "reloader",
    ),
    (
        "keda-no-requestheader",
        with_keda("tenant-b", server_args=("--secure-port=6443",)),
        "has requestheader flags",
        "missing --requestheader-client-ca-file, --requestheader-allowed-names",
        "deploy/keda/values.yaml",
    ),
    (
        "router-unreachable",
        lambda s: replace(s, router=RouterState("http://127.0.0.1:9", error="connection refused")),
        "metrics endpoint",
        "connection refused",
        "--metrics-url",
    ),
    (
        "router-reload-failures",
        lambda s: replace(s, router=router_state(failures=3)),
        "No reload failures",
        "routes: 3 failed reload(s)",
        "last good version",
    ),
    (
        "router-cert-expiring",
        lambda s: replace(s, router=router_state(expiry=NOW - DAY)),
        "router's certificates are not about to expire",
        "serving: ",
        "renew",
    ),
    (
        "router-recent-upstream-error",
        lambda s: replace(s, router=router_state(error_at=NOW - 60)),
        "No recent upstream error",
        "tenant tenant-a: tls",
        "trust-chain checks",
    ),
    # Reads the identity doctor runs as is not allowed (403): named, with the permission.
    (
        "rbac-apiservices",
        cluster(errors=MappingProxyType({"apiservices": "403 Forbidden: cannot list"})),
        "exists",
        "listing APIServices failed: 403",
        "list apiservices.apiregistration.k8s.io",
    ),
    (
        "rbac-router-service",
        cluster(router_service=None, errors=MappingProxyType({"router-service": "403 Forbidden"})),
        "points at",
        "reading Service metrics-router/metrics-router: 403",
        "get services",
    ),
    (
        "rbac-deployments",
        cluster(errors=MappingProxyType({"deployments": "403 Forbidden"})),
        "Tenant KEDA settings",
        "403",
        "list deployments.apps",
    ),
]


@pytest.mark.parametrize(
    ("plant", "title", "evidence", "fix"), [f[1:] for f in FAULTS], ids=[f[0] for f in FAULTS]
)
def test_each_planted_fault_fails_with_evidence_and_fix(
    plant: Callable[[Snapshot], Snapshot], title: str, evidence: str, fix: str
) -> None:
    results = run_checks(plant(healthy()))
    bad = [r for r in failed(results) if title in r.title]
    assert bad, f"no failure titled {title!r}; failures: {[r.title for r in failed(results)]}"
    assert any(evidence in e for r in bad for e in r.evidence), [r.evidence for r in bad]
    assert any(r.fix is not None and fix in r.fix for r in bad), [r.fix for r in bad]
    assert checks.exit_code(results) == 1
    # The text report names the fault with a cross and its fix.
    text = report.text(results)
    assert any(line.strip().startswith("\u2717") and title in line for line in text.splitlines())
    assert "fix: " in text


def test_compatible_flags_are_deliberate_not_a_fault() -> None:
    # Narrower allowed names than the ConfigMap, same CA: deliberate, and it works.
    snap = flags(allowed_names=("front-proxy-client",))(healthy())
    snap = cm_data(**{"requestheader-allowed-names": "[]"})(snap)
    results = checks.check_requestheader(snap)
    assert [r.status for r in results] == ["ok"]
    assert "compatible" in results[0].evidence[-1]


def test_operator_under_the_reloader_passes_without_watch_namespace() -> None:
    d = deployment(
        "tenant-a--sys",
        "keda-operator",
        ["reloader", "--tenant", "tenant-a", "--", "/keda", "--enable-cert-rotation=false"],
        command=["metrics-router"],
    )
    snap = cluster(deployments=(d,))(healthy())
    results = [r for r in checks.check_keda(snap) if "watches" in r.title]
    assert [r.status for r in results] == ["ok"]
    assert "reloader" in results[0].evidence[0]


def test_policies_not_managed_are_skipped_in_auto_mode() -> None:
    snap = cluster(policies=(Policies("networkpolicy", MappingProxyType({}), ()),))(healthy())
    assert [r.status for r in checks.check_traffic(snap)] == ["skipped"]
    required = cluster(policy_kind="networkpolicy")(snap)
    assert "fail" in {r.status for r in checks.check_traffic(required)}


def test_flag_value_reads_both_spellings() -> None:
    assert checks.flag_value(["--a=1", "--b", "2", "--c"], "--a") == "1"
    assert checks.flag_value(["--a=1", "--b", "2", "--c"], "--b") == "2"
    assert checks.flag_value(["--a=1", "--b", "2", "--c"], "--c") == "true"
    assert checks.flag_value(["--a=1"], "--d") is None


def test_json_report_has_the_same_results() -> None:
    results = run_checks(FAULTS[0][1](healthy()))
    doc = json.loads(report.to_json(results))
    assert doc["summary"]["fail"] == len(failed(results)) >= 1
    assert [c["title"] for c in doc["checks"]] == [r.title for r in results]
    assert all(c["fix"] for c in doc["checks"] if c["status"] == "fail")


def test_an_unreachable_api_fails_once_and_skips_the_rest() -> None:
    snap = Snapshot(
        now=NOW,
        cluster_error="GET /apis/...: ClientConnectorError",
        router=router_state(),
        trust_skipped="no cluster",
    )
    results = run_checks(snap)
    assert [r.title for r in failed(results)] == ["The Kubernetes API answers"]
    assert failed(results)[0].fix is not None
    for s in ("serving", "requestheader", "routes", "traffic", "keda", "trust"):
        assert {r.status for r in results if r.section == s} == {"skipped"}, s
    assert checks.exit_code(results) == 1


@pytest.mark.parametrize(
    ("bind", "url"),
    [
        ("0.0.0.0:9090", "http://127.0.0.1:9090"),
        ("127.0.0.1:9191", "http://127.0.0.1:9191"),
        ("[::1]:9090", "http://[::1]:9090"),
        ("0", None),
        ("nonsense", None),
    ],
)
def test_local_metrics_url_follows_the_bind_address(bind: str, url: str | None) -> None:
    from router.cli.doctor import local_metrics_url

    assert local_metrics_url(bind) == url


@pytest.mark.parametrize(
    ("given", "local", "url"),
    [
        ("http://10.0.0.5:9090", True, "http://10.0.0.5:9090"),
        ("http://10.0.0.5:9090", False, "http://10.0.0.5:9090"),
        (None, True, "http://127.0.0.1:9191"),
        (None, False, None),  # cluster mode from a workstation: the services proxy
    ],
)
def test_metrics_url_is_the_local_bind_address_only_beside_the_router(
    given: str | None, local: bool, url: str | None
) -> None:
    from router.cli.doctor import metrics_url_for

    assert metrics_url_for(given, "0.0.0.0:9191", router_is_local=local) == url


def test_the_routers_own_helm_release_is_no_claimant() -> None:
    obj = apiservice()
    obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] = "Helm"
    obj["metadata"]["annotations"] = {
        "meta.helm.sh/release-name": "metrics-router",
        "meta.helm.sh/release-namespace": "metrics-router",
    }
    results = checks.check_apiservice(cluster(apiservices=(obj,))(healthy()))
    assert failed(results) == []
