"""Hostile upstreams behind a running router (issue 10): floods, stalls, garbage, surplus bytes.

Each upstream is a raw TLS server (tests/conftest.py ``raw_tls_upstream``) writing exact bytes;
each test asserts the Status returned, what it does not say, and what happened to the pooled
upstream connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import socket
import ssl
import threading
from pathlib import Path
from typing import Any

import pytest

from router.devtools.pki import ROUTER_CLIENT_CN, CertAndKey, Pki, issue_cert
from tests.conftest import (
    HPA_IDENTITY,
    StartRouter,
    answering,
    metric_path,
    raw_tls_upstream,
    start_with_upstream,
    wait_until,
)

pytestmark = pytest.mark.usefixtures("no_leftover_tasks")

SMALL = ["--max-response-bytes", "64Ki", "--max-response-header-bytes", "16Ki"]
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


def assert_no_internals(body: bytes, url: str) -> None:
    text = body.decode()
    for leak in (url, "127.0.0.1", "_ssl.c", "SSL:", "Errno", "Traceback", "/tmp/", ".py"):
        assert leak not in text, text


async def flood(writer: asyncio.StreamWriter, first: bytes, chunk: bytes, total: int) -> None:
    writer.write(first)
    sent = 0
    while sent < total:
        writer.write(chunk)
        await writer.drain()
        sent += len(chunk)


@pytest.mark.parametrize(
    ("first", "chunk"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 104857600\r\n\r\n", b"x" * 65536),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"10000\r\n" + b"x" * 65536 + b"\r\n",
        ),
        (b"HTTP/1.1 200 OK\r\n", b"X-Flood: " + b"y" * 1000 + b"\r\n"),
        (b"HTTP/1.1 200 OK\r\nX-Endless: ", b"z" * 65536),
    ],
    ids=["body", "chunked", "header-lines", "one-header-line"],
)
async def test_a_flooding_upstream_gets_502_and_is_closed(
    start_router: StartRouter, pki: Pki, first: bytes, chunk: bytes
) -> None:
    closed = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await flood(writer, first, chunk, 100 << 20)
        finally:
            closed.set()

    async with raw_tls_upstream(pki, handler) as up:
        h2 = await start_router({"b": ["tenant-b"]}, extra_args=SMALL)
        h2.write_routes(
            {"a": (["tenant-a"], up.url, None), "b": (["tenant-b"], h2.stubs["b"].url, None)}
        )
        h2.router.check_files()
        reply = await h2.request(metric_path("tenant-a"))
        assert reply.status == 502, reply.body
        assert "larger than the router allows" in reply.json()["message"]
        assert_no_internals(reply.body, up.url)
        await asyncio.wait_for(closed.wait(), 5.0)  # the upstream connection was closed
        assert await h2.sample(
            "metrics_router_upstream_errors_total", {"tenant": "a", "kind": "response-too-large"}
        )


async def test_surplus_bytes_never_answer_the_next_request(
    start_router: StartRouter, pki: Pki
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # The answer, then a second answer nobody asked for, in the same write.
        evil = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nEVIL!"
        writer.write(OK + evil)
        await writer.drain()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await reader.read()  # keep the connection open until the router closes it

    async with raw_tls_upstream(pki, handler) as up:
        h = await start_with_upstream(start_router, up.url)
        conn = await h.connect()
        for _ in range(3):
            reply = await conn.request(metric_path("tenant-a"), HPA_IDENTITY)
            assert reply.status == 200
            assert reply.body == b"{}"
        assert len(up.heads) == 3  # a fresh upstream connection each time


async def test_bytes_after_a_complete_answer_in_a_later_read_close_the_connection(
    start_router: StartRouter, pki: Pki
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(OK)
        await writer.drain()
        await asyncio.sleep(0.05)  # the late bytes arrive in a later read
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nEVIL!")
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await reader.read()

    async with raw_tls_upstream(pki, handler) as up:
        h = await start_with_upstream(start_router, up.url)
        conn = await h.connect()
        assert (await conn.request(metric_path("tenant-a"), HPA_IDENTITY)).body == b"{}"
        await asyncio.sleep(0.2)
        assert (await conn.request(metric_path("tenant-a"), HPA_IDENTITY)).body == b"{}"
        assert len(up.heads) == 2


@pytest.mark.parametrize(
    "answer",
    [
        b"NOT HTTP AT ALL\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nContent-Length: 3\r\n\r\n",
    ],
    ids=["garbage", "two-lengths"],
)
async def test_a_garbage_answer_is_502_without_parser_text(
    start_router: StartRouter, pki: Pki, answer: bytes
) -> None:
    async with raw_tls_upstream(pki, answering(answer)) as up:
        h = await start_with_upstream(start_router, up.url)
        reply = await h.request(metric_path("tenant-a"))
        assert reply.status == 502
        assert reply.json()["message"] == "tenant 'a' metrics server sent an invalid answer"
        assert_no_internals(reply.body, up.url)


async def test_upstream_trailers_and_date_are_not_relayed(
    start_router: StartRouter, pki: Pki
) -> None:
    answer = (
        b"HTTP/1.1 200 OK\r\nDate: Mon, 01 Jan 2001 00:00:00 GMT\r\n"
        b"Transfer-Encoding: chunked\r\nTrailer: X-Evil\r\n\r\n"
        b"2\r\n{}\r\n0\r\nX-Evil: 1\r\nSet-Cookie: a=b\r\n\r\n"
    )
    async with raw_tls_upstream(pki, answering(answer)) as up:
        h = await start_with_upstream(start_router, up.url)
        reply = await h.request(metric_path("tenant-a"))
        assert reply.status == 200
        assert reply.body == b"{}"
        names = [k.lower() for k, _ in reply.raw_headers]
        assert names.count("date") == 1
        assert reply.headers["Date"] != "Mon, 01 Jan 2001 00:00:00 GMT"
        assert "x-evil" not in names
        assert "set-cookie" not in names


async def test_a_stalled_answer_is_504_without_the_url(start_router: StartRouter, pki: Pki) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{")
        await writer.drain()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await reader.read()

    async with raw_tls_upstream(pki, handler) as up:
        h = await start_router({"b": ["tenant-b"]}, extra_args=["--upstream-timeout", "0.3"])
        h.write_routes(
            {"a": (["tenant-a"], up.url, None), "b": (["tenant-b"], h.stubs["b"].url, None)}
        )
        h.router.check_files()
        reply = await h.request(metric_path("tenant-a"))
        assert reply.status == 504
        assert reply.json()["message"] == "tenant 'a' metrics server did not answer within 0.3s"
        assert_no_internals(reply.body, up.url)


class _RefusingServer:
    """A blocking TLS server (OpenSSL's own socket I/O, as Go's server behaves) that requires a
    client certificate from another CA: the refusal reaches the client as an alert."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self._ctx = ctx
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(10.0)
        self.port = int(self._sock.getsockname()[1])
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            conn, _ = self._sock.accept()
            tls = self._ctx.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
            with contextlib.suppress(OSError):
                tls.do_handshake()
            # Read what the client sent (raw bytes) before closing, so that the close is no
            # reset that could overtake the alert.
            tls.settimeout(5.0)
            with contextlib.suppress(OSError):
                while socket.socket.recv(tls, 65536):
                    pass
            tls.close()

    def close(self) -> None:
        self._sock.close()
        self._thread.join(10.0)


