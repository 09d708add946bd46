"""`metrics-router doctor` end to end: the fake API server, a real Router and real TLS KEDA
stubs play a healthy installation, then one fault at a time is planted; the report's ✗ lines
and the exit codes are asserted.

The doctor runs through the real command line (``router.cli.main.main``) in a worker thread with
its own event loop, while this test's loop serves the fake API, the stubs and the router.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from router.app import Router
from router.cli import main as cli
from router.core.version import version
from router.devtools.keda_stub import KedaStub
from router.devtools.pki import Pki, generate_pki
from tests.conftest import routes_yaml, serve_args, serve_config
from tests.fakeapi import FakeKube

pytestmark = pytest.mark.usefixtures("no_leftover_tasks")

TENANTS = ("tenant-a", "tenant-b")
PATTERN = "^(?P<tenant>tenant-[a-z0-9]+)(--.+)?$"
KEDA_SVC = "keda-operator-metrics-apiserver"
SVC_LABELS = {"app.kubernetes.io/name": KEDA_SVC}
APISERVICE = "v1beta1.external.metrics.k8s.io"
CROSS = "\u2717"


@pytest.fixture(scope="module")
def tenant_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A PKI whose tenant serving certificates name keda-operator-metrics-apiserver.<t>--sys.svc
    for tenants named after their root namespace (tenant-a, tenant-b)."""
    return generate_pki(tmp_path_factory.mktemp("doctor-pki"), tenants=TENANTS)


def stub(pki: Pki, tenant: str, **kw: Any) -> KedaStub:
    kw.setdefault("client_ca_file", pki.router_client_ca)
    return KedaStub(
        tenant=tenant, cert_file=pki.upstream_cert(tenant), key_file=pki.upstream_key(tenant), **kw
    )


def _run_cli(argv: list[str]) -> tuple[int, str]:
    """`metrics-router` ARGV through the real CLI (run it in a thread): (exit code, stdout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(argv)
    return code, out.getvalue()


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def apiservice(pki: Pki, **status: str) -> dict[str, Any]:
    cond = {
        "type": "Available",
        "status": "True",
        "reason": "Passed",
        "message": "all checks passed",
    }
    cond.update(status)
    return {
        "apiVersion": "apiregistration.k8s.io/v1",
        "kind": "APIService",
        "metadata": {"name": APISERVICE, "labels": {"app.kubernetes.io/name": "metrics-router"}},
        "spec": {
            "group": "external.metrics.k8s.io",
            "version": "v1beta1",
            "groupPriorityMinimum": 100,
            "versionPriority": 100,
            "service": {"namespace": "metrics-router", "name": "metrics-router", "port": 443},
            "caBundle": b64(pki.router_serving_ca),
        },
        "status": {"conditions": [cond]},
    }


def deployment(
    ns: str, name: str, args: Sequence[str], env: dict[str, str] | None = None
) -> dict[str, Any]:
    container: dict[str, Any] = {"name": name, "image": "keda", "args": list(args)}
    if env is not None:
        container["env"] = [{"name": k, "value": v} for k, v in env.items()]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": ns, "labels": {"app.kubernetes.io/name": name}},
        "spec": {"template": {"spec": {"containers": [container]}}},
    }


def operator(tenant: str, *, rotation: str = "false", watch: str | None = None) -> dict[str, Any]:
    namespaces = watch if watch is not None else f"{tenant},{tenant}--sys"
    return deployment(
        f"{tenant}--sys",
        "keda-operator",
        ["--leader-elect", f"--enable-cert-rotation={rotation}"],
        {"WATCH_NAMESPACE": namespaces},
    )


def metrics_server(tenant: str, args: Sequence[str] | None = None) -> dict[str, Any]:
    if args is None:
        args = (
            "--requestheader-client-ca-file=/var/run/metrics-router-client-ca/ca.crt",
            "--requestheader-allowed-names=metrics-router",
        )
    return deployment(f"{tenant}--sys", KEDA_SVC, args)


@dataclass
class Install:
    """A healthy installation: the fake API's objects, a Router, one stub per tenant."""

    fake: FakeKube
    pki: Pki
    router: Router
    stubs: dict[str, KedaStub]
    tmp_path: Path
    extra_stubs: list[KedaStub] = field(default_factory=list)

    def point_tenant_at(self, tenant: str, s: KedaStub, *, ready: bool = True) -> None:
        assert s.port is not None
        self.fake.add_endpoints(
            f"{tenant}--sys", KEDA_SVC, ["127.0.0.1"], [("https", s.port)], ready=ready
        )

    async def start_stub(self, tenant: str, **kw: Any) -> KedaStub:
        s = stub(self.pki, tenant, **kw)
        await s.start()
        self.extra_stubs.append(s)
        return s

    def argv(self, *extra: str) -> list[str]:
        p = self.pki
        return [
            "doctor",
            "--kubeconfig", str(self.fake.kubeconfig),
            "--tenant-strategies", "pattern",
            "--tenant-pattern", PATTERN,
            "--proxy-client-cert-file", str(p.router_client_cert),
            "--proxy-client-key-file", str(p.router_client_key),
            "--upstream-ca-file", str(p.upstream_ca),
            "--requestheader-client-ca-file", str(p.requestheader_ca),
            "--requestheader-allowed-names", "front-proxy-client",
            "--metrics-url", f"http://127.0.0.1:{self.router.metrics_port}",
            "--network", "direct",
            "--timeout", "3s",
            *extra,
        ]  # fmt: skip

    async def doctor(self, *extra: str) -> tuple[int, str]:
        """Run `metrics-router doctor` (the real CLI) in a thread; (exit code, stdout)."""
        return await asyncio.to_thread(_run_cli, self.argv(*extra))


