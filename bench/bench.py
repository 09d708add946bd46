"""`make bench`: the router against DIRECT and NGINX on loopback, real mTLS both ways.

A benchmark, not a test: it prints figures, writes bench/results.md, and never fails on a
number. See bench/README.md for what is measured and how to read it.

    .venv/bin/python bench/bench.py            # full run (~8 min on 2 cores)
    BENCH_QUICK=1 .venv/bin/python bench/bench.py   # ~1 min, one repetition, short runs
    .venv/bin/python bench/bench.py --only matrix --reps 1 --duration 3 --targets router-1,nginx-1

Everything runs on 127.0.0.1 with OS-chosen free ports; every process it starts is stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import hostile  # noqa: E402  (bench/hostile.py, next to this file)
import paced  # noqa: E402

BENCH = ROOT / "bench"
NGINX_DIR = BENCH / "nginx"
RESULTS = BENCH / "results.md"
VENV_BIN = Path(sys.executable).parent

TENANTS = ("a", "b", "c", "h")  # h: the hanging tenant of the isolation scenario
METRIC_PATH = (
    "/apis/external.metrics.k8s.io/v1beta1/namespaces/{ns}/s0-prometheus"
    "?labelSelector=scaledobject.keda.sh%2Fname%3Dapp-scaler"
)
HPA_IDENTITY = (
    ("X-Remote-User", "system:serviceaccount:kube-system:horizontal-pod-autoscaler"),
    ("X-Remote-Group", "system:serviceaccounts"),
    ("X-Remote-Group", "system:authenticated"),
)
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Idle keep-alive connections kept per upstream, for the router and NGINX alike: as many as the
# router's per-tenant in-flight limit, so c=64 does not close and re-open connections.
KEEPALIVE = 64


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    quick: bool
    reps: int
    duration: float
    concurrency: tuple[int, ...]
    only: frozenset[str]
    targets: frozenset[str] | None
    workers: tuple[int, ...]
    workdir: Path
    keep_workdir: bool
    write_results: bool
    baseline: Path | None = None  # another checkout of the router, run in the same session

    def wants(self, section: str) -> bool:
        return not self.only or section in self.only


def parse_settings(argv: Sequence[str]) -> Settings:
    quick = os.environ.get("BENCH_QUICK", "") not in ("", "0")
    p = argparse.ArgumentParser(description="router vs DIRECT vs NGINX on loopback")
    p.add_argument("--quick", action="store_true", default=quick, help="also: BENCH_QUICK=1")
    p.add_argument("--reps", type=int, help="interleaved repetitions (default 3; quick 1)")
    p.add_argument("--duration", type=float, help="seconds per ab run (default 5; quick 2)")
    p.add_argument("--concurrency", default="1,16,64")
    p.add_argument(
        "--only", default="", help="comma list of: matrix,paced,scale,isolation,reload,hostile"
    )
    p.add_argument(
        "--baseline",
        type=Path,
        help="another checkout (e.g. `git worktree add /tmp/base main`): its router runs as the "
        "matrix target base-1 and in the hostile scenario, for before/after figures",
    )
    p.add_argument("--targets", help="matrix targets, e.g. direct,router-1,nginx-1")
    p.add_argument("--workers", default="1,2", help="worker/process counts for ROUTER and NGINX")
    p.add_argument(
        "--workdir",
        type=Path,
        help="keep logs, configs and the PKI here (default: a directory under bench/out, "
        "removed after a complete run)",
    )
    p.add_argument("--no-results", action="store_true", help="do not write bench/results.md")
    a = p.parse_args(argv)
    workdir = a.workdir
    if workdir is None:
        (BENCH / "out").mkdir(exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix="run-", dir=BENCH / "out"))
    return Settings(
        quick=a.quick,
        reps=a.reps or (1 if a.quick else 3),
        duration=a.duration or (2.0 if a.quick else 5.0),
        concurrency=tuple(int(c) for c in a.concurrency.split(",") if c),
        only=frozenset(s for s in a.only.split(",") if s),
        targets=frozenset(a.targets.split(",")) if a.targets else None,
        workers=tuple(int(w) for w in a.workers.split(",") if w),
        workdir=workdir,
        keep_workdir=a.workdir is not None,
        write_results=not a.no_results,
        baseline=a.baseline.resolve() if a.baseline else None,
    )


# -------------------------------------------------------------------------- processes, CPU


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_tree(root: int) -> list[int]:
    """root and every descendant (from /proc/<pid>/stat parent pids)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def cpu_seconds(root: int) -> float:
    """utime + stime of root's process tree, in seconds."""
    total = 0
    for pid in proc_tree(root):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / CLK_TCK


