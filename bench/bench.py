"""`make bench`: the router against DIRECT and NGINX on loopback, real mTLS both ways.

A benchmark, not a test: it prints figures, writes bench/results.md, and never fails on a
number. See bench/README.md for what is measured and how to read it.

    .venv/bin/python bench/bench.py            # full run (~8 min on 2 cores)
    BENCH_QUICK=1 .venv/bin/python bench/bench.py   # ~1 min, one repetition, short runs
    .venv/bin/python bench/bench.py --only matrix --reps 1 --duration 3 --targets router-1,nginx-1

The parts live in bench/harness/ by job: procstats (processes, CPU, RSS), ab (the load
generator), nginx (upstreams and the NGINX router), routerproc (the router under test), pki,
stack, scenarios/ (matrix, isolation, reload, hostile_input, scale) and report (tables,
results.md). This file composes them.

Everything runs on 127.0.0.1 with OS-chosen free ports; every process it starts is stopped.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import paced  # bench/paced.py, the fixed-rate point
from harness.common import BENCH, RESULTS, ROOT, log
from harness.nginx import start_upstreams
from harness.procstats import Proc, free_port
from harness.report import Report, environment, results_document, router_server_kind, tool_version
from harness.scenarios.hostile_input import hostile_scenario
from harness.scenarios.isolation import isolation
from harness.scenarios.matrix import build_targets, matrix_report, run_matrix
from harness.scenarios.reload import reload_scenario
from harness.scenarios.scale import scale, scale_probe
from harness.settings import parse_settings
from harness.stack import stack


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(sys.argv[1:] if argv is None else argv)
    started = time.monotonic()
    ab_version = tool_version(["ab", "-V"], r"Version ([\d.]+)")
    nginx_version = tool_version(["nginx", "-v"], r"nginx/([\d.]+)")
    if ab_version is None:
        print("bench: ApacheBench (ab, Debian package apache2-utils) is required", file=sys.stderr)
        return 1
    if nginx_version is None:
        log(
            "nginx is not installed: the NGINX rows are skipped, and the upstreams are KedaStub "
            "processes (aiohttp), which may be the bottleneck"
        )
    env = environment(settings, nginx_version, ab_version)
    verdicts: dict[str, str] = {}
    sections: list[Report] = []
    upstream_kind = "nginx"
    with stack(settings) as st:
        log(f"workdir {st.workdir}")
        hang_port = free_port()
        hang = st.add(
            Proc(
                "hang-stub",
                [sys.executable, str(BENCH / "hang_stub.py"), "--pki", str(st.pki),
                 "--port", str(hang_port)],
                st.workdir / "hang-stub.log",
            )
        )  # fmt: skip
        hang.wait_for_log("listening on")
        ups = start_upstreams(st.workdir, st.pki, hang_port, st.nginx)
        st.ups = ups
        upstream_kind = ups.kind
        for p in ups.procs:
            st.add(p)
        targets = build_targets(st)
        router_target = next((t for t in targets if t.name.startswith("router-")), None)
        if router_target is not None:
            port = int(router_target.url.split(":")[2].split("/")[0])
            env.append(("router secure port served by", router_server_kind(port)))
        env.append(("router build", paced.router_build()))
        if settings.wants("matrix"):
            chosen = [t for t in targets if settings.targets is None or t.name in settings.targets]
            log("matrix: " + ", ".join(t.label for t in chosen))
            cells = run_matrix(settings, chosen, st.workdir)
            sec = Report()
            verdicts.update(matrix_report(sec, settings, chosen, cells))
            sections.append(sec)
        if settings.wants("paced"):  # the fixed-rate point (bench/paced.py)
            sec = Report()
            verdicts.update(paced.scenario(st, targets, sec))
            sections.append(sec)
        if settings.wants("isolation"):
            sec = Report()
            verdicts.update(isolation(st, targets, sec))
            sections.append(sec)
        if settings.wants("reload"):
            sec = Report()
            verdicts.update(reload_scenario(st, sec))
            sections.append(sec)
        if settings.wants("hostile"):
            sec = Report()
            hostile_scenario(st, sec)
            sections.append(sec)
        if settings.wants("scale"):
            sec = Report()
            scale(st, sec)
            sections.append(sec)
    elapsed = time.monotonic() - started
    env.append(("wall time", f"{elapsed:.0f} s"))
    text = results_document(verdicts, sections, upstream_kind, env)
    print()
    print(text)
    if settings.write_results:
        RESULTS.write_text(text)
        log(f"wrote {RESULTS.relative_to(ROOT)}")
    if not settings.keep_workdir:
        shutil.rmtree(settings.workdir, ignore_errors=True)  # logs, configs, keys
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--scale-probe":
        sys.path.insert(0, str(ROOT))
        ns = json.loads(Path(sys.argv[3]).read_text())
        print(json.dumps(scale_probe(Path(sys.argv[2]), ns)))
        sys.exit(0)
    sys.exit(main())
