"""The fixed-rate point: router and NGINX CPU per request at the same, realistic rate.

ab saturates: at full load reads and writes batch, and CPU per request is the lowest a server
will ever show. An aggregator sends a few thousand requests a second over many keep-alive
connections, one request in flight per connection, so every request pays its own wake-ups.
This module is both:

- the paced client, run as its own process (``python bench/paced.py --url URL --pem PEM``):
  ``--connections`` keep-alive TLS connections (one request in flight on each, as the
  aggregator holds them), each sending on its own fixed schedule so that together they send
  ``--rate`` requests per second for ``--duration`` seconds. A request whose slot passed while
  the previous answer was awaited is sent at once (the schedule is not reset, so a slow target
  shows as a lower achieved rate, which is reported). It prints one JSON line: requests,
  errors, achieved rate, p50/p99 latency, and its own CPU seconds;
- ``scenario``: the `make bench` section that runs it against each target (interleaved,
  ``reps`` times) and charges each target's process-tree CPU over the run to the requests it
  answered.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import ssl
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

RATE = 1000.0
CONNECTIONS = 16


# ------------------------------------------------------------------------------ the client


@dataclass
class _Tally:
    latencies: list[float] = field(default_factory=list)
    errors: int = 0


async def _connection(
    host: str, port: int, ctx: ssl.SSLContext, request: bytes, slots: Sequence[float],
    tally: _Tally,
) -> None:  # fmt: skip
    reader, writer = await asyncio.open_connection(host, port, ssl=ctx)
    loop = asyncio.get_running_loop()
    try:
        for slot in slots:
            delay = slot - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            sent = time.perf_counter()  # uvloop's loop.time() has millisecond steps
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            if head[9:12] == b"200":
                tally.latencies.append(time.perf_counter() - sent)
            else:
                tally.errors += 1
    finally:
        writer.close()
        await writer.wait_closed()


async def _run(
    url: str, pem: str, headers: Sequence[str], rate: float, connections: int, duration: float
) -> dict[str, Any]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 443
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # as ab: the bench measures the server, not the client
    ctx.load_cert_chain(pem)
    lines = [f"GET {target} HTTP/1.1", f"Host: {host}:{port}", "Accept: application/json"]
    lines += headers
    request = ("\r\n".join(lines) + "\r\n\r\n").encode()
    loop = asyncio.get_running_loop()
    interval = connections / rate
    start = loop.time() + 0.2
    count = int(duration * rate / connections)
    tally = _Tally()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.monotonic()
    results = await asyncio.gather(
        *(
            _connection(
                host,
                port,
                ctx,
                request,
                [start + i * interval / connections + k * interval for k in range(count)],
                tally,
            )
            for i in range(connections)
        ),
        return_exceptions=True,
    )
    wall = time.monotonic() - t0 - 0.2
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    failed = [repr(r) for r in results if isinstance(r, BaseException)]
    lat = sorted(tally.latencies)
    done = len(lat)
    return {
        "requests": done,
        "errors": tally.errors + len(failed),
        "failures": failed[:3],
        "wanted_rate": rate,
        "achieved_rate": done / wall if wall > 0 else 0.0,
        "p50_ms": lat[done // 2] * 1000 if done else float("nan"),
        "p99_ms": lat[min(done - 1, int(done * 0.99))] * 1000 if done else float("nan"),
        "client_cpu_s": (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime),
    }


def client_main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="paced keep-alive HTTPS client (one JSON line out)")
    p.add_argument("--url", required=True)
    p.add_argument("--pem", required=True, help="client certificate and key, one PEM file")
    p.add_argument("--rate", type=float, default=RATE, help="requests per second, in total")
    p.add_argument("--connections", type=int, default=CONNECTIONS)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--header", action="append", default=[], help="NAME: VALUE (repeatable)")
    a = p.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    out = asyncio.run(_run(a.url, a.pem, a.header, a.rate, a.connections, a.duration))
    print(json.dumps(out), flush=True)
    return 0


# ---------------------------------------------------------------------------- the scenario


@dataclass
class PacedRun:
    requests: int
    errors: int
    achieved_rate: float
    p50_ms: float
    p99_ms: float
    target_cpu_s: float
    client_cpu_s: float

    @property
    def cpu_us(self) -> float:
        return self.target_cpu_s / self.requests * 1e6 if self.requests else float("nan")


def paced_run(url: str, pem: Any, pid: int, rate: float, duration: float) -> PacedRun:
    """One paced run against a target; its process tree's CPU over the run, per request."""
    from harness.common import HPA_IDENTITY, log
    from harness.procstats import cpu_seconds

    cmd = [
        sys.executable, __file__, "--url", url, "--pem", str(pem), "--rate", str(rate),
        "--connections", str(CONNECTIONS), "--duration", str(duration),
    ]  # fmt: skip
    for name, value in HPA_IDENTITY:
        cmd += ["--header", f"{name}: {value}"]
    before = cpu_seconds(pid)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    after = cpu_seconds(pid)
    if out.returncode != 0 or not out.stdout.strip():
        log(f"paced client failed: {out.stderr.strip()[-500:]}")
        return PacedRun(0, 1, 0.0, float("nan"), float("nan"), after - before, 0.0)
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    if doc["failures"]:
        log(f"paced client connection failures: {doc['failures']}")
    return PacedRun(
        doc["requests"], doc["errors"], doc["achieved_rate"], doc["p50_ms"], doc["p99_ms"],
        after - before, doc["client_cpu_s"],
    )  # fmt: skip


