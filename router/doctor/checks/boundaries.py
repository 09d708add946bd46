"""Checks 6-7, what keeps tenants apart: the traffic policies and the tenant KEDA settings
that break sharing (pure)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from router.doctor.checks.results import (
    FIX_KEDA_TRUST,
    KEDA_METRICS_SERVER,
    KEDA_OPERATOR,
    CheckResult,
    fail,
    field_at,
    name_of,
    ok,
    read_fix,
    skip_without_cluster,
    skipped,
    tenant_of_namespace,
)
from router.doctor.snapshot import Cluster, Obj, Policies, Snapshot

# --------------------------------------------------------------------------- 6. traffic


def contains(actual: Any, desired: Any) -> bool:
    """Whether ``actual`` holds every field of ``desired`` (lists compared whole)."""
    if isinstance(desired, Mapping):
        return isinstance(actual, Mapping) and all(
            k in actual and contains(actual[k], v) for k, v in desired.items()
        )
    if isinstance(desired, list | tuple):
        return (
            isinstance(actual, list | tuple)
            and len(actual) == len(desired)
            and all(contains(a, d) for a, d in zip(actual, desired, strict=True))
        )
    return bool(actual == desired)


def _policy_results(p: Policies, cluster: Cluster, required: bool) -> list[CheckResult]:
    s = "traffic"
    label = {"networkpolicy": "NetworkPolicies", "cilium": "CiliumClusterwideNetworkPolicies"}
    what = label.get(p.kind, p.kind)
    fix = (
        "let the router re-apply them (serve --manage-network-policies, leader replica), or "
        f"write them for GitOps: metrics-router render --kind {p.kind} --output-dir DIR"
    )
    if not p.available:
        if required:
            return [fail(s, f"{what} exist", [f"the API has no {what}"], "install the CRDs")]
        return []
    if p.render_error is not None:
        return [fail(s, f"{what} render", [p.render_error], "fix --policy-config")]
    wanted = {w.key: w for w in p.wanted}
    missing = sorted(k for k in wanted if k not in p.actual)
    differs = sorted(
        k for k in wanted if k in p.actual and not contains(p.actual[k], wanted[k].body)
    )
    extra = sorted(k for k in p.actual if k not in wanted)
    results = []
    title = f"The {what} the router renders exist and match"
    if missing or differs or extra:
        evidence = (
            [f"missing: {k}" for k in missing]
            + [f"differs from the rendering: {k}" for k in differs]
            + [f"owned but no longer wanted: {k}" for k in extra]
        )
        results.append(fail(s, title, evidence, fix))
    else:
        results.append(ok(s, title, f"{len(wanted)} objects"))
    bad = set(missing) | set(differs)
    for tenant in sorted(cluster.tenancy.tenants):
        mine = [w.key for w in p.wanted if w.tenant == tenant]
        tt = f"tenant {tenant}: the router may reach its metrics server on :{p.metrics_server_port}"
        up = cluster.tenancy.upstreams.get(tenant)
        if not mine:
            results.append(fail(s, tt, ["no policy is rendered for this tenant"], fix))
        elif bad & set(mine):
            results.append(
                fail(s, tt, [f"{k} is missing or differs" for k in sorted(bad & set(mine))], fix)
            )
        elif up is not None and up.ports and p.metrics_server_port not in up.ports:
            results.append(
                fail(
                    s,
                    tt,
                    [
                        f"the policies allow :{p.metrics_server_port}; Service {up.namespace}/"
                        f"{up.name} sends to :{', :'.join(map(str, up.ports))}"
                    ],
                    "set keda.metricsServer.port in --policy-config to the metrics server's "
                    "container port, then let the router re-apply the policies",
                )
            )
        else:
            results.append(ok(s, tt))
    return results


def check_traffic(snapshot: Snapshot) -> list[CheckResult]:
    s = "traffic"
    title = "NetworkPolicies"
    skip = skip_without_cluster(snapshot, s, title)
    if skip is not None:
        return skip
    c = snapshot.cluster
    assert c is not None
    if c.policy_kind == "none":
        return [skipped(s, title, "--policy-kind none")]
    if "policies" in c.errors:
        return [fail(s, title, [c.errors["policies"]], read_fix("policies"))]
    if c.policy_kind == "auto":
        chosen = [p for p in c.policies if p.actual]
        if not chosen:
            return [
                skipped(
                    s,
                    title,
                    "no policy owned by metrics-router in the cluster: not managed here "
                    "(--policy-kind networkpolicy|cilium requires them)",
                )
            ]
        required = False
    else:
        chosen = [p for p in c.policies if p.kind == c.policy_kind]
        required = True
    out: list[CheckResult] = []
    for p in chosen:
        out.extend(_policy_results(p, c, required))
    return out


# --------------------------------------------------------------------------- 7. KEDA settings


def _argv(deploy: Obj) -> list[str]:
    out: list[str] = []
    for container in field_at(deploy, "spec", "template", "spec", "containers") or ():
        out.extend(map(str, container.get("command") or ()))
        out.extend(map(str, container.get("args") or ()))
    return out


def _env(deploy: Obj, name: str) -> str | None:
    for container in field_at(deploy, "spec", "template", "spec", "containers") or ():
        for e in container.get("env") or ():
            if e.get("name") == name:
                return str(e.get("value") or "")
    return None


def flag_value(argv: Sequence[str], flag: str) -> str | None:
    """The value of ``--flag=V`` or ``--flag V`` (last one wins); ``"true"`` for a bare flag."""
    value = None
    for i, arg in enumerate(argv):
        if arg == flag:
            nxt = argv[i + 1] if i + 1 < len(argv) else ""
            value = nxt if nxt and not nxt.startswith("-") else "true"
        elif arg.startswith(flag + "="):
            value = arg[len(flag) + 1 :]
    return value


def _component(deploy: Obj) -> str | None:
    labels = field_at(deploy, "metadata", "labels") or {}
    name = str(labels.get("app.kubernetes.io/name") or labels.get("app") or name_of(deploy))
    if name == KEDA_METRICS_SERVER or "metrics-apiserver" in name:
        return KEDA_METRICS_SERVER
    if name == KEDA_OPERATOR or name.endswith("keda-operator"):
        return KEDA_OPERATOR
    return None


def check_keda(snapshot: Snapshot) -> list[CheckResult]:
    s = "keda"
    title = "Tenant KEDA settings"
    skip = skip_without_cluster(snapshot, s, title)
    if skip is not None:
        return skip
    c = snapshot.cluster
    assert c is not None
    if "deployments" in c.errors:
        return [fail(s, title, [c.errors["deployments"]], read_fix("deployments"))]
    owner = tenant_of_namespace(c)
    by_tenant: dict[str, list[Obj]] = {}
    for d in c.deployments:
        tenant = owner.get(str(field_at(d, "metadata", "namespace")))
        if tenant is not None and _component(d) is not None:
            by_tenant.setdefault(tenant, []).append(d)
    results: list[CheckResult] = []
    for tenant in sorted(c.tenancy.tenants):
        deploys = sorted(
            by_tenant.get(tenant, []),
            key=lambda d: str(field_at(d, "metadata", "namespace")) + name_of(d),
        )
        if not deploys:
            results.append(
                skipped(s, f"tenant {tenant}: KEDA", "no KEDA Deployment in its namespaces")
            )
            continue
        for d in deploys:
            results.extend(_keda_deployment(s, tenant, d, owner, snapshot.router_cn))
    if not results:
        results.append(skipped(s, title, "no tenants"))
    return results


def _keda_deployment(
    s: str, tenant: str, d: Obj, owner: Mapping[str, str], router_cn: str
) -> list[CheckResult]:
    ref = f"deploy/{name_of(d)} in {field_at(d, 'metadata', 'namespace')}"
    argv = _argv(d)
    kind = _component(d)
    out: list[CheckResult] = []
    if kind == KEDA_OPERATOR:
        patching = flag_value(argv, "--enable-apiservice-patching")
        rotation = flag_value(argv, "--enable-cert-rotation")
        t = f"tenant {tenant}: {ref} does not patch the shared APIService"
        if patching != "false" and rotation == "true":
            out.append(
                fail(
                    s,
                    t,
                    [
                        "--enable-cert-rotation=true and APIService patching not disabled: the "
                        "operator writes its own CA into v1beta1.external.metrics.k8s.io"
                    ],
                    "KEDA >= v2.20: certificates.operator.apiServicePatching.enabled=false "
                    "(--enable-apiservice-patching=false); before v2.20: "
                    "certificates.autoGenerated=false with cert-manager, as "
                    "deploy/keda/values.yaml does",
                )
            )
        else:
            out.append(ok(s, t))
        t = f"tenant {tenant}: {ref} watches only its tenant's namespaces"
        if any(a.endswith("metrics-router") for a in argv[:1]) and "reloader" in argv:
            out.append(ok(s, t, "WATCH_NAMESPACE is set by metrics-router reloader"))
        else:
            watch = _env(d, "WATCH_NAMESPACE")
            names = [n.strip() for n in (watch or "").split(",") if n.strip()]
            foreign = [f"{n} (tenant {owner[n]})" for n in names if owner.get(n, tenant) != tenant]
            fix = (
                "run the operator under `metrics-router reloader --tenant "
                f"{tenant}` (deploy/keda/component), which keeps WATCH_NAMESPACE to the "
                "tenant's namespaces"
            )
            if not names:
                out.append(
                    fail(
                        s,
                        t,
                        ["WATCH_NAMESPACE is empty: KEDA watches every namespace"],
                        fix,
                    )
                )
            elif foreign:
                out.append(fail(s, t, [f"WATCH_NAMESPACE names {', '.join(foreign)}"], fix))
            else:
                out.append(ok(s, t, f"WATCH_NAMESPACE={watch}"))
    elif kind == KEDA_METRICS_SERVER:
        t = f"tenant {tenant}: {ref} has requestheader flags"
        missing = [
            f
            for f in ("--requestheader-client-ca-file", "--requestheader-allowed-names")
            if flag_value(argv, f) is None
        ]
        if missing:
            out.append(
                fail(
                    s,
                    t,
                    [
                        f"missing {', '.join(missing)}: it trusts the cluster's front-proxy CA, "
                        "not the router"
                    ],
                    FIX_KEDA_TRUST.format(cn=router_cn),
                )
            )
        else:
            allowed = flag_value(argv, "--requestheader-allowed-names") or ""
            out.append(ok(s, t, f"--requestheader-allowed-names={allowed}"))
    return out
