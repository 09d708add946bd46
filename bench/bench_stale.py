"""A tenant's KEDA restarts while an HPA-like client polls: errors with --serve-stale-for off
and on (router/core/stale.py).

    .venv/bin/python bench/bench_stale.py                      # stub stopped 10 s, off vs 30s
    .venv/bin/python bench/bench_stale.py --failure 500        # metrics server up, answering 500
    .venv/bin/python bench/bench_stale.py --outage 40          # longer than the duration

For each setting: a development PKI, tenant a's KEDA stand-in (router.devtools.keda_stub, mTLS), the
real `metrics-router serve` as a child process, and this process playing the aggregator for
the HPA controller: every ``--interval`` seconds it GETs each of ``--metrics`` external
metrics with the HPA's identity (one keep-alive connection, as the aggregator keeps). After
``--before`` seconds the tenant's metrics server fails for ``--outage`` seconds: ``stop`` closes
its port (what a pod restart looks like to the router: connection refused), ``500`` and
``503`` keep it up answering that status (KEDA's metrics server answers 500 while its operator
is unreachable). Then it comes back and the client polls ``--after`` seconds more.

Prints a table (requests, errors, stale answers and their ages) and writes it to
bench/stale_results.md with ``--write``. A benchmark, not a test: it never fails on a number.
Everything runs on 127.0.0.1; every process it starts is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import signal
import socket
import ssl
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from router.devtools.keda_stub import KedaStub  # noqa: E402
from router.devtools.pki import Pki, generate_pki  # noqa: E402

RESULTS = ROOT / "bench" / "stale_results.md"
VERBOSE = False
HPA_HEADERS = (
    ("X-Remote-User", "system:serviceaccount:kube-system:horizontal-pod-autoscaler"),
    ("X-Remote-Uid", "6b1c1e5e-2f4a-4c1e-9a53-0d7b5a0c9e11"),
    ("X-Remote-Group", "system:serviceaccounts"),
    ("X-Remote-Group", "system:serviceaccounts:kube-system"),
    ("X-Remote-Group", "system:authenticated"),
)


def metric_path(i: int) -> str:
    return (
        f"/apis/external.metrics.k8s.io/v1beta1/namespaces/tenant-a/s{i}-prometheus"
        f"?labelSelector=scaledobject.keda.sh%2Fname%3Dapp-{i}"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Poll:
    at: float  # seconds since the start of polling
    phase: str  # before, outage, after
    status: int  # 0: no HTTP answer
    age: int | None  # Age of a stale answer


@dataclass
class Run:
    setting: str
    polls: list[Poll] = field(default_factory=list)

    def count(self, phase: str | None = None, *, errors: bool = False, stale: bool = False) -> int:
        return sum(
            1
            for p in self.polls
            if (phase is None or p.phase == phase)
            and (not errors or p.status != 200)
            and (not stale or p.age is not None)
        )

    @property
    def ages(self) -> list[int]:
        return [p.age for p in self.polls if p.age is not None]

    def first_error_free_after(self) -> float | None:
        """Seconds after the recovery until every later poll succeeded fresh."""
        after = [p for p in self.polls if p.phase == "after"]
        if not after:
            return None
        start = after[0].at
        last_bad = max((p.at for p in after if p.status != 200 or p.age is not None), default=None)
        return 0.0 if last_bad is None else last_bad - start


async def run_one(pki: Pki, args: argparse.Namespace, setting: str, work: Path) -> Run:
    stub = KedaStub(
        tenant="a",
        cert_file=pki.upstream_cert("a"),
        key_file=pki.upstream_key("a"),
        client_ca_file=pki.router_client_ca,
    )
    stub_port = await stub.start()
    routes = work / f"routes-{setting}.yaml"
    routes.write_text(f"tenants:\n  a:\n    namespaces: [tenant-a]\n    upstream: {stub.url}\n")
    port, metrics_port = free_port(), free_port()
    router = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "router", "serve",
        "--secure-port", str(port), "--bind-address", "127.0.0.1",
        *pki.serve_flags(),
        "--routes-file", str(routes),
        "--metrics-bind-address", f"127.0.0.1:{metrics_port}",
        "--serve-stale-for", setting,
        "--log-level", "error",
        cwd=ROOT,
    )  # fmt: skip
    ctx = ssl.create_default_context(cafile=str(pki.router_serving_ca))
    ctx.load_cert_chain(pki.front_proxy_client_cert, pki.front_proxy_client_key)
    result = Run(setting)
    connector = aiohttp.TCPConnector(ssl=ctx, limit=1)  # one keep-alive connection
    try:
        async with aiohttp.ClientSession(connector=connector) as http:
            await wait_ready(http, metrics_port, router)
            base = f"https://127.0.0.1:{port}"
            loop = asyncio.get_running_loop()
            start = loop.time()
            outage_at, back_at = args.before, args.before + args.outage
            end_at = back_at + args.after
            phase, tick = "before", 0
            while True:
                now = loop.time() - start
                if phase == "before" and now >= outage_at:
                    phase = "outage"
                    await fail(stub, args.failure)
                if phase == "outage" and now >= back_at:
                    phase = "after"
                    await recover(stub, args.failure, stub_port)
                if now >= end_at:
                    break
                for i in range(args.metrics):
                    result.polls.append(await poll(http, base + metric_path(i), now, phase))
                tick += 1
                await asyncio.sleep(max(0.0, start + tick * args.interval - loop.time()))
    finally:
        if router.returncode is None:
            router.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(router.wait(), 20)
            except TimeoutError:
                router.kill()
                await router.wait()
        await stub.stop()
    return result


async def fail(stub: KedaStub, failure: str) -> None:
    if failure == "stop":
        await stub.stop()
    else:
        stub.behaviour.fail_status = int(failure)


async def recover(stub: KedaStub, failure: str, port: int) -> None:
    if failure == "stop":
        await stub.start(port=port)
    else:
        stub.behaviour.fail_status = None


async def poll(http: aiohttp.ClientSession, url: str, now: float, phase: str) -> Poll:
    try:
        async with http.get(url, headers=list(HPA_HEADERS)) as resp:
            body = await resp.read()
            if resp.status != 200 and VERBOSE:
                print(f"  {now:5.1f}s {phase}: {resp.status} {body[:200]!r}", file=sys.stderr)
            age = resp.headers.get("Age") if "Warning" in resp.headers else None
            return Poll(now, phase, resp.status, None if age is None else int(age))
    except (aiohttp.ClientError, ssl.SSLError, OSError) as exc:
        if VERBOSE:
            print(f"  {now:5.1f}s {phase}: no answer: {exc!r}", file=sys.stderr)
        return Poll(now, phase, 0, None)


async def wait_ready(
    http: aiohttp.ClientSession, metrics_port: int, router: asyncio.subprocess.Process
) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if router.returncode is not None:
            raise SystemExit(f"the router exited with {router.returncode}")
        with contextlib.suppress(aiohttp.ClientError):
            async with http.get(f"http://127.0.0.1:{metrics_port}/readyz") as resp:
                if resp.status == 200:
                    return
        await asyncio.sleep(0.05)
    raise SystemExit("the router did not become ready within 30s")


def report(runs: list[Run], args: argparse.Namespace) -> str:
    failure = {"stop": "stopped (connection refused)"}.get(
        args.failure, f"answering {args.failure}"
    )
    lines = [
        f"Tenant a's metrics server {failure} for {args.outage:g} s; an HPA-like client polls "
        f"{args.metrics} metric(s) every {args.interval:g} s ({args.before:g} s before, "
        f"{args.after:g} s after).",
        "",
        "| --serve-stale-for | requests | errors | errors during the outage | stale answers "
        "| stale answers' ages (s) | max age (s) | clean again after recovery (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        ages = r.ages
        clean = r.first_error_free_after()
        lines.append(
            f"| {r.setting} | {len(r.polls)} | {r.count(errors=True)} "
            f"| {r.count('outage', errors=True)} | {r.count(stale=True)} "
            f"| {summarise(ages)} | {max(ages) if ages else '-'} "
            f"| {'-' if clean is None else f'{clean:.1f}'} |"
        )
    return "\n".join(lines)


def summarise(ages: list[int]) -> str:
    if not ages:
        return "-"
    ordered = sorted(ages)
    return f"{ordered[0]}-{ordered[-1]} (median {ordered[len(ordered) // 2]})"


async def main_async(args: argparse.Namespace) -> str:
    with tempfile.TemporaryDirectory(prefix="bench-stale-") as tmp:
        work = Path(tmp)
        pki = generate_pki(work / "pki", ("a",), force=True)
        runs = []
        for setting in args.settings.split(","):
            print(f"-- --serve-stale-for {setting}: {args.before + args.outage + args.after:g} s")
            runs.append(await run_one(pki, args, setting, work))
        return report(runs, args)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", default="0,30s", help="comma list (default %(default)s)")
    parser.add_argument("--failure", choices=("stop", "500", "503"), default="stop")
    parser.add_argument("--outage", type=float, default=10.0, help="seconds down (default 10)")
    parser.add_argument("--before", type=float, default=5.0)
    parser.add_argument("--after", type=float, default=5.0)
    parser.add_argument("--interval", type=float, default=1.0, help="poll period (default 1 s)")
    parser.add_argument("--metrics", type=int, default=3, help="metrics polled per period")
    parser.add_argument("--write", action="store_true", help=f"append the table to {RESULTS}")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every error")
    args = parser.parse_args()
    global VERBOSE
    VERBOSE = args.verbose
    table = asyncio.run(main_async(args))
    print()
    print(table)
    if args.write:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        command = "python bench/bench_stale.py " + " ".join(sys.argv[1:])
        if not RESULTS.exists():
            RESULTS.write_text(
                "# bench_stale.py: a tenant's outage under an HPA-like poll, stale answers off "
                "and on\n\nMethod: bench/README.md. Runs appended newest last.\n"
            )
        with RESULTS.open("a") as out:
            out.write(f"\n## {stamp}: `{command.strip()}`\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