@pytest.fixture
async def install(tenant_pki: Pki, tmp_path: Path) -> AsyncIterator[Install]:
    pki = tenant_pki
    stubs = {t: stub(pki, t) for t in TENANTS}
    routes = tmp_path / "routes.yaml"
    router: Router | None = None
    inst: Install | None = None
    try:
        for s in stubs.values():
            await s.start()
        routes.write_text(routes_yaml({t: ([t], s.url, None) for t, s in stubs.items()}))
        router = Router(serve_config(serve_args(pki, routes)))
        await router.start()
        async with FakeKube(tmp_path) as fake:
            inst = Install(fake, pki, router, stubs, tmp_path)
            populate(inst)
            yield inst
    finally:
        for s in [*stubs.values(), *(inst.extra_stubs if inst else [])]:
            await s.stop()
        if router is not None:
            await router.stop()


def populate(inst: Install) -> None:
    fake, pki, router = inst.fake, inst.pki, inst.router
    fake.add_namespace("kube-system")
    fake.add_namespace("metrics-router")
    fake.add_service(
        "metrics-router",
        "metrics-router",
        {"app.kubernetes.io/name": "metrics-router"},
        [("https", 443), ("metrics", 9090)],
    )
    fake.add_endpoints(
        "metrics-router",
        "metrics-router",
        ["127.0.0.1"],
        [("https", router.port), ("metrics", router.metrics_port)],
    )
    fake.put("apiservices", apiservice(pki), api_version="apiregistration.k8s.io/v1")
    fake.add_configmap(
        "kube-system",
        "extension-apiserver-authentication",
        {
            "requestheader-client-ca-file": pki.requestheader_ca.read_text(),
            "requestheader-allowed-names": '["front-proxy-client"]',
            "requestheader-username-headers": '["X-Remote-User"]',
            "requestheader-group-headers": '["X-Remote-Group"]',
            "requestheader-extra-headers-prefix": '["X-Remote-Extra-"]',
        },
    )
    for t in TENANTS:
        fake.add_namespace(t)
        fake.add_namespace(f"{t}--sys")
        fake.add_service(f"{t}--sys", KEDA_SVC, SVC_LABELS, [("https", 443)])
        inst.point_tenant_at(t, inst.stubs[t])
        fake.put("deployments", operator(t), api_version="apps/v1")
        fake.put("deployments", metrics_server(t), api_version="apps/v1")


