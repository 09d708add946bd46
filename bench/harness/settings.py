"""The benchmark's command line: what to run, how long, how often, where."""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.common import BENCH


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
