"""Checks 4-5: the routes, and each tenant's trust chain as the probes found it (pure)."""

from __future__ import annotations

from router.doctor.checks.results import (
    DOCTOR_GROUP,
    DOCTOR_USER,
    FIX_KEDA_TRUST,
    KEDA_METRICS_SERVER,
    CheckResult,
    fail,
    ok,
    read_fix,
    skip_without_cluster,
    skipped,
)
from router.doctor.snapshot import Snapshot, TrustProbe

# --------------------------------------------------------------------------- 4. routes


def check_routes(snapshot: Snapshot) -> list[CheckResult]:
    s = "routes"
    if snapshot.routes_file is not None:
        rf = snapshot.routes_file
        title = f"Routes file {rf.path}"
        if rf.error is not None:
            return [fail(s, title, [rf.error], "fix the routes file; `serve` refuses it too")]
        count = sum(len(v) for v in rf.tenants.values())
        return [ok(s, title, f"{len(rf.tenants)} tenants, {count} namespaces")]
    title = "Every tenant has an upstream Service with ready endpoints"
    skip = skip_without_cluster(snapshot, s, title)
    if skip is not None:
        return skip
    c = snapshot.cluster
    assert c is not None
    t = c.tenancy
    results: list[CheckResult] = []
    if "tenancy" in c.errors:
        return [
            fail(
                s,
                title,
                [c.errors["tenancy"]],
                read_fix("tenancy"),
            )
        ]
    if not t.tenants:
        results.append(
            fail(
                s,
                "At least one tenant",
                [f"no namespace resolves to a tenant (selector {t.selector or 'none'})"],
                "label the tenants' root namespaces (--tenant-root-label) or check "
                "--tenant-strategies / --tenant-pattern",
            )
        )
    for tenant in sorted(t.tenants):
        tt = f"tenant {tenant}: upstream with ready endpoints"
        if tenant in t.unrouted:
            results.append(
                fail(
                    s,
                    tt,
                    [f"no route: {t.unrouted[tenant]}"],
                    f"install the tenant's KEDA (its metrics Service must match "
                    f"--upstream-service-selector) in a namespace of tenant {tenant}",
                )
            )
            continue
        up = t.upstreams.get(tenant)
        if up is None:
            continue
        if t.template is not None:
            results.append(ok(s, tt, f"{up.url} (from --upstream-template)"))
            continue
        eps = c.endpoints.get(f"{up.namespace}/{up.name}")
        if "endpoints" in c.errors and (eps is None or not (eps.ready or eps.not_ready)):
            results.append(fail(s, tt, [c.errors["endpoints"]], read_fix("endpoints")))
        elif eps is None or not eps.ready:
            nready = len(eps.not_ready) if eps is not None else 0
            results.append(
                fail(
                    s,
                    tt,
                    [f"Service {up.namespace}/{up.name}: no ready endpoint ({nready} not ready)"],
                    f"kubectl -n {up.namespace} get pods -l app.kubernetes.io/name="
                    f"{KEDA_METRICS_SERVER}: the tenant's KEDA metrics server is not ready",
                )
            )
        else:
            results.append(
                ok(s, tt, f"Service {up.namespace}/{up.name}: {len(eps.ready)} ready ({up.url})")
            )
    if t.conflicts:
        results.append(
            fail(
                s,
                "No namespace is claimed twice",
                t.conflicts,
                "give each namespace one tenant: remove the extra tenant-root label or the "
                "second metrics Service",
            )
        )
    else:
        results.append(ok(s, "No namespace is claimed twice"))
    left = sorted(t.untenanted.items())
    listed = [f"{ns}: {why}" for ns, why in left[:20]] + (
        [f"... and {len(left) - 20} more"] if len(left) > 20 else []
    )
    if t.selector is not None and left:
        results.append(
            fail(
                s,
                f"Every namespace of the selector {t.selector} has a tenant",
                listed,
                "label these namespaces for a tenant (or keep them out of --namespace-selector)",
            )
        )
    elif t.selector is not None:
        results.append(ok(s, f"Every namespace of the selector {t.selector} has a tenant"))
    else:
        results.append(
            ok(
                s,
                "Namespaces of no tenant",
                f"{len(left)} (no --namespace-selector, so the cluster's own are expected)",
                *listed[:5],
            )
        )
    return results