def crosses(report: str) -> list[str]:
    return [ln.strip() for ln in report.splitlines() if ln.strip().startswith(CROSS)]


async def test_healthy_installation_passes(install: Install) -> None:
    code, report = await install.doctor()
    assert crosses(report) == [], report
    assert code == 0
    for line in (
        f"\u2713 APIService {APISERVICE} points at metrics-router/metrics-router:443",
        f"\u2713 APIService {APISERVICE} is Available",
        "\u2713 The APIService's caBundle verifies the serving certificate at 127.0.0.1:",
        "\u2713 The serving certificate names metrics-router.metrics-router.svc",
        "\u2713 tenant tenant-a: TLS handshake with the router's client certificate",
        "\u2713 tenant tenant-b: discovery GET as metrics-router:doctor",
        "\u2713 tenant tenant-a: deploy/keda-operator in tenant-a--sys does not patch the shared "
        "APIService",
        "\u2713 Router 0.1.0",
    ):
        assert line in report, line
    # The stubs saw the doctor's read-only identity, presented with the router's certificate.
    seen = install.stubs["tenant-a"].seen[-1]
    assert (seen.user, seen.groups, seen.peer_cn) == (
        "metrics-router:doctor",
        ("system:authenticated",),
        "metrics-router",
    )


async def test_json_output_is_the_same_report(install: Install) -> None:
    code, out = await install.doctor("-o", "json")
    doc = json.loads(out)
    assert code == 0
    assert doc["summary"]["fail"] == 0
    assert {c["section"] for c in doc["checks"]} >= {"apiservice", "trust", "router"}


async def _plant_unavailable(i: Install) -> None:
    i.fake.put(
        "apiservices",
        apiservice(
            i.pki,
            status="False",
            reason="FailedDiscoveryCheck",
            message="failing or missing response",
        ),
        api_version="apiregistration.k8s.io/v1",
    )


async def _plant_second_version(i: Install) -> None:
    other = apiservice(i.pki)
    other["metadata"]["name"] = "v1.external.metrics.k8s.io"
    other["spec"]["version"] = "v1"
    i.fake.put("apiservices", other, api_version="apiregistration.k8s.io/v1")


async def _plant_cabundle(i: Install) -> None:
    obj = apiservice(i.pki)
    obj["spec"]["caBundle"] = b64(i.pki.upstream_ca)  # as a tenant's KEDA patching it would
    i.fake.put("apiservices", obj, api_version="apiregistration.k8s.io/v1")


async def _plant_configmap_ca(i: Install) -> None:
    i.fake.add_configmap(
        "kube-system",
        "extension-apiserver-authentication",
        {
            "requestheader-client-ca-file": i.pki.rogue_ca.read_text(),
            "requestheader-allowed-names": '["front-proxy-client"]',
        },
    )


async def _plant_untrusted_router_ca(i: Install) -> None:
    s = await i.start_stub("tenant-b", client_ca_file=i.pki.requestheader_ca)
    i.point_tenant_at("tenant-b", s)


async def _plant_cn_not_allowed(i: Install) -> None:
    s = await i.start_stub("tenant-a", allowed_names=("someone-else",))
    i.point_tenant_at("tenant-a", s)


async def _plant_not_ready(i: Install) -> None:
    i.point_tenant_at("tenant-b", i.stubs["tenant-b"], ready=False)


async def _plant_patching(i: Install) -> None:
    i.fake.put("deployments", operator("tenant-a", rotation="true"), api_version="apps/v1")


async def _plant_watch_all(i: Install) -> None:
    i.fake.put("deployments", operator("tenant-b", watch=""), api_version="apps/v1")


async def _plant_watch_other(i: Install) -> None:
    i.fake.put(
        "deployments", operator("tenant-a", watch="tenant-a,tenant-b"), api_version="apps/v1"
    )


async def _plant_no_requestheader(i: Install) -> None:
    i.fake.put(
        "deployments", metrics_server("tenant-b", ["--secure-port=6443"]), api_version="apps/v1"
    )


