"""`metrics-router reloader`: run a tenant's KEDA operator with an up-to-date WATCH_NAMESPACE.

    metrics-router reloader [--kubeconfig F] (--tenant T [tenancy flags] | --namespace-selector SEL)
        [--debounce 2s] [--grace-period 30s] [--health-bind-address 0.0.0.0:8090]
        [--env-name WATCH_NAMESPACE] -- COMMAND [ARGS...]

Options are validated all at once (exit 2 with one line per problem); then the health port is
bound, the namespace watch starts, and COMMAND runs as a child once the first list arrived.
SIGTERM/SIGINT are forwarded to the child; the exit status is the child's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import re
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry

from router import logs
from router.cli import logs as cli_logs
from router.cli.options import add_log_arguments, address
from router.cli.tenancy_options import add_tenancy_arguments, tenancy_from_args
from router.cluster.client import KubeConfigError, api_client
from router.cluster.kubeconfig import NO_CLUSTER_HINT
from router.core.option_values import parse_duration
from router.metrics import ReloaderMetrics
from router.reloader.decide import REASONS
from router.reloader.health import start_health_server
from router.reloader.shell import Reloader
from router.reloader.source import NamespaceSource
from router.settings import ReloaderSettings, TenancySettings

logger = logging.getLogger(__name__)

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

__all__ = ["ReloaderConfig", "add_arguments", "config_from_args", "parse_duration", "run"]


@dataclass(frozen=True, slots=True)
class ReloaderConfig:
    tenant: str | None
    tenancy: TenancySettings
    kubeconfig: Path | None
    settings: ReloaderSettings
    health_host: str | None  # None = no health port
    health_port: int
    log_level: str
    log_format: str


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.usage = (
        "%(prog)s [--kubeconfig F] (--tenant T [tenancy flags] | --namespace-selector SEL) "
        "[--debounce 2s] [--grace-period 30s] [options] -- COMMAND [ARGS...]"
    )
    g = parser.add_argument_group("namespaces")
    g.add_argument(
        "--tenant",
        help="the tenant whose namespaces the child watches (resolved with the tenancy flags); "
        "without it, --namespace-selector alone selects the namespaces",
    )
    add_tenancy_arguments(parser)
    g = parser.add_argument_group("child process")
    g.add_argument(
        "--env-name",
        default="WATCH_NAMESPACE",
        help="environment variable that carries the namespace list",
    )
    g.add_argument(
        "--debounce",
        default="2s",
        help="window after the first change of the set in which further changes are folded into "
        "one restart",
    )
    g.add_argument(
        "--grace-period",
        default="30s",
        help="time the child has to exit after SIGTERM before SIGKILL",
    )
    g.add_argument(
        "--restart-backoff",
        default="1s",
        help="first delay before restarting a child that exited on its own; doubles on each crash",
    )
    g.add_argument(
        "--restart-backoff-max",
        default="1m",
        help="cap of the restart delay; a child that stayed up twice this long resets it",
    )
    g = parser.add_argument_group("operation")
    g.add_argument(
        "--health-bind-address",
        default="0.0.0.0:8090",
        help="HOST:PORT for /healthz and /metrics; '0' disables",
    )
    add_log_arguments(g)
    parser.add_argument(
        "command", nargs="*", metavar="COMMAND", help="the operator command line, after '--'"
    )


def _duration(args: argparse.Namespace, name: str, errors: list[str]) -> float:
    flag = "--" + name.replace("_", "-")
    try:
        return parse_duration(str(getattr(args, name)))
    except ValueError as exc:
        errors.append(f"{flag}: {exc}")
        return 0.0


def config_from_args(args: argparse.Namespace) -> tuple[ReloaderConfig | None, list[str]]:
    """Validate every option; return the config or the list of problems."""
    errors: list[str] = []
    tenancy = tenancy_from_args(args, errors)
    tenant = args.tenant
    if tenant is not None and not tenant.strip():
        errors.append("--tenant: must not be empty")
    if tenant is None and not args.namespace_selector:
        errors.append("one of --tenant or --namespace-selector is required")
    if args.namespace_selector is not None and not args.namespace_selector.strip():
        errors.append("--namespace-selector: must not be empty")
    if args.kubeconfig is not None and not args.kubeconfig.is_file():
        errors.append(f"--kubeconfig: {args.kubeconfig} is not a readable file")
    if not _ENV_NAME.match(args.env_name):
        errors.append(f"--env-name: {args.env_name!r} is not an environment variable name")
    debounce = _duration(args, "debounce", errors)
    grace = _duration(args, "grace_period", errors)
    backoff = _duration(args, "restart_backoff", errors)
    backoff_max = _duration(args, "restart_backoff_max", errors)
    if backoff <= 0 and "--restart-backoff" not in " ".join(errors):
        errors.append("--restart-backoff: must be > 0 (a crash loop must never be a busy loop)")
    if backoff_max < backoff:
        errors.append("--restart-backoff-max: must be >= --restart-backoff")
    health_host, health_port = _bind_address(args.health_bind_address, errors)
    command = tuple(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        errors.append("a COMMAND to run is required after '--'")
    elif "/" not in command[0] and shutil.which(command[0]) is None:
        errors.append(f"COMMAND: {command[0]!r} not found in PATH")
    if errors:
        return None, errors
    settings = ReloaderSettings(
        command=command,
        env_name=args.env_name,
        debounce=debounce,
        grace_period=grace,
        backoff_initial=backoff,
        backoff_max=backoff_max,
        backoff_reset=2 * backoff_max,
    )
    return (
        ReloaderConfig(
            tenant=tenant,
            tenancy=tenancy,
            kubeconfig=args.kubeconfig,
            settings=settings,
            health_host=health_host,
            health_port=health_port,
            log_level=args.log_level,
            log_format=args.log_format,
        ),
        [],
    )


def _bind_address(value: str, errors: list[str]) -> tuple[str | None, int]:
    parsed = address(value, "--health-bind-address", errors)
    if parsed is None:
        return None, 0
    return parsed[0] or "0.0.0.0", parsed[1]


def run(args: argparse.Namespace) -> int:
    config, errors = config_from_args(args)
    if config is None:
        for error in errors:
            print(f"metrics-router reloader: error: {error}", file=sys.stderr)
        return 2
    cli_logs.setup(config.log_level, config.log_format)
    return asyncio.run(main(config))


def for_the_reloader(message: str) -> str:
    """The client-configuration error as the reloader's operator needs it: `serve` can run
    without a cluster (--routes-file), the reloader cannot, so that hint would mislead."""
    return message.replace(
        f"({NO_CLUSTER_HINT})",
        "(the reloader watches the cluster's namespaces: run it in the KEDA operator's pod, "
        "or give --kubeconfig)",
    )


async def main(config: ReloaderConfig) -> int:
    try:
        api = await api_client(config.kubeconfig)
    except KubeConfigError as exc:
        logger.error("%s", for_the_reloader(str(exc)))
        return 1
    except Exception as exc:  # e.g. a kubeconfig that is not YAML: a message, not a traceback
        logger.error("cannot load Kubernetes client configuration: %s: %s", type(exc).__name__, exc)
        return 1
    registry = CollectorRegistry()
    reloader = Reloader(config.settings, ReloaderMetrics(registry, REASONS))
    source = NamespaceSource(api, reloader.update, tenant=config.tenant, tenancy=config.tenancy)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, reloader.stop, signum)
    failed: list[BaseException] = []

    def source_done(task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        assert exc is not None
        failed.append(exc)
        logger.error("namespace watch failed; stopping", exc_info=exc)
        reloader.stop(signal.SIGTERM)

    runner = None
    try:
        if config.health_host is not None:
            try:
                runner, port = await start_health_server(
                    reloader, registry, config.health_host, config.health_port
                )
            except OSError as exc:
                logger.error(
                    "cannot listen",
                    extra=logs.fields(
                        health_bind_address=f"{config.health_host}:{config.health_port}",
                        error=exc.strerror or str(exc),
                    ),
                )
                return 1
            logger.info(
                "health and metrics listening",
                extra=logs.fields(address=f"{config.health_host}:{port}"),
            )
        watch = asyncio.create_task(source.run())
        watch.add_done_callback(source_done)
        try:
            status = await reloader.run()
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watch
        return 1 if failed else status
    finally:
        if runner is not None:
            await runner.cleanup()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await api.close()
