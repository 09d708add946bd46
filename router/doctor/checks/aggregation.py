"""Checks 1-3, the links the aggregator depends on: the APIService, the serving certificate,
the requestheader trust (pure)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from router.core.status import GROUP
from router.doctor.checks.results import (
    CheckResult,
    fail,
    field_at,
    json_list,
    name_of,
    ok,
    pem_certificates,
    read_fix,
    skip_without_cluster,
    skipped,
    tenant_of_namespace,
    validity,
)
from router.doctor.snapshot import Obj, Snapshot

# --------------------------------------------------------------------------- 1. APIService


def _conditions(obj: Obj) -> dict[str, Mapping[str, Any]]:
    out = {}
    for c in field_at(obj, "status", "conditions") or ():
        if isinstance(c, Mapping) and c.get("type"):
            out[str(c["type"])] = c
    return out


def _chart_owner(obj: Obj, router_namespace: str) -> str | None:
    """Who (other than the router) created this APIService, judged by its labels/annotations:
    a KEDA chart, or a Helm release outside the router's namespace."""
    labels = field_at(obj, "metadata", "labels") or {}
    annotations = field_at(obj, "metadata", "annotations") or {}
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
    skip = skip_without_cluster(snapshot, s, title)
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
    ours = next((a for a in c.apiservices if name_of(a) == c.apiservice_name), None)
    tenants_ns = tenant_of_namespace(c)
    if ours is None:
        others = [name_of(a) for a in c.apiservices]
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
        svc = field_at(ours, "spec", "service") or {}
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
            ports = [p.get("port") for p in field_at(c.router_service, "spec", "ports") or ()]
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
        if name_of(a) != c.apiservice_name:
            claimants.append(f"APIService {name_of(a)} also serves group {GROUP}")
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
    skip = skip_without_cluster(snapshot, s, title)
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
    skip = skip_without_cluster(snapshot, s, title)
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
    data = field_at(cm, "data") or {}
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
    cm_names = json_list(data, "requestheader-allowed-names") or ()
    cm_users = json_list(data, "requestheader-username-headers") or ("X-Remote-User",)
    cm_groups = json_list(data, "requestheader-group-headers") or ("X-Remote-Group",)
    cm_extra = json_list(data, "requestheader-extra-headers-prefix") or ("X-Remote-Extra-",)
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
