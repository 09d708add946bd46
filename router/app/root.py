"""Composition root of `metrics-router serve`: build everything, run it, stop it gracefully.

One ``Router`` owns: the secure port (router.http.server's strict HTTP/1.1 server, TLS context
switched per handshake), the upstream client and its pools, the live route table and where it
comes from (a routes file, or the cluster's tenancy), the file watcher that reloads certificates
and the routes file, and the metrics port (/metrics, /routes, health).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import logging
import os
import signal
from collections.abc import Callable, Sequence
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

logger = logging.getLogger("router.app")  # the name operators filter on


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


class Phase(enum.Enum):
    """The router's one life-cycle state (readiness follows from it)."""

    STARTING = "starting"  # building the parts; not ready
    SERVING = "serving"  # ready once the routes source has synced
    DRAINING = "draining"  # a signal came (or stop began): not ready; the port serves, then drains
    STOPPED = "stopped"


class AggregatorTrust:
    """What the secure port trusts of the aggregator: the serving certificate and the
    requestheader CA in one TLS context (validate, then swap), and the identity header names.
    The ConfigMap (cluster mode) may change both; the files are re-read by the FileWatcher."""

    def __init__(self, config: ServeConfig, metrics: ProxyMetrics, reload_state: ReloadState):
        self._config = config
        self._metrics = metrics
        self._reload_state = reload_state
        self.settings: RequestHeaderSettings = config.requestheader
        self.identity = IdentityHeaders.from_settings(config.requestheader)
        self.serving: tls.ReloadingContext | None = None  # built once the settings are known

    def build(self) -> tls.ReloadingContext:
        """Load the serving certificate and the CA (once the settings are known)."""
        try:
            self.serving = tls.ReloadingContext(
                "serving", self._source(), _build_serving, expiry_of=("serving", "requestheader-ca")
            )
        except tls.TLSFileError as exc:
            raise StartupError(str(exc)) from exc
        return self.serving

    def update(self, settings: RequestHeaderSettings) -> None:
        """New requestheader settings (from the ConfigMap). Before the TLS context is built (the
        first read, at start), they are simply taken; later they are validated, then applied to
        new handshakes, and the identity header names to the next request."""
        if self.serving is None:
            self.settings = settings
            self.identity = IdentityHeaders.from_settings(settings)
            return
        old = self.settings
        self.settings = settings
        try:
            self.serving.set_source(self._source())
        except (tls.TLSFileError, StartupError) as exc:
            self.settings = old
            self._metrics.reloads.labels("requestheader", "failure").inc()
            self._reload_state.set("requestheader", False)
            logger.error(
                "requestheader settings refused, keeping the last good",
                extra=logs.fields(source="configmap", error=str(exc)),
            )
            return
        self.identity = IdentityHeaders.from_settings(settings)
        self._metrics.reloads.labels("requestheader", "success").inc()
        self._reload_state.set("requestheader", True)
        names = ",".join(settings.allowed_names) or "(any from the CA)"
        logger.info("requestheader settings applied", extra=logs.fields(allowed_names=names))

    def _source(self) -> tls.Source:
        files = {
            "serving": self._config.tls_cert_file,
            "serving-key": self._config.tls_private_key_file,
        }
        rh = self.settings
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


def _build_serving(d: dict[str, bytes]) -> Any:
    return tls.server_context(d["serving"], d["serving-key"], d["requestheader-ca"])


def load_client_tls(config: ServeConfig) -> tls.ReloadingContext:
    """The router's own client certificate (and the upstream CA) for its upstream calls."""
    files = {
        "proxy-client": config.proxy_client_cert_file,
        "proxy-client-key": config.proxy_client_key_file,
    }
    if config.upstream_ca_file is not None:
        files["upstream-ca"] = config.upstream_ca_file
    try:
        return tls.ReloadingContext(
            "proxy-client",
            tls.read_files(files),
            lambda d: tls.client_context(
                d["proxy-client"], d["proxy-client-key"], d.get("upstream-ca")
            ),
            expiry_of=("proxy-client", "upstream-ca"),
        )
    except tls.TLSFileError as exc:
        raise StartupError(str(exc)) from exc


