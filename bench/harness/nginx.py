"""NGINX: the upstreams (one NGINX, or KedaStub processes without it) and the NGINX router."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

from harness.common import BENCH, KEEPALIVE, TENANTS
from harness.pki import router_certs
from harness.procstats import Proc, free_port, wait_port

NGINX_DIR = BENCH / "nginx"


def render(template: str, values: dict[str, str]) -> str:
    text = (NGINX_DIR / template).read_text()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    leftover = re.findall(r"\{\{[A-Z_]+\}\}", text)
    if leftover:
        raise ValueError(f"{template}: unfilled {leftover}")
    return text


def nginx_cmd(conf: Path, prefix: Path) -> list[str]:
    return ["nginx", "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"]


@dataclass
class Upstreams:
    kind: str  # "nginx" or "keda-stub"
    ports: dict[str, list[int]]  # tenant -> ports (tenant b has two: the reload toggles them)
    procs: list[Proc]

    def port(self, tenant: str) -> int:
        return self.ports[tenant][0]

    @property
    def cpu_pid(self) -> int:
        """Process whose CPU the DIRECT rows charge (tenant a's upstream)."""
        return self.procs[0].pid


def start_upstreams(workdir: Path, pki: Path, hang_port: int, nginx: bool) -> Upstreams:
    ports = {"a": [free_port()], "b": [free_port(), free_port()], "c": [free_port()]}
    if nginx:
        servers = []
        for tenant, tports in ports.items():
            listen = "\n".join(f"        listen 127.0.0.1:{p} ssl;" for p in tports)
            servers.append(
                render(
                    "upstream-server.conf",
                    {"TENANT": tenant, "LISTEN": listen, "PKI": str(pki)},
                )
            )
        conf = workdir / "upstream.conf"
        conf.write_text(
            render(
                "upstream.conf",
                {"WORKERS": "1", "DIR": str(workdir), "PKI": str(pki),
                 "SERVERS": "\n".join(servers)},
            )
        )  # fmt: skip
        procs = [Proc("upstream-nginx", nginx_cmd(conf, workdir), workdir / "upstream-nginx.log")]
    else:
        # Without NGINX: one KedaStub process per port (aiohttp; it may be the bottleneck).
        procs = []
        for tenant, tports in ports.items():
            for p in tports:
                cmd = [
                    sys.executable, "-m", "router.devtools.keda_stub", "--tenant", tenant,
                    "--cert", str(pki / f"upstream-{tenant}.crt"),
                    "--key", str(pki / f"upstream-{tenant}.key"),
                    "--client-ca", str(pki / "router-client-ca.crt"), "--port", str(p),
                ]  # fmt: skip
                procs.append(Proc(f"stub-{tenant}-{p}", cmd, workdir / f"stub-{tenant}-{p}.log"))
    for tports in ports.values():
        for p in tports:
            wait_port(p)
    ports["h"] = [hang_port]
    return Upstreams("nginx" if nginx else "keda-stub", ports, procs)


def start_nginx_router(workdir: Path, pki: Path, ups: Upstreams, workers: int, port: int) -> Proc:
    name = f"nginx-{workers}"
    certs = router_certs(pki, workdir / f"certs-{name}")
    blocks = "\n".join(
        render(
            "router-upstream.conf",
            {"TENANT": t, "UPSTREAM_PORT": str(ups.port(t)), "KEEPALIVE": str(KEEPALIVE)},
        )
        for t in TENANTS
    )
    conf = workdir / f"router-{name}.conf"
    conf.write_text(
        render(
            "router.conf",
            {
                "WORKERS": str(workers),
                "NAME": name,
                "DIR": str(workdir),
                "PKI": str(pki),
                "CERTS": str(certs),
                "PORT": str(port),
                "REUSEPORT": " reuseport" if workers > 1 else "",
                "UPSTREAMS": blocks,
                "READ_TIMEOUT": "10",
            },
        )
    )
    proc = Proc(name, nginx_cmd(conf, workdir), workdir / f"{name}.log")
    wait_port(port)
    return proc
