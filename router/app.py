"""Composition root of `metrics-router serve`: build everything, run it, stop it gracefully.

One ``Router`` owns: the secure port (aiohttp low-level server, TLS context switched per
handshake), the upstream client and its pools, the live route table and where it comes from
(a routes file, or the cluster's tenancy), the file watcher that reloads certificates and the
routes file, and the metrics port (/metrics, /routes, health).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from router import tlsfiles
from router.config import RequestHeaderSettings, ServeConfig
from router.http.client import UpstreamClient
from router.http.server import ProxyServer
from router.live_routes import LiveRoutes
from router.metrics import ProxyMetrics
from router.proxy import IdentityHeaders, Proxy
from router.routes import RoutesError, RouteTable, Upstream, parse_routes_file

logger = logging.getLogger(__name__)


class StartupError(Exception):
    """The router cannot start with this configuration; the message says why."""


class Router:
    def __init__(
        self,
        config: ServeConfig,
        *,
        registry: CollectorRegistry | None = None,
        reuse_port: bool = False,
        metrics_registry_view: Callable[[], CollectorRegistry] | None = None,
        policy: Any = None,
    ) -> None:
        """``policy``: ``policy_sync.PolicySyncSettings`` to manage NetworkPolicies (cluster
        mode only), or None."""
        self.config = config
        self._policy_settings = policy
        self._policy_sync: Any = None
        self.registry = registry or CollectorRegistry()
        self._metrics_view = metrics_registry_view or (lambda: self.registry)
        self.metrics = ProxyMetrics(self.registry)
        self.live = LiveRoutes()
        self.live.on_swap(self._on_swap)
        self._reuse_port = reuse_port
        self._requestheader: RequestHeaderSettings = config.requestheader
        self._identity = IdentityHeaders.from_settings(config.requestheader)
        self._serving: tlsfiles.ReloadingContext | None = None
        self._client_tls: tlsfiles.ReloadingContext | None = None
        self._client: UpstreamClient | None = None
        self._server: ProxyServer | None = None
        self._metrics_runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._routes_digest: str | None = None
        self._synced: Callable[[], bool] = lambda: True
        self._stopping = False
        self._api: Any = None
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
        return not self._stopping and self._synced()

    async def start(self) -> None:
        cfg = self.config
        try:
            self._client_tls = tlsfiles.ReloadingContext(
                "proxy-client",
                tlsfiles.read_files(self._client_files()),
                lambda d: tlsfiles.client_context(
                    d["proxy-client"], d["proxy-client-key"], d.get("upstream-ca")
                ),
                expiry_of=("proxy-client", "upstream-ca"),
            )
        except tlsfiles.TLSFileError as exc:
            raise StartupError(str(exc)) from exc
        if cfg.routes_file is not None:
            self._load_routes_file(initial=True)
        else:
            await self._start_cluster()
        try:
            self._serving = tlsfiles.ReloadingContext(
                "serving",
                self._serving_source(),
                self._build_serving,
                expiry_of=("serving", "requestheader-ca"),
            )
        except tlsfiles.TLSFileError as exc:
            raise StartupError(str(exc)) from exc
        self._export_expiry()

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
            resumed_peer_ok=tlsfiles.ResumedPeerVerifier(
                lambda: serving.loaded_bytes("requestheader-ca")
            ),
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
                tlsfiles.listening_context(lambda: serving.context),
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
        logger.info(
            "serving port=%d metrics_port=%s routes=%s tenants=%d namespaces=%d",
            self.port, self.metrics_port or "off",
            "file" if cfg.routes_file else "cluster",
            len(self.live.table.tenants), self.live.table.namespace_count,
        )  # fmt: skip

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish within the grace period, clean up."""
        if self._stopping:
            return
        self._stopping = True
        if self._policy_sync is not None:
            # Let the policy loop release its Lease so a standby replica takes over at once.
            await self._policy_sync.stop()
            policy_task = next(t for t in self._tasks if t.get_name() == "policy-sync")
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(policy_task), timeout=5)
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
        if self._api is not None:
            await self._api.close()
        logger.info("stopped")

    async def run_until_signalled(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        logger.info("signal received: draining (grace %gs)", self.config.shutdown_grace_period)
        await self.stop()
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

    def _serving_source(self) -> tlsfiles.Source:
        files = {
            "serving": self.config.tls_cert_file,
            "serving-key": self.config.tls_private_key_file,
        }
        rh = self._requestheader
        read_files = tlsfiles.read_files(files)
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
        return tlsfiles.server_context(d["serving"], d["serving-key"], d["requestheader-ca"])

    def _export_expiry(self) -> None:
        for holder in (self._serving, self._client_tls):
            if holder is None:
                continue
            for name, when in holder.expiry.items():
                self.metrics.cert_expiry.labels(name).set(when.timestamp())

    def set_requestheader(self, settings: RequestHeaderSettings) -> None:
        """New requestheader settings (from the ConfigMap): validate, then apply to new
        handshakes; identity header names apply to the next request."""
        old = self._requestheader
        self._requestheader = settings
        if self._serving is not None:
            try:
                self._serving.set_source(self._serving_source())
            except (tlsfiles.TLSFileError, StartupError) as exc:
                self._requestheader = old
                self.metrics.reloads.labels("requestheader", "failure").inc()
                logger.error("requestheader settings refused, keeping the last good: %s", exc)
                return
        self._identity = IdentityHeaders.from_settings(settings)
        self.metrics.reloads.labels("requestheader", "success").inc()
        logger.info(
            "requestheader settings applied allowed_names=%s", ",".join(settings.allowed_names)
        )

    # ---- routes -----------------------------------------------------------------------------

    def _on_swap(self, table: RouteTable) -> None:
        self.metrics.routes.set(table.namespace_count)
        self.metrics.tenants.set(len(table.tenants))
        if self._client is not None:
            self._client.forget(table.upstreams())

    def _load_routes_file(self, *, initial: bool = False) -> bool:
        path = self.config.routes_file
        assert path is not None
        try:
            data = path.read_bytes()
        except OSError as exc:
            if initial:
                raise StartupError(f"--routes-file: cannot read {path}: {exc.strerror}") from exc
            logger.error("routes file unreadable, keeping the last good table: %s", exc)
            self.metrics.reloads.labels("routes", "failure").inc()
            return False
        digest = hashlib.sha256(data).hexdigest()
        if digest == self._routes_digest:
            return False
        try:
            table = parse_routes_file(data.decode("utf-8"), default=self.default_upstream)
        except (RoutesError, UnicodeDecodeError) as exc:
            self._routes_digest = digest  # do not log the same broken file every second
            errors = exc.errors if isinstance(exc, RoutesError) else [str(exc)]
            if initial:
                raise StartupError(f"--routes-file {path}: " + "; ".join(errors)) from exc
            logger.error(
                "routes file %s refused, keeping the last good table: %s", path, "; ".join(errors)
            )
            self.metrics.reloads.labels("routes", "failure").inc()
            return False
        self._routes_digest = digest
        self.live.swap(table, f"file:{path}")
        if not initial:
            self.metrics.reloads.labels("routes", "success").inc()
            logger.info(
                "routes reloaded tenants=%d namespaces=%d",
                len(table.tenants),
                table.namespace_count,
            )
        return True

    async def _start_cluster(self) -> None:
        from router import kube, reconciler  # cluster code loads only when used

        cfg = self.config
        try:
            self._api = await kube.api_client(cfg.kubeconfig)
        except Exception as exc:
            raise StartupError(f"cannot load Kubernetes client configuration: {exc}") from exc
        sync = None
        if self._policy_settings is not None:
            from router.policy_sync import PolicySync

            sync = self._policy_sync = PolicySync(
                self._api,
                kind=self._policy_settings.kind,
                settings=self._policy_settings,
                registry=self.registry,
            )

        def on_table(table: RouteTable) -> None:
            self.live.swap(table, "cluster")
            if sync is not None:
                # The informer cache itself: root-namespace annotation edits that leave the
                # table unchanged are picked up at the next resync.
                sync.update(routes.resolution or table, routes.namespaces.cache)

        routes = reconciler.ClusterRoutes(
            self._api,
            cfg.tenancy,
            registry=self.registry,
            on_table=on_table,
            default=self.default_upstream,
        )
        if sync is not None:
            self._tasks.append(asyncio.create_task(sync.run(), name="policy-sync"))
        self._synced = routes.synced.is_set
        self._tasks.append(asyncio.create_task(routes.run(), name="cluster-routes"))
        if not cfg.requestheader_from_flags:
            follower = reconciler.RequestHeaderFollower(
                self._api, self._on_configmap, registry=self.registry
            )
            self._tasks.append(asyncio.create_task(follower.run(), name="requestheader"))
            try:
                await asyncio.wait_for(follower.got_first.wait(), timeout=60)
            except TimeoutError:
                raise StartupError(
                    "no requestheader settings: kube-system/extension-apiserver-authentication "
                    "could not be read within 60s (or set --requestheader-client-ca-file)"
                ) from None

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
        if self.config.routes_file is not None:
            self._load_routes_file()
        for holder in (self._serving, self._client_tls):
            if holder is None or not holder.changed():
                continue
            try:
                holder.reload()
            except tlsfiles.TLSFileError as exc:
                self.metrics.reloads.labels(holder.name, "failure").inc()
                logger.error("%s refused, keeping the last good: %s", holder.name, exc)
                continue
            self.metrics.reloads.labels(holder.name, "success").inc()
            logger.info("%s reloaded", holder.name)
            self._export_expiry()

    # ---- metrics port -----------------------------------------------------------------------

    async def _start_metrics(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        app = web.Application()
        app.router.add_get("/metrics", self._metrics_handler)
        app.router.add_get("/routes", self._routes_handler)
        for path in ("/healthz", "/livez", "/readyz"):
            app.router.add_get(path, self._health_handler)
        self._metrics_runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._metrics_runner.setup()
        site = web.TCPSite(self._metrics_runner, host.strip("[]") or None, int(port))
        try:
            await site.start()
        except OSError as exc:
            raise StartupError(f"cannot listen on {address} for metrics: {exc.strerror}") from exc
        self.metrics_port = self._metrics_runner.addresses[0][1]

    async def _metrics_handler(self, request: web.Request) -> web.Response:
        body = await asyncio.get_running_loop().run_in_executor(
            None, generate_latest, self._metrics_view()
        )
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _routes_handler(self, request: web.Request) -> web.Response:
        return web.Response(
            text=json.dumps(self.live.snapshot(), indent=2) + "\n", content_type="application/json"
        )

    async def _health_handler(self, request: web.Request) -> web.Response:
        if request.path == "/readyz" and not self.ready:
            return web.Response(status=503, text="not ready\n")
        return web.Response(text="ok\n")
