"""What a check returns, the report's sections, and helpers shared by the checks (pure)."""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from router.core.option_values import format_duration
from router.doctor.snapshot import CertInfo, Cluster, Obj, Snapshot

Status = Literal["ok", "fail", "skipped"]

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


def field_at(obj: Obj | None, *path: str) -> Any:
    cur: Any = obj
    for key in path:
        if not isinstance(cur, Mapping):
            return None
        cur = cur.get(key)
    return cur


def name_of(obj: Obj) -> str:
    return str(field_at(obj, "metadata", "name") or "")


def date_text(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


def span(seconds: float) -> str:
    if abs(seconds) >= 2 * DAY:
        return f"{seconds / DAY:.0f} days"
    return format_duration(float(max(0, round(seconds))))


def validity(cert: CertInfo, now: float) -> str:
    left = cert.not_after - now
    when = f"expired {span(-left)} ago" if left < 0 else f"expires in {span(left)}"
    return f"valid {date_text(cert.not_before)} .. {date_text(cert.not_after)} ({when})"


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


def json_list(data: Mapping[str, Any], key: str) -> tuple[str, ...] | None:
    raw = data.get(key)
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return tuple(map(str, value)) if isinstance(value, list) else None


def skip_without_cluster(snapshot: Snapshot, section: str, title: str) -> list[CheckResult] | None:
    if snapshot.cluster is not None:
        return None
    if snapshot.cluster_error is not None:
        return [skipped(section, title, f"the cluster could not be read: {snapshot.cluster_error}")]
    return [skipped(section, title, "routes-file mode: no cluster to read")]


def tenant_of_namespace(cluster: Cluster) -> dict[str, str]:
    return {ns: t for t, nss in cluster.tenancy.tenants.items() for ns in nss}
