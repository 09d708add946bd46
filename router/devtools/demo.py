"""`metrics-router demo`: the whole request path on this machine, no cluster needed.

A development PKI in a temporary directory, three tenant upstreams that enforce the router's
client certificate the way KEDA's metrics server does, the real `metrics-router serve` as a
child process, and this process playing the kube-apiserver aggregator: front-proxy client
certificate, the HPA controller's identity in X-Remote-* headers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import ssl
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from multidict import CIMultiDict

from router.devtools.keda_stub import KedaStub
from router.devtools.pki import Pki, generate_pki

HPA_USER = "system:serviceaccount:kube-system:horizontal-pod-autoscaler"
HPA_GROUPS = ("system:serviceaccounts", "system:authenticated")
METRIC = "s0-prometheus"
SELECTOR = "labelSelector=scaledobject.keda.sh%2Fname%3Dapp-scaler"
# Each tenant is named after its root namespace (the default --tenant-pattern and the hnc
# strategy name tenants so); its KEDA would run in "<tenant>--sys".
TENANTS = {
    "tenant-a": (("tenant-a", "tenant-a--dev"), "42"),
    "tenant-b": (("tenant-b",), "7"),
    "tenant-c": (("tenant-c", "tenant-c--ml"), "1500m"),
}
OK, FAIL = "\u2713", "\u2717"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--keep-running",
        action="store_true",
        help="leave the stack up after the walk-through and print curl commands",
    )
    parser.add_argument("--dir", type=Path, help="work directory (default: a temporary one)")


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(Demo(args.keep_running, args.dir).main())
    except KeyboardInterrupt:
        return 130


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def metric_path(namespace: str) -> str:
    return f"/apis/external.metrics.k8s.io/v1beta1/namespaces/{namespace}/{METRIC}?{SELECTOR}"


@dataclass
class Answer:
    """What the aggregator got back, and what the upstream said it saw (X-Stub-* headers)."""

    status: int  # 0: no HTTP answer (TLS handshake refused, connection dropped)
    body: str = ""
    reason: str = ""
    value: str = "-"
    seen_user: str = ""
    seen_groups: str = ""
    peer_cn: str = ""
    upstream_tenant: str = "-"


@dataclass
class Checks:
    passed: int = 0
    failed: list[str] = field(default_factory=list)

    def check(self, ok: bool, what: str) -> str:
        if ok:
            self.passed += 1
            return OK
        self.failed.append(what)
        return FAIL


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = ["  " + line, "  " + "  ".join("-" * w for w in widths)]
    out += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def step(title: str) -> None:
    print(f"\n\u25b6 {title}")


class Demo:
    def __init__(self, keep_running: bool, workdir: Path | None) -> None:
        self.keep_running = keep_running
        self.workdir_arg = workdir
        self.checks = Checks()
        self.stubs: dict[str, KedaStub] = {}
        self.router: asyncio.subprocess.Process | None = None

    async def main(self) -> int:
        started = time.monotonic()
        with self._workdir() as work:
            try:
                await self._run(work)
            finally:
                await self._stop_all()
        elapsed = time.monotonic() - started
        print(
            f"\n{self.checks.passed} passed, {len(self.checks.failed)} failed "
            f"({elapsed:.1f}s; everything started was stopped)"
        )
        for what in self.checks.failed:
            print(f"  {FAIL} {what}")
        return 0 if not self.checks.failed else 1

    @contextlib.contextmanager
    def _workdir(self) -> Iterator[Path]:
        if self.workdir_arg is not None:
            self.workdir_arg.mkdir(parents=True, exist_ok=True)
            yield self.workdir_arg
        else:
            with tempfile.TemporaryDirectory(prefix="metrics-router-demo-") as tmp:
                yield Path(tmp)

    async def _run(self, work: Path) -> None:
        step("Development PKI (metrics-router certs init)")
        pki = generate_pki(work / "pki", tuple(TENANTS), force=True)
        print(f"  {len(pki.files())} files in {pki.directory}: requestheader (front-proxy) CA,")
        print("  router serving cert, a separate router client CA (CN metrics-router),")
        print("  upstream CA and one serving cert per tenant KEDA metrics server")

        step("Three tenant KEDA metrics servers (they require the router's client cert)")
        for tenant, (_, value) in TENANTS.items():
            stub = KedaStub(
                tenant=tenant,
                cert_file=pki.upstream_cert(tenant),
                key_file=pki.upstream_key(tenant),
                client_ca_file=pki.router_client_ca,
                allowed_names=("metrics-router",),
                value=value,
            )
            await stub.start()
            self.stubs[tenant] = stub
        print(table(["tenant", "upstream", "metric value"], [
            [t, self.stubs[t].url, v] for t, (_, v) in TENANTS.items()
        ]))  # fmt: skip

        routes = work / "routes.yaml"
        self._write_routes(routes, extra={})
        port, metrics_port = free_port(), free_port()
        step(f"metrics-router serve on https://127.0.0.1:{port} (metrics :{metrics_port})")
        await self._start_router(pki, routes, port, metrics_port)
        base = f"https://127.0.0.1:{port}"
        agg = self._client_ssl(pki, pki.front_proxy_client_cert, pki.front_proxy_client_key)
        async with aiohttp.ClientSession() as http:
            await self._wait_ready(http, metrics_port)
            print(f"  {OK} ready")

            step("The aggregator asks for each tenant's metric (HPA identity in X-Remote-*)")
            rows = []
            for tenant, (namespaces, value) in TENANTS.items():
                for ns in namespaces:
                    r = await self._get(http, base + metric_path(ns), agg)
                    seen = r.seen_user
                    ok = r.status == 200 and r.value == value and seen == HPA_USER
                    mark = self.checks.check(ok, f"{ns} routed to tenant {tenant}")
                    rows.append([
                        mark, ns, tenant, r.upstream_tenant, str(r.status), r.value,
                        seen.rsplit(":", 1)[-1], r.seen_groups, r.peer_cn,
                    ])  # fmt: skip
            print(table(
                ["", "namespace", "tenant", "answered by", "HTTP", "value", "user seen upstream",
                 "groups seen upstream", "upstream's peer CN"],
                rows,
            ))  # fmt: skip
            print("  (the user is the HPA's service account; the upstream authenticated the")
            print(
                "   router's own certificate, CN metrics-router, and read identity from X-Remote-*)"
            )

            step("Discovery is answered by the router itself")
            r = await self._get(http, base + "/apis/external.metrics.k8s.io/v1beta1", agg)
            resources = []
            with contextlib.suppress(ValueError, AttributeError, KeyError, TypeError):
                resources = [x["name"] for x in json.loads(r.body).get("resources", [])]
            ok = r.status == 200 and resources == ["externalmetrics"]
            mark = self.checks.check(ok, "discovery")
            print(f"  {mark} GET /apis/external.metrics.k8s.io/v1beta1 -> {r.status} {resources}")

            step("Refusals (nothing reaches any upstream)")
            before = sum(len(s.seen) for s in self.stubs.values())
            rows = []
            r = await self._get(http, base + metric_path("kube-system"), agg)
            rows.append(self._refusal("unknown namespace kube-system", r, 404))
            no_cert = self._client_ssl(pki, None, None)
            r = await self._get(http, base + metric_path("tenant-a"), no_cert)
            rows.append(self._refusal("no client certificate, spoofed X-Remote-User", r, 401))
            other = self._client_ssl(pki, pki.other_client_cert, pki.other_client_key)
            r = await self._get(http, base + metric_path("tenant-a"), other)
            rows.append(self._refusal("requestheader CA cert, CN not allowed", r, 401))
            rogue = self._client_ssl(pki, pki.rogue_client_cert, pki.rogue_client_key)
            r = await self._get(http, base + metric_path("tenant-a"), rogue)
            rows.append(self._refusal("CN front-proxy-client from another CA", r, 0))
            r = await self._get(
                http, base + "/apis/external.metrics.k8s.io/v1beta1/namespaces/a%2F..%2Fb/x", agg
            )
            rows.append(self._refusal("encoded traversal in the path", r, 400))
            after = sum(len(s.seen) for s in self.stubs.values())
            mark = self.checks.check(after == before, "refused requests never forwarded")
            print(table(["", "request", "answer"], rows))
            print(f"  {mark} upstream requests during these refusals: {after - before}")

            step("Live change: tenant-b--new is added to the routes file")
            self._write_routes(routes, extra={"tenant-b": ("tenant-b--new",)})
            t0 = time.monotonic()
            status = 0
            while time.monotonic() - t0 < 10:
                status = (await self._get(http, base + metric_path("tenant-b--new"), agg)).status
                if status == 200:
                    break
                await asyncio.sleep(0.05)
            mark = self.checks.check(status == 200, "new namespace routable")
            print(f"  {mark} routable after {time.monotonic() - t0:.2f}s (file checked every 0.2s)")

            step("metrics-router doctor (routes-file mode: the cluster checks are skipped)")
            doctor = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "router", "doctor", "--routes-file", str(routes),
                *pki.serve_flags(), "--metrics-url", f"http://127.0.0.1:{metrics_port}",
                stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            report = (await doctor.communicate())[0].decode()
            print("\n".join("  " + ln for ln in report.splitlines()))
            probed = all(f"{OK} tenant {t}: discovery GET" in report for t in TENANTS)
            mark = self.checks.check(doctor.returncode == 0 and probed, "doctor")
            print(f"  {mark} doctor exit {doctor.returncode}: every tenant's trust chain holds")

            step("Tenant outage: tenant-c's metrics server stops")
            await self.stubs["tenant-c"].stop()
            rows = []
            for ns, want in (("tenant-c", 503), ("tenant-a", 200), ("tenant-b", 200)):
                r = await self._get(http, base + metric_path(ns), agg)
                mark = self.checks.check(r.status == want, f"{ns} during tenant-c's outage")
                rows.append([mark, ns, str(r.status), r.reason])
            print(table(["", "namespace", "HTTP", "reason"], rows))

            step("The router's own metrics (/metrics), per tenant")
            async with http.get(f"http://127.0.0.1:{metrics_port}/metrics") as resp:
                text = await resp.text()
            wanted = ("metrics_router_requests_total{", "metrics_router_upstream_errors")
            lines = [ln for ln in text.splitlines() if ln.startswith(wanted)]
            for ln in lines:
                print("  " + ln)
            self.checks.check(any('tenant="tenant-c"' in ln for ln in lines), "per-tenant metrics")

            await self._stale_step(http, base, agg, routes, metrics_port)

            if self.keep_running:
                self._print_try_it(pki, port, metrics_port)
                stop = asyncio.Event()
                loop = asyncio.get_running_loop()
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.add_signal_handler(sig, stop.set)
                await stop.wait()

    async def _stale_step(
        self, http: aiohttp.ClientSession, base: str, agg: ssl.SSLContext, routes: Path, mport: int
    ) -> None:
        """Tenant-b's metrics server restarts (down 3 s) while the HPA polls every 0.5 s, with
        serveStaleFor: 30s on tenant-b: every poll is answered, from the HPA's own last answer."""
        step("Ride through a restart: tenant-b gets serveStaleFor: 30s, then stops for 3 s")
        b = self.stubs["tenant-b"]

        def turn_on() -> None:  # serveStaleFor: 30s under tenant-b's upstream, written atomically
            line = f"    upstream: {b.url}\n"
            tmp = routes.with_suffix(".tmp")
            tmp.write_text(routes.read_text().replace(line, line + "    serveStaleFor: 30s\n"))
            os.replace(tmp, routes)

        turn_on()
        view: dict[str, object] = {}
        deadline = time.monotonic() + 10
        while not view.get("enabled") and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            async with http.get(f"http://127.0.0.1:{mport}/routes") as resp:
                tenants = {t["tenant"]: t for t in (await resp.json())["tenants"]}
            view = tenants["tenant-b"].get("staleAnswers") or {}
        url = base + metric_path("tenant-b")
        hpa = [("X-Remote-User", HPA_USER)] + [("X-Remote-Group", g) for g in HPA_GROUPS]
        other = [*hpa, ("X-Remote-Group", "system:masters")]

        async def get(headers: list[tuple[str, str]]) -> list[str]:
            async with http.get(url, ssl=agg, headers=CIMultiDict(headers)) as resp:
                await resp.read()
                warning = resp.headers.get("Warning", "-")
                return [str(resp.status), resp.headers.get("Age", "-"), warning]

        fresh = await get(hpa)
        port = b.port or 0
        await b.stop()
        rows, started = [["", "fresh", *fresh]], time.monotonic()
        for _ in range(6):  # every 0.5 s for 3 s
            got = await get(hpa)
            mark = self.checks.check(got[0] == "200" and got[2] != "-", "stale answer to the HPA")
            rows.append([mark, f"down {time.monotonic() - started:.1f}s", *got])
            await asyncio.sleep(0.5)
        got = await get(other)
        mark = self.checks.check(got[0] == "503", "another identity never gets it")
        rows.append([mark, "one group more", *got])
        await b.start(port=port)
        got = await get(hpa)
        mark = self.checks.check(got[0] == "200" and got[2] == "-", "fresh again after restart")
        rows.append([mark, "back", *got])
        print(table(["", "when", "HTTP", "Age", "Warning"], rows))
        down = [r for r in rows if r[1].startswith("down")]
        errors = sum(r[2] != "200" for r in down)
        print(
            f"  {len(down)} polls while tenant-b was down: {errors} errors"
            " (tenant-c, with it off: 503 above)"
        )

    def _refusal(self, what: str, r: Answer, want: int) -> list[str]:
        mark = self.checks.check(r.status == want, what)
        answer = "TLS handshake refused" if r.status == 0 else f"{r.status} {r.reason}"
        return [mark, what, answer]

    def _write_routes(self, path: Path, extra: dict[str, tuple[str, ...]]) -> None:
        lines = ["tenants:"]
        for tenant, (namespaces, _) in TENANTS.items():
            ns = list(namespaces) + list(extra.get(tenant, ()))
            lines += [
                f"  {tenant}:",
                f"    namespaces: [{', '.join(ns)}]",
                f"    upstream: {self.stubs[tenant].url}",
                f"    serverName: keda-operator-metrics-apiserver.{tenant}--sys.svc",
            ]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, path)  # atomic, as a ConfigMap volume update is

    async def _start_router(self, pki: Pki, routes: Path, port: int, metrics_port: int) -> None:
        args = [
            sys.executable, "-m", "router", "serve",
            "--secure-port", str(port), "--bind-address", "127.0.0.1",
            *pki.serve_flags(),
            "--routes-file", str(routes),
            "--metrics-bind-address", f"127.0.0.1:{metrics_port}",
            "--file-check-interval", "0.2",
            "--log-level", "warning",
        ]  # fmt: skip
        print("  " + " ".join(a if a.startswith("-") else Path(a).name for a in args[3:]))
        self.router = await asyncio.create_subprocess_exec(*args)

    async def _wait_ready(self, http: aiohttp.ClientSession, metrics_port: int) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.router is not None and self.router.returncode is not None:
                raise SystemExit(f"the router exited with {self.router.returncode}")
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"http://127.0.0.1:{metrics_port}/readyz") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.05)
        raise SystemExit("the router did not become ready within 20s")

    @staticmethod
    def _client_ssl(pki: Pki, cert: Path | None, key: Path | None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(pki.router_serving_ca))
        if cert is not None and key is not None:
            ctx.load_cert_chain(cert, key)
        return ctx

    async def _get(self, http: aiohttp.ClientSession, url: str, ctx: ssl.SSLContext) -> Answer:
        headers = [("X-Remote-User", HPA_USER)] + [("X-Remote-Group", g) for g in HPA_GROUPS]
        try:
            async with http.get(url, ssl=ctx, headers=CIMultiDict(headers)) as resp:
                body = await resp.text()
                answer = Answer(
                    status=resp.status,
                    body=body,
                    seen_user=resp.headers.get("X-Stub-Seen-User", ""),
                    seen_groups=resp.headers.get("X-Stub-Seen-Groups", ""),
                    peer_cn=resp.headers.get("X-Stub-Peer-CN", ""),
                    upstream_tenant=resp.headers.get("X-Stub-Tenant", "-"),
                )
        except (aiohttp.ClientError, ssl.SSLError) as exc:
            return Answer(status=0, reason=type(exc).__name__)
        with contextlib.suppress(ValueError, KeyError, IndexError, TypeError, AttributeError):
            doc = json.loads(body)
            if doc.get("kind") == "ExternalMetricValueList":
                answer.value = str(doc["items"][0]["value"])
            elif doc.get("kind") == "Status":
                answer.reason = str(doc.get("reason", ""))
        return answer

    def _print_try_it(self, pki: Pki, port: int, metrics_port: int) -> None:
        d = pki.directory
        print("\nThe stack stays up (Ctrl-C stops it). Try it by hand:\n")
        print(
            f"  curl --cacert {d}/router-serving-ca.crt \\\n"
            f"       --cert {d}/front-proxy-client.crt --key {d}/front-proxy-client.key \\\n"
            f"       -H 'X-Remote-User: {HPA_USER}' -H 'X-Remote-Group: system:authenticated' \\\n"
            f"       'https://127.0.0.1:{port}{metric_path('tenant-a--dev')}'\n"
        )
        print(f"  curl http://127.0.0.1:{metrics_port}/routes")
        print(f"  curl http://127.0.0.1:{metrics_port}/metrics | grep ^metrics_router")

    async def _stop_all(self) -> None:
        if self.router is not None and self.router.returncode is None:
            self.router.send_signal(signal.SIGTERM)
            try:
                code = await asyncio.wait_for(self.router.wait(), timeout=20)
            except TimeoutError:
                self.router.kill()
                code = await self.router.wait()
            self.checks.check(code == 0, f"router exits 0 on SIGTERM (got {code})")
        for stub in self.stubs.values():
            await stub.stop()
