"""End to end: routes from the (fake) cluster, through a real Router, to the right KedaStub.

The Router is built from real `metrics-router serve` flags with ``--kubeconfig`` pointing at
tests.fakeapi.FakeKube (real TLS, real kubernetes-asyncio client).

Reaching a stub on 127.0.0.1 needs an upstream host that resolves here: the discovered-Service
URL ``https://<svc>.<ns>.svc`` does not resolve outside a cluster, so these tests use the label
strategy with ``--upstream-template https://localhost:{tenant}`` and name each tenant by its
stub's port (the stubs' certificates carry the SAN ``localhost``). Service discovery itself is
covered in test_tenancy.py and test_reconciler.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from router.app import Router
from router.core.routes import RouteTable
from router.devtools.pki import Pki
from tests.conftest import (
    HPA_IDENTITY,
    RecordingStub,
    RouterHarness,
    make_stub,
    metric_path,
    serve_config,
    started_router,
)
from tests.fakeapi import FakeKube, Signal

pytestmark = pytest.mark.usefixtures("no_leftover_tasks")

PORT_LABEL = "e2e.metrics-router.io/port"


def cluster_args(pki: Pki, kubeconfig: Path, *, requestheader_flags: bool = True) -> list[str]:
    args = [
        "--secure-port", "0",
        "--bind-address", "127.0.0.1",
        "--tls-cert-file", str(pki.router_serving_cert),
        "--tls-private-key-file", str(pki.router_serving_key),
        "--proxy-client-cert-file", str(pki.router_client_cert),
        "--proxy-client-key-file", str(pki.router_client_key),
        "--upstream-ca-file", str(pki.upstream_ca),
        "--kubeconfig", str(kubeconfig),
        "--tenant-strategies", "label",
        "--tenant-label", PORT_LABEL,
        "--upstream-template", "https://localhost:{tenant}",
        "--metrics-bind-address", "127.0.0.1:0",
        "--file-check-interval", "3600",
        "--shutdown-grace-period", "1",
    ]  # fmt: skip
    if requestheader_flags:
        args += [
            "--requestheader-client-ca-file", str(pki.requestheader_ca),
            "--requestheader-allowed-names", "front-proxy-client",
        ]  # fmt: skip
    return args


class Swaps:
    """Every table the router swaps in, with a Signal to wait on."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.signal = Signal()
        router.live.on_swap(self._swapped)

    def _swapped(self, table: RouteTable) -> None:
        self.signal.notify()

    def tenant(self, namespace: str) -> str | None:
        route = self.router.live.table.lookup(namespace)
        return None if route is None else route.tenant

    async def until_routed(self, namespace: str, tenant: str | None, within: float = 1.0) -> None:
        await self.signal.wait_for(lambda: self.tenant(namespace) == tenant, within)


@pytest.fixture
async def stubs(pki: Pki) -> AsyncIterator[dict[str, RecordingStub]]:
    started = {t: make_stub(pki, t) for t in ("a", "b")}
    for stub in started.values():
        await stub.start()
    yield started
    for stub in started.values():
        await stub.stop()


async def start(pki: Pki, fake: FakeKube, tmp_path: Path, **kw: bool) -> RouterHarness:
    router = await started_router(serve_config(cluster_args(pki, fake.kubeconfig, **kw)))
    return RouterHarness(router, {}, tmp_path / "unused", pki, tmp_path)


def label(stub: RecordingStub) -> dict[str, str]:
    return {PORT_LABEL: str(stub.port)}


