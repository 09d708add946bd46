"""The doctor's checks: pure functions from a :class:`Snapshot` to results (no I/O, no clock).

Each ``check_*`` function returns a list of :class:`CheckResult`; :func:`run_checks` runs them
all in the order of the report. A failure carries its evidence and one concrete fix. The fix
texts name flags and the files of deploy/ that set them, so an operator can act on them.
"""

from __future__ import annotations

import base64
import binascii
import calendar
import json
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from prometheus_client.parser import text_string_to_metric_families

from router.doctor.snapshot import (
    CertInfo,
    Cluster,
    Obj,
    Policies,
    Snapshot,
    TrustProbe,
)
from router.options import format_duration

Status = Literal["ok", "fail", "skipped"]

GROUP = "external.metrics.k8s.io"
DOCTOR_USER = "metrics-router:doctor"
DOCTOR_GROUP = "system:authenticated"
KEDA_OPERATOR = "keda-operator"
KEDA_METRICS_SERVER = "keda-operator-metrics-apiserver"
DAY = 86400.0

# Sections of the report, in order: (id, heading).
SECTIONS: tuple[tuple[str, str], ...] = (
    ("apiservice", "1. The APIService"),
    ("serving", "2. The serving certificate"),
    ("requestheader", "3. The requestheader trust"),
    ("routes", "4. Routes"),
    ("trust", "5. Each tenant's trust chain"),
    ("traffic", "6. Traffic boundaries"),
    ("keda", "7. Tenant KEDA settings"),
    ("router", "8. The router itself"),
)

FIX_KEDA_TRUST = (
    "give the tenant's KEDA metrics server --requestheader-client-ca-file=<the router's client "
    "CA> and --requestheader-allowed-names={cn}; deploy/keda/values.yaml sets them as "
    "extraArgs.metricsAdapter.requestheader-client-ca-file: "
    "/var/run/metrics-router-client-ca/ca.crt (ConfigMap metrics-router-client-ca) and "
    "requestheader-allowed-names: {cn}"
)


# Cluster.errors key -> what the identity doctor runs as must be allowed to read.
READS: dict[str, str] = {
    "apiservices": "list apiservices.apiregistration.k8s.io",
    "router-service": "get services and list endpointslices.discovery.k8s.io in the router's "
    "namespace",
    "tenancy": "list namespaces and services cluster-wide",
    "endpoints": "list endpointslices.discovery.k8s.io in the tenants' namespaces",
    "policies": "list networkpolicies.networking.k8s.io (and "
    "ciliumclusterwidenetworkpolicies.cilium.io)",
    "deployments": "list deployments.apps cluster-wide",
}


def read_fix(what: str) -> str:
    return (
        f"let the identity doctor runs as {READS[what]} (kubectl auth can-i ...; the router's "
        "own ServiceAccount may not), or run doctor with --kubeconfig of a reader"
    )


@dataclass(frozen=True, slots=True)
class CheckResult:
    section: str  # one of SECTIONS' ids
    title: str
    status: Status
    evidence: tuple[str, ...] = ()
    fix: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "section": self.section,
            "title": self.title,
            "status": self.status,
            "evidence": list(self.evidence),
            "fix": self.fix,
        }


def ok(section: str, title: str, *evidence: str) -> CheckResult:
    return CheckResult(section, title, "ok", tuple(evidence))


def fail(section: str, title: str, evidence: Iterable[str], fix: str) -> CheckResult:
    return CheckResult(section, title, "fail", tuple(evidence), fix)


def skipped(section: str, title: str, why: str) -> CheckResult:
    return CheckResult(section, title, "skipped", (why,))


# --------------------------------------------------------------------------- helpers


def _get(obj: Obj | None, *path: str) -> Any:
    cur: Any = obj
    for key in path:
        if not isinstance(cur, Mapping):
            return None
        cur = cur.get(key)
    return cur


def _name(obj: Obj) -> str:
    return str(_get(obj, "metadata", "name") or "")