def router_build() -> str:
    """Which build of the router this checkout runs: mypyc-compiled modules (make compile) or
    pure Python."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    compiled = [
        name
        for name in ("router/proxy", "router/http/server", "router/http/client")
        if any(
            f.startswith(os.path.basename(name) + ".") and f.endswith(".so")
            for f in os.listdir(os.path.join(root, os.path.dirname(name)))
        )
    ]
    if not compiled:
        return "pure Python"
    return "compiled with mypyc (make compile): " + ", ".join(n + ".py" for n in compiled)


def _load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def scenario(st: Any, targets: Sequence[Any], rep: Any) -> dict[str, str]:
    """`make bench`'s fixed-rate section: each ROUTER and NGINX target at ``RATE`` req/s over
    ``CONNECTIONS`` keep-alive connections, interleaved ``reps`` times; medians reported."""
    from harness.common import log
    from harness.report import fmt

    chosen = [t for t in targets if t.name.startswith(("router-", "nginx-", "base-"))]
    if st.settings.targets is not None:
        chosen = [t for t in chosen if t.name in st.settings.targets]
    duration = max(3.0, st.settings.duration)
    runs: dict[str, list[PacedRun]] = {t.name: [] for t in chosen}
    loads: list[str] = []
    for t in chosen:  # warm up: handshakes and pools
        paced_run(t.url, t.pem, t.pid, 200.0, 1.0)
    order = list(chosen)
    for r in range(st.settings.reps):
        for t in order:
            run = paced_run(t.url, t.pem, t.pid, RATE, duration)
            runs[t.name].append(run)
            loads.append(_load())
            log(
                f"paced rep {r + 1} {t.label:<20} {run.achieved_rate:7.0f} req/s "
                f"(wanted {RATE:.0f}) p50 {run.p50_ms:6.3f} ms p99 {run.p99_ms:6.3f} ms "
                f"cpu {run.cpu_us:6.1f} us/req errors {run.errors} load {loads[-1]}"
            )
        order = order[1:] + order[:1]

    def med(name: str, attr: str) -> float:
        values = [getattr(x, attr) for x in runs[name] if x.requests]
        return statistics.median(values) if values else float("nan")

    rep.add(
        f"## Fixed rate: {RATE:.0f} req/s over {CONNECTIONS} keep-alive connections",
        "",
        f"A paced client (bench/paced.py, its own process) sends {RATE:.0f} req/s in total, "
        f"one request in flight per connection, for {duration:g} s per run; medians of "
        f"{st.settings.reps} interleaved runs. CPU µs/req is the target's process tree over the "
        "run divided by the answers. The achieved rate says whether the client held the pace. "
        f"Load averages during the runs: {'; '.join(loads)}.",
        "",
    )
    rows = []
    for t in chosen:
        rows.append(
            [
                t.label, fmt(med(t.name, "achieved_rate")),
                fmt(med(t.name, "p50_ms"), ".3f"), fmt(med(t.name, "p99_ms"), ".3f"),
                fmt(med(t.name, "cpu_us"), ".1f"), str(sum(x.errors for x in runs[t.name])),
            ]
        )  # fmt: skip
    rep.table(["target", "achieved req/s", "p50 ms", "p99 ms", "CPU µs/req", "errors"], rows)
    verdicts: dict[str, str] = {}
    if "router-1" in runs and "nginx-1" in runs:
        ratio = med("router-1", "cpu_us") / med("nginx-1", "cpu_us")
        mark = "✓" if ratio <= 1.5 else "✗"
        verdicts[f"router CPU/request within 1.5x NGINX at {RATE:.0f} req/s (1 worker)"] = (
            f"{mark} {ratio:.2f}x"
        )
    return verdicts


if __name__ == "__main__":
    sys.exit(client_main())
