"""Instructions per request of the router process, counted by valgrind (callgrind).

CPU time per request on a shared machine moves by ±20 % from run to run; the number of
instructions the router executes per request moves far less (runs of one tree agree within
about 3 %: batching of reads and writes still varies). This counts them for this checkout
and, with ``--baseline DIR``, for another one, twice each, interleaved:

    git worktree add /tmp/base main
    .venv/bin/python bench/instructions.py --baseline /tmp/base [--requests 3000]

Each router runs under ``valgrind --tool=callgrind --instr-atstart=no`` (start-up runs
uninstrumented), is warmed with 300 requests, then instrumentation is switched on for
``--requests`` requests (ab -k -c 16 through the NGINX upstream of bench.py, the matrix's
request), and the count is divided by the requests completed. Needs valgrind and NGINX.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench


def ab(url: str, pem: Path, n: int) -> int:
    cmd = ["ab", "-q", "-k", "-c", "16", "-n", str(n), "-s", "120", "-E", str(pem)]
    for name, value in bench.HPA_IDENTITY:
        cmd += ["-H", f"{name}: {value}"]
    out = subprocess.run([*cmd, url], capture_output=True, text=True).stdout
    done = re.search(r"Complete requests:\s+(\d+)", out)
    failed = re.search(r"Failed requests:\s+(\d+)", out)
    if done is None or failed is None or int(failed.group(1)):
        raise RuntimeError(f"ab failed:\n{out}")
    return int(done.group(1))


def count(
    workdir: Path, pki: Path, ups: bench.Upstreams, name: str, tree: Path, n: int, run: str
) -> float:
    certs = bench.router_certs(pki, workdir / f"certs-{name}")
    routes = workdir / f"routes-{name}.yaml"
    bench.write_atomic(routes, bench.routes_doc(ups))
    port = bench.free_port()
    out = workdir / f"{run}.callgrind"
    cmd = [
        "valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
        sys.executable, "-m", "router", "serve",
        "--secure-port", str(port), "--bind-address", "127.0.0.1",
        "--tls-cert-file", str(certs / "router-serving.crt"),
        "--tls-private-key-file", str(certs / "router-serving.key"),
        "--requestheader-client-ca-file", str(pki / "requestheader-ca.crt"),
        "--requestheader-allowed-names", "front-proxy-client",
        "--proxy-client-cert-file", str(certs / "router-client.crt"),
        "--proxy-client-key-file", str(certs / "router-client.key"),
        "--upstream-ca-file", str(pki / "upstream-ca.crt"),
        "--routes-file", str(routes), "--metrics-bind-address", "0",
        "--max-idle-connections-per-upstream", str(bench.KEEPALIVE), "--upstream-timeout", "60",
    ]  # fmt: skip
    proc = bench.Proc(run, cmd, workdir / f"{run}.log", cwd=tree, env={"PYTHONPATH": str(tree)})
    try:
        proc.wait_for_log("serving port=", timeout=600)
        url = f"https://127.0.0.1:{port}" + bench.METRIC_PATH.format(ns="tenant-a")
        pem = workdir / "front-proxy-client.pem"
        ab(url, pem, 300)
        subprocess.run(
            ["callgrind_control", "-i", "on", str(proc.pid)], check=True, capture_output=True
        )
        done = ab(url, pem, n)
        subprocess.run(
            ["callgrind_control", "-i", "off", str(proc.pid)], check=True, capture_output=True
        )
    finally:
        proc.stop(timeout=120)
    total = 0
    for path in glob.glob(f"{out}*"):
        for line in Path(path).read_text().splitlines():
            if line.startswith(("summary:", "totals:")):
                total = max(total, int(line.split()[1]))
    return total / done


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", type=Path, help="another checkout to count as well")
    p.add_argument("--requests", type=int, default=3000)
    a = p.parse_args()
    if shutil.which("valgrind") is None or shutil.which("nginx") is None:
        print("instructions.py needs valgrind and nginx", file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="instr-", dir=bench.BENCH / "out"))
    (workdir / "tmp").mkdir()
    os.chmod(workdir, 0o755)  # NGINX workers run as another user
    pki = bench.make_pki(workdir)
    ups = bench.start_upstreams(workdir, pki, bench.free_port(), True)
    trees = [("router", bench.ROOT)]
    if a.baseline is not None:
        trees += [("baseline", a.baseline.resolve())]
    try:
        results = {}
        for i, (name, tree) in enumerate(trees + trees):  # twice each, interleaved
            ir = count(workdir, pki, ups, name, tree, a.requests, f"{name}-{i}")
            results.setdefault(name, []).append(ir)
            bench.log(f"{name}: {ir:,.0f} instructions per request")
    finally:
        for proc in ups.procs:
            proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    for name, values in results.items():
        print(f"{name}: {sum(values) / len(values):,.0f} instructions per request ({values})")
    if "baseline" in results:
        ratio = sum(results["router"]) / sum(results["baseline"])
        print(f"router/baseline: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
