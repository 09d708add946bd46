"""The two listening ports: the secure port (server, request path, upstream client) and
the metrics port (/metrics, /routes, health)."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CollectorRegistry

from router import tls
from router.app.errors import StartupError
from router.app.trust import AggregatorTrust
from router.core.live_routes import LiveRoutes
from router.core.option_values import parse_host_port
from router.http.client import UpstreamClient
from router.http.server import ProxyServer
from router.metrics import (
    ProxyMetrics,
    metrics_handler,
    routes_handler,
)
from router.proxy import Proxy
from router.settings.serve import ServeConfig


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
