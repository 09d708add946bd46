"""The matrix: DIRECT, ROUTER and NGINX at each concurrency, interleaved repetitions, ratios."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from harness.ab import Cell, ab_cmd, run_ab
from harness.common import METRIC_PATH, log
from harness.nginx import start_nginx_router
from harness.procstats import free_port
from harness.report import Report, fmt, ratio
from harness.routerproc import routes_doc, start_router
from harness.settings import Settings
from harness.stack import Stack


@dataclass
class Target:
    name: str  # direct, router-1, router-2, nginx-1, nginx-2
    label: str
    url: str
    pem: Path
    pid: int  # root of the process tree whose CPU is charged to this target
    processes: int


def build_targets(st: Stack) -> list[Target]:
    assert st.ups is not None
    ups, workdir, pki = st.ups, st.workdir, st.pki
    fp = workdir / "front-proxy-client.pem"
    path = METRIC_PATH.format(ns="tenant-a")
    targets = [
        Target(
            "direct", "DIRECT", f"https://127.0.0.1:{ups.port('a')}{path}",
            workdir / "router-client.pem", ups.cpu_pid, 1,
        )
    ]  # fmt: skip
    for w in st.settings.workers:
        r = start_router(workdir, pki, f"router-{w}", routes_doc(ups), w)
        st.add(r.proc)
        targets.append(
            Target(f"router-{w}", f"ROUTER {w} worker{'s' if w > 1 else ''}",
                   f"https://127.0.0.1:{r.port}{path}", fp, r.proc.pid, w)
        )  # fmt: skip
    if st.settings.baseline is not None:
        r = start_router(workdir, pki, "base-1", routes_doc(ups), 1, tree=st.settings.baseline)
        st.add(r.proc)
        targets.append(
            Target("base-1", "BASELINE 1 worker", f"https://127.0.0.1:{r.port}{path}", fp,
                   r.proc.pid, 1)
        )  # fmt: skip
    for w in st.settings.workers if st.nginx else ():
        port = free_port()
        proc = st.add(start_nginx_router(workdir, pki, ups, w, port))
        targets.append(
            Target(f"nginx-{w}", f"NGINX {w} worker{'s' if w > 1 else ''}",
                   f"https://127.0.0.1:{port}{path}", fp, proc.pid, w)
        )  # fmt: skip
    return targets


def run_matrix(
    settings: Settings, targets: list[Target], workdir: Path
) -> dict[tuple[str, int], Cell]:
    cells = {(t.name, c): Cell() for t in targets for c in settings.concurrency}
    csv = workdir / "ab.csv"
    for t in targets:  # warm up: handshakes, pools, first-request paths
        run_ab(ab_cmd(t.url, t.pem, 16, 1, csv), csv)
    order = list(targets)
    total = settings.reps * len(settings.concurrency) * len(targets)
    n = 0
    for rep in range(settings.reps):
        for c in settings.concurrency:
            for t in order:
                n += 1
                res = run_ab(ab_cmd(t.url, t.pem, c, settings.duration, csv), csv, t.pid)
                cells[(t.name, c)].runs.append(res)
                cpu = res.target_cpu / res.complete * 1e6 if res.complete else float("nan")
                log(
                    f"[{n}/{total}] rep {rep + 1} c={c:<3} {t.label:<20} {res.rps:9.0f} req/s "
                    f"p50 {res.p50:6.3f} ms p99 {res.p99:6.3f} ms cpu {cpu:6.1f} us/req"
                    + (f" errors {res.errors}" if res.errors else "")
                    + (f" ({res.error})" if res.error else "")
                )
            order = order[1:] + order[:1]  # rotate who goes first
    return cells


def matrix_report(
    rep: Report, settings: Settings, targets: list[Target], cells: dict[tuple[str, int], Cell]
) -> dict[str, str]:
    """Tables of the matrix; returns the targets' verdicts for the summary."""
    rows = []
    for t in targets:
        for c in settings.concurrency:
            cell = cells[(t.name, c)]
            rows.append(
                [
                    t.label, str(c), fmt(cell.median("rps")), fmt(cell.median("p50"), ".3f"),
                    fmt(cell.median("p99"), ".3f"), fmt(cell.cpu_us(), ".1f"),
                    fmt(cell.ab_us(), ".1f"), str(cell.errors()),
                ]
            )  # fmt: skip
    rep.add("## Throughput and latency (medians)", "")
    rep.table(
        ["target", "c", "req/s", "p50 ms", "p99 ms", "CPU µs/req", "ab µs/req", "errors"], rows
    )
    names = {t.name for t in targets}
    verdicts: dict[str, str] = {}
    rows = []
    for c in settings.concurrency:
        for w in settings.workers:
            r, n = cells.get((f"router-{w}", c)), cells.get((f"nginx-{w}", c))
            d = cells.get(("direct", c))
            if r is None:
                continue
            rows.append(
                [
                    str(c), str(w),
                    ratio(r.median("rps"), d.median("rps")) if d else "-",
                    ratio(r.median("rps"), n.median("rps")) if n else "-",
                    ratio(r.cpu_us(), n.cpu_us()) if n else "-",
                    fmt(r.median("p99") - d.median("p99"), ".3f") if d else "-",
                ]
            )  # fmt: skip
    rep.add("## Ratios (same run)", "")
    rep.table(
        ["c", "processes", "ROUTER/DIRECT req/s", "ROUTER/NGINX req/s", "ROUTER/NGINX CPU per req",
         "ROUTER p99 - DIRECT p99 (ms)"],
        rows,
    )  # fmt: skip
    # Targets of the issue.
    cpu_ratios, tput = [], []
    for w in settings.workers:
        for c in settings.concurrency:
            r, n = cells.get((f"router-{w}", c)), cells.get((f"nginx-{w}", c))
            if r and n:
                cpu_ratios.append(r.cpu_us() / n.cpu_us())
                if c >= 16:
                    tput.append(r.median("rps") / n.median("rps"))
    if cpu_ratios:
        worst = max(cpu_ratios)
        verdicts["router CPU/request within 2x NGINX"] = (
            f"{'✓' if worst <= 2 else '✗'} worst {worst:.2f}x (best {min(cpu_ratios):.2f}x)"
        )
    if tput:
        worst = min(tput)
        verdicts["ROUTER/NGINX req/s ≥ 0.5 at c≥16"] = (
            f"{'✓' if worst >= 0.5 else '✗'} worst {worst:.2f} (best {max(tput):.2f})"
        )
    # The goals of the performance issue: 1 worker each, at c=16 and c=64.
    at = [(cells[("router-1", c)], cells[("nginx-1", c)]) for c in (16, 64)
          if ("router-1", c) in cells and ("nginx-1", c) in cells]  # fmt: skip
    if at:
        cpu = [r.cpu_us() / n.cpu_us() for r, n in at]
        rps = [r.median("rps") / n.median("rps") for r, n in at]
        p99 = [r.median("p99") / n.median("p99") for r, n in at]
        verdicts["router CPU/request within 1.25x NGINX at c=16, 64 (1 worker)"] = (
            f"{'✓' if max(cpu) <= 1.25 else '✗'} " + " / ".join(f"{x:.2f}x" for x in cpu)
        )
        verdicts["ROUTER/NGINX req/s ≥ 0.8 at c=16, 64 (1 worker)"] = (
            f"{'✓' if min(rps) >= 0.8 else '✗'} " + " / ".join(f"{x:.2f}" for x in rps)
        )
        verdicts["router p99 ≤ NGINX p99 at c=16, 64 (1 worker)"] = (
            f"{'✓' if max(p99) <= 1.0 else '✗'} " + " / ".join(f"{x:.2f}x" for x in p99)
        )
    if "direct" in names and 1 in settings.concurrency:
        added = [
            cells[(f"router-{w}", 1)].median("p99") - cells[("direct", 1)].median("p99")
            for w in settings.workers
            if (f"router-{w}", 1) in cells
        ]
        if added:
            verdicts["p99 added over DIRECT ≤ 0.5 ms at c=1"] = (
                f"{'✓' if max(added) <= 0.5 else '✗'} {max(added):.3f} ms"
            )
    return verdicts
