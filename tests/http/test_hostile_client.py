"""Hostile clients against a running router, over raw TLS sockets (issue 10).

Each test plays one attack and asserts what the router does: the connection is closed, a
Status is returned, reading is paused, nothing is forwarded.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from router.devtools.pki import CertAndKey
from tests.conftest import (
    HPA_IDENTITY,
    NoResponseError,
    RawConnection,
    StartRouter,
    build_request,
    client_ssl_context,
    metric_path,
)

pytestmark = pytest.mark.usefixtures("no_leftover_tasks")

USER = dict(HPA_IDENTITY)["X-Remote-User"]


def chunked_with_trailers(target: str, trailers: list[tuple[str, str]]) -> bytes:
    head = build_request(target, [*HPA_IDENTITY, ("Transfer-Encoding", "chunked")])
    trailer = "".join(f"{k}: {v}\r\n" for k, v in trailers).encode()
    return head + b"1\r\na\r\n0\r\n" + trailer + b"\r\n"


async def rest_of_connection(conn: RawConnection, within: float = 5.0) -> bytes:
    """Everything the server still sends until it closes the connection."""
    out = b""
    try:
        while chunk := await asyncio.wait_for(conn.reader.read(65536), within):
            out += chunk
    except (ConnectionError, ssl.SSLError):
        pass
    return out


# --------------------------------------------------------------------------------- identity


async def test_trailer_fields_never_become_identity(start_router: StartRouter) -> None:
    h = await start_router({"a": ["tenant-a"]})
    conn = await h.connect()
    data = chunked_with_trailers(
        metric_path("tenant-a"),
        [("X-Remote-User", "admin"), ("X-Remote-Group", "system:masters")],
    )
    reply = await conn.send(data)
    assert reply.status == 200
    seen = h.stubs["a"].seen[0]
    assert seen.user == USER
    assert "system:masters" not in seen.groups
    assert not any(v in ("admin", "system:masters") for _, v in seen.headers)


async def test_identity_look_alike_headers_are_dropped(start_router: StartRouter) -> None:
    h = await start_router({"a": ["tenant-a"]})
    reply = await h.request(
        metric_path("tenant-a"),
        [*HPA_IDENTITY, ("X_Remote_User", "admin"), ("X_REMOTE_GROUP", "system:masters"),
         ("Impersonate_User", "admin"), ("X_Custom_Thing", "kept")],
    )  # fmt: skip
    assert reply.status == 200
    names = [k.lower() for k, _ in h.stubs["a"].seen[0].headers]
    assert "x_remote_user" not in names
    assert "x_remote_group" not in names
    assert "impersonate_user" not in names
    assert "x_custom_thing" in names  # only look-alikes go


def _two_cn_cert(pki_dir: Path, ca_cert: Path, ca_key: Path, names: list[str]) -> tuple[Path, Path]:
    ca = CertAndKey.load(ca_cert, ca_key)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, n) for n in names])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    cert_file, key_file = pki_dir / "two-cn.crt", pki_dir / "two-cn.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


async def test_a_certificate_with_several_common_names_is_refused(
    start_router: StartRouter, tmp_path: Path
) -> None:
    h = await start_router({"a": ["tenant-a"]})
    # kube-apiserver would judge by the last CN (not allowed); the router must never judge by
    # the first (allowed).
    pair = _two_cn_cert(
        tmp_path, h.pki.requestheader_ca, h.pki.requestheader_ca_key,
        ["front-proxy-client", "someone-else"],
    )  # fmt: skip
    reply = await h.request(metric_path("tenant-a"), cert=pair)
    assert reply.status == 401
    assert "several common names" in reply.json()["message"]
    assert h.seen_total() == 0
    assert (
        await h.sample(
            "metrics_router_unauthorized_requests_total", {"reason": "multiple-common-names"}
        )
        == 1
    )


# ------------------------------------------------------------------------ one answer each


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(
            build_request("/apis", [("Upgrade", "websocket"), ("Connection", "Upgrade")])
            + build_request("/apis"),
            id="upgrade-local",
        ),
        pytest.param(
            build_request("tenant-a:443", [], method="CONNECT") + build_request("/apis"),
            id="connect",
        ),
    ],
)
async def test_upgrade_and_connect_get_exactly_one_answer(
    start_router: StartRouter, request_bytes: bytes
) -> None:
    h = await start_router({"a": ["tenant-a"]})
    conn = await h.connect()
    reply = await conn.send(request_bytes)
    assert reply.status in (200, 404, 405)
    assert reply.headers["Connection"] == "close"
    assert await rest_of_connection(conn) == b""


async def test_a_forwarded_upgrade_request_gets_one_answer_and_no_upgrade_header(
    start_router: StartRouter,
) -> None:
    h = await start_router({"a": ["tenant-a"]})
    conn = await h.connect()
    head = build_request(
        metric_path("tenant-a"), [*HPA_IDENTITY, ("Upgrade", "h2c"), ("Connection", "Upgrade")]
    )
    reply = await conn.send(head + build_request("/apis"))
    assert reply.status == 200
    assert await rest_of_connection(conn) == b""
    assert not any(k.lower() == "upgrade" for k, _ in h.stubs["a"].seen[0].headers)


@pytest.mark.parametrize(
    "request_line",
    [b"GET /apis HTTP/2.0\r\nHost: x\r\n\r\n", b"GET /apis HTTP/0.9\r\n\r\n", b"GET /apis\r\n\r\n"],
    ids=["http2", "http09", "no-version"],
)
async def test_other_http_versions_are_refused_never_forwarded(
    start_router: StartRouter, request_line: bytes
) -> None:
    h = await start_router({"a": ["tenant-a"]})
    conn = await h.connect()
    forwarded = request_line.replace(b"/apis", metric_path("tenant-a").encode())
    reply = await conn.send(forwarded)
    assert reply.status in (400, 505)
    assert reply.json()["kind"] == "Status"
    assert await rest_of_connection(conn) == b""
    assert h.seen_total() == 0


@pytest.mark.parametrize(
    ("framing", "code"),
    [
        ([("Transfer-Encoding", "chunked"), ("Content-Length", "3")], 400),
        ([("Content-Length", "3"), ("Transfer-Encoding", "chunked")], 400),
        ([("Transfer-Encoding", "gzip, chunked")], 501),
        ([("Transfer-Encoding", "identity")], 501),
    ],
    ids=["te-cl", "cl-te", "gzip-chunked", "identity"],
)
async def test_smuggling_framings_are_refused_and_the_connection_closed(
    start_router: StartRouter, framing: list[tuple[str, str]], code: int
) -> None:
    h = await start_router({"a": ["tenant-a"]})
    conn = await h.connect()
    smuggled = build_request(metric_path("tenant-a"), HPA_IDENTITY)
    data = build_request(metric_path("tenant-a"), [*HPA_IDENTITY, *framing])
    reply = await conn.send(data + b"3\r\nabc\r\n0\r\n\r\n" + smuggled)
    assert reply.status == code
    assert await rest_of_connection(conn) == b""
    assert h.seen_total() == 0


async def test_expect_100_continue_with_a_body_gets_a_final_answer(
    start_router: StartRouter,
) -> None:
    h = await start_router({"a": ["tenant-a"]})
    conn = await h.connect()
    head = build_request(
        metric_path("tenant-a"),
        [*HPA_IDENTITY, ("Expect", "100-continue"), ("Content-Length", "10")],
    )
    reply = await conn.send(head, within=5.0)  # the body is never sent
    assert reply.status == 200
    assert reply.headers["Connection"] == "close"
    assert await rest_of_connection(conn) == b""


async def test_an_unknown_expectation_is_417(start_router: StartRouter) -> None:
    h = await start_router({"a": ["tenant-a"]})
    reply = await h.request(metric_path("tenant-a"), [*HPA_IDENTITY, ("Expect", "telepathy")])
    assert reply.status == 417
    assert h.seen_total() == 0


# ---------------------------------------------------------------------------------- deadlines

FAST = [
    "--tls-handshake-timeout", "1s", "--read-header-timeout", "400ms",
    "--read-timeout", "0.4", "--idle-timeout", "400ms", "--write-timeout", "400ms",
]  # fmt: skip


async def test_a_silent_tcp_client_is_closed_at_the_handshake_deadline(
    start_router: StartRouter,
) -> None:
    h = await start_router({"a": ["tenant-a"]}, extra_args=FAST)
    reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
    try:
        assert await asyncio.wait_for(reader.read(), 5.0) == b""
    finally:
        writer.close()
    assert await h.sample("metrics_router_tls_handshake_failures_total", {"reason": "timeout"})


@pytest.mark.parametrize(
    ("cert", "data", "phase"),
    [
        ("front-proxy", b"GET /apis HTTP/1.1\r\nHost: x\r\nX-Rem", "head"),
        ("none", b"GET /apis HTTP/1.1\r\nHost: x\r\nX-Rem", "head"),
        ("front-proxy", b"GET /apis HTTP/1.1\r\nContent-Length: 1000\r\n\r\nx", "body"),
    ],
    ids=["head", "head-no-cert", "body"],
)
async def test_a_stalled_request_is_aborted_at_its_deadline(
    start_router: StartRouter, cert: str, data: bytes, phase: str
) -> None:
    h = await start_router({"a": ["tenant-a"]}, extra_args=FAST)
    conn = await h.connect(cert)  # type: ignore[arg-type]
    conn.writer.write(data)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await rest_of_connection(conn) == b""
    assert loop.time() - started < 3.0
    assert await h.sample("metrics_router_connection_timeouts_total", {"phase": phase}) == 1


async def test_a_client_without_certificate_gets_one_answer_at_its_head(
    start_router: StartRouter,
) -> None:
    h = await start_router({"a": ["tenant-a"]}, extra_args=FAST)
    conn = await h.connect("none")
    # Content-Length 1000 and one byte: answered at once, the body never waited for.
    reply = await conn.send(
        build_request(metric_path("tenant-a"), [*HPA_IDENTITY, ("Content-Length", "1000")]) + b"x"
    )
    assert reply.status == 401
    assert reply.headers["Connection"] == "close"
    assert await rest_of_connection(conn) == b""


async def test_health_without_certificate_is_answered_then_closed(
    start_router: StartRouter,
) -> None:
    h = await start_router({"a": ["tenant-a"]})
    conn = await h.connect("none")
    reply = await conn.send(build_request("/healthz") + build_request("/healthz"))
    assert reply.status == 200
    assert await rest_of_connection(conn) == b""


async def test_an_idle_keep_alive_connection_is_closed(start_router: StartRouter) -> None:
    h = await start_router({"a": ["tenant-a"]}, extra_args=FAST)
    conn = await h.connect()
    assert (await conn.request("/apis")).status == 200
    assert await rest_of_connection(conn) == b""
    assert await h.sample("metrics_router_connection_timeouts_total", {"phase": "idle"}) == 1


# ------------------------------------------------------------------------ clients that never read

PIPELINED = 100
BIG = b'{"kind":"ExternalMetricValueList","items":[],"pad":"' + b"x" * (1 << 20) + b'"}'


async def answered(h: object) -> float:
    sample = await h.sample("metrics_router_requests_total", {"tenant": "a", "code": "200"})  # type: ignore[attr-defined]
    return float(sample or 0)


async def test_a_client_that_never_reads_stops_being_read(start_router: StartRouter) -> None:
    h = await start_router({"a": ["tenant-a"]})
    h.stubs["a"].behaviour.body = BIG
    h.stubs["a"].behaviour.content_type = "application/json"
    conn = await h.connect()
    one = build_request(metric_path("tenant-a"), HPA_IDENTITY)
    conn.writer.write(one * PIPELINED)  # 100 answers of 1 MiB: 100 MiB if nothing stopped
    # Wait until the router stops answering: its write buffer is full and it stopped reading.
    count, previous = 0.0, -1.0
    while count != previous:
        await asyncio.sleep(0.2)
        previous, count = count, await answered(h)
    # Socket buffers on both sides (a few MiB on loopback) and the transport's hold a few.
    assert 0 < count < PIPELINED // 4, count
    assert len(h.stubs["a"].seen) == count  # nothing more was read or forwarded
    # Once the client reads, every request is answered, in order.
    for _ in range(PIPELINED):
        reply = await conn.read_reply()
        assert reply.status == 200
        assert len(reply.body) == len(BIG)


async def test_an_unread_answer_hits_the_write_deadline(start_router: StartRouter) -> None:
    h = await start_router({"a": ["tenant-a"]}, extra_args=FAST)
    h.stubs["a"].behaviour.body = BIG
    h.stubs["a"].behaviour.content_type = "application/json"
    conn = await h.connect()
    conn.writer.write(build_request(metric_path("tenant-a"), HPA_IDENTITY) * 64)

    async def aborted() -> None:
        while not await h.sample(  # noqa: ASYNC110  (a counter has no event to wait on)
            "metrics_router_connection_timeouts_total", {"phase": "write"}
        ):
            await asyncio.sleep(0.05)

    await asyncio.wait_for(aborted(), 5.0)


# ------------------------------------------------------------------------- connections, TLS


async def test_connections_over_the_cap_are_refused_before_tls(
    start_router: StartRouter,
) -> None:
    h = await start_router({"a": ["tenant-a"]}, extra_args=["--max-connections", "2"])
    first, second = await h.connect(), await h.connect()
    with pytest.raises((ConnectionError, ssl.SSLError, NoResponseError)):
        await RawConnection.open(h.port, client_ssl_context(h.pki))
    assert (
        await h.sample("metrics_router_connections_refused_total", {"reason": "max-connections"})
        == 1
    )
    assert (await first.request("/apis")).status == 200
    assert (await second.request("/apis")).status == 200


async def test_handshake_failures_are_counted_and_logged_rate_limited(
    start_router: StartRouter, caplog: pytest.LogCaptureFixture
) -> None:
    h = await start_router({"a": ["tenant-a"]})
    caplog.set_level(logging.WARNING, logger="router.http.server")

    async def rogue() -> None:
        conn = await RawConnection.open(h.port, client_ssl_context(h.pki, "rogue"))
        await conn.request("/apis")  # TLS 1.3: the refusal arrives on the first read

    for _ in range(3):
        with pytest.raises((ConnectionError, ssl.SSLError)):
            await rogue()
    samples = await h.sample(
        "metrics_router_tls_handshake_failures_total", {"reason": "unknown-ca"}
    )
    assert samples == 3
    lines = [r for r in caplog.records if r.getMessage() == "TLS handshake failed"]
    assert len(lines) == 1  # one line per reason per 10 s
    fields = lines[0].fields  # type: ignore[attr-defined]
    assert fields["peer"].startswith("127.0.0.1:")
    assert fields["reason"] == "unknown-ca"


async def test_access_log_has_httplog_fields(
    start_router: StartRouter, caplog: pytest.LogCaptureFixture
) -> None:
    h = await start_router({"a": ["tenant-a"]}, extra_args=["--access-log"])
    caplog.set_level(logging.INFO, logger="router.access")
    reply = await h.request(metric_path("tenant-a"), [*HPA_IDENTITY, ("Audit-ID", "abc-123")])
    assert reply.status == 200
    (record,) = [r for r in caplog.records if r.name == "router.access"]
    assert record.getMessage() == "HTTP"
    fields = record.fields  # type: ignore[attr-defined]
    assert {k: fields[k] for k in ("verb", "resp", "tenant", "namespace", "metric")} == {
        "verb": "GET", "resp": 200, "tenant": "a", "namespace": "tenant-a",
        "metric": "s0-prometheus",
    }  # fmt: skip
    assert fields["audit-ID"] == "abc-123"
    assert fields["user"] == USER
    assert fields["URI"] == metric_path("tenant-a")
    assert fields["srcIP"].startswith("127.0.0.1:")
    assert fields["upstream"].startswith("https://127.0.0.1:")
    assert fields["latency"].endswith("ms")
    assert list(fields)[:7] == ["verb", "URI", "latency", "userAgent", "audit-ID", "srcIP", "resp"]


async def test_no_access_log_by_default(
    start_router: StartRouter, caplog: pytest.LogCaptureFixture
) -> None:
    h = await start_router({"a": ["tenant-a"]})
    caplog.set_level(logging.INFO, logger="router.access")
    assert (await h.request(metric_path("tenant-a"))).status == 200
    assert not [r for r in caplog.records if r.name == "router.access"]


async def test_a_malformed_request_gets_a_status_without_parser_text(
    start_router: StartRouter,
) -> None:
    h = await start_router({"a": ["tenant-a"]})
    conn = await h.connect()
    reply = await conn.send(b"GET /apis HTTP/1.1\r\nHost: x\r\nNo colon here\r\n\r\n")
    assert reply.status == 400
    assert reply.json()["message"] == "malformed HTTP request: the request is not valid HTTP/1.1"
    assert await rest_of_connection(conn) == b""
