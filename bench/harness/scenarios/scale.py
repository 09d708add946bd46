"""Scale: 10,000 namespaces in 1,000 tenants: the table in a fresh interpreter; the router
with it."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

from harness.ab import Cell, ab_cmd, run_ab
from harness.common import BENCH, METRIC_PATH, ROOT, log
from harness.nginx import Upstreams
from harness.procstats import rss_kib
from harness.report import Report
from harness.routerproc import routes_doc, start_router
from harness.stack import Stack


def scale_probe(routes_file: Path, namespaces: list[str]) -> dict[str, float]:
    """Runs in a fresh interpreter: parse time, lookup cost, RSS growth."""

    def rss() -> int:
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmRSS:")[1].split()[0])

    from router.core.routes import parse_routes_file

    text = routes_file.read_text()
    r0 = rss()
    t0 = time.perf_counter()
    table = parse_routes_file(text)
    load = time.perf_counter() - t0
    r1 = rss()
    rng = random.Random(1)
    sample = [rng.choice(namespaces) for _ in range(100_000)]
    misses = [f"nobody-{i}" for i in range(100_000)]
    lookup = table.lookup
    t0 = time.perf_counter()
    for ns in sample:
        lookup(ns)
    hit = (time.perf_counter() - t0) / len(sample)
    t0 = time.perf_counter()
    for ns in misses:
        lookup(ns)
    miss = (time.perf_counter() - t0) / len(misses)
    return {
        "namespaces": table.namespace_count,
        "tenants": len(table.tenants),
        "load_s": load,
        "lookup_hit_ns": hit * 1e9,
        "lookup_miss_ns": miss * 1e9,
        "rss_growth_kib": r1 - r0,
    }


def big_routes(ups: Upstreams, tenants: int = 1000, per_tenant: int = 10) -> tuple[str, list[str]]:
    lines = ["tenants:"]
    namespaces = []
    for i in range(tenants):
        t = f"t{i:04d}"
        ns = [f"tenant-{t}"] + [f"tenant-{t}--ns{j}" for j in range(1, per_tenant)]
        namespaces += ns
        port = ups.port("a") if i == 0 else 20000 + i  # only tenant t0000 is ever called
        server = "keda-operator-metrics-apiserver.a--sys.svc"
        lines += [
            f"  {t}:",
            f"    namespaces: [{', '.join(ns)}]",
            f"    upstream: https://127.0.0.1:{port}",
            f"    serverName: {server}",
        ]
    return "\n".join(lines) + "\n", namespaces


def scale(st: Stack, rep: Report) -> None:
    assert st.ups is not None
    settings, workdir, pki, ups = st.settings, st.workdir, st.pki, st.ups
    text, namespaces = big_routes(ups)
    big = workdir / "routes-big.yaml"
    big.write_text(text)
    (workdir / "namespaces.json").write_text(json.dumps(namespaces))
    probe = subprocess.run(
        [sys.executable, str(BENCH / "bench.py"), "--scale-probe", str(big),
         str(workdir / "namespaces.json")],
        capture_output=True, text=True, check=False, cwd=ROOT,
    )  # fmt: skip
    if probe.returncode != 0:
        rep.add("## Scale", "", f"probe failed: {probe.stderr[-500:]}", "")
        return
    p = json.loads(probe.stdout)
    log(f"scale probe: {p}")
    rows = []
    measured: dict[str, dict[str, float]] = {}
    for name, routes_text, ns in (
        ("small", routes_doc(ups), "tenant-a"),
        ("big", text, "tenant-t0000--ns5"),
    ):
        r = start_router(workdir, pki, f"scale-{name}", routes_text, 1)
        st.add(r.proc)
        url = f"https://127.0.0.1:{r.port}" + METRIC_PATH.format(ns=ns)
        csv = workdir / "scale.csv"
        fp = workdir / "front-proxy-client.pem"
        run_ab(ab_cmd(url, fp, 16, 1, csv), csv)
        cell = Cell([run_ab(ab_cmd(url, fp, 16, settings.duration, csv), csv, r.proc.pid)])
        measured[name] = {
            "startup": r.startup,
            "rss": rss_kib(r.proc.pid) / 1024,
            "rps": cell.median("rps"),
            "cpu": cell.cpu_us(),
        }
        r.proc.stop()
    s, b = measured["small"], measured["big"]
    rows = [
        ["routes file", f"{len(text) / 1024:.0f} KiB YAML, {p['tenants']:.0f} tenants, "
         f"{p['namespaces']:.0f} namespaces"],
        ["parse + build (routes.parse_routes_file)", f"{p['load_s'] * 1000:.0f} ms"],
        ["lookup, hit / miss", f"{p['lookup_hit_ns']:.0f} ns / {p['lookup_miss_ns']:.0f} ns"],
        ["table memory (RSS growth while loading)", f"{p['rss_growth_kib'] / 1024:.1f} MiB"],
        ["router start to serving: 4 tenants / 1,000",
         f"{s['startup']:.2f} s / {b['startup']:.2f} s"],
        ["router RSS: 4 tenants / 1,000", f"{s['rss']:.0f} MiB / {b['rss']:.0f} MiB"],
        ["req/s at c=16: 4 tenants / 1,000", f"{s['rps']:.0f} / {b['rps']:.0f}"],
        ["router CPU µs/req: 4 tenants / 1,000", f"{s['cpu']:.1f} / {b['cpu']:.1f}"],
    ]  # fmt: skip
    rep.add("## Scale: 10,000 namespaces across 1,000 tenants", "")
    rep.table(["", ""], rows, left=2)
