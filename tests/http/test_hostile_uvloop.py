"""The secure port's connection handling on uvloop, the loop `metrics-router serve` runs on.

The other suites run on asyncio's own loop; TLS (start_tls), flow control and transports are
implemented anew by uvloop, so the cases that depend on them run here again.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import uvloop

from router.app import Router
from router.devtools.pki import Pki
from tests.conftest import (
    HPA_IDENTITY,
    RawConnection,
    build_request,
    client_ssl_context,
    make_stub,
    metric_path,
    routes_yaml,
    serve_args,
    serve_config,
)

Scenario = Callable[[Router, Pki], Awaitable[None]]
FAST = ["--tls-handshake-timeout", "300ms", "--read-header-timeout", "300ms"]


def run_on_uvloop(pki: Pki, tmp_path: Path, scenario: Scenario) -> None:
    async def main() -> None:
        stub = make_stub(pki, "a")
        await stub.start()
        routes = tmp_path / "routes.yaml"
        routes.write_text(routes_yaml({"a": (["tenant-a"], stub.url, None)}))
        router = Router(serve_config(serve_args(pki, routes, FAST)))
        try:
            await router.start()
            await scenario(router, pki)
        finally:
            await stub.stop()
            await router.stop()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert isinstance(runner.get_loop(), uvloop.Loop)
        runner.run(main())


def counter(router: Router, name: str, **labels: str) -> float:
    value = router.metrics.registry.get_sample_value(name, labels)
    return float(value or 0)


async def verified_requests(router: Router, pki: Pki) -> None:
    conn = await RawConnection.open(router.port, client_ssl_context(pki))
    try:
        # Sent at once after the handshake: the TLS layer may deliver it before start_tls
        # returns.
        for _ in range(3):
            reply = await conn.request(metric_path("tenant-a"), HPA_IDENTITY)
            assert reply.status == 200
    finally:
        await conn.close()


async def unverified_gets_one_answer(router: Router, pki: Pki) -> None:
    conn = await RawConnection.open(router.port, client_ssl_context(pki, "none"))
    try:
        reply = await conn.send(build_request("/healthz") + build_request("/healthz"))
        assert reply.status == 200
        assert await conn.closed_by_peer()
    finally:
        await conn.close()


async def handshake_failures(router: Router, pki: Pki) -> None:
    async def rogue() -> None:
        conn = await RawConnection.open(router.port, client_ssl_context(pki, "rogue"))
        await conn.request("/apis")  # TLS 1.3: the refusal arrives on the first read

    with pytest.raises((ConnectionError, ssl.SSLError)):
        await rogue()
    reader, writer = await asyncio.open_connection("127.0.0.1", router.port)
    assert await asyncio.wait_for(reader.read(), 5.0) == b""
    writer.close()
    name = "metrics_router_tls_handshake_failures_total"
    assert counter(router, name, reason="unknown-ca") == 1
    assert counter(router, name, reason="timeout") == 1


async def stalled_head(router: Router, pki: Pki) -> None:
    conn = await RawConnection.open(router.port, client_ssl_context(pki))
    try:
        conn.writer.write(b"GET /apis HTTP/1.1\r\nHost: x\r\n")
        assert await conn.closed_by_peer()
        assert counter(router, "metrics_router_connection_timeouts_total", phase="head") == 1
    finally:
        await conn.close()


@pytest.mark.parametrize(
    "scenario",
    [verified_requests, unverified_gets_one_answer, handshake_failures, stalled_head],
    ids=lambda s: s.__name__,
)
def test_on_uvloop(pki: Pki, tmp_path: Path, scenario: Scenario) -> None:
    run_on_uvloop(pki, tmp_path, scenario)