class SecurePort:
    """The secure port: the strict HTTP/1.1 server, the request path (Proxy) behind it, and the
    upstream client it forwards with. Built before it listens, so that route swaps can close the
    pools of upstreams that left the table from the first one on."""

    def __init__(
        self,
        config: ServeConfig,
        *,
        live: LiveRoutes,
        metrics: ProxyMetrics,
        trust: AggregatorTrust,
        client_tls: tls.ReloadingContext,
        ready: Callable[[], bool],
    ) -> None:
        self._config = config
        self.port = 0
        self.client = UpstreamClient(
            lambda: client_tls.context,
            timeout=config.upstream_timeout,
            connect_timeout=config.upstream_connect_timeout,
            max_idle_per_upstream=config.max_idle_connections_per_upstream,
            limits=config.limits,
            own_certificate_expiry=lambda: client_tls.expiry.get("proxy-client"),
        )
        proxy = Proxy(
            routes=live,
            client=self.client,
            identity=lambda: trust.identity,
            metrics=metrics,
            max_inflight_per_tenant=config.max_inflight_per_tenant,
            ready=ready,
            resumed_peer_ok=tls.ResumedPeerVerifier(
                lambda: _built(trust).loaded_bytes("requestheader-ca")
            ),
            stale_settings=config.stale,
            access_log=config.limits.access_log,
        )
        self.server = ProxyServer(
            proxy,
            metrics,
            limits=config.limits,
            access_log=proxy.log_access if config.limits.access_log else None,
        )
        self._trust = trust
        self._listening = False

    async def listen(self, *, reuse_port: bool) -> None:
        cfg = self._config
        trust = self._trust
        try:
            await self.server.start(
                cfg.bind_address,
                cfg.secure_port,
                tls.listening_context(lambda: _built(trust).context),
                reuse_port=reuse_port,
            )
        except OSError as exc:
            raise StartupError(
                f"cannot listen on {cfg.bind_address}:{cfg.secure_port}: {exc.strerror}"
            ) from exc
        self._listening = True
        self.port = self.server.port

    async def drain(self) -> None:
        """Close the listener and idle connections, let requests in flight finish within
        --shutdown-grace-period, then abort what is left."""
        if self._listening:
            await self.server.stop(self._config.shutdown_grace_period)

    async def close_client(self) -> None:
        await self.client.close()


def _built(trust: AggregatorTrust) -> tls.ReloadingContext:
    assert trust.serving is not None  # the port listens only once it is built
    return trust.serving


class MetricsPort:
    """The plain-HTTP port for /metrics, /routes and the health endpoints."""

    def __init__(
        self,
        address: str,
        view: Callable[[], CollectorRegistry],
        live: LiveRoutes,
        ready: Callable[[], bool],
    ) -> None:
        self._address = address
        self._ready = ready
        app = web.Application()
        app.router.add_get("/metrics", metrics_handler(view))
        app.router.add_get("/routes", routes_handler(live))
        for path in ("/healthz", "/livez", "/readyz"):
            app.router.add_get(path, self._health)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        self._set_up = False
        self.port = 0

    async def start(self) -> None:
        parsed = parse_host_port(self._address)
        assert parsed is not None  # "0" (disabled) never gets here
        host, port = parsed
        await self._runner.setup()
        self._set_up = True
        site = web.TCPSite(self._runner, host or None, port)
        try:
            await site.start()
        except OSError as exc:
            raise StartupError(
                f"cannot listen on {self._address} for metrics: {exc.strerror}"
            ) from exc
        self.port = self._runner.addresses[0][1]

    async def close(self) -> None:
        if self._set_up:
            await self._runner.cleanup()

    async def _health(self, request: web.Request) -> web.Response:
        if request.path == "/readyz" and not self._ready():
            return web.Response(status=503, text="not ready\n")
        return web.Response(text="ok\n")