async def _plant_tenant_down(i: Install) -> None:
    await i.stubs["tenant-a"].stop()


PLANTS = {
    "apiservice-unavailable": (
        _plant_unavailable,
        [f"{CROSS} APIService {APISERVICE} is Available"],
        "reason=FailedDiscoveryCheck",
    ),
    "second-apiservice": (
        _plant_second_version,
        [f"{CROSS} No other object claims external.metrics.k8s.io"],
        "v1.external.metrics.k8s.io also serves",
    ),
    "cabundle-mismatch": (
        _plant_cabundle,
        [f"{CROSS} The APIService's caBundle verifies the serving certificate at 127.0.0.1:"],
        "certificate verify failed",
    ),
    "requestheader-ca": (
        _plant_configmap_ca,
        [f"{CROSS} The router's requestheader settings match"],
        "does not hold the ConfigMap's requestheader CA",
    ),
    "keda-untrusted-router-ca": (
        _plant_untrusted_router_ca,
        [f"{CROSS} tenant tenant-b: TLS handshake with the router's client certificate"],
        "does not trust the router's client CA",
    ),
    "keda-cn-not-allowed": (
        _plant_cn_not_allowed,
        [f"{CROSS} tenant tenant-a: discovery GET as metrics-router:doctor"],
        "--requestheader-allowed-names=metrics-router",
    ),
    "no-ready-endpoints": (
        _plant_not_ready,
        [f"{CROSS} tenant tenant-b: upstream with ready endpoints"],
        "no ready endpoint (1 not ready)",
    ),
    "keda-patches-apiservice": (
        _plant_patching,
        [
            f"{CROSS} tenant tenant-a: deploy/keda-operator in tenant-a--sys "
            "does not patch the shared APIService"
        ],
        "--enable-apiservice-patching=false",
    ),
    "keda-watches-everything": (
        _plant_watch_all,
        [
            f"{CROSS} tenant tenant-b: deploy/keda-operator in tenant-b--sys "
            "watches only its tenant's namespaces"
        ],
        "WATCH_NAMESPACE is empty",
    ),
    "keda-watches-other-tenant": (
        _plant_watch_other,
        [
            f"{CROSS} tenant tenant-a: deploy/keda-operator in tenant-a--sys "
            "watches only its tenant's namespaces"
        ],
        "tenant-b (tenant tenant-b)",
    ),
    "keda-no-requestheader-flags": (
        _plant_no_requestheader,
        [
            f"{CROSS} tenant tenant-b: deploy/keda-operator-metrics-apiserver in tenant-b--sys "
            "has requestheader flags"
        ],
        "missing --requestheader-client-ca-file",
    ),
    "tenant-down": (
        _plant_tenant_down,
        [f"{CROSS} tenant tenant-a: TLS handshake with the router's client certificate"],
        "cannot connect",
    ),
}


@pytest.mark.parametrize("fault", list(PLANTS))
async def test_each_planted_fault_is_named_with_a_fix(install: Install, fault: str) -> None:
    plant, want, evidence = PLANTS[fault]
    await plant(install)
    code, report = await install.doctor()
    got = crosses(report)
    assert code == 1, report
    for w in want:
        assert any(line.startswith(w) for line in got), f"{w!r} not in {got}\n{report}"
    assert evidence in report, report
    # Only the planted fault fails (plus, for a tenant's broken chain, nothing unrelated).
    assert len(got) <= 2, got


async def test_routes_file_mode_skips_the_cluster_checks(install: Install) -> None:
    routes = install.tmp_path / "doctor-routes.yaml"
    routes.write_text(
        routes_yaml({t: ([t], s.url, f"{KEDA_SVC}.{t}--sys.svc") for t, s in install.stubs.items()})
    )
    p = install.pki
    argv = [
        "--routes-file", str(routes),
        "--proxy-client-cert-file", str(p.router_client_cert),
        "--proxy-client-key-file", str(p.router_client_key),
        "--upstream-ca-file", str(p.upstream_ca),
        # serve's own flag, as pasted from its command line: no --metrics-url needed
        "--metrics-bind-address", f"127.0.0.1:{install.router.metrics_port}",
    ]  # fmt: skip

    code, report = await asyncio.to_thread(_run_cli, ["doctor", *argv])
    assert code == 0, report
    assert "- APIService: skipped: routes-file mode" in report
    assert "\u2713 tenant tenant-b: discovery GET as metrics-router:doctor" in report
    assert f"\u2713 Router {version()} at http://127.0.0.1:{install.router.metrics_port}" in (
        report
    )


