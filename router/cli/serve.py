"""`metrics-router serve`: parse options, build the Router, run until SIGTERM.

``--workers N`` (N > 1) makes this process a small supervisor: it starts N worker processes
(spawned: fresh interpreters, see ``supervise``) before any event loop exists; each binds the
secure port with SO_REUSEPORT (the kernel spreads connections across them) and keeps its own
upstream pools and TLS contexts. Worker 0 alone serves the metrics port, where Prometheus'
multiprocess mode sums the counters of all workers.
SIGTERM/SIGINT are forwarded to the workers; if one dies, the others are stopped and the
supervisor exits with its code, so the pod restarts whole.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable
from types import FrameType
from typing import Any

from prometheus_client import CollectorRegistry

from router import logs
from router.app import Router, StartupError
from router.cli import logs as cli_logs
from router.cli.serve_options import add_serve_arguments, serve_config_from_args
from router.core.errors import ConfigError
from router.settings.serve import ServeConfig

logger = logging.getLogger("router.cli.serve")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from router.cli.policy_options import add_policy_arguments

    add_serve_arguments(parser)
    add_policy_arguments(parser)


def install_uvloop() -> bool:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


async def serve(
    config: ServeConfig,
    *,
    reuse_port: bool = False,
    metrics_view: Callable[[], CollectorRegistry] | None = None,
    policy: Any = None,
) -> int:
    router: Router | None = None
    try:
        router = Router(
            config, reuse_port=reuse_port, metrics_registry_view=metrics_view, policy=policy
        )
        router.handle_signals()
        await router.start()
    except Exception as exc:  # never a traceback at start-up, whatever the input
        if isinstance(exc, StartupError):
            logger.error("cannot start: %s", exc)
        else:
            logger.error("cannot start: %s: %s", type(exc).__name__, exc)
            logger.debug("start-up failure", exc_info=True)
        if router is not None:
            with contextlib.suppress(Exception):
                await router.stop()
        return 1
    return await router.run_until_signalled()


def run(args: argparse.Namespace) -> int:
    from router.cli.policy_options import policy_settings_from_args

    errors: list[str] = []
    try:
        config = serve_config_from_args(args)
    except ConfigError as exc:
        errors.extend(exc.errors)
    policy = policy_settings_from_args(args, errors)
    if policy is not None:
        if args.routes_file is not None:
            errors.append(
                "--manage-network-policies needs routes from the cluster, not --routes-file "
                "(for GitOps, write the manifests with `metrics-router render --output-dir`)"
            )
        if args.workers > 1:
            errors.append("--manage-network-policies runs with --workers 1 (one writer per pod)")
    if errors:
        for error in errors:
            print(f"metrics-router serve: error: {error}", file=sys.stderr)
        return 2  # a usage error, as argparse's own
    cli_logs.setup(config.log_level, config.log_format)
    if config.workers > 1:
        problem = port_held_by_another_process(config.bind_address, config.secure_port)
        if problem is not None:
            logger.error("cannot start: %s", problem)
            return 1
        return supervise(config)
    install_uvloop()
    return asyncio.run(serve(config, policy=policy))


def port_held_by_another_process(host: str, port: int) -> str | None:
    """With --workers, every worker binds with SO_REUSEPORT, and the kernel would let them
    join the listeners of any other process of this user on that port (splitting connections
    with a router of another configuration). Before forking, bind the port once *without*
    SO_REUSEPORT: that fails if anyone holds it. Returns the problem, or None."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return (
                    f"{host}:{port} is already in use by another process; --workers would "
                    "share it with that process (SO_REUSEPORT): stop it or choose another "
                    "--secure-port"
                )
            return f"cannot listen on {host}:{port}: {exc.strerror}"
    return None


def _worker(config: ServeConfig, index: int, multiproc_dir: str) -> None:
    from prometheus_client import multiprocess

    # A spawned process: PROMETHEUS_MULTIPROC_DIR came with the environment, so every metric
    # writes to per-process files the metrics port aggregates. Logging is set up afresh.
    cli_logs.setup(config.log_level, config.log_format)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor forwards one SIGTERM
    metrics_view: Callable[[], CollectorRegistry] | None = None
    if index == 0:
        view = CollectorRegistry()
        multiprocess.MultiProcessCollector(view, path=multiproc_dir)  # type: ignore[no-untyped-call]
        metrics_view = lambda: view  # noqa: E731
    else:
        config = _without_metrics(config)
    install_uvloop()
    sys.exit(asyncio.run(serve(config, reuse_port=True, metrics_view=metrics_view)))


def _without_metrics(config: ServeConfig) -> ServeConfig:
    from dataclasses import replace

    return replace(config, metrics_bind_address=None)


def supervise(config: ServeConfig) -> int:
    from prometheus_client import multiprocess

    multiproc_dir = tempfile.mkdtemp(prefix="metrics-router-prom-")
    # prometheus_client's documented multiprocess setup: PROMETHEUS_MULTIPROC_DIR is in the
    # environment before a process that creates metrics imports prometheus_client. This process
    # has imported it already, so the workers are spawned (fresh interpreters that inherit the
    # environment), not forked. The supervisor itself creates no metric.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = multiproc_dir
    ctx = multiprocessing.get_context("spawn")
    workers = [
        ctx.Process(target=_worker, args=(config, i, multiproc_dir), name=f"worker-{i}")
        for i in range(config.workers)
    ]
    for w in workers:
        w.start()
    logger.info(
        "supervising", extra=logs.fields(workers=len(workers), pids=[w.pid for w in workers])
    )
    stopping = False

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for w in workers:
            if w.is_alive() and w.pid is not None:
                os.kill(w.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = 0
    try:
        remaining = list(workers)
        while remaining:
            multiprocessing.connection.wait([w.sentinel for w in remaining])
            for w in [w for w in remaining if not w.is_alive()]:
                remaining.remove(w)
                w.join()
                if w.pid is not None:
                    multiprocess.mark_process_dead(w.pid, multiproc_dir)  # type: ignore[no-untyped-call]
                exit_code = w.exitcode or 0
                if not stopping:
                    logger.error(
                        "worker exited: stopping the others",
                        extra=logs.fields(worker=w.name, code=exit_code),
                    )
                    code = exit_code if exit_code > 0 else 1
                    forward(signal.SIGTERM, None)
    finally:
        shutil.rmtree(multiproc_dir, ignore_errors=True)
    return code