# --------------------------------------------------------------------------- 5. trust chain


def _trust_result(probe: TrustProbe, router_cn: str) -> list[CheckResult]:
    s = "trust"
    hs = f"tenant {probe.tenant}: TLS handshake with the router's client certificate"
    gt = f"tenant {probe.tenant}: discovery GET as {DOCTOR_USER}"
    dialled = "" if probe.upstream.endswith(f"//{probe.address}") else f"dialled {probe.address}, "
    where = f"{probe.upstream} ({dialled}server name {probe.server_name})"
    if probe.skipped is not None:
        return [skipped(s, hs, probe.skipped), skipped(s, gt, probe.skipped)]
    trust_fix = FIX_KEDA_TRUST.format(cn=router_cn)
    if probe.failure in ("unreachable", "server-cert", "tls", "client-cert-refused"):
        fixes = {
            "unreachable": "check that the tenant's metrics server runs and that a NetworkPolicy "
            "lets the router reach it on its port (see 6)",
            "server-cert": "issue the tenant's serving certificate from the CA in "
            f"--upstream-ca-file with the SAN {probe.server_name} (deploy/keda/values.yaml: "
            "certificates.certManager, issuer metrics-router-upstream-ca)",
            "tls": "compare the TLS versions and certificates of both sides",
            "client-cert-refused": trust_fix,
        }
        assert probe.failure is not None
        what = {
            "unreachable": "cannot connect",
            "server-cert": "the router refuses the tenant's serving certificate",
            "tls": "TLS failed",
            "client-cert-refused": "the tenant's KEDA refused the router's client certificate "
            "(it does not trust the router's client CA)",
        }[probe.failure]
        return [
            fail(s, hs, [where, f"{what}: {probe.message}"], fixes[probe.failure]),
            skipped(s, gt, "no TLS connection"),
        ]
    peer = [f"peer CN={probe.peer.subject_cn}"] if probe.peer is not None else []
    out = [ok(s, hs, where, *peer)]
    status = probe.status
    said = f"{status} {probe.status_reason}".strip() + (
        f": {probe.status_message}"
        if probe.status_message and probe.status_message != probe.status_reason
        else ""
    )
    if probe.failure == "protocol" or status is None:
        out.append(
            fail(s, gt, [f"no valid HTTP answer: {probe.message}"], "read the tenant's KEDA log")
        )
    elif 200 <= status < 300:
        out.append(ok(s, gt, f"HTTP {status}"))
    elif status == 401:
        out.append(
            fail(
                s,
                gt,
                [
                    f"HTTP {said}",
                    f"the tenant's KEDA does not trust the router's client CA or does not allow "
                    f"its CN {router_cn}",
                ],
                trust_fix,
            )
        )
    elif status == 403:
        out.append(
            fail(
                s,
                gt,
                [f"HTTP {said}"],
                f"the tenant's KEDA forbids discovery to {DOCTOR_GROUP}: keep the ClusterRole "
                "system:discovery bound to system:authenticated, and let the metrics server "
                "create SubjectAccessReviews",
            )
        )
    else:
        out.append(fail(s, gt, [f"HTTP {said}"], "read the tenant's KEDA metrics server log"))
    return out


def check_trust(snapshot: Snapshot) -> list[CheckResult]:
    if snapshot.trust_skipped is not None:
        return [skipped("trust", "Tenants' trust chains", snapshot.trust_skipped)]
    if not snapshot.trust:
        return [skipped("trust", "Tenants' trust chains", "no tenant with a route")]
    out: list[CheckResult] = []
    for probe in sorted(snapshot.trust, key=lambda p: p.tenant):
        out.extend(_trust_result(probe, snapshot.router_cn))
    return out
