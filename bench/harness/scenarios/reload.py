"""Reload under load: the routes file rewritten and both router certificates rotated."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from harness.ab import AbResult, ab_cmd, run_ab
from harness.common import METRIC_PATH, log
from harness.nginx import Upstreams
from harness.pki import rotate_cert
from harness.report import Report, fmt
from harness.routerproc import (
    RouterProc,
    metric_sum,
    routes_doc,
    scrape,
    start_router,
    write_atomic,
)
from harness.stack import Stack


class Churn:
    """Every 0.5 s: rewrite the routes file and re-issue a router certificate."""

    def __init__(self, router: RouterProc, ups: Upstreams, pki: Path) -> None:
        self.router, self.ups, self.pki = router, ups, pki
        self.stop = threading.Event()
        self.changes = {"routes": 0, "serving": 0, "client": 0}

    def run(self) -> None:
        i = 0
        while not self.stop.wait(0.5):
            i += 1
            routes = routes_doc(self.ups, b_port_index=i % 2, extra_ns=i % 3 == 0)
            write_atomic(self.router.routes, routes)
            self.changes["routes"] += 1
            which = "serving" if i % 2 else "client"
            rotate_cert(self.pki, self.router.certs, which)
            self.changes[which] += 1


def _run_into(results: dict[str, AbResult], label: str, cmd: list[str]) -> None:
    results[label] = run_ab(cmd, Path(cmd[cmd.index("-e") + 1]))


def reload_scenario(st: Stack, rep: Report) -> dict[str, str]:
    """Rewrite the routes file and rotate both router certificates while load runs."""
    assert st.ups is not None
    settings, workdir, pki, ups = st.settings, st.workdir, st.pki, st.ups
    duration = max(6.0, settings.duration * 3)
    rows = []
    total_errors = 0
    for w in settings.workers:
        name = f"reload-{w}"
        r = start_router(workdir, pki, name, routes_doc(ups), w, ["--file-check-interval", "0.25"])
        st.add(r.proc)
        base = f"https://127.0.0.1:{r.port}"
        fp = workdir / "front-proxy-client.pem"
        loads = {
            "tenant a, keep-alive c=16": ab_cmd(
                base + METRIC_PATH.format(ns="tenant-a"), fp, 16, duration, workdir / "r1.csv"
            ),
            "tenant b (upstream moves), keep-alive c=8": ab_cmd(
                base + METRIC_PATH.format(ns="tenant-b"), fp, 8, duration, workdir / "r2.csv"
            ),
            "tenant c, new TLS connection per request c=4": ab_cmd(
                base + METRIC_PATH.format(ns="tenant-c"), fp, 4, duration, workdir / "r3.csv",
                keepalive=False,
            ),
        }  # fmt: skip
        churn = Churn(r, ups, pki)
        results: dict[str, AbResult] = {}
        threads = [
            threading.Thread(target=_run_into, args=(results, label, cmd))
            for label, cmd in loads.items()
        ]
        churner = threading.Thread(target=churn.run)
        for th in threads:
            th.start()
        churner.start()
        for th in threads:
            th.join()
        churn.stop.set()
        churner.join()
        changes = churn.changes
        time.sleep(0.6)  # the last change is picked up (check interval 0.25 s)
        text = scrape(r.metrics_port)
        reloads = {
            src: (
                int(metric_sum(text, "metrics_router_reloads_total", source=src, result="success")),
                int(metric_sum(text, "metrics_router_reloads_total", source=src, result="failure")),
            )
            for src in ("routes", "serving", "proxy-client")
        }
        r.proc.stop()
        errors = sum(res.errors for res in results.values())
        total_errors += errors
        requests = sum(res.complete for res in results.values())
        reload_text = ", ".join(f"{k} {ok} ok / {bad} refused" for k, (ok, bad) in reloads.items())
        log(f"reload {w} worker(s): {requests} requests, {errors} failed; reloads: {reload_text}")
        for label, res in results.items():
            rows.append(
                [str(w), label, str(res.complete), str(res.errors), fmt(res.p99, ".3f"),
                 res.error or ""]
            )  # fmt: skip
        rows.append(
            [str(w), f"**changes written**: routes {changes['routes']}, serving cert "
             f"{changes['serving']}, client cert {changes['client']}; **router reloads**: "
             f"{reload_text}", str(requests), f"**{errors}**", "", ""]
        )  # fmt: skip
    rep.add(
        "## Reload under load",
        "",
        f"For {duration:g} s per worker count, every 0.5 s the routes file is rewritten (tenant "
        "b's upstream moves between two ports, so its pool is replaced; a namespace comes and "
        "goes) and the router's serving or client certificate is re-issued, while three ab "
        "runs load tenants a, b and c (c without keep-alive: every request is a new handshake "
        "against the current serving certificate). `--file-check-interval 0.25`. Refused "
        "reloads are the router reading a key and certificate mid-rotation (written one after "
        "the other): it keeps the last good pair and retries.",
        "",
    )
    rep.table(["workers", "load", "requests", "failed", "p99 ms", "note"], rows, left=2)
    return {"0 failed requests across reloads": f"{'✓' if total_errors == 0 else '✗'} "
            f"{total_errors} failed"}  # fmt: skip
