"""The reloader's health and metrics port: /healthz (its state) and /metrics."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CollectorRegistry

from router.metrics import metrics_handler
from router.reloader.shell import Reloader

RELOADER_KEY = web.AppKey("reloader", Reloader)


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response(request.app[RELOADER_KEY].status())


def health_app(reloader: Reloader, registry: CollectorRegistry) -> web.Application:
    """/healthz (200 while the reloader loop serves, with its state) and /metrics."""
    app = web.Application()
    app[RELOADER_KEY] = reloader
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/metrics", metrics_handler(lambda: registry))
    return app


async def start_health_server(
    reloader: Reloader, registry: CollectorRegistry, host: str, port: int
) -> tuple[web.AppRunner, int]:
    """Serve ``health_app`` on host:port (0 = OS-chosen); returns the runner and bound port."""
    runner = web.AppRunner(health_app(reloader, registry), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = port
    for address in runner.addresses:
        if isinstance(address, tuple):
            bound = int(address[1])
            break
    return runner, bound
