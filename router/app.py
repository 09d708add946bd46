"""Composition root of `metrics-router serve`: build everything, run it, stop it gracefully.

One ``Router`` owns: the secure port (router.http.server's strict HTTP/1.1 server, TLS context
switched per handshake), the upstream client and its pools, the live route table and where it
comes from (a routes file, or the cluster's tenancy), the file watcher that reloads certificates
and the routes file, and the metrics port (/metrics, /routes, health).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from router import logs, tls
from router.core.live_routes import LiveRoutes
from router.core.option_values import format_duration, parse_host_port
from router.core.routes import RoutesError, RouteTable, Upstream, parse_routes_file
from router.core.version import version
from router.http.client import UpstreamClient
from router.http.server import ProxyServer
from router.metrics import (
    ClusterMetrics,
    ExpiryWarnings,
    PolicyMetrics,
    ProxyMetrics,
    ReloadState,
    metrics_handler,
    routes_handler,
)
from router.proxy import IdentityHeaders, Proxy
from router.settings.serve import RequestHeaderSettings, ServeConfig

if TYPE_CHECKING:
    from router.cluster.policy_loop import PolicySync, PolicySyncSettings  # loaded when used

logger = logging.getLogger(__name__)


class StartupError(Exception):
    """The router cannot start with this configuration; the message says why."""


def _second_signal_exit(signum: int) -> None:
    """A second SIGTERM/SIGINT during the shutdown delay or drain: exit now (kube-apiserver
    does the same), without waiting for requests in flight."""
    logger.warning("second signal: exiting at once", extra=logs.fields(signal=signum))
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(1)


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
        """Let the policy loop release its Lease (a standby replica takes over at once), then
        stop every loop."""
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

    async def close(self) -> None:
        if self.api is not None:
            await self.api.close()


class Router:
    def __init__(
        self,
        config: ServeConfig,
        *,
        registry: CollectorRegistry | None = None,
        reuse_port: bool = False,
        metrics_registry_view: Callable[[], CollectorRegistry] | None = None,
        policy: PolicySyncSettings | None = None,
    ) -> None:
        """``policy``: the settings of the NetworkPolicy loop (cluster mode only), or None."""
        self.config = config
        self._policy_settings = policy
        self._cluster: ClusterSource | None = None
        self.registry = registry or CollectorRegistry()
        self._metrics_view = metrics_registry_view or (lambda: self.registry)
        self.metrics = ProxyMetrics(self.registry)
        self.live = LiveRoutes()
        self.live.on_swap(self._on_swap)
        self._reuse_port = reuse_port
        self._requestheader: RequestHeaderSettings = config.requestheader
        self._identity = IdentityHeaders.from_settings(config.requestheader)
        self._serving: tls.ReloadingContext | None = None
        self._client_tls: tls.ReloadingContext | None = None
        self._client: UpstreamClient | None = None
        self._server: ProxyServer | None = None
        self._metrics_runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._routes_file: RoutesFile | None = None
        self._stopping = False  # stop() has begun
        self._draining = False  # a signal came: /readyz fails, the port still serves
        self._started = False
        self._tls_errors: dict[str, logs.ChangeLogger] = {}
        self.expiry_warnings = ExpiryWarnings(self.registry, config.certificate_expiry_warning)
        self.reload_state = ReloadState(self.registry)
        self.on_second_signal: Callable[[int], None] = _second_signal_exit
        self._signalled: asyncio.Event | None = None
        self.port = 0
        self.metrics_port = 0
        self.default_upstream: Upstream | None = None
        if config.default_upstream:
            try:
                self.default_upstream = Upstream.parse(
                    config.default_upstream, config.default_upstream_server_name
                )
            except RoutesError as exc:
                raise StartupError(f"--default-upstream: {exc}") from exc

    # ---- life cycle -------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        synced = self._cluster.synced() if self._cluster is not None else True
        return not self._stopping and not self._draining and synced

    async def start(self) -> None:
        cfg = self.config
        try:
            self._client_tls = tls.ReloadingContext(
                "proxy-client",
                tls.read_files(self._client_files()),
                lambda d: tls.client_context(
                    d["proxy-client"], d["proxy-client-key"], d.get("upstream-ca")
                ),
                expiry_of=("proxy-client", "upstream-ca"),
            )
        except tls.TLSFileError as exc:
            raise StartupError(str(exc)) from exc
        if cfg.routes_file is not None:
            self._routes_file = RoutesFile(
                cfg.routes_file, self.live, self.default_upstream, self.metrics, self.reload_state
            )
            self._routes_file.load(initial=True)
        else:
            self._cluster = ClusterSource(
                cfg,
                self._policy_settings,
                self.registry,
                self.live,
                self.default_upstream,
                self._on_configmap,
            )
            await self._cluster.start()
        try:
            self._serving = tls.ReloadingContext(
                "serving",
                self._serving_source(),
                self._build_serving,
                expiry_of=("serving", "requestheader-ca"),
            )
        except tls.TLSFileError as exc:
            raise StartupError(str(exc)) from exc
        self._export_expiry()
        for source in ("serving", "proxy-client", "routes" if cfg.routes_file else "requestheader"):
            self.reload_state.set(source, True)

        client_tls = self._client_tls
        self._client = UpstreamClient(
            lambda: client_tls.context,
            timeout=cfg.upstream_timeout,
            connect_timeout=cfg.upstream_connect_timeout,
            max_idle_per_upstream=cfg.max_idle_connections_per_upstream,
            limits=cfg.limits,
            own_certificate_expiry=lambda: client_tls.expiry.get("proxy-client"),
        )
        serving = self._serving
        proxy = Proxy(
            routes=self.live,
            client=self._client,
            identity=lambda: self._identity,
            metrics=self.metrics,
            max_inflight_per_tenant=cfg.max_inflight_per_tenant,
            ready=lambda: self.ready,
            resumed_peer_ok=tls.ResumedPeerVerifier(
                lambda: serving.loaded_bytes("requestheader-ca")
            ),
            stale_settings=cfg.stale,
            access_log=cfg.limits.access_log,
        )
        self._server = ProxyServer(
            proxy,
            self.metrics,
            limits=cfg.limits,
            access_log=proxy.log_access if cfg.limits.access_log else None,
        )
        try:
            await self._server.start(
                cfg.bind_address,
                cfg.secure_port,
                tls.listening_context(lambda: serving.context),
                reuse_port=self._reuse_port,
            )
        except OSError as exc:
            raise StartupError(
                f"cannot listen on {cfg.bind_address}:{cfg.secure_port}: {exc.strerror}"
            ) from exc
        self.port = self._server.port
        if cfg.metrics_bind_address is not None:
            await self._start_metrics(cfg.metrics_bind_address)
        self._tasks.append(asyncio.create_task(self._watch_files(), name="watch-files"))
        self._started = True
        logger.info("serving", extra=logs.fields(**self.startup_fields()))

    def startup_fields(self) -> dict[str, Any]:
        """What an operator checks first: version, addresses, trust sources, routes source."""
        cfg = self.config
        rh = self._requestheader
        if rh.client_ca_file is not None:
            requestheader_ca = f"file:{rh.client_ca_file}"
        else:
            requestheader_ca = "configmap:kube-system/extension-apiserver-authentication"
        if cfg.routes_file is not None:
            routes = f"file:{cfg.routes_file}"
        else:
            routes = f"cluster:{self._cluster.source if self._cluster else 'unknown'}"
        return {
            "port": self.port,
            "metrics_port": self.metrics_port or "off",
            "version": version(),
            "address": f"{cfg.bind_address}:{self.port}",
            "metrics_address": cfg.metrics_bind_address or "off",
            "requestheader_ca": requestheader_ca,
            "allowed_names": ",".join(rh.allowed_names) or "(any from the CA)",
            "upstream_ca": f"file:{cfg.upstream_ca_file}" if cfg.upstream_ca_file else "system",
            "routes": routes,
            "tenants": len(self.live.table.tenants),
            "namespaces": self.live.table.namespace_count,
            "shutdown_delay": format_duration(cfg.shutdown_delay_duration),
        }

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish within the grace period, clean up."""
        if self._stopping:
            return
        self._stopping = True
        if self._cluster is not None:
            await self._cluster.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._server is not None:
            # Closes the listener and idle connections, lets requests in flight finish within
            # the grace period, then aborts what is left.
            await self._server.stop(self.config.shutdown_grace_period)
        if self._client is not None:
            await self._client.close()
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
        if self._cluster is not None:
            await self._cluster.close()
        if self._started:  # a failed start logs its error, not "stopped"
            logger.info("stopped")

    async def shutdown(self) -> None:
        """Roll-out friendly stop: /readyz fails at once, the secure port keeps serving for
        --shutdown-delay-duration (until every endpoint list has dropped this pod), then the
        listener closes and requests in flight get --shutdown-grace-period."""
        self._draining = True
        delay = self.config.shutdown_delay_duration
        logger.info(
            "shutting down",
            extra=logs.fields(
                delay=format_duration(delay),
                grace=format_duration(self.config.shutdown_grace_period),
            ),
        )
        if delay > 0:
            await asyncio.sleep(delay)
        await self.stop()

    def handle_signals(self) -> None:
        """Take SIGTERM/SIGINT from now on (call before start(): a signal that arrives while
        starting is honoured once started, not fatal): the first begins shutdown(), a second
        exits at once."""
        if self._signalled is not None:
            return
        signalled = self._signalled = asyncio.Event()

        def on_signal(signum: int) -> None:
            if signalled.is_set():
                self.on_second_signal(signum)
                return
            signalled.set()

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, int(sig))

    async def run_until_signalled(self) -> int:
        self.handle_signals()
        assert self._signalled is not None
        try:
            await self._signalled.wait()
            await self.shutdown()
        finally:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        return 0

    # ---- TLS --------------------------------------------------------------------------------

    def _client_files(self) -> dict[str, Path]:
        files = {
            "proxy-client": self.config.proxy_client_cert_file,
            "proxy-client-key": self.config.proxy_client_key_file,
        }
        if self.config.upstream_ca_file is not None:
            files["upstream-ca"] = self.config.upstream_ca_file
        return files

    def _serving_source(self) -> tls.Source:
        files = {
            "serving": self.config.tls_cert_file,
            "serving-key": self.config.tls_private_key_file,
        }
        rh = self._requestheader
        read_files = tls.read_files(files)
        if rh.client_ca_file is not None:
            ca_file = rh.client_ca_file

            def read() -> dict[str, bytes]:
                return {**read_files(), "requestheader-ca": ca_file.read_bytes()}

            return read
        pem = rh.client_ca_pem
        if pem is None:
            raise StartupError("no requestheader client CA: set --requestheader-client-ca-file")

        def read_with_pem() -> dict[str, bytes]:
            return {**read_files(), "requestheader-ca": pem}

        return read_with_pem

    @staticmethod
    def _build_serving(d: dict[str, bytes]) -> Any:
        return tls.server_context(d["serving"], d["serving-key"], d["requestheader-ca"])

    def _export_expiry(self) -> None:
        for holder in (self._serving, self._client_tls):
            if holder is None:
                continue
            for name, when in holder.expiry.items():
                self.metrics.cert_expiry.labels(name).set(when.timestamp())
                self.expiry_warnings.check(name, when)

    def set_requestheader(self, settings: RequestHeaderSettings) -> None:
        """New requestheader settings (from the ConfigMap): validate, then apply to new
        handshakes; identity header names apply to the next request."""
        old = self._requestheader
        self._requestheader = settings
        if self._serving is not None:
            try:
                self._serving.set_source(self._serving_source())
            except (tls.TLSFileError, StartupError) as exc:
                self._requestheader = old
                self.metrics.reloads.labels("requestheader", "failure").inc()
                self.reload_state.set("requestheader", False)
                logger.error(
                    "requestheader settings refused, keeping the last good",
                    extra=logs.fields(source="configmap", error=str(exc)),
                )
                return
        self._identity = IdentityHeaders.from_settings(settings)
        self.metrics.reloads.labels("requestheader", "success").inc()
        self.reload_state.set("requestheader", True)
        names = ",".join(settings.allowed_names) or "(any from the CA)"
        logger.info("requestheader settings applied", extra=logs.fields(allowed_names=names))

    # ---- routes -----------------------------------------------------------------------------

    def _on_swap(self, table: RouteTable) -> None:
        self.metrics.routes.set(table.namespace_count)
        self.metrics.tenants.set(len(table.tenants))
        if self._client is not None:
            self._client.forget(table.upstreams())

    def _on_configmap(self, settings: RequestHeaderSettings) -> None:
        if self._serving is None:
            self._requestheader = settings  # first read, before the server is built
            self._identity = IdentityHeaders.from_settings(settings)
        else:
            self.set_requestheader(settings)

    # ---- file watching ----------------------------------------------------------------------

    async def _watch_files(self) -> None:
        interval = self.config.file_check_interval
        while True:
            await asyncio.sleep(interval)
            self.check_files()

    def check_files(self) -> None:
        """One pass: reload whatever changed on disk (validate first, keep the last good)."""
        if self._routes_file is not None:
            self._routes_file.load()
        for holder in (self._serving, self._client_tls):
            if holder is None or not holder.changed():
                continue
            try:
                holder.reload()
            except tls.TLSFileError as exc:
                # The bad file is re-checked at every pass: log and count it when it changes.
                errors = self._tls_errors.setdefault(holder.name, logs.ChangeLogger(logger))
                if errors.report(
                    f"{holder.name} refused, keeping the last good",
                    source=holder.name,
                    error=str(exc),
                ):
                    self.metrics.reloads.labels(holder.name, "failure").inc()
                self.reload_state.set(holder.name, False)
                continue
            if holder.name in self._tls_errors:
                self._tls_errors[holder.name].clear()
            self.metrics.reloads.labels(holder.name, "success").inc()
            self.reload_state.set(holder.name, True)
            logger.info("%s reloaded", holder.name, extra=logs.fields(source=holder.name))
        # Also without a reload: a certificate in force drifts into the warning window.
        self._export_expiry()

    # ---- metrics port -----------------------------------------------------------------------

    async def _start_metrics(self, address: str) -> None:
        parsed = parse_host_port(address)
        assert parsed is not None  # "0" (disabled) never gets here
        host, port = parsed
        app = web.Application()
        app.router.add_get("/metrics", metrics_handler(self._metrics_view))
        app.router.add_get("/routes", routes_handler(self.live))
        for path in ("/healthz", "/livez", "/readyz"):
            app.router.add_get(path, self._health_handler)
        self._metrics_runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._metrics_runner.setup()
        site = web.TCPSite(self._metrics_runner, host or None, port)
        try:
            await site.start()
        except OSError as exc:
            raise StartupError(f"cannot listen on {address} for metrics: {exc.strerror}") from exc
        self.metrics_port = self._metrics_runner.addresses[0][1]

    async def _health_handler(self, request: web.Request) -> web.Response:
        if request.path == "/readyz" and not self.ready:
            return web.Response(status=503, text="not ready\n")
        return web.Response(text="ok\n")


def _home() -> Path | None:
    try:
        return Path.home()
    except RuntimeError:
        return None