def _date(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


def _days(seconds: float) -> str:
    if abs(seconds) >= 2 * DAY:
        return f"{seconds / DAY:.0f} days"
    return format_duration(float(max(0, round(seconds))))


def validity(cert: CertInfo, now: float) -> str:
    left = cert.not_after - now
    when = f"expired {_days(-left)} ago" if left < 0 else f"expires in {_days(left)}"
    return f"valid {_date(cert.not_before)} .. {_date(cert.not_after)} ({when})"


_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", re.DOTALL)


def pem_certificates(pem: bytes) -> frozenset[bytes]:
    """The DER bytes of every PEM certificate in ``pem`` (to compare CA bundles)."""
    out = set()
    for match in _PEM.finditer(pem):
        try:
            out.add(base64.b64decode(b"".join(match.group(1).split()), validate=True))
        except binascii.Error:
            continue
    return frozenset(out)


def _json_list(data: Mapping[str, Any], key: str) -> tuple[str, ...] | None:
    raw = data.get(key)
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return tuple(map(str, value)) if isinstance(value, list) else None


def _skip_cluster(snapshot: Snapshot, section: str, title: str) -> list[CheckResult] | None:
    if snapshot.cluster is not None:
        return None
    if snapshot.cluster_error is not None:
        return [skipped(section, title, f"the cluster could not be read: {snapshot.cluster_error}")]
    return [skipped(section, title, "routes-file mode: no cluster to read")]


def _tenant_of_namespace(cluster: Cluster) -> dict[str, str]:
    return {ns: t for t, nss in cluster.tenancy.tenants.items() for ns in nss}


# --------------------------------------------------------------------------- 1. APIService


def _conditions(obj: Obj) -> dict[str, Mapping[str, Any]]:
    out = {}
    for c in _get(obj, "status", "conditions") or ():
        if isinstance(c, Mapping) and c.get("type"):
            out[str(c["type"])] = c
    return out


def _chart_owner(obj: Obj, router_namespace: str) -> str | None:
    """Who (other than the router) created this APIService, judged by its labels/annotations:
    a KEDA chart, or a Helm release outside the router's namespace."""
    labels = _get(obj, "metadata", "labels") or {}
    annotations = _get(obj, "metadata", "annotations") or {}
    release_ns = annotations.get("meta.helm.sh/release-namespace")
    release = annotations.get("meta.helm.sh/release-name")
    part_of = str(labels.get("app.kubernetes.io/part-of", ""))
    if "keda" in part_of or str(labels.get("app.kubernetes.io/name", "")).startswith("keda"):
        where = f" (Helm release {release} in {release_ns})" if release_ns else ""
        return f"a KEDA chart{where}"
    if (
        release_ns
        and release
        and release_ns != router_namespace
        and labels.get("app.kubernetes.io/managed-by") == "Helm"
    ):
        return f"Helm release {release} in {release_ns}"
    return None


def check_apiservice(snapshot: Snapshot) -> list[CheckResult]:
    s = "apiservice"
    title = "APIService"
    if snapshot.cluster_error is not None:
        return [
            fail(
                s,
                "The Kubernetes API answers",
                [snapshot.cluster_error],
                "check --kubeconfig (or the pod's service account) and that the kube-apiserver "
                "is reachable from here: kubectl get --raw /readyz",
            )
        ]
    skip = _skip_cluster(snapshot, s, title)
    if skip is not None:
        return skip
    c = snapshot.cluster
    assert c is not None
    want = f"{c.router_namespace}/{c.router_service_name}"
    results: list[CheckResult] = []
    if "apiservices" in c.errors:
        return [
            fail(
                s,
                f"APIService {c.apiservice_name} exists",
                [f"listing APIServices failed: {c.errors['apiservices']}"],
                read_fix("apiservices"),
            )
        ]
    ours = next((a for a in c.apiservices if _name(a) == c.apiservice_name), None)
    tenants_ns = _tenant_of_namespace(c)
    if ours is None:
        others = [_name(a) for a in c.apiservices]
        results.append(
            fail(
                s,
                f"APIService {c.apiservice_name} exists",
                [f"not found; APIServices of {GROUP}: {', '.join(others) or 'none'}"],
                "apply it: kubectl apply -k deploy/apiservice (cert-manager injects the caBundle), "
                "or metrics-router render apiservice --ca-file <serving CA> | kubectl apply -f -",
            )
        )
    else:
        svc = _get(ours, "spec", "service") or {}
        target = f"{svc.get('namespace')}/{svc.get('name')}" if svc else "(local: no Service)"
        port = int(svc.get("port") or 443) if svc else 0
        title_points = f"APIService {c.apiservice_name} points at {want}"
        if target != want:
            owner = tenants_ns.get(str(svc.get("namespace", "")))
            who = f" (a namespace of tenant {owner}: its KEDA chart re-created it)" if owner else ""
            results.append(
                fail(
                    s,
                    title_points,
                    [f"spec.service is {target}:{port}{who}"],
                    f"re-apply deploy/apiservice so spec.service is {want}:443, and remove the "
                    "APIService from every tenant's KEDA release (the deploy/keda/component "
                    "post-renderer deletes it)",
                )
            )
        elif c.router_service is None and "router-service" in c.errors:
            results.append(
                fail(
                    s,
                    title_points,
                    [f"reading Service {want}: {c.errors['router-service']}"],
                    read_fix("router-service"),
                )
            )
        elif c.router_service is None:
            results.append(
                fail(
                    s,
                    title_points,
                    [f"Service {want} not found"],
                    "apply the router's base: kubectl apply -k deploy/router",
                )
            )
        else:
            ports = [p.get("port") for p in _get(c.router_service, "spec", "ports") or ()]
            if port not in ports:
                results.append(
                    fail(
                        s,
                        title_points,
                        [f"spec.service.port is {port}; Service {want} has ports {ports}"],
                        f"set spec.service.port of APIService {c.apiservice_name} to the "
                        "Service's https port (443 in deploy/router/service.yaml)",
                    )
                )
            else:
                results.append(ok(s, f"{title_points}:{port}"))
        cond = _conditions(ours).get("Available")
        if cond is not None and cond.get("status") == "True":
            results.append(ok(s, f"APIService {c.apiservice_name} is Available"))
        else:
            reason = str((cond or {}).get("reason") or "no Available condition")
            message = str((cond or {}).get("message") or "")
            fixes = {
                "FailedDiscoveryCheck": "the aggregator cannot reach or verify the router: see "
                "the serving-certificate checks below, and that the router's pods are ready "
                f"(kubectl -n {c.router_namespace} get endpointslices -l "
                f"kubernetes.io/service-name={c.router_service_name})",
                "ServiceNotFound": f"create Service {want}: kubectl apply -k deploy/router",
                "MissingEndpoints": "no ready router pod: kubectl -n "
                f"{c.router_namespace} describe deploy/metrics-router",
            }
            results.append(
                fail(
                    s,
                    f"APIService {c.apiservice_name} is Available",
                    [f"Available={(cond or {}).get('status', 'Unknown')} reason={reason}"]
                    + ([f"message: {message}"] if message else []),
                    fixes.get(reason, "read the kube-apiserver's log for the aggregator's error"),
                )
            )
    claimants = []
    for a in c.apiservices:
        if _name(a) != c.apiservice_name:
            claimants.append(f"APIService {_name(a)} also serves group {GROUP}")
    owner = _chart_owner(ours, c.router_namespace) if ours is not None else None
    if owner is not None:
        claimants.append(f"APIService {c.apiservice_name} was re-created by {owner}")
    if claimants:
        results.append(
            fail(
                s,
                f"No other object claims {GROUP}",
                claimants,
                "delete the extra APIServices (kubectl delete apiservice NAME), re-apply "
                "deploy/apiservice, and keep every tenant's KEDA chart from rendering one "
                "(deploy/keda/component)",
            )
        )
    else:
        results.append(ok(s, f"No other object claims {GROUP}"))
    return results


# --------------------------------------------------------------------------- 2. serving cert


def check_serving(snapshot: Snapshot) -> list[CheckResult]:
    s = "serving"
    title = "Serving certificate"
    skip = _skip_cluster(snapshot, s, title)
    if skip is not None:
        return skip
    c = snapshot.cluster
    assert c is not None
    if c.serving_skipped is not None:
        return [skipped(s, title, c.serving_skipped)]
    if "router-service" in c.errors:
        return [fail(s, title, [c.errors["router-service"]], read_fix("router-service"))]
    if not c.serving:
        return [
            fail(
                s,
                title,
                [f"Service {c.router_namespace}/{c.router_service_name} has no ready endpoint"],
                f"start the router: kubectl -n {c.router_namespace} rollout status "
                "deploy/metrics-router",
            )
        ]
    name = f"{c.router_service_name}.{c.router_namespace}.svc"
    results = []
    for probe in c.serving:
        where = f"at {probe.address}"
        if probe.leaf is None:
            results.append(
                fail(
                    s,
                    f"Serving certificate {where}",
                    [f"TLS handshake failed: {probe.error}"],
                    "check the router's log and its --tls-cert-file/--tls-private-key-file",
                )
            )
            continue
        leaf = probe.leaf
        evidence = [
            f"subject CN={leaf.subject_cn}, issuer CN={leaf.issuer_cn}",
            validity(leaf, snapshot.now),
        ]
        if probe.ca_error is not None:
            results.append(
                fail(
                    s,
                    f"The APIService's caBundle verifies the serving certificate {where}",
                    [*evidence, probe.ca_error],
                    "put the CA that signed the serving certificate into spec.caBundle: with "
                    "cert-manager keep the annotation cert-manager.io/inject-ca-from on the "
                    "APIService; without, metrics-router render apiservice --ca-file "
                    "<serving CA> | kubectl apply -f -. A KEDA operator that still patches the "
                    "APIService overwrites it (see 7)",
                )
            )
        else:
            results.append(
                ok(
                    s,
                    f"The APIService's caBundle verifies the serving certificate {where}",
                    *evidence,
                )
            )
        if name not in leaf.dns_names:
            results.append(
                fail(
                    s,
                    f"The serving certificate names {name}",
                    [f"DNS SANs: {', '.join(leaf.dns_names) or 'none'}"],
                    f"issue the serving certificate with dnsNames {name} "
                    "(deploy/router/certificates.yaml)",
                )
            )
        else:
            results.append(ok(s, f"The serving certificate names {name}"))
        left = leaf.not_after - snapshot.now
        if left < snapshot.expiry_warning:
            results.append(
                fail(
                    s,
                    "The serving certificate is not about to expire",
                    [validity(leaf, snapshot.now)],
                    "renew it: cmctl renew -n metrics-router metrics-router-serving (the router "
                    "re-reads the files on change)",
                )
            )
    return results


# --------------------------------------------------------------------------- 3. requestheader


def check_requestheader(snapshot: Snapshot) -> list[CheckResult]:
    s = "requestheader"
    title = (
        "The router's requestheader settings match kube-system/extension-apiserver-authentication"
    )
    skip = _skip_cluster(snapshot, s, title)
    if skip is not None:
        return skip
    c = snapshot.cluster
    assert c is not None
    cm = c.auth_configmap
    if cm is None:
        why = c.errors.get("configmap", "not found")
        return [
            fail(
                s,
                title,
                [f"kube-system/extension-apiserver-authentication: {why}"],
                "let the router read it: bind the Role extension-apiserver-authentication-reader "
                "in kube-system to its ServiceAccount (deploy/router/rbac.yaml)",
            )
        ]
    data = _get(cm, "data") or {}
    cm_ca = pem_certificates(str(data.get("requestheader-client-ca-file", "")).encode())
    if not cm_ca:
        return [
            fail(
                s,
                title,
                ["the ConfigMap has no requestheader-client-ca-file"],
                "start kube-apiserver with --requestheader-client-ca-file, "
                "--proxy-client-cert-file and --proxy-client-key-file (the aggregation layer)",
            )
        ]
    cm_names = _json_list(data, "requestheader-allowed-names") or ()
    cm_users = _json_list(data, "requestheader-username-headers") or ("X-Remote-User",)
    cm_groups = _json_list(data, "requestheader-group-headers") or ("X-Remote-Group",)
    cm_extra = _json_list(data, "requestheader-extra-headers-prefix") or ("X-Remote-Extra-",)
    rh = c.requestheader
    summary = f"ConfigMap: {len(cm_ca)} CA certificate(s), allowed names {list(cm_names) or 'any'}"
    if not rh.from_flags:
        return [
            ok(s, title, summary, "the router reads the ConfigMap (no --requestheader-* flags)")
        ]
    problems = []
    fixes = []
    flag_ca = pem_certificates(rh.client_ca_pem or b"")
    if not cm_ca <= flag_ca:
        problems.append(
            "--requestheader-client-ca-file does not hold the ConfigMap's requestheader CA: the "
            "aggregator's client certificate fails the handshake"
        )
    names = set(rh.allowed_names)
    if names and cm_names and not names & set(cm_names):
        problems.append(
            f"--requestheader-allowed-names {sorted(names)} shares no name with the ConfigMap's "
            f"{list(cm_names)}: every request gets 401"
        )
    for flag, mine, theirs in (
        ("--requestheader-username-headers", rh.username_headers, cm_users),
        ("--requestheader-group-headers", rh.group_headers, cm_groups),
        ("--requestheader-extra-headers-prefix", rh.extra_headers_prefixes, cm_extra),
    ):
        if {h.lower() for h in mine} != {h.lower() for h in theirs}:
            problems.append(f"{flag} is {list(mine)}, the aggregator sends {list(theirs)}")
    if problems:
        fixes.append(
            "drop the --requestheader-* flags from serve so the router follows the ConfigMap, "
            "or set them to the ConfigMap's values"
        )
        return [fail(s, title, [summary, *problems], fixes[0])]
    note = "set by --requestheader-* flags, compatible with the ConfigMap"
    if names != set(cm_names):
        note += f" (allowed names {sorted(names) or 'any'})"
    return [ok(s, title, summary, note)]


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
    skip = _skip_cluster(snapshot, s, title)
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
    skip = _skip_cluster(snapshot, s, title)
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
    for container in _get(deploy, "spec", "template", "spec", "containers") or ():
        out.extend(map(str, container.get("command") or ()))
        out.extend(map(str, container.get("args") or ()))
    return out


def _env(deploy: Obj, name: str) -> str | None:
    for container in _get(deploy, "spec", "template", "spec", "containers") or ():
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
    labels = _get(deploy, "metadata", "labels") or {}
    name = str(labels.get("app.kubernetes.io/name") or labels.get("app") or _name(deploy))
    if name == KEDA_METRICS_SERVER or "metrics-apiserver" in name:
        return KEDA_METRICS_SERVER
    if name == KEDA_OPERATOR or name.endswith("keda-operator"):
        return KEDA_OPERATOR
    return None


def check_keda(snapshot: Snapshot) -> list[CheckResult]:
    s = "keda"
    title = "Tenant KEDA settings"
    skip = _skip_cluster(snapshot, s, title)
    if skip is not None:
        return skip
    c = snapshot.cluster
    assert c is not None
    if "deployments" in c.errors:
        return [fail(s, title, [c.errors["deployments"]], read_fix("deployments"))]
    owner = _tenant_of_namespace(c)
    by_tenant: dict[str, list[Obj]] = {}
    for d in c.deployments:
        tenant = owner.get(str(_get(d, "metadata", "namespace")))
        if tenant is not None and _component(d) is not None:
            by_tenant.setdefault(tenant, []).append(d)
    results: list[CheckResult] = []
    for tenant in sorted(c.tenancy.tenants):
        deploys = sorted(
            by_tenant.get(tenant, []),
            key=lambda d: str(_get(d, "metadata", "namespace")) + _name(d),
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
    ref = f"deploy/{_name(d)} in {_get(d, 'metadata', 'namespace')}"
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


# --------------------------------------------------------------------------- 8. the router


def _samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    out = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.append((sample.name, dict(sample.labels), float(sample.value)))
    return out


def _rfc3339(text: str) -> float | None:
    try:
        return float(calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ")))
    except (TypeError, ValueError):
        return None


def check_router(snapshot: Snapshot) -> list[CheckResult]:
    s = "router"
    r = snapshot.router
    title = "The router's metrics endpoint"
    if r is None:
        return [skipped(s, title, "not asked")]
    if r.skipped is not None:
        return [skipped(s, title, r.skipped)]
    if r.error is not None or r.metrics_text is None:
        fix = (
            "pass --metrics-url of the router's metrics port (in the router's pod "
            "http://127.0.0.1:9090; from a workstation after kubectl -n metrics-router "
            "port-forward svc/metrics-router 9090)"
        )
        if r.url.startswith("services proxy"):
            fix = (
                "allow get on services/proxy for the router's Service to the identity doctor "
                "runs as (kubectl auth can-i get services/proxy -n metrics-router), or " + fix
            )
        return [fail(s, title, [f"{r.url}: {r.error}"], fix)]
    try:
        samples = _samples(r.metrics_text)
    except ValueError as exc:
        return [fail(s, title, [f"{r.url}/metrics is not Prometheus text: {exc}"], "check the URL")]
    results: list[CheckResult] = []

    def find(name: str) -> list[tuple[dict[str, str], float]]:
        return [(labels, value) for n, labels, value in samples if n == name]

    version = next((lab.get("version", "") for lab, _ in find("metrics_router_build_info")), "")
    started = next((v for _, v in find("metrics_router_start_time_seconds")), None)
    uptime = f"up {_days(snapshot.now - started)}" if started else "uptime unknown"
    results.append(ok(s, f"Router {version or '(version unknown)'} at {r.url}", uptime))

    failures = [
        f"{lab.get('source', '?')}: {v:.0f} failed reload(s)"
        for lab, v in find("metrics_router_reloads_total")
        if lab.get("result") == "failure" and v > 0
    ]
    if failures:
        results.append(
            fail(
                s,
                "No reload failures",
                failures,
                "the router keeps the last good version; read its log (`reload` lines) and fix "
                "the file or ConfigMap it refused",
            )
        )
    else:
        results.append(ok(s, "No reload failures"))

    expiry = find("metrics_router_certificate_expiry_timestamp_seconds")
    soon = []
    shown = []
    for lab, when in sorted(expiry, key=lambda x: x[0].get("certificate", "")):
        name = lab.get("certificate", "?")
        left = when - snapshot.now
        state = f"expired {_days(-left)} ago" if left < 0 else f"expires in {_days(left)}"
        shown.append(f"{name}: {_date(when)} ({state})")
        if left < snapshot.expiry_warning:
            soon.append(f"{name}: {_date(when)} ({state})")
    if soon:
        results.append(
            fail(
                s,
                "The router's certificates are not about to expire",
                soon,
                "renew them (cert-manager: cmctl renew); the router re-reads changed files",
            )
        )
    else:
        results.append(ok(s, "The router's certificates are not about to expire", *shown))

    tenants = (r.routes or {}).get("tenants") or []
    recent = []
    older = []
    for t in tenants:
        err = t.get("lastUpstreamError") if isinstance(t, Mapping) else None
        if not err:
            continue
        at = _rfc3339(str(err.get("at", "")))
        line = (
            f"tenant {t.get('tenant')}: {err.get('kind')} at {err.get('at')}: {err.get('message')}"
        )
        if at is not None and snapshot.now - at <= snapshot.recent_error_window:
            recent.append(line)
        else:
            older.append(line)
    title_err = "No recent upstream error"
    if recent:
        results.append(
            fail(
                s,
                title_err,
                recent + older,
                "see the trust-chain checks (5) of these tenants",
            )
        )
    else:
        results.append(ok(s, title_err, *(older or [f"{len(tenants)} tenants, none recorded"])))
    return results


# --------------------------------------------------------------------------- all


Check = Callable[[Snapshot], list[CheckResult]]


def run_checks(snapshot: Snapshot) -> list[CheckResult]:
    """Every check, in report order."""
    return [
        *check_apiservice(snapshot),
        *check_serving(snapshot),
        *check_requestheader(snapshot),
        *check_routes(snapshot),
        *check_trust(snapshot),
        *check_traffic(snapshot),
        *check_keda(snapshot),
        *check_router(snapshot),
    ]


def exit_code(results: Sequence[CheckResult]) -> int:
    return 1 if any(r.status == "fail" for r in results) else 0
