"""Routes file and certificate reloads: validate, then swap; the last good version stays."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from router.devtools.pki import (
    FRONT_PROXY_CLIENT_CN,
    LOOPBACK_IPS,
    ROUTER_SERVING_DNS,
    CertAndKey,
    Pki,
    issue_cert,
    make_ca,
)
from tests.conftest import (
    HPA_IDENTITY,
    RouterHarness,
    StartRouter,
    build_request,
    client_ssl_context,
    copy_file,
    metric_path,
)

pytestmark = pytest.mark.usefixtures("no_leftover_tasks")


async def reloads(h: RouterHarness, source: str, result: str) -> float:
    return await h.sample("metrics_router_reloads_total", {"source": source, "result": result}) or 0


# --------------------------------------------------------------------------- routes file


async def test_added_namespace_becomes_routable(start_router: StartRouter) -> None:
    h = await start_router({"a": ["tenant-a"], "b": ["tenant-b"]})
    assert (await h.request(metric_path("tenant-a--new"))).status == 404
    h.write_routes(h.routes_for({"a": ["tenant-a", "tenant-a--new"], "b": ["tenant-b"]}))
    h.router.check_files()
    reply = await h.request(metric_path("tenant-a--new"))
    assert reply.status == 200
    assert [s.raw_path for s in h.stubs["a"].seen] == [metric_path("tenant-a--new")]
    assert h.stubs["b"].seen == []
    assert await reloads(h, "routes", "success") == 1
    assert await h.sample("metrics_router_routes") == 3


async def test_moved_and_removed_namespaces(start_router: StartRouter) -> None:
    h = await start_router({"a": ["tenant-a", "shared"], "b": ["tenant-b", "gone"]})
    assert (await h.request(metric_path("shared"))).headers["X-Stub-Tenant"] == "a"
    h.write_routes(h.routes_for({"a": ["tenant-a"], "b": ["tenant-b", "shared"]}))
    h.router.check_files()
    assert (await h.request(metric_path("shared"))).headers["X-Stub-Tenant"] == "b"
    assert (await h.request(metric_path("gone"))).status == 404
    assert [s.raw_path for s in h.stubs["b"].seen] == [metric_path("shared")]


async def test_removed_tenant_is_404_and_its_pool_forgotten(start_router: StartRouter) -> None:
    h = await start_router({"a": ["tenant-a"], "b": ["tenant-b"]})
    assert (await h.request(metric_path("tenant-b"))).status == 200
    h.write_routes(h.routes_for({"a": ["tenant-a"]}))
    h.router.check_files()
    assert (await h.request(metric_path("tenant-b"))).status == 404
    assert await h.sample("metrics_router_tenants") == 1
    assert len(h.stubs["b"].seen) == 1


async def test_unchanged_routes_file_is_not_reloaded(start_router: StartRouter) -> None:
    h = await start_router({"a": ["tenant-a"]})
    h.router.check_files()
    h.router.check_files()
    assert await reloads(h, "routes", "success") == 0


@pytest.mark.parametrize(
    "broken",
    [
        "tenants: [not, a, mapping",
        "tenants:\n  a: {namespaces: [Tenant-A], upstream: 'https://127.0.0.1:1'}\n",
        "tenants:\n  a: {namespaces: [x], upstream: 'https://127.0.0.1:1'}\n"
        "  b: {namespaces: [x], upstream: 'https://127.0.0.1:2'}\n",
        "\xff\xfe not utf-8",
        "",
    ],
)
async def test_broken_routes_file_keeps_the_last_table(
    start_router: StartRouter, broken: str
) -> None:
    h = await start_router({"a": ["tenant-a"], "b": ["tenant-b"]})
    h.routes_file.write_bytes(broken.encode("latin-1"))
    h.router.check_files()
    assert await reloads(h, "routes", "failure") == 1
    assert (await h.request(metric_path("tenant-a"))).headers["X-Stub-Tenant"] == "a"
    assert (await h.request(metric_path("tenant-b"))).headers["X-Stub-Tenant"] == "b"
    # The same broken file is not counted again; a good file is taken.
    h.router.check_files()
    assert await reloads(h, "routes", "failure") == 1
    h.write_routes(h.routes_for({"a": ["tenant-a", "tenant-b"]}))
    h.router.check_files()
    assert await reloads(h, "routes", "success") == 1
    assert (await h.request(metric_path("tenant-b"))).headers["X-Stub-Tenant"] == "a"


async def test_deleted_routes_file_keeps_the_last_table(start_router: StartRouter) -> None:
    h = await start_router({"a": ["tenant-a"]})
    h.routes_file.unlink()
    h.router.check_files()
    assert await reloads(h, "routes", "failure") == 1
    assert (await h.request(metric_path("tenant-a"))).status == 200


async def test_file_watcher_reloads_routes_without_being_asked(start_router: StartRouter) -> None:
    h = await start_router(
        {"a": ["tenant-a"], "b": ["tenant-b"]}, extra_args=["--file-check-interval", "0.05"]
    )
    swapped = asyncio.Event()
    h.router.live.on_swap(lambda _table: swapped.set())
    h.write_routes(h.routes_for({"a": ["tenant-a"], "b": ["tenant-b", "tenant-b--new"]}))
    await asyncio.wait_for(swapped.wait(), 5)
    assert (await h.request(metric_path("tenant-b--new"))).headers["X-Stub-Tenant"] == "b"


async def _router_reading(
    start_router: StartRouter, files: Mapping[str, Path], **kwargs: Any
) -> RouterHarness:
    """Tenant a's router, its file flags pointing at the test's own copies (rotated later)."""
    flags = [arg for flag, path in files.items() for arg in (flag, str(path))]
    return await start_router({"a": ["tenant-a"]}, extra_args=flags, **kwargs)


# --------------------------------------------------------------------------- serving certificate


def _serving_copy(pki: Pki, directory: Path) -> tuple[Path, Path]:
    cert = copy_file(pki.router_serving_cert, directory / "tls.crt")
    key = copy_file(pki.router_serving_key, directory / "tls.key")
    return cert, key


def _proxy_client_copy(pki: Pki, directory: Path) -> tuple[Path, Path]:
    cert = copy_file(pki.router_client_cert, directory / "client.crt")
    key = copy_file(pki.router_client_key, directory / "client.key")
    return cert, key


def _new_serving(pki: Pki, days: int = 30) -> CertAndKey:
    ca = pki.load_pair(pki.router_serving_ca, pki.router_serving_ca_key)
    return issue_cert(
        ca,
        "metrics-router.metrics-router.svc",
        server=True,
        dns_names=ROUTER_SERVING_DNS,
        ip_addresses=LOOPBACK_IPS,
        days=days,
    )


def _serial(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


async def test_rotated_serving_certificate_is_used_by_new_handshakes_only(
    start_router: StartRouter, pki: Pki, tmp_path: Path
) -> None:
    cert, key = _serving_copy(pki, tmp_path)
    h = await _router_reading(
        start_router, {"--tls-cert-file": cert, "--tls-private-key-file": key}
    )
    old_serial = _serial(cert)
    established = await h.connect()
    assert (await established.request(metric_path("tenant-a"), HPA_IDENTITY)).status == 200
    assert established.peer_serial() == old_serial

    rotated = _new_serving(pki, days=30)
    rotated.write(cert, key)
    h.router.check_files()
    assert await reloads(h, "serving", "success") == 1

    fresh = await h.connect()
    assert fresh.peer_serial() == rotated.cert.serial_number != old_serial
    assert (await fresh.request(metric_path("tenant-a"), HPA_IDENTITY)).status == 200
    # The connection established before the rotation keeps working.
    assert (await established.request(metric_path("tenant-a"), HPA_IDENTITY)).status == 200
    assert established.peer_serial() == old_serial
    assert await h.sample(
        "metrics_router_certificate_expiry_timestamp_seconds", {"certificate": "serving"}
    ) == pytest.approx(rotated.cert.not_valid_after_utc.timestamp())


@pytest.mark.parametrize("damage", ["mismatched-key", "garbage-cert", "empty-key", "missing-key"])
async def test_bad_new_serving_files_are_refused_and_the_old_pair_stays(
    start_router: StartRouter, pki: Pki, tmp_path: Path, damage: str
) -> None:
    cert, key = _serving_copy(pki, tmp_path)
    h = await _router_reading(
        start_router, {"--tls-cert-file": cert, "--tls-private-key-file": key}
    )
    old_serial = _serial(cert)
    if damage == "mismatched-key":
        cert.write_bytes(_new_serving(pki).cert_pem())  # the key stays the old one
    elif damage == "garbage-cert":
        cert.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    elif damage == "empty-key":
        key.write_bytes(b"")
    else:
        key.unlink()
    h.router.check_files()
    assert await reloads(h, "serving", "failure") == 1
    assert await reloads(h, "serving", "success") == 0
    conn = await h.connect()
    assert conn.peer_serial() == old_serial
    assert (await conn.request(metric_path("tenant-a"), HPA_IDENTITY)).status == 200

    # A good pair afterwards is taken.
    rotated = _new_serving(pki)
    rotated.write(cert, key)
    h.router.check_files()
    assert await reloads(h, "serving", "success") == 1
    assert (await h.connect()).peer_serial() == rotated.cert.serial_number


async def test_requestheader_ca_rotation(
    start_router: StartRouter, pki: Pki, tmp_path: Path
) -> None:
    ca_file = copy_file(pki.requestheader_ca, tmp_path / "requestheader-ca.crt")
    h = await _router_reading(start_router, {"--requestheader-client-ca-file": ca_file})
    new_ca = make_ca("rotated front-proxy CA")
    new_client = issue_cert(new_ca, FRONT_PROXY_CLIENT_CN, client=True)
    new_pair = (tmp_path / "new-client.crt", tmp_path / "new-client.key")
    new_client.write(*new_pair)

    with pytest.raises((ssl.SSLError, ConnectionError)):
        await h.request(metric_path("tenant-a"), cert=new_pair)

    # Overlap: a bundle of old and new CA accepts both.
    ca_file.write_bytes(pki.requestheader_ca.read_bytes() + new_ca.cert_pem())
    h.router.check_files()
    assert await reloads(h, "serving", "success") == 1
    assert (await h.request(metric_path("tenant-a"), cert=new_pair)).status == 200
    assert (await h.request(metric_path("tenant-a"), cert="front-proxy")).status == 200

    # Only the new CA: the old aggregator certificate is refused at the handshake.
    ca_file.write_bytes(new_ca.cert_pem())
    h.router.check_files()
    assert await reloads(h, "serving", "success") == 2
    assert (await h.request(metric_path("tenant-a"), cert=new_pair)).status == 200
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await h.request(metric_path("tenant-a"), cert="front-proxy")
    assert len(h.stubs["a"].seen) == 3


def _blocking_request(
    port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None = None
) -> tuple[bytes, ssl.SSLSession | None, bool]:
    """One request on a blocking TLS socket that may resume session; returns (response
    bytes, the session to resume next time, whether this one was resumed)."""
    request = build_request(metric_path("tenant-a"), [*HPA_IDENTITY, ("Connection", "close")])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1", session=session) as tls,
    ):
        tls.sendall(request)
        data = b""
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            while chunk := tls.recv(65536):
                data += chunk
        return data, tls.session, bool(tls.session_reused)


@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"]
)
async def test_resumed_session_is_not_trusted_after_requestheader_ca_rotation(
    start_router: StartRouter, pki: Pki, tmp_path: Path, version: ssl.TLSVersion
) -> None:
    ca_file = copy_file(pki.requestheader_ca, tmp_path / "requestheader-ca.crt")
    h = await _router_reading(start_router, {"--requestheader-client-ca-file": ca_file})
    ctx = client_ssl_context(pki)
    ctx.maximum_version = version
    data, session, _ = await asyncio.to_thread(_blocking_request, h.port, ctx)
    assert data.startswith(b"HTTP/1.1 200 ")
    assert session is not None

    # The front-proxy CA is replaced (say it leaked): its certificates must stop working,
    # including for a client that kept a TLS session from before.
    ca_file.write_bytes(make_ca("replacement front-proxy CA").cert_pem())
    h.router.check_files()
    assert await reloads(h, "serving", "success") == 1
    seen = len(h.stubs["a"].seen)
    data, _, resumed = await asyncio.to_thread(_blocking_request, h.port, ctx, session)
    assert not data.startswith(b"HTTP/1.1 200 "), (resumed, data[:200])
    assert len(h.stubs["a"].seen) == seen


async def test_bad_requestheader_ca_is_refused_and_the_old_one_stays(
    start_router: StartRouter, pki: Pki, tmp_path: Path
) -> None:
    ca_file = copy_file(pki.requestheader_ca, tmp_path / "requestheader-ca.crt")
    h = await _router_reading(start_router, {"--requestheader-client-ca-file": ca_file})
    ca_file.write_bytes(b"not a certificate\n")
    h.router.check_files()
    assert await reloads(h, "serving", "failure") == 1
    assert (await h.request(metric_path("tenant-a"))).status == 200


# --------------------------------------------------------------------------- proxy client cert


async def test_rotated_proxy_client_certificate_is_used_for_new_upstream_connections(
    start_router: StartRouter, pki: Pki, tmp_path: Path
) -> None:
    cert, key = _proxy_client_copy(pki, tmp_path)
    h = await _router_reading(
        start_router,
        {"--proxy-client-cert-file": cert, "--proxy-client-key-file": key},
        stub_kwargs={"a": {"allowed_names": ("metrics-router", "metrics-router-next")}},
    )
    assert (await h.request(metric_path("tenant-a"))).status == 200  # one pooled connection
    client_ca = pki.load_pair(pki.router_client_ca, pki.router_client_ca_key)
    issue_cert(client_ca, "metrics-router-next", client=True).write(cert, key)
    h.router.check_files()
    assert await reloads(h, "proxy-client", "success") == 1

    stub = h.stubs["a"]
    stub.behaviour.delay = 0.2  # two requests at once: the pooled connection and a new one
    replies = await asyncio.gather(*(h.request(metric_path("tenant-a")) for _ in range(2)))
    assert [r.status for r in replies] == [200, 200]
    assert [s.peer_cn for s in stub.seen[:1]] == ["metrics-router"]
    assert sorted(str(s.peer_cn) for s in stub.seen[1:]) == [
        "metrics-router",
        "metrics-router-next",
    ]


async def test_bad_proxy_client_files_are_refused(
    start_router: StartRouter, pki: Pki, tmp_path: Path
) -> None:
    cert, key = _proxy_client_copy(pki, tmp_path)
    h = await _router_reading(
        start_router, {"--proxy-client-cert-file": cert, "--proxy-client-key-file": key}
    )
    key.write_bytes(pki.front_proxy_client_key.read_bytes())  # not the certificate's key
    h.router.check_files()
    assert await reloads(h, "proxy-client", "failure") == 1
    h.stubs["a"].behaviour.delay = 0.1
    replies = await asyncio.gather(*(h.request(metric_path("tenant-a")) for _ in range(3)))
    assert [r.status for r in replies] == [200, 200, 200]
    assert {s.peer_cn for s in h.stubs["a"].seen} == {"metrics-router"}
