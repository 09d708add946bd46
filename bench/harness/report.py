"""The report: markdown tables, the set-up notes and the environment of bench/results.md."""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import os
import platform
import re
import socket
import ssl
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from harness.common import ROOT
from harness.settings import Settings


def fmt(v: float, spec: str = ".0f") -> str:
    return "-" if v != v else format(v, spec)  # NaN -> dash


def ratio(a: float, b: float) -> str:
    return "-" if not (a == a and b == b) or b == 0 else f"{a / b:.2f}"


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def table(self, header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> None:
        """A markdown table; the first ``left`` columns align left, the others right."""
        self.add("| " + " | ".join(header) + " |")
        self.add("|" + "|".join("---:" if i >= left else "---" for i in range(len(header))) + "|")
        for row in rows:
            self.add("| " + " | ".join(row) + " |")
        self.add("")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def tool_version(cmd: Sequence[str], pattern: str) -> str | None:
    try:
        out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(pattern, out.stdout + out.stderr)
    return m.group(1) if m else None


def router_server_kind(port: int) -> str:
    """Which HTTP server answers the router's secure port (aiohttp names itself in Server)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            ctx.wrap_socket(raw) as tls,
        ):
            tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            head = tls.recv(4096).split(b"\r\n\r\n", 1)[0].decode("latin-1")
    except OSError as exc:
        return f"unknown ({exc})"
    server = re.search(r"(?im)^server: *(.*)$", head)
    if server and "aiohttp" in server.group(1):
        return f"aiohttp web.Server ({server.group(1).strip()})"
    return "router.http.server.ProxyServer (asyncio protocol, httptools)"


def git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "router"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip()
    except OSError:
        return "?"
    return f"{rev or '?'}{' + uncommitted changes in router/' if dirty else ''}"


def environment(settings: Settings, nginx: str | None, ab: str | None) -> list[tuple[str, str]]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = []
    for dist in ("aiohttp", "uvloop", "httptools", "prometheus-client", "PyYAML"):
        try:
            versions.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{dist} not installed")
    return [
        ("date", dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")),
        ("revision", git_revision()),
        ("machine", f"{cpu}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}"),
        ("python", f"{platform.python_version()} ({', '.join(versions)})"),
        ("openssl", ssl.OPENSSL_VERSION),
        ("nginx", nginx or "not installed: NGINX rows skipped"),
        ("load generator", f"ApacheBench {ab}" if ab else "ab not installed"),
        (
            "mode",
            f"{'quick' if settings.quick else 'full'}: {settings.reps} interleaved repetitions "
            f"x {settings.duration:g}s per run, concurrency {settings.concurrency}",
        ),
    ]


def setup_notes(upstream_kind: str) -> list[str]:
    if upstream_kind == "nginx":
        upstream = (
            "- Upstreams: one NGINX (1 worker) answering a fixed ExternalMetricValueList over mTLS "
            "(bench/nginx/upstream.conf) with `ssl_verify_client on` against the router client "
            "CA, like KEDA's `--requestheader-client-ca-file`, so the upstream is never the "
            "bottleneck. DIRECT is ab straight to it with the router's client certificate: the "
            "physical limit of this setup."
        )
    else:
        upstream = (
            "- Upstreams: **NGINX was not available**, so each upstream is a KedaStub process "
            "(aiohttp, mTLS with the router client CA). It is slower than the router itself: "
            "DIRECT and the ROUTER/DIRECT ratios are bounded by it, and there are no NGINX rows."
        )
    return [
        "- Load generator: ApacheBench `ab -k -E <client cert+key PEM>`: an HTTP/1.0 client with "
        "keep-alive, single-threaded (one core at most), and its own CPU is on the same machine "
        "(column *ab µs/req*). Percentiles come from `ab -e` (µs resolution).",
        upstream,
        "- ROUTER: `metrics-router serve --workers N` (uvloop, httptools on both sides), routes "
        "file of 4 tenants, metrics port on, `--max-idle-connections-per-upstream 64` (the "
        "default: as many as the per-tenant in-flight limit, so c=64 never closes and re-opens "
        "upstream connections), defaults otherwise. NGINX: the talk's "
        "configuration (bench/nginx/router.conf): namespace regex -> `tenant_$tenant` upstream "
        "with `keepalive 64`, `proxy_ssl_verify "
        "on`, `proxy_ssl_certificate`, `ssl_verify_client on`, access log off, "
        "`worker_processes N`. Both present the same certificates.",
        "- CPU µs/req: user+system CPU of the target's process tree (/proc/<pid>/stat) during the "
        "run, divided by completed requests (for DIRECT: the upstream).",
        "- Everything shares the machine's cores: ab, the upstream and the target compete, so "
        "absolute req/s at c≥16 is CPU-bound for every target; the ratios from the same run and "
        "CPU per request are the figures to compare.",
    ]


def results_document(
    verdicts: dict[str, str],
    sections: Sequence[Report],
    upstream_kind: str,
    env: Sequence[tuple[str, str]],
) -> str:
    """bench/results.md: the targets' verdicts, each scenario's section, set-up, environment."""
    rep = Report()
    rep.add(
        "# Benchmark results",
        "",
        "Written by `make bench` (bench/run.sh); see bench/README.md for the method. "
        "Figures are from one machine and one run: compare ratios within this file, not across "
        "machines.",
        "",
    )
    if verdicts:
        rep.add("## Targets", "")
        rep.table(["target", "this run"], [[k, v] for k, v in verdicts.items()], left=2)
    for sec in sections:
        rep.add(*sec.lines)
    rep.add("## Set-up", "")
    rep.add(*setup_notes(upstream_kind), "")
    rep.add("## Environment", "")
    rep.table(["", ""], [[k, v] for k, v in env], left=2)
    return rep.text()
