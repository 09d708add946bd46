"""`metrics-router demo` end to end, as a user runs it: a subprocess, its output, its exit code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def _demo_command() -> list[str]:
    script = Path(sys.executable).parent / "metrics-router"
    if script.exists():
        return [str(script), "demo"]
    return [sys.executable, "-m", "router", "demo"]


def _row(lines: list[str], *cells: str) -> list[str]:
    """The first table row whose cells start with ``cells`` (after the check mark)."""
    for line in lines:
        parts = line.split()
        if parts[1 : 1 + len(cells)] == list(cells):
            return parts
    raise AssertionError(f"no row {cells} in output")


def test_demo_walks_the_whole_path_and_exits_zero() -> None:
    done = subprocess.run(
        _demo_command(),
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "\u2717" not in out, out
    lines = out.splitlines()
    # each namespace answered by its own tenant, with the HPA's identity seen upstream and the
    # router's own certificate authenticated there
    for namespace, tenant, value in (
        ("tenant-a", "tenant-a", "42"),
        ("tenant-a--dev", "tenant-a", "42"),
        ("tenant-b", "tenant-b", "7"),
        ("tenant-c--ml", "tenant-c", "1500m"),
    ):
        row = _row(lines, namespace, tenant)
        assert row[0] == "\u2713", row
        assert row[3:6] == [tenant, "200", value], row
        assert row[6] == "horizontal-pod-autoscaler", row
        assert row[7] == "system:serviceaccounts,system:authenticated", row
        assert row[8] == "metrics-router", row
    assert "404 NotFound" in " ".join(_row(lines, "unknown", "namespace"))
    assert "401 Unauthorized" in " ".join(_row(lines, "no", "client", "certificate,"))
    assert "TLS handshake refused" in " ".join(_row(lines, "CN", "front-proxy-client"))
    assert "400 BadRequest" in " ".join(_row(lines, "encoded", "traversal"))
    assert "upstream requests during these refusals: 0" in out
    assert "routable after" in out
    assert _row(lines, "tenant-c", "503")[0] == "\u2713"
    assert 'metrics_router_upstream_errors_total{kind="unreachable",tenant="tenant-c"} 1.0' in out
    summary = lines[-1] if "passed" in lines[-1] else next(ln for ln in lines if " passed, " in ln)
    # the doctor, in routes-file mode: cluster checks skipped, every tenant's chain probed
    assert "- APIService: skipped: routes-file mode" in out
    assert "\u2713 tenant tenant-c: discovery GET as metrics-router:doctor" in out
    assert "6 polls while tenant-b was down: 0 errors" in out
    assert _row(lines, "one", "group", "more")[0] == "\u2713"
    # 5 namespaces, discovery, 5 refusals, nothing forwarded, live change, doctor, 3 outage
    # rows, metrics, 6 stale answers, another identity, b back, and the exit code 0 on SIGTERM
    assert summary.startswith("27 passed, 0 failed"), summary
