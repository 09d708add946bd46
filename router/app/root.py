"""Composition root of `metrics-router serve`: build every part once, run them, stop them in
the drain order.

The parts, one job each:
- trust.py     AggregatorTrust (serving certificate + requestheader CA, identity headers) and
               the router's client certificate (load_client_tls);
- sources.py   where the routes come from: RoutesFile, or ClusterSource (watch loops, policy
               loop with its Lease, the requestheader ConfigMap follower);
- ports.py     SecurePort (server, request path, upstream client) and MetricsPort;
- files.py     FileWatcher (certificates and the routes file, validate then swap).
Here: the one life-cycle state (Phase), the signals, the start order and the drain order.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from router import logs
from router.app.errors import StartupError
from router.app.files import FileWatcher
from router.app.ports import MetricsPort, SecurePort
from router.app.sources import ClusterSource, RoutesFile
from router.app.trust import AggregatorTrust, load_client_tls
from router.core.live_routes import LiveRoutes
from router.core.option_values import format_duration
from router.core.routes import RoutesError, RouteTable, Upstream
from router.core.version import version
from router.metrics import ExpiryWarnings, ProxyMetrics, ReloadState
from router.settings.serve import RequestHeaderSettings, ServeConfig

if TYPE_CHECKING:
    from router.cluster.policy_loop import PolicySyncSettings  # loaded when used

logger = logging.getLogger("router.app")  # the name operators filter on


def _second_signal_exit(signum: int) -> None:
    """A second SIGTERM/SIGINT during the shutdown delay or drain: exit now (kube-apiserver
    does the same), without waiting for requests in flight."""
    logger.warning("second signal: exiting at once", extra=logs.fields(signal=signum))
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(1)


class Phase(enum.Enum):
    """The router's one life-cycle state (readiness follows from it)."""

    STARTING = "starting"  # building the parts; not ready
    SERVING = "serving"  # ready once the routes source has synced
    DRAINING = "draining"  # a signal came (or stop began): not ready; the port serves, then drains
    STOPPED = "stopped"


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
