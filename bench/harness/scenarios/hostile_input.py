"""Hostile input: RSS growth of a fresh router per attack (bench/hostile.py plays them)."""

from __future__ import annotations

import json
import ssl
import sys
import time
from collections.abc import Callable
from pathlib import Path

import hostile  # bench/hostile.py: bench/ is on sys.path (bench/bench.py runs from there)

from harness.common import BENCH, HPA_IDENTITY, METRIC_PATH, log
from harness.nginx import Upstreams
from harness.procstats import Proc, free_port, rss_kib
from harness.report import Report
from harness.routerproc import start_router
from harness.stack import Stack


def hostile_routes(ups: Upstreams, hostile_port: int) -> str:
    tenants: dict[str, object] = {
        "a": {"namespaces": ["tenant-a"], "upstream": f"https://127.0.0.1:{ups.port('a')}",
              "serverName": "keda-operator-metrics-apiserver.a--sys.svc"},
    }  # fmt: skip
    for ns in hostile.FLOOD_NAMESPACES:
        tenants[ns] = {
            "namespaces": [ns],
            "upstream": f"https://127.0.0.1:{hostile_port}",
            "serverName": "keda-operator-metrics-apiserver.h--sys.svc",
        }
    return json.dumps({"tenants": tenants}, indent=1)


def hostile_scenario(st: Stack, rep: Report) -> None:
    """RSS growth of a fresh router under each hostile case, this checkout vs --baseline."""
    assert st.ups is not None
    workdir, pki = st.workdir, st.pki
    hport = free_port()
    up = st.add(
        Proc("hostile-upstream",
             [sys.executable, str(BENCH / "hostile.py"), "upstream", "--pki", str(pki),
              "--port", str(hport)],
             workdir / "hostile-upstream.log")
    )  # fmt: skip
    up.wait_for_log("listening on")
    routes = hostile_routes(st.ups, hport)
    trees: list[tuple[str, Path | None]] = [("router", None)]
    if st.settings.baseline is not None:
        trees.append(("baseline", st.settings.baseline))
    with_cert = hostile.client_context(pki)
    without_cert = hostile.client_context(pki, cert=False)
    discovery = hostile.request("/apis/external.metrics.k8s.io/v1beta1", HPA_IDENTITY)

    def flood(ns: str) -> Callable[[int], str]:
        path = METRIC_PATH.format(ns=ns)
        data = hostile.request(path, HPA_IDENTITY, "Connection: close\r\n")
        return lambda port: hostile.one_request(port, with_cert, data)

    def never_reads(port: int) -> str:
        sock, sent = hostile.pipeline_without_reading(port, with_cert, discovery, 8.0)
        held.append(sock)
        return f"sent {sent >> 20} MiB of requests, then blocked"

    def slow_bodies(port: int) -> str:
        path = METRIC_PATH.format(ns="tenant-a")
        left = hostile.slow_bodies_without_certificate(port, without_cert, path, 200, 2.0)
        return f"{left}/200 connections still open after 2 s"

    cases: list[tuple[str, Callable[[int], str]]] = [
        ("pipelining client that never reads (8 s)", never_reads),
        ("upstream answers 100 MiB (Content-Length)", flood("flood-body")),
        ("upstream answers 100 MiB of chunks", flood("flood-chunked")),
        ("upstream sends 100 MiB of header lines", flood("flood-header")),
        ("200 slow bodies without a certificate", slow_bodies),
    ]
    results: dict[tuple[str, str], tuple[float, str]] = {}
    for i, (case, attack) in enumerate(cases):
        for name, tree in trees:
            held: list[ssl.SSLSocket] = []
            r = start_router(workdir, pki, f"hostile-{i}-{name}", routes, 1, tree=tree)
            try:
                time.sleep(0.5)
                before = rss_kib(r.proc.pid)
                try:
                    outcome = attack(r.port)
                except OSError as exc:
                    outcome = f"client error: {exc}"
                grown = (rss_kib(r.proc.pid) - before) / 1024
            finally:
                for sock in held:
                    sock.close()
                r.proc.stop()
            results[(case, name)] = (grown, outcome)
            log(f"hostile {name}: {case}: RSS +{grown:.1f} MiB; {outcome}")
    rep.add("## Hostile input: router RSS growth per case", "")
    rep.add(
        "A fresh router (1 worker, default limits) per case and per checkout; RSS of its process "
        "tree before and right after the attack (bench/hostile.py).",
        "",
    )
    header = ["case", "RSS growth (MiB)", "outcome"]
    if len(trees) > 1:
        header = ["case", "RSS growth (MiB)", "baseline RSS growth (MiB)", "outcome",
                  "baseline outcome"]  # fmt: skip
    rows = []
    for case, _ in cases:
        g, o = results[(case, "router")]
        if len(trees) > 1:
            bg, bo = results[(case, "baseline")]
            rows.append([case, f"{g:.1f}", f"{bg:.1f}", o, bo])
        else:
            rows.append([case, f"{g:.1f}", o])
    rep.table(header, rows)
    rep.add("")