class FileWatcher:
    """Re-reads the certificates (serving + requestheader CA, proxy client + upstream CA) and the
    routes file when they change on disk: validate, then swap; keep the last good. Exports the
    certificates' expiry at every pass (a certificate in force drifts into the warning window)."""

    def __init__(
        self,
        holders: Sequence[tls.ReloadingContext],
        routes_file: RoutesFile | None,
        *,
        interval: float,
        metrics: ProxyMetrics,
        reload_state: ReloadState,
        expiry_warnings: ExpiryWarnings,
    ) -> None:
        self._holders = tuple(holders)
        self._routes_file = routes_file
        self._interval = interval
        self._metrics = metrics
        self._reload_state = reload_state
        self._expiry_warnings = expiry_warnings
        self._errors = {h.name: logs.ChangeLogger(logger) for h in self._holders}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="watch-files")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            self.check()

    def check(self) -> None:
        """One pass: reload whatever changed on disk (validate first, keep the last good)."""
        if self._routes_file is not None:
            self._routes_file.load()
        for holder in self._holders:
            if not holder.changed():
                continue
            try:
                holder.reload()
            except tls.TLSFileError as exc:
                # The bad file is re-checked at every pass: log and count it when it changes.
                if self._errors[holder.name].report(
                    f"{holder.name} refused, keeping the last good",
                    source=holder.name,
                    error=str(exc),
                ):
                    self._metrics.reloads.labels(holder.name, "failure").inc()
                self._reload_state.set(holder.name, False)
                continue
            self._errors[holder.name].clear()
            self._metrics.reloads.labels(holder.name, "success").inc()
            self._reload_state.set(holder.name, True)
            logger.info("%s reloaded", holder.name, extra=logs.fields(source=holder.name))
        self.export_expiry()

    def export_expiry(self) -> None:
        for holder in self._holders:
            for name, when in holder.expiry.items():
                self._metrics.cert_expiry.labels(name).set(when.timestamp())
                self._expiry_warnings.check(name, when)