def test_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["doctor", "--routes-file", str(tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err
    assert "--proxy-client-cert-file is required" in err
    with pytest.raises(SystemExit) as exc:
        cli.main(["doctor", "--network", "sideways"])
    assert exc.value.code == 2


async def render_policies(i: Install) -> list[dict[str, Any]]:
    """The policies `metrics-router render` writes for this cluster (the CLI, from the fake)."""
    out = i.tmp_path / "policies"
    argv = [
        "render", "--kubeconfig", str(i.fake.kubeconfig),
        "--tenant-strategies", "pattern", "--tenant-pattern", PATTERN,
        "--output-dir", str(out),
    ]  # fmt: skip
    assert await asyncio.to_thread(cli.main, argv) == 0
    return [yaml.safe_load(p.read_text()) for p in sorted(out.glob("*.yaml"))]


async def test_traffic_boundaries_missing_or_edited_policy(install: Install) -> None:
    # The metrics servers listen on :6443 as in a cluster (no probes: --network none).
    for t in TENANTS:
        install.fake.add_endpoints(f"{t}--sys", KEDA_SVC, ["10.1.0.7"], [("https", 6443)])
    install.fake.add_namespace("default")
    install.fake.add_endpoints("default", "kubernetes", ["172.18.0.2"], [("https", 6443)])
    policies = await render_policies(install)
    assert len(policies) >= 3  # the router's, and per tenant
    for obj in policies:
        install.fake.put("networkpolicies", obj, api_version="networking.k8s.io/v1")
    doctor = ("--manage-network-policies", "--network", "none")
    code, report = await install.doctor(*doctor)
    assert crosses(report) == [], report
    assert code == 0
    assert "\u2713 The NetworkPolicies the router renders exist and match" in report
    assert "\u2713 tenant tenant-b: the router may reach its metrics server on :6443" in report

    # A tenant's metrics-server policy deleted by hand, another one edited.
    meta = [o["metadata"] for o in policies if "keda-metrics-apiserver" in o["metadata"]["name"]]
    b = next(m for m in meta if "tenant-b" in m["name"])
    a = next(m for m in meta if "tenant-a" in m["name"])
    install.fake.delete("networkpolicies", b["name"], b["namespace"], "networking.k8s.io/v1")
    edited = install.fake.get("networkpolicies", a["name"], a["namespace"], "networking.k8s.io/v1")
    assert edited is not None
    edited = json.loads(json.dumps(edited))
    edited["spec"]["ingress"] = []
    install.fake.put("networkpolicies", edited, api_version="networking.k8s.io/v1")
    code, report = await install.doctor(*doctor)
    got = crosses(report)
    assert code == 1
    assert f"{CROSS} The NetworkPolicies the router renders exist and match" in got
    assert f"{CROSS} tenant tenant-b: the router may reach its metrics server on :6443" in got
    assert f"{CROSS} tenant tenant-a: the router may reach its metrics server on :6443" in got
    assert f"missing: NetworkPolicy/tenant-b--sys/{b['name']}" in report
    assert f"differs from the rendering: NetworkPolicy/tenant-a--sys/{a['name']}" in report
    assert "metrics-router render --kind networkpolicy" in report


async def test_traffic_boundaries_wrong_port(install: Install) -> None:
    """The policies allow :6443, but tenant-b's metrics server listens on :8443."""
    install.fake.add_endpoints("tenant-a--sys", KEDA_SVC, ["10.1.0.7"], [("https", 6443)])
    install.fake.add_endpoints("tenant-b--sys", KEDA_SVC, ["10.1.0.8"], [("https", 8443)])
    install.fake.add_namespace("default")
    install.fake.add_endpoints("default", "kubernetes", ["172.18.0.2"], [("https", 6443)])
    for obj in await render_policies(install):
        install.fake.put("networkpolicies", obj, api_version="networking.k8s.io/v1")
    code, report = await install.doctor("--network", "none")  # auto: finds the owned policies
    assert code == 1
    assert crosses(report) == [
        f"{CROSS} tenant tenant-b: the router may reach its metrics server on :6443"
    ], report
    assert "sends to :8443" in report
    assert "keda.metricsServer.port" in report


async def test_args_from_pid_takes_serve_flags(install: Install) -> None:
    """`--args-from-pid` reads serve's flags from a process' command line; doctor's own win."""
    p = install.pki
    serve_flags = [
        "serve", "--kubeconfig", str(install.fake.kubeconfig),
        "--tenant-strategies", "pattern", "--tenant-pattern", PATTERN,
        "--proxy-client-cert-file", str(p.router_client_cert),
        "--proxy-client-key-file", str(p.router_client_key),
        "--upstream-ca-file", str(p.upstream_ca),
    ]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import sys; sys.stdin.read()", *serve_flags,
        stdin=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        argv = [
            "doctor", "--args-from-pid", str(proc.pid), "--network", "direct",
            "--metrics-url", f"http://127.0.0.1:{install.router.metrics_port}",
        ]  # fmt: skip

        code, report = await asyncio.to_thread(_run_cli, argv)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        await proc.wait()
    assert code == 0, report
    assert "\u2713 tenant tenant-a: discovery GET as metrics-router:doctor" in report
    assert "the router reads the ConfigMap (no --requestheader-* flags)" in report


async def test_router_metrics_through_the_services_proxy(install: Install) -> None:
    """Without --metrics-url (a workstation), the router is read through the kube-apiserver's
    services proxy; without RBAC for it, the check fails and says which permission."""
    argv = [a for a in install.argv() if not a.startswith("http://")]
    argv.remove("--metrics-url")

    code, report = await asyncio.to_thread(_run_cli, argv)
    assert code == 0, report
    assert "\u2713 Router 0.1.0 at services proxy metrics-router/metrics-router:metrics" in report
    install.fake.proxy_forbidden = True
    code, report = await asyncio.to_thread(_run_cli, argv)
    assert code == 1
    assert crosses(report) == [f"{CROSS} The router's metrics endpoint"], report
    assert "HTTP 403" in report
    assert "services/proxy" in report


async def test_workstation_mode_skips_what_it_cannot_reach(install: Install) -> None:
    """--network try (a workstation): a tenant that cannot be connected to is 'skipped: not
    reachable from here', not a fault; one that answers is still checked for real."""
    await install.stubs["tenant-b"].stop()
    argv = install.argv()
    argv[argv.index("direct")] = "try"
    code, report = await asyncio.to_thread(_run_cli, argv)
    assert code == 0, report
    assert (
        "- tenant tenant-b: TLS handshake with the router's client certificate: skipped: "
        "not reachable from here" in report
    )
    assert "\u2713 tenant tenant-a: discovery GET as metrics-router:doctor" in report


def test_bad_policy_config_is_a_usage_error(
    tenant_pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "policy.yaml"
    bad.write_text("keda: [not, a, mapping]\n")
    argv = [
        "doctor", "--routes-file", str(tmp_path / "r.yaml"), "--policy-config", str(bad),
        "--proxy-client-cert-file", str(tenant_pki.router_client_cert),
        "--proxy-client-key-file", str(tenant_pki.router_client_key),
    ]  # fmt: skip
    assert cli.main(argv) == 2
    assert "--policy-config" in capsys.readouterr().err


async def test_api_outage_is_one_failure(install: Install) -> None:
    await install.fake.outage()
    try:
        code, report = await install.doctor("--timeout", "1s")
    finally:
        await install.fake.recover()
    assert code == 1
    assert crosses(report) == [f"{CROSS} The Kubernetes API answers"], report
