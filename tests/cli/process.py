"""`metrics-router` as a subprocess: its flags, one-shot runs, and a running `serve`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from router.devtools.pki import Pki

ROUTER_CMD = [sys.executable, "-m", "router"]
SERVING = re.compile(r"serving port=(\d+) metrics_port=(\d+)")


def base_args(pki: Pki, routes_file: Path) -> list[str]:
    return [
        "serve",
        "--secure-port", "0",
        "--bind-address", "127.0.0.1",
        *pki.serve_flags(),
        "--routes-file", str(routes_file),
        "--metrics-bind-address", "127.0.0.1:0",
        "--shutdown-grace-period", "5",
    ]  # fmt: skip


def with_flag(args: Sequence[str], flag: str, value: str) -> list[str]:
    out = list(args)
    out[out.index(flag) + 1] = value
    return out


def run_cli(
    args: Sequence[str], cmd: Sequence[str] = ROUTER_CMD
) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=60, check=False)


def assert_clean_failure(
    proc: subprocess.CompletedProcess[str], *fragments: str, code: int = 1
) -> None:
    """Exit ``code`` (2: a usage error found in the flags; 1: a runtime error at start-up)
    with each fragment on stderr and no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, (fragment, proc.stderr)


@dataclass
class Running:
    proc: asyncio.subprocess.Process
    port: int
    metrics_port: int
    log: list[str]


async def read_until(
    proc: asyncio.subprocess.Process, log: list[str], pattern: re.Pattern[str]
) -> re.Match[str]:
    assert proc.stderr is not None
    while True:
        line = (await proc.stderr.readline()).decode(errors="replace")
        if not line:
            raise AssertionError("router exited before serving:\n" + "".join(log))
        log.append(line)
        m = pattern.search(line)
        if m is not None:
            return m


@contextlib.asynccontextmanager
async def running_router(args: Sequence[str]) -> AsyncIterator[Running]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = await asyncio.create_subprocess_exec(
        *ROUTER_CMD,
        *args,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    log: list[str] = []
    try:
        m = await asyncio.wait_for(read_until(proc, log, SERVING), 30)
        running = Running(proc, int(m.group(1)), int(m.group(2)), log)
        # The metrics port answers once the event loop runs after start-up, i.e. once the
        # signal handlers are installed.
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{running.metrics_port}/healthz") as resp,
        ):
            assert resp.status == 200
        yield running
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        if proc.stderr is not None:
            await proc.stderr.read()
