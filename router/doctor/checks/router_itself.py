"""Check 8: the router itself, from its metrics endpoint (pure)."""

from __future__ import annotations

import calendar
import time
from collections.abc import Mapping

from prometheus_client.parser import text_string_to_metric_families

from router.doctor.checks.results import CheckResult, date_text, fail, ok, skipped, span
from router.doctor.snapshot import Snapshot

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
    uptime = f"up {span(snapshot.now - started)}" if started else "uptime unknown"
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
        state = f"expired {span(-left)} ago" if left < 0 else f"expires in {span(left)}"
        shown.append(f"{name}: {date_text(when)} ({state})")
        if left < snapshot.expiry_warning:
            soon.append(f"{name}: {date_text(when)} ({state})")
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