def rss_kib(root: int) -> int:
    total = 0
    for pid in proc_tree(root):
        with contextlib.suppress(OSError, IndexError, ValueError):
            status = Path(f"/proc/{pid}/status").read_text()
            total += int(status.split("VmRSS:")[1].split()[0])
    return total


class Proc:
    """A process this benchmark started; stopped with SIGTERM (then SIGKILL) by its own pid."""

    def __init__(
        self, name: str, cmd: Sequence[str], logfile: Path, *, cwd: Path = ROOT,
        env: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        self.name = name
        self.logfile = logfile
        self._log = logfile.open("ab")
        self.popen = subprocess.Popen(
            list(cmd), stdout=self._log, stderr=subprocess.STDOUT, cwd=cwd,
            env=None if env is None else {**os.environ, **env},
        )  # fmt: skip
        self.started = time.monotonic()

    @property
    def pid(self) -> int:
        return int(self.popen.pid)

    def wait_for_log(self, pattern: str, count: int = 1, timeout: float = 30.0) -> float:
        """Seconds from start until pattern appeared count times in the log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.logfile.read_text(errors="replace")
            if text.count(pattern) >= count:
                return time.monotonic() - self.started
            if self.popen.poll() is not None:
                break
            time.sleep(0.02)
        raise RuntimeError(
            f"{self.name} did not log {pattern!r}: see {self.logfile}\n{self.tail()}"
        )

    def tail(self, n: int = 15) -> str:
        return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-n:])

    def stop(self, timeout: float = 15.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log.close()


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


# ------------------------------------------------------------------------------ environment


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


# ------------------------------------------------------------------------------------- PKI


def make_pki(workdir: Path) -> Path:
    from router.certs import generate_pki

    pki = generate_pki(workdir / "pki", tenants=TENANTS)
    # ab -E wants one PEM file: certificate, then key.
    for name in ("front-proxy-client", "router-client"):
        (workdir / f"{name}.pem").write_bytes(
            (pki.directory / f"{name}.crt").read_bytes()
            + (pki.directory / f"{name}.key").read_bytes()
        )
    return pki.directory


def router_certs(pki: Path, dest: Path) -> Path:
    """A private copy of the router's own certificates (so rotating one never touches another)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("router-serving", "router-client"):
        for ext in ("crt", "key"):
            shutil.copy2(pki / f"{name}.{ext}", dest / f"{name}.{ext}")
    return dest


def rotate_cert(pki: Path, dest: Path, which: str) -> None:
    """Issue a fresh router serving or client certificate into dest (key first, then cert)."""
    from router import certs

    if which == "serving":
        ca = certs.CertAndKey.load(pki / "router-serving-ca.crt", pki / "router-serving-ca.key")
        leaf = certs.issue_cert(
            ca,
            certs.ROUTER_SERVICE,
            server=True,
            dns_names=certs.ROUTER_SERVING_DNS,
            ip_addresses=certs.LOOPBACK_IPS,
        )
    else:
        ca = certs.CertAndKey.load(pki / "router-client-ca.crt", pki / "router-client-ca.key")
        leaf = certs.issue_cert(ca, certs.ROUTER_CLIENT_CN, client=True)
    leaf.write(dest / f"router-{which}.crt", dest / f"router-{which}.key")


# ------------------------------------------------------------------------------------ NGINX


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
                    sys.executable, "-m", "router.keda_stub", "--tenant", tenant,
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


# ----------------------------------------------------------------------------------- router


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


# --------------------------------------------------------------------------------------- ab


@dataclass
class AbResult:
    complete: int = 0
    failed: int = 0
    non2xx: int = 0
    rps: float = 0.0
    p50: float = float("nan")  # ms
    p99: float = float("nan")  # ms
    keepalive: int = 0
    ab_cpu: float = 0.0  # seconds of ab's own CPU
    target_cpu: float = 0.0  # seconds of the measured process tree's CPU
    error: str = ""

    @property
    def errors(self) -> int:
        return self.failed + self.non2xx


def ab_cmd(
    url: str,
    pem: Path,
    concurrency: int,
    duration: float,
    csv: Path,
    *,
    keepalive: bool = True,
    socket_timeout: int = 30,
) -> list[str]:
    # -t implies -n 50000; -n after it raises the cap (ab allocates -n result slots).
    cmd = ["ab", "-q", "-r", "-t", f"{max(1, round(duration))}", "-n", str(int(60000 * duration))]
    cmd += ["-c", str(concurrency), "-s", str(socket_timeout), "-E", str(pem), "-e", str(csv)]
    if keepalive:
        cmd.append("-k")
    for name, value in HPA_IDENTITY:
        cmd += ["-H", f"{name}: {value}"]
    return [*cmd, url]


def run_ab(cmd: list[str], csv: Path, cpu_of: int | None = None) -> AbResult:
    before = cpu_seconds(cpu_of) if cpu_of else 0.0
    with tempfile.TemporaryFile() as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read().decode(errors="replace")
    after = cpu_seconds(cpu_of) if cpu_of else 0.0
    res = parse_ab(text, csv)
    res.ab_cpu = usage.ru_utime + usage.ru_stime
    res.target_cpu = after - before
    if p.returncode != 0 and not res.complete:
        res.error = text.strip().splitlines()[-1] if text.strip() else f"ab exit {p.returncode}"
    return res


def parse_ab(text: str, csv: Path) -> AbResult:
    def num(pattern: str, conv: Callable[[str], float] = float) -> float:
        m = re.search(pattern, text)
        return conv(m.group(1)) if m else 0

    res = AbResult(
        complete=int(num(r"Complete requests:\s+(\d+)")),
        failed=int(num(r"Failed requests:\s+(\d+)")),
        non2xx=int(num(r"Non-2xx responses:\s+(\d+)")),
        rps=num(r"Requests per second:\s+([\d.]+)"),
        keepalive=int(num(r"Keep-Alive requests:\s+(\d+)")),
    )
    with contextlib.suppress(OSError):
        pct = {}
        for line in csv.read_text().splitlines()[1:]:
            k, _, v = line.partition(",")
            pct[int(float(k))] = float(v)
        res.p50, res.p99 = pct.get(50, res.p50), pct.get(99, res.p99)
    return res


# ----------------------------------------------------------------------------------- matrix


@dataclass
class Target:
    name: str  # direct, router-1, router-2, nginx-1, nginx-2
    label: str
    url: str
    pem: Path
    pid: int  # root of the process tree whose CPU is charged to this target
    processes: int


@dataclass
class Cell:
    runs: list[AbResult] = field(default_factory=list)

    def median(self, attr: str) -> float:
        values = [getattr(r, attr) for r in self.runs if r.complete]
        return statistics.median(values) if values else float("nan")

    def cpu_us(self) -> float:
        values = [r.target_cpu / r.complete * 1e6 for r in self.runs if r.complete]
        return statistics.median(values) if values else float("nan")

    def ab_us(self) -> float:
        values = [r.ab_cpu / r.complete * 1e6 for r in self.runs if r.complete]
        return statistics.median(values) if values else float("nan")

    def errors(self) -> int:
        return sum(r.errors for r in self.runs)


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


# ------------------------------------------------------------------------------------ scale


def scale_probe(routes_file: Path, namespaces: list[str]) -> dict[str, float]:
    """Runs in a fresh interpreter: parse time, lookup cost, RSS growth."""

    def rss() -> int:
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmRSS:")[1].split()[0])

    from router.routes import parse_routes_file

    text = routes_file.read_text()
    r0 = rss()
    t0 = time.perf_counter()
    table = parse_routes_file(text)
    load = time.perf_counter() - t0
    r1 = rss()
    rng = random.Random(1)
    sample = [rng.choice(namespaces) for _ in range(100_000)]
    misses = [f"nobody-{i}" for i in range(100_000)]
    lookup = table.lookup
    t0 = time.perf_counter()
    for ns in sample:
        lookup(ns)
    hit = (time.perf_counter() - t0) / len(sample)
    t0 = time.perf_counter()
    for ns in misses:
        lookup(ns)
    miss = (time.perf_counter() - t0) / len(misses)
    return {
        "namespaces": table.namespace_count,
        "tenants": len(table.tenants),
        "load_s": load,
        "lookup_hit_ns": hit * 1e9,
        "lookup_miss_ns": miss * 1e9,
        "rss_growth_kib": r1 - r0,
    }


def big_routes(ups: Upstreams, tenants: int = 1000, per_tenant: int = 10) -> tuple[str, list[str]]:
    lines = ["tenants:"]
    namespaces = []
    for i in range(tenants):
        t = f"t{i:04d}"
        ns = [f"tenant-{t}"] + [f"tenant-{t}--ns{j}" for j in range(1, per_tenant)]
        namespaces += ns
        port = ups.port("a") if i == 0 else 20000 + i  # only tenant t0000 is ever called
        server = "keda-operator-metrics-apiserver.a--sys.svc"
        lines += [
            f"  {t}:",
            f"    namespaces: [{', '.join(ns)}]",
            f"    upstream: https://127.0.0.1:{port}",
            f"    serverName: {server}",
        ]
    return "\n".join(lines) + "\n", namespaces


# ------------------------------------------------------------------------------------ report


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


# -------------------------------------------------------------------------------------- main


@dataclass
class Stack:
    settings: Settings
    workdir: Path
    pki: Path
    procs: list[Proc] = field(default_factory=list)
    ups: Upstreams | None = None
    nginx: bool = False

    def add(self, proc: Proc) -> Proc:
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            with contextlib.suppress(Exception):
                p.stop()


@contextlib.contextmanager
def stack(settings: Settings) -> Iterator[Stack]:
    workdir = settings.workdir
    (workdir / "tmp").mkdir(parents=True, exist_ok=True)
    os.chmod(workdir, 0o755)  # NGINX workers run as another user
    pki = make_pki(workdir)
    st = Stack(settings, workdir, pki, nginx=shutil.which("nginx") is not None)
    try:
        yield st
    finally:
        st.stop_all()


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
    rep = Report()
    rep.add(
        "# Benchmark results",
        "",
        "Written by `make bench` (bench/run.sh); see bench/README.md for the method. "
        "Figures are from one machine and one run: compare ratios within this file, not across "
        "machines.",
        "",
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
    if verdicts:
        rep.add("## Targets", "")
        rep.table(["target", "this run"], [[k, v] for k, v in verdicts.items()], left=2)
    for sec in sections:
        rep.add(*sec.lines)
    rep.add("## Set-up", "")
    rep.add(*setup_notes(upstream_kind), "")
    rep.add("## Environment", "")
    rep.table(["", ""], [[k, v] for k, v in env], left=2)
    text = rep.text()
    print()
    print(text)
    if settings.write_results:
        RESULTS.write_text(text)
        log(f"wrote {RESULTS.relative_to(ROOT)}")
    if not settings.keep_workdir:
        shutil.rmtree(settings.workdir, ignore_errors=True)  # logs, configs, keys
    return 0


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
        "default 32 is below the per-tenant in-flight limit of 64: at c=64 half the upstream "
        "connections would be closed and re-opened), defaults otherwise. NGINX: the talk's "
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


# -------------------------------------------------------------------------------- hostile


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


# -------------------------------------------------------------------------------- isolation


def isolation(st: Stack, targets: list[Target], rep: Report) -> dict[str, str]:
    """Load on tenant a, with and without 32 requests held open on the hanging tenant h."""
    settings, workdir = st.settings, st.workdir
    csv, hang_csv = workdir / "iso.csv", workdir / "iso-hang.csv"
    duration = settings.duration
    rows, verdicts = [], {}
    for t in targets:
        if t.name not in ("router-1", "nginx-1"):
            continue
        hang_url = t.url.replace("tenant-a", "tenant-h")
        base, hung = Cell(), Cell()
        reps = 2 if settings.quick else 5  # a noisy shared machine needs more than 3
        for _ in range(reps):
            base.runs.append(run_ab(ab_cmd(t.url, t.pem, 16, duration, csv), csv, t.pid))
        # One hanging load for the whole phase: 32 requests always held open (each ends with a
        # 504 after the upstream timeout and is sent again). Restarting it per run would leave
        # the previous run's requests in flight and push tenant h over its in-flight limit,
        # into fast 429s that ab re-sends in a tight loop.
        hang_load = subprocess.Popen(
            ab_cmd(hang_url, t.pem, 32, 600, hang_csv, socket_timeout=60),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(1.0)  # let the 32 hanging requests pile up
            for _ in range(reps):
                hung.runs.append(run_ab(ab_cmd(t.url, t.pem, 16, duration, csv), csv, t.pid))
        finally:
            hang_load.terminate()
            hang_load.wait()
        log(
            f"isolation {t.label}: baseline p99 "
            + ", ".join(f"{r.p99:.3f}" for r in base.runs)
            + " ms; hung p99 "
            + ", ".join(f"{r.p99:.3f}" for r in hung.runs)
            + " ms"
        )
        b99, h99 = base.median("p99"), hung.median("p99")
        change = (h99 / b99 - 1) * 100
        rows.append(
            [
                t.label, fmt(base.median("rps")), fmt(b99, ".3f"), fmt(hung.median("rps")),
                fmt(h99, ".3f"), f"{change:+.0f} %", str(base.errors() + hung.errors()),
            ]
        )  # fmt: skip
        log(f"isolation {t.label}: p99 {b99:.3f} -> {h99:.3f} ms ({change:+.0f} %)")
        if t.name == "router-1":
            verdicts["a hanging tenant moves the others' p99 < 10 %"] = (
                f"{'✓' if change < 10 else '✗'} {change:+.0f} % (1 worker, c=16)"
            )
    rep.add(
        "## Isolation: one tenant's upstream hangs",
        "",
        "Tenant h's upstream (a KedaStub with `hang`) accepts requests and never answers; 32 "
        "requests are held open against it for the whole hung phase (below the router's "
        "per-tenant in-flight limit of 64; the router answers 504 after its 10 s upstream "
        "timeout, NGINX after `proxy_read_timeout 10s`, and each is sent again) while ab "
        "measures tenant a at c=16. Medians of the baseline runs, then of the hung runs.",
        "",
    )
    rep.table(
        ["target", "baseline req/s", "baseline p99 ms", "hung req/s", "hung p99 ms", "p99 change",
         "errors on a"],
        rows,
    )  # fmt: skip
    return verdicts


# ----------------------------------------------------------------------------------- reload


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


# ------------------------------------------------------------------------------------ scale


def scale(st: Stack, rep: Report) -> None:
    assert st.ups is not None
    settings, workdir, pki, ups = st.settings, st.workdir, st.pki, st.ups
    text, namespaces = big_routes(ups)
    big = workdir / "routes-big.yaml"
    big.write_text(text)
    (workdir / "namespaces.json").write_text(json.dumps(namespaces))
    probe = subprocess.run(
        [sys.executable, str(Path(__file__)), "--scale-probe", str(big),
         str(workdir / "namespaces.json")],
        capture_output=True, text=True, check=False, cwd=ROOT,
    )  # fmt: skip
    if probe.returncode != 0:
        rep.add("## Scale", "", f"probe failed: {probe.stderr[-500:]}", "")
        return
    p = json.loads(probe.stdout)
    log(f"scale probe: {p}")
    rows = []
    measured: dict[str, dict[str, float]] = {}
    for name, routes_text, ns in (
        ("small", routes_doc(ups), "tenant-a"),
        ("big", text, "tenant-t0000--ns5"),
    ):
        r = start_router(workdir, pki, f"scale-{name}", routes_text, 1)
        st.add(r.proc)
        url = f"https://127.0.0.1:{r.port}" + METRIC_PATH.format(ns=ns)
        csv = workdir / "scale.csv"
        fp = workdir / "front-proxy-client.pem"
        run_ab(ab_cmd(url, fp, 16, 1, csv), csv)
        cell = Cell([run_ab(ab_cmd(url, fp, 16, settings.duration, csv), csv, r.proc.pid)])
        measured[name] = {
            "startup": r.startup,
            "rss": rss_kib(r.proc.pid) / 1024,
            "rps": cell.median("rps"),
            "cpu": cell.cpu_us(),
        }
        r.proc.stop()
    s, b = measured["small"], measured["big"]
    rows = [
        ["routes file", f"{len(text) / 1024:.0f} KiB YAML, {p['tenants']:.0f} tenants, "
         f"{p['namespaces']:.0f} namespaces"],
        ["parse + build (routes.parse_routes_file)", f"{p['load_s'] * 1000:.0f} ms"],
        ["lookup, hit / miss", f"{p['lookup_hit_ns']:.0f} ns / {p['lookup_miss_ns']:.0f} ns"],
        ["table memory (RSS growth while loading)", f"{p['rss_growth_kib'] / 1024:.1f} MiB"],
        ["router start to serving: 4 tenants / 1,000",
         f"{s['startup']:.2f} s / {b['startup']:.2f} s"],
        ["router RSS: 4 tenants / 1,000", f"{s['rss']:.0f} MiB / {b['rss']:.0f} MiB"],
        ["req/s at c=16: 4 tenants / 1,000", f"{s['rps']:.0f} / {b['rps']:.0f}"],
        ["router CPU µs/req: 4 tenants / 1,000", f"{s['cpu']:.1f} / {b['cpu']:.1f}"],
    ]  # fmt: skip
    rep.add("## Scale: 10,000 namespaces across 1,000 tenants", "")
    rep.table(["", ""], rows, left=2)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--scale-probe":
        sys.path.insert(0, str(ROOT))
        ns = json.loads(Path(sys.argv[3]).read_text())
        print(json.dumps(scale_probe(Path(sys.argv[2]), ns)))
        sys.exit(0)
    sys.exit(main())
