"""Where the live route table comes from: a routes file (RoutesFile) or the cluster
(ClusterSource: the watch loops, the policy loop, the requestheader ConfigMap follower)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from router import logs
from router.app.errors import StartupError
from router.core.live_routes import LiveRoutes
from router.core.routes import RoutesError, RouteTable, Upstream, parse_routes_file
from router.metrics import (
    ClusterMetrics,
    PolicyMetrics,
    ProxyMetrics,
    ReloadState,
)
from router.settings.serve import RequestHeaderSettings, ServeConfig

if TYPE_CHECKING:
    from router.cluster.policy_loop import PolicySync, PolicySyncSettings  # loaded when used

logger = logging.getLogger("router.app")  # the name operators filter on


class RoutesFile:
    """The --routes-file source: read, validated and swapped into the live table when its
    content changes; a bad file is reported once per distinct error and the last good table
    stays."""

    def __init__(
        self,
        path: Path,
        live: LiveRoutes,
        default: Upstream | None,
        metrics: ProxyMetrics,
        reload_state: ReloadState,
    ) -> None:
        self.path = path
        self.live = live
        self.default = default
        self.metrics = metrics
        self.reload_state = reload_state
        self._digest: str | None = None
        self._errors = logs.ChangeLogger(logger)

    def load(self, *, initial: bool = False) -> bool:
        """Read, validate and swap in the file when it changed; keep the last good table."""
        path = self.path
        try:
            data = path.read_bytes()
        except OSError as exc:
            if initial:
                raise StartupError(f"--routes-file: cannot read {path}: {exc.strerror}") from exc
            # Logged and counted when the error changes, not at every check.
            if self._errors.report(
                "routes file unreadable, keeping the last good table",
                file=str(path),
                error=exc.strerror or str(exc),
            ):
                self.metrics.reloads.labels("routes", "failure").inc()
            self.reload_state.set("routes", False)
            self._digest = None  # the same file back is a change
            return False
        digest = hashlib.sha256(data).hexdigest()
        if digest == self._digest:
            return False
        try:
            table = parse_routes_file(data.decode("utf-8"), default=self.default)
        except (RoutesError, UnicodeDecodeError) as exc:
            self._digest = digest  # do not log the same broken file every second
            errors = exc.errors if isinstance(exc, RoutesError) else [str(exc)]
            if initial:
                raise StartupError(f"--routes-file {path}: " + "; ".join(errors)) from exc
            self._errors.report(
                "routes file refused, keeping the last good table",
                file=str(path),
                error="; ".join(errors),
            )
            self.metrics.reloads.labels("routes", "failure").inc()
            self.reload_state.set("routes", False)
            return False
        self._errors.clear("routes file readable again", file=str(path))
        self.reload_state.set("routes", True)
        self._digest = digest
        self.live.swap(table, f"file:{path}")
        if not initial:
            self.metrics.reloads.labels("routes", "success").inc()
            logger.info(
                "routes reloaded",
                extra=logs.fields(tenants=len(table.tenants), namespaces=table.namespace_count),
            )
        return True


class ClusterSource:
    """Routes from the cluster (and, when asked, NetworkPolicies and the requestheader
    settings): the API client, the watch loops and the policy loop, and the tasks that run them.
    """

    def __init__(
        self,
        config: ServeConfig,
        policy: PolicySyncSettings | None,
        registry: CollectorRegistry,
        live: LiveRoutes,
        default: Upstream | None,
        on_requestheader: Callable[[RequestHeaderSettings], None],
    ) -> None:
        self.config = config
        self._policy_settings = policy
        self._registry = registry
        self._live = live
        self._default = default
        self._on_requestheader = on_requestheader
        self.api: Any = None
        self.source = "unknown"  # where the kubeconfig came from, for the start-up line
        self.synced: Callable[[], bool] = lambda: False
        self._policy: PolicySync | None = None
        self._policy_task: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[Any]] = []

    async def start(self) -> None:
        """Connect, start the loops; with the ConfigMap follower, wait for its first read."""
        from router.cluster import client as kube
        from router.cluster import kubeconfig, requestheader, routes_loop  # loaded only when used

        cfg = self.config
        try:
            self.api = await kube.api_client(cfg.kubeconfig)
        except Exception as exc:
            raise StartupError(str(exc)) from exc
        choice, _ = kubeconfig.choose(cfg.kubeconfig, os.environ, _home())
        self.source = choice.describe() if choice is not None else "unknown"
        sync = None
        if self._policy_settings is not None:
            from router.cluster.policy_loop import PolicySync

            sync = self._policy = PolicySync(
                self.api,
                kind=self._policy_settings.kind,
                settings=self._policy_settings,
                metrics=PolicyMetrics(self._registry),
            )

        cluster_metrics = ClusterMetrics(self._registry)  # one set for both watch loops

        def on_table(table: RouteTable) -> None:
            self._live.swap(table, "cluster")
            if sync is not None:
                # The routes loop's namespace objects: root-namespace annotation edits that
                # leave the table unchanged are picked up at the next resync.
                sync.update(routes.resolution or table, routes.namespace_objects)

        routes = routes_loop.ClusterRoutes(
            self.api,
            cfg.tenancy,
            metrics=cluster_metrics,
            on_table=on_table,
            default=self._default,
        )
        if sync is not None:
            self._policy_task = asyncio.create_task(sync.run(), name="policy-sync")
            self._tasks.append(self._policy_task)
        self.synced = routes.synced.is_set
        self._tasks.append(asyncio.create_task(routes.run(), name="cluster-routes"))
        if not cfg.requestheader_from_flags:
            follower = requestheader.RequestHeaderFollower(
                self.api, self._on_requestheader, metrics=cluster_metrics
            )
            self._tasks.append(asyncio.create_task(follower.run(), name="requestheader"))
            try:
                await asyncio.wait_for(follower.got_first.wait(), timeout=60)
            except TimeoutError:
                raise StartupError(
                    "no requestheader settings: kube-system/extension-apiserver-authentication "
                    "could not be read within 60s (or set --requestheader-client-ca-file)"
                ) from None

    async def stop(self) -> None:
        """Let the policy loop release its Lease (a standby replica takes over at once), stop
        every loop, close the API client."""
        if self._policy is not None:
            await self._policy.stop()
            if self._policy_task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(asyncio.shield(self._policy_task), timeout=5)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.api is not None:
            await self.api.close()


def _home() -> Path | None:
    try:
        return Path.home()
    except RuntimeError:
        return None
