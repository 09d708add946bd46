"""Isolation: one tenant's upstream hangs while another tenant is measured."""

from __future__ import annotations

import subprocess
import time

from harness.ab import Cell, ab_cmd, run_ab
from harness.common import log
from harness.report import Report, fmt
from harness.scenarios.matrix import Target
from harness.stack import Stack


def isolation(st: Stack, targets: list[Target], rep: Report) -> dict[str, str]:
    """Load on tenant a, with and without 32 requests held open on the hanging tenant h."""
    settings, workdir = st.settings, st.workdir
    csv, hang_csv = workdir / "iso.csv", workdir / "iso-hang.csv"
    duration = settings.duration
    rows, verdicts = [], {}
    for t in targets:
        if t.name not in ("router-1", "nginx-1"):
            continue
        hang_url = t.url.replace("tenant-a", "tenant-h")
        base, hung = Cell(), Cell()
        reps = 2 if settings.quick else 5  # a noisy shared machine needs more than 3
        for _ in range(reps):
            base.runs.append(run_ab(ab_cmd(t.url, t.pem, 16, duration, csv), csv, t.pid))
        # One hanging load for the whole phase: 32 requests always held open (each ends with a
        # 504 after the upstream timeout and is sent again). Restarting it per run would leave
        # the previous run's requests in flight and push tenant h over its in-flight limit,
        # into fast 429s that ab re-sends in a tight loop.
        hang_load = subprocess.Popen(
            ab_cmd(hang_url, t.pem, 32, 600, hang_csv, socket_timeout=60),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(1.0)  # let the 32 hanging requests pile up
            for _ in range(reps):
                hung.runs.append(run_ab(ab_cmd(t.url, t.pem, 16, duration, csv), csv, t.pid))
        finally:
            hang_load.terminate()
            hang_load.wait()
        log(
            f"isolation {t.label}: baseline p99 "
            + ", ".join(f"{r.p99:.3f}" for r in base.runs)
            + " ms; hung p99 "
            + ", ".join(f"{r.p99:.3f}" for r in hung.runs)
            + " ms"
        )
        b99, h99 = base.median("p99"), hung.median("p99")
        change = (h99 / b99 - 1) * 100
        rows.append(
            [
                t.label, fmt(base.median("rps")), fmt(b99, ".3f"), fmt(hung.median("rps")),
                fmt(h99, ".3f"), f"{change:+.0f} %", str(base.errors() + hung.errors()),
            ]
        )  # fmt: skip
        log(f"isolation {t.label}: p99 {b99:.3f} -> {h99:.3f} ms ({change:+.0f} %)")
        if t.name == "router-1":
            verdicts["a hanging tenant moves the others' p99 < 10 %"] = (
                f"{'✓' if change < 10 else '✗'} {change:+.0f} % (1 worker, c=16)"
            )
    rep.add(
        "## Isolation: one tenant's upstream hangs",
        "",
        "Tenant h's upstream (a KedaStub with `hang`) accepts requests and never answers; 32 "
        "requests are held open against it for the whole hung phase (below the router's "
        "per-tenant in-flight limit of 64; the router answers 504 after its 10 s upstream "
        "timeout, NGINX after `proxy_read_timeout 10s`, and each is sent again) while ab "
        "measures tenant a at c=16. Medians of the baseline runs, then of the hung runs.",
        "",
    )
    rep.table(
        ["target", "baseline req/s", "baseline p99 ms", "hung req/s", "hung p99 ms", "p99 change",
         "errors on a"],
        rows,
    )  # fmt: skip
    return verdicts
