"""The load generator: ApacheBench command lines, runs with CPU accounting, parsed results."""

from __future__ import annotations

import contextlib
import os
import re
import statistics
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from harness.common import HPA_IDENTITY
from harness.procstats import cpu_seconds


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
