"""Processes the benchmark starts and what they cost: CPU seconds and RSS of a process tree."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from harness.common import ROOT

CLK_TCK = os.sysconf("SC_CLK_TCK")


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
