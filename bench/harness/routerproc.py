"""The router under test: `metrics-router serve` from this checkout or another, its routes file,
its metrics."""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.common import KEEPALIVE, TENANTS, VENV_BIN
from harness.nginx import Upstreams
from harness.pki import router_certs
from harness.procstats import Proc, free_port


def routes_doc(ups: Upstreams, *, b_port_index: int = 0, extra_ns: bool = False) -> str:
    tenants: dict[str, object] = {}
    for t in TENANTS:
        port = ups.ports[t][b_port_index] if t == "b" else ups.port(t)
        namespaces = [f"tenant-{t}", f"tenant-{t}--dev"]
        if extra_ns and t == "a":
            namespaces.append("tenant-a--extra")
        tenants[t] = {
            "namespaces": namespaces,
            "upstream": f"https://127.0.0.1:{port}",
            "serverName": f"keda-operator-metrics-apiserver.{t}--sys.svc",
        }
    return json.dumps({"tenants": tenants}, indent=1)  # JSON is YAML


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class RouterProc:
    proc: Proc
    port: int
    metrics_port: int
    startup: float
    certs: Path
    routes: Path


def start_router(
    workdir: Path,
    pki: Path,
    name: str,
    routes_text: str,
    workers: int,
    extra: Sequence[str] = (),
    tree: Path | None = None,
) -> RouterProc:
    """A router from this checkout, or from ``tree`` (another checkout, same venv)."""
    certs = router_certs(pki, workdir / f"certs-{name}")
    routes = workdir / f"routes-{name}.yaml"
    write_atomic(routes, routes_text)
    port, mport = free_port(), free_port()
    program = (
        [str(VENV_BIN / "metrics-router")] if tree is None else [sys.executable, "-m", "router"]
    )
    cmd = [
        *program,
        "serve",
        "--secure-port", str(port),
        "--bind-address", "127.0.0.1",
        "--tls-cert-file", str(certs / "router-serving.crt"),
        "--tls-private-key-file", str(certs / "router-serving.key"),
        "--requestheader-client-ca-file", str(pki / "requestheader-ca.crt"),
        "--requestheader-allowed-names", "front-proxy-client",
        "--proxy-client-cert-file", str(certs / "router-client.crt"),
        "--proxy-client-key-file", str(certs / "router-client.key"),
        "--upstream-ca-file", str(pki / "upstream-ca.crt"),
        "--routes-file", str(routes),
        "--metrics-bind-address", f"127.0.0.1:{mport}",
        "--workers", str(workers),
        "--shutdown-grace-period", "2",
        "--max-idle-connections-per-upstream", str(KEEPALIVE),
        *extra,
    ]  # fmt: skip
    if tree is None:
        proc = Proc(name, cmd, workdir / f"{name}.log")
    else:
        proc = Proc(name, cmd, workdir / f"{name}.log", cwd=tree, env={"PYTHONPATH": str(tree)})
    startup = proc.wait_for_log("serving port=", count=workers, timeout=60)
    return RouterProc(proc, port, mport, startup, certs, routes)


def scrape(metrics_port: int) -> str:
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:
        return str(resp.read().decode())


def metric_sum(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total