class Signals:
    """SIGTERM and SIGINT on the running loop: the first sets ``first``; a second calls
    ``on_second`` (by default: exit at once, as kube-apiserver does)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, on_second: Callable[[int], None] = _second_signal_exit) -> None:
        self.first = asyncio.Event()
        self._on_second = on_second
        self._installed = False

    def install(self) -> None:
        if self._installed:
            return
        self._installed = True
        loop = asyncio.get_running_loop()
        for sig in self.SIGNALS:
            loop.add_signal_handler(sig, self._on_signal, int(sig))

    def remove(self) -> None:
        if not self._installed:
            return
        self._installed = False
        loop = asyncio.get_running_loop()
        for sig in self.SIGNALS:
            loop.remove_signal_handler(sig)

    def _on_signal(self, signum: int) -> None:
        if self.first.is_set():
            self._on_second(signum)
            return
        self.first.set()


class Router:
    """The composition root of `serve`: builds each part once, starts them in order, and stops
    them in the drain order (``stop``)."""

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
        self.phase = Phase.STARTING
        self._reuse_port = reuse_port
        self._policy_settings = policy
        self.registry = registry or CollectorRegistry()
        self.metrics = ProxyMetrics(self.registry)
        self.expiry_warnings = ExpiryWarnings(self.registry, config.certificate_expiry_warning)
        self.reload_state = ReloadState(self.registry)
        self.live = LiveRoutes()
        self.live.on_swap(self._on_swap)
        self.default_upstream: Upstream | None = None
        if config.default_upstream:
            try:
                self.default_upstream = Upstream.parse(
                    config.default_upstream, config.default_upstream_server_name
                )
            except RoutesError as exc:
                raise StartupError(f"--default-upstream: {exc}") from exc
        self._trust = AggregatorTrust(config, self.metrics, self.reload_state)
        self._metrics_port: MetricsPort | None = None
        if config.metrics_bind_address is not None:
            view = metrics_registry_view or (lambda: self.registry)
            self._metrics_port = MetricsPort(
                config.metrics_bind_address, view, self.live, lambda: self.ready
            )
        # Built by start(), in this order; stop() takes them down in the drain order.
        self._secure: SecurePort | None = None
        self._routes: RoutesFile | ClusterSource | None = None
        self._watcher: FileWatcher | None = None
        self._stop_lock = asyncio.Lock()
        self._signals = Signals()

    @property
    def port(self) -> int:
        return self._secure.port if self._secure is not None else 0

    @property
    def metrics_port(self) -> int:
        return self._metrics_port.port if self._metrics_port is not None else 0

    # ---- life cycle -------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        if self.phase is not Phase.SERVING:
            return False
        return not isinstance(self._routes, ClusterSource) or self._routes.synced()

    async def start(self) -> None:
        """Build and start the parts: the upstream side, the routes source (with the cluster,
        also the requestheader settings' first read), the aggregator's trust, the secure port,
        the metrics port, the file watcher. Raises StartupError; then call stop()."""
        cfg = self.config
        client_tls = load_client_tls(cfg)
        self._secure = SecurePort(
            cfg,
            live=self.live,
            metrics=self.metrics,
            trust=self._trust,
            client_tls=client_tls,
            ready=lambda: self.ready,
        )
        routes_file: RoutesFile | None = None
        if cfg.routes_file is not None:
            self._routes = routes_file = RoutesFile(
                cfg.routes_file, self.live, self.default_upstream, self.metrics, self.reload_state
            )
            routes_file.load(initial=True)
        else:
            self._routes = ClusterSource(
                cfg,
                self._policy_settings,
                self.registry,
                self.live,
                self.default_upstream,
                self._trust.update,
            )
            await self._routes.start()
        serving = self._trust.build()
        self._watcher = FileWatcher(
            (serving, client_tls),
            routes_file,
            interval=cfg.file_check_interval,
            metrics=self.metrics,
            reload_state=self.reload_state,
            expiry_warnings=self.expiry_warnings,
        )
        self._watcher.export_expiry()
        for source in ("serving", "proxy-client", "routes" if cfg.routes_file else "requestheader"):
            self.reload_state.set(source, True)
        await self._secure.listen(reuse_port=self._reuse_port)
        if self._metrics_port is not None:
            await self._metrics_port.start()
        self._watcher.start()
        self.phase = Phase.SERVING
        logger.info("serving", extra=logs.fields(**self.startup_fields()))

    def startup_fields(self) -> dict[str, Any]:
        """What an operator checks first: version, addresses, trust sources, routes source."""
        cfg = self.config
        rh = self._trust.settings
        if rh.client_ca_file is not None:
            requestheader_ca = f"file:{rh.client_ca_file}"
        else:
            requestheader_ca = "configmap:kube-system/extension-apiserver-authentication"
        if cfg.routes_file is not None:
            routes = f"file:{cfg.routes_file}"
        else:
            source = self._routes.source if isinstance(self._routes, ClusterSource) else "unknown"
            routes = f"cluster:{source}"
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
        """The drain order, written once (the parts a failed start did not build are skipped):
        /readyz fails; the secure port stops accepting and lets requests in flight finish within
        --shutdown-grace-period; the upstream client closes; the file watcher stops; the cluster
        loops stop (the policy loop first releases its Lease, so a standby takes over at once);
        the metrics port closes last. A second call waits for the first."""
        async with self._stop_lock:
            if self.phase is Phase.STOPPED:
                return
            served = self.phase is not Phase.STARTING  # a failed start logs its error only
            self.phase = Phase.DRAINING
            if self._secure is not None:
                await self._secure.drain()
                await self._secure.close_client()
            if self._watcher is not None:
                await self._watcher.stop()
            if isinstance(self._routes, ClusterSource):
                await self._routes.stop()
            if self._metrics_port is not None:
                await self._metrics_port.close()
            self.phase = Phase.STOPPED
            if served:
                logger.info("stopped")

    async def shutdown(self) -> None:
        """Roll-out friendly stop: /readyz fails at once, the secure port keeps serving for
        --shutdown-delay-duration (until every endpoint list has dropped this pod), then
        ``stop`` drains in order."""
        self.phase = Phase.DRAINING
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
        self._signals.install()

    async def run_until_signalled(self) -> int:
        """Serve until the first SIGTERM/SIGINT, then shut down (delay, then the drain order)."""
        self._signals.install()
        try:
            await self._signals.first.wait()
            await self.shutdown()
        finally:
            self._signals.remove()
        return 0

    # ---- what the tests and the ConfigMap follower drive ------------------------------------

    def check_files(self) -> None:
        """One pass of the file watcher (the watcher runs it every --file-check-interval)."""
        if self._watcher is not None:
            self._watcher.check()

    def set_requestheader(self, settings: RequestHeaderSettings) -> None:
        """New requestheader settings (from the ConfigMap): validate, then apply."""
        self._trust.update(settings)

    def _on_swap(self, table: RouteTable) -> None:
        self.metrics.routes.set(table.namespace_count)
        self.metrics.tenants.set(len(table.tenants))
        if self._secure is not None:
            self._secure.client.forget(table.upstreams())


def _home() -> Path | None:
    try:
        return Path.home()
    except RuntimeError:
        return None