async def test_an_upstream_refusing_the_router_certificate_is_classified(
    start_router: StartRouter, pki: Pki
) -> None:
    # The upstream trusts another CA for client certificates: with TLS 1.3 the router learns
    # it on its first read, after the handshake.
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pki.upstream_cert(pki.tenants[0]), pki.upstream_key(pki.tenants[0]))
    ctx.load_verify_locations(pki.rogue_ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    server = _RefusingServer(ctx)
    url = f"https://127.0.0.1:{server.port}"
    try:
        h = await start_with_upstream(start_router, url)
        reply = await h.request(metric_path("tenant-a"))
        assert reply.status == 502
        assert reply.json()["message"] == (
            "tenant 'a' metrics server refused the router's client certificate"
        )
        assert_no_internals(reply.body, url)
        assert await h.sample(
            "metrics_router_upstream_errors_total", {"tenant": "a", "kind": "tls"}
        )
        assert await h.sample(
            "metrics_router_upstream_tls_errors_total",
            {"tenant": "a", "cause": "client-certificate-rejected"},
        )
    finally:
        await asyncio.to_thread(server.close)


# ------------------------------------------------------------- upstream TLS failures, by cause


def _upstream_pair(pki: Pki, directory: Path, name: str, **kwargs: Any) -> tuple[Path, Path]:
    ca = CertAndKey.load(pki.upstream_ca, pki.upstream_ca_key)
    pair = issue_cert(ca, name, server=True, **kwargs)
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    pair.write(cert, key)
    return cert, key


@pytest.mark.parametrize("cause", ["expired-certificate", "hostname-mismatch"])
async def test_upstream_certificate_failures_are_classified(
    start_router: StartRouter, pki: Pki, tmp_path: Path, cause: str
) -> None:
    now = datetime.datetime.now(datetime.UTC)
    if cause == "expired-certificate":
        cert, key = _upstream_pair(
            pki, tmp_path, "127.0.0.1", ip_addresses=["127.0.0.1"],
            not_before=now - datetime.timedelta(days=2), not_after=now - datetime.timedelta(days=1),
        )  # fmt: skip
    else:
        cert, key = _upstream_pair(pki, tmp_path, "elsewhere", dns_names=["elsewhere.example"])
    h = await start_router(
        {"a": ["tenant-a"], "b": ["tenant-b"]},
        stub_kwargs={"a": {"cert_file": cert, "key_file": key}},
    )
    reply = await h.request(metric_path("tenant-a"))
    assert reply.status == 502
    assert_no_internals(reply.body, h.stubs["a"].url)
    assert await h.sample("metrics_router_upstream_errors_total", {"tenant": "a", "kind": "tls"})
    assert await h.sample(
        "metrics_router_upstream_tls_errors_total", {"tenant": "a", "cause": cause}
    )


async def test_an_expired_router_client_certificate_is_named_as_the_cause(
    start_router: StartRouter, pki: Pki, tmp_path: Path
) -> None:
    # The router's own client certificate expires while it runs; the upstream (an asyncio
    # server, whose refusal alert is lost when it aborts) just closes the new connection.
    ca = CertAndKey.load(pki.router_client_ca, pki.router_client_ca_key)
    now = datetime.datetime.now(datetime.UTC)
    expiry = now + datetime.timedelta(seconds=2)
    pair = issue_cert(
        ca,
        ROUTER_CLIENT_CN,
        client=True,
        not_before=now - datetime.timedelta(hours=1),
        not_after=expiry,
    )
    cert, key = tmp_path / "client.crt", tmp_path / "client.key"
    pair.write(cert, key)
    h = await start_router(
        {"a": ["tenant-a"], "b": ["tenant-b"]},
        extra_args=["--proxy-client-cert-file", str(cert), "--proxy-client-key-file", str(key)],
    )
    # Wait for the clock, not for the router: the certificate expires at a known time.
    await wait_until(lambda: datetime.datetime.now(datetime.UTC) > expiry, within=10)
    reply = await h.request(metric_path("tenant-a"))
    assert reply.status == 502
    assert reply.json()["message"] == (
        "tenant 'a' metrics server refused the router's client certificate"
    )
    assert await h.sample(
        "metrics_router_upstream_tls_errors_total",
        {"tenant": "a", "cause": "client-certificate-rejected"},
    )


async def test_idle_upstream_connections_expire(start_router: StartRouter) -> None:
    h = await start_router(
        {"a": ["tenant-a"], "b": ["tenant-b"]}, extra_args=["--upstream-idle-conn-timeout", "200ms"]
    )
    assert (await h.request(metric_path("tenant-a"))).status == 200
    assert (await h.request(metric_path("tenant-a"))).status == 200
    assert h.stubs["a"].connections == 1  # reused while fresh
    loop = asyncio.get_running_loop()
    idle_from = loop.time()
    await wait_until(lambda: loop.time() - idle_from > 0.3, within=5)  # let the pool age
    assert (await h.request(metric_path("tenant-a"))).status == 200
    assert h.stubs["a"].connections == 2  # the expired one was closed, not reused
