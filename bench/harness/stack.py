"""A run's stack: work directory, PKI, upstreams and every process started (stopped at the end)."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from harness.nginx import Upstreams
from harness.pki import make_pki
from harness.procstats import Proc
from harness.settings import Settings


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