async def test_namespace_appears_and_goes_through_the_router(
    pki: Pki, fake: FakeKube, stubs: dict[str, RecordingStub], tmp_path: Path
) -> None:
    a, b = stubs["a"], stubs["b"]
    fake.add_namespace("tenant-a", label(a))
    fake.add_namespace("kube-system")
    harness = await start(pki, fake, tmp_path)
    try:
        swaps = Swaps(harness.router)
        await swaps.until_routed("tenant-a", str(a.port), within=2.0)
        assert harness.router.ready

        reply = await harness.request(metric_path("tenant-a"), HPA_IDENTITY)
        assert reply.status == 200, reply.body
        assert reply.headers["X-Stub-Tenant"] == "a"
        assert len(a.seen) == 1

        unknown = await harness.request(metric_path("tenant-b"), HPA_IDENTITY)
        assert unknown.status == 404
        assert unknown.json()["reason"] == "NotFound"

        # A namespace created in the cluster is routable within a second ...
        fake.add_namespace("tenant-b", label(b))
        await swaps.until_routed("tenant-b", str(b.port))
        reply = await harness.request(metric_path("tenant-b"), HPA_IDENTITY)
        assert reply.status == 200
        assert reply.headers["X-Stub-Tenant"] == "b"
        assert [s.raw_path for s in b.seen] == [metric_path("tenant-b")]

        # ... and so is a second namespace of an existing tenant ...
        fake.add_namespace("tenant-a--dev", label(a))
        await swaps.until_routed("tenant-a--dev", str(a.port))
        reply = await harness.request(metric_path("tenant-a--dev"), HPA_IDENTITY)
        assert reply.headers["X-Stub-Tenant"] == "a"

        # ... and a deleted one stops being routable within a second.
        fake.delete("namespaces", "tenant-b")
        await swaps.until_routed("tenant-b", None)
        gone = await harness.request(metric_path("tenant-b"), HPA_IDENTITY)
        assert gone.status == 404
        assert len(b.seen) == 1

        routes = await harness.sample("metrics_router_routes")
        assert routes == 2
        assert await harness.sample("metrics_router_synced") == 1
    finally:
        await harness.router.stop()


async def test_routes_survive_an_api_outage(
    pki: Pki, fake: FakeKube, stubs: dict[str, RecordingStub], tmp_path: Path
) -> None:
    a = stubs["a"]
    fake.add_namespace("tenant-a", label(a))
    harness = await start(pki, fake, tmp_path)
    try:
        swaps = Swaps(harness.router)
        await swaps.until_routed("tenant-a", str(a.port), within=2.0)
        await fake.wait_watches("namespaces")
        await fake.outage()
        reply = await harness.request(metric_path("tenant-a"), HPA_IDENTITY)
        assert reply.status == 200
        assert harness.router.ready
        await fake.recover()
        fake.add_namespace("tenant-a--new", label(a))
        await swaps.until_routed("tenant-a--new", str(a.port), within=3.0)
    finally:
        await harness.router.stop()


AUTH = ("kube-system", "extension-apiserver-authentication")


def auth_data(pki: Pki, allowed: Sequence[str]) -> dict[str, str]:
    quoted = ", ".join(f'"{n}"' for n in allowed)
    return {
        "requestheader-client-ca-file": pki.requestheader_ca.read_text(),
        "requestheader-allowed-names": f"[{quoted}]",
        "requestheader-username-headers": '["X-Remote-User"]',
        "requestheader-group-headers": '["X-Remote-Group"]',
        "requestheader-extra-headers-prefix": '["X-Remote-Extra-"]',
    }


async def test_requestheader_settings_from_the_configmap(
    pki: Pki, fake: FakeKube, stubs: dict[str, RecordingStub], tmp_path: Path
) -> None:
    a = stubs["a"]
    fake.add_namespace("tenant-a", label(a))
    fake.add_configmap(*AUTH, auth_data(pki, ["front-proxy-client"]))
    harness = await start(pki, fake, tmp_path, requestheader_flags=False)
    try:
        swaps = Swaps(harness.router)
        await swaps.until_routed("tenant-a", str(a.port), within=2.0)
        ok = await harness.request(metric_path("tenant-a"), HPA_IDENTITY)
        assert ok.status == 200
        # same CA, CN not in the ConfigMap's allowed names
        refused = await harness.request(metric_path("tenant-a"), HPA_IDENTITY, cert="other")
        assert refused.status == 401
        assert len(a.seen) == 1
    finally:
        await harness.router.stop()
