"""Who is refused, and how upstream failures become Status answers (real TLS on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import datetime
import logging
import ssl
from pathlib import Path

import pytest

from router.devtools.pki import Pki, issue_cert, make_ca
from router.http.server import RateLimitedLog
from tests.conftest import (
    HPA_IDENTITY,
    NoResponseError,
    Reply,
    StartRouter,
    answering,
    build_request,
    metric_path,
    raw_tls_upstream,
    start_with_upstream,
    wait_until,
)

pytestmark = pytest.mark.usefixtures("no_leftover_tasks")

SPOOFED = (
    ("X-Remote-User", "system:admin"),
    ("X-Remote-Group", "system:masters"),
    ("X-Remote-Extra-Scopes", "everything"),
)


def assert_status(reply: Reply, code: int, reason: str) -> dict[str, object]:
    assert reply.status == code, reply.body
    assert reply.content_type == "application/json"
    doc = reply.json()
    assert doc["kind"] == "Status"
    assert doc["apiVersion"] == "v1"
    assert doc["status"] == "Failure"
    assert doc["reason"] == reason
    assert doc["code"] == code
    assert isinstance(doc["message"], str)
    assert doc["message"]
    return doc  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- authentication


@pytest.mark.parametrize(
    "target",
    [
        metric_path("tenant-a"),
        metric_path("tenant-b", "s1-rabbitmq-queue") + "?labelSelector=a%3Db",
        "/apis/external.metrics.k8s.io/v1beta1",
        "/apis",
    ],
)
async def test_spoofed_identity_without_a_client_certificate_is_401(
    start_router: StartRouter, target: str
) -> None:
    h = await start_router({"a": ["tenant-a"], "b": ["tenant-b"]})
    reply = await h.request(target, SPOOFED, cert="none")
    assert_status(reply, 401, "Unauthorized")
    assert h.seen_total() == 0
    assert (
        await h.sample("metrics_router_unauthorized_requests_total", {"reason": "no-certificate"})
        == 1
    )


async def test_rogue_ca_certificate_fails_the_handshake(start_router: StartRouter) -> None:
    h = await start_router({"a": ["tenant-a"]})
    with pytest.raises((ssl.SSLError, ConnectionError)):
        # TLS 1.3: the server's alert may arrive only when the client reads.
        await h.request(metric_path("tenant-a"), SPOOFED, cert="rogue")
    assert h.seen_total() == 0
    # The router still serves the aggregator afterwards.
    assert (await h.request(metric_path("tenant-a"))).status == 200


@pytest.mark.parametrize("flaw", ["expired", "not-yet-valid", "server-only-usage"])
async def test_flawed_certificate_from_the_right_ca_fails_the_handshake(
    start_router: StartRouter, pki: Pki, tmp_path: Path, flaw: str
) -> None:
    ca = pki.load_pair(pki.requestheader_ca, pki.requestheader_ca_key)
    now = datetime.datetime.now(datetime.UTC)
    if flaw == "expired":
        pair = issue_cert(
            ca,
            "front-proxy-client",
            client=True,
            not_before=now - datetime.timedelta(days=30),
            not_after=now - datetime.timedelta(days=1),
        )
    elif flaw == "not-yet-valid":
        pair = issue_cert(
            ca,
            "front-proxy-client",
            client=True,
            not_before=now + datetime.timedelta(days=1),
            not_after=now + datetime.timedelta(days=30),
        )
    else:
        pair = issue_cert(ca, "front-proxy-client", server=True)
    files = (tmp_path / "flawed.crt", tmp_path / "flawed.key")
    pair.write(*files)
    h = await start_router({"a": ["tenant-a"]})
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await h.request(metric_path("tenant-a"), HPA_IDENTITY, cert=files)
    assert h.seen_total() == 0


async def test_certificate_from_the_ca_with_a_name_not_allowed_is_401(
    start_router: StartRouter,
) -> None:
    h = await start_router({"a": ["tenant-a"]})
    reply = await h.request(metric_path("tenant-a"), HPA_IDENTITY, cert="other")
    doc = assert_status(reply, 401, "Unauthorized")
    assert "not-the-aggregator" in str(doc["message"])
    assert h.seen_total() == 0
    assert (
        await h.sample("metrics_router_unauthorized_requests_total", {"reason": "name-not-allowed"})
        == 1
    )


async def test_not_allowed_name_is_refused_for_discovery_too(start_router: StartRouter) -> None:
    h = await start_router({"a": ["tenant-a"]})
    reply = await h.request("/apis/external.metrics.k8s.io/v1beta1", [], cert="other")
    assert_status(reply, 401, "Unauthorized")


async def test_empty_allowed_names_accept_any_certificate_from_the_ca(
    start_router: StartRouter,
) -> None:
    h = await start_router({"a": ["tenant-a"]}, extra_args=["--requestheader-allowed-names", ""])
    reply = await h.request(metric_path("tenant-a"), HPA_IDENTITY, cert="other")
    assert reply.status == 200, reply.body
    assert h.stubs["a"].seen[0].user == HPA_IDENTITY[0][1]
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await h.request(metric_path("tenant-a"), HPA_IDENTITY, cert="rogue")
    assert len(h.stubs["a"].seen) == 1


async def test_several_allowed_names(start_router: StartRouter) -> None:
    h = await start_router(
        {"a": ["tenant-a"]},
        extra_args=["--requestheader-allowed-names", "front-proxy-client, not-the-aggregator"],
    )
    assert (await h.request(metric_path("tenant-a"), cert="other")).status == 200
    assert (await h.request(metric_path("tenant-a"), cert="front-proxy")).status == 200


@pytest.mark.parametrize(
    "headers",
    [
        (),
        (("X-Remote-Group", "system:masters"), ("X-Remote-Uid", "1")),
        (("X-Remote-User", ""), ("X-Remote-Group", "system:authenticated")),
        (("X-Remote-Username", "alice"),),
    ],
)
async def test_verified_peer_without_a_user_is_401_and_nothing_is_forwarded(
    start_router: StartRouter, headers: tuple[tuple[str, str], ...]
) -> None:
    h = await start_router({"a": ["tenant-a"]})
    reply = await h.request(metric_path("tenant-a"), headers)
    assert_status(reply, 401, "Unauthorized")
    assert h.seen_total() == 0
    assert await h.sample("metrics_router_unauthorized_requests_total", {"reason": "no-user"}) == 1


# --------------------------------------------------------------------------- upstream failures


async def test_stopped_upstream_is_503_service_unavailable(start_router: StartRouter) -> None:
    h = await start_router({"a": ["tenant-a"], "b": ["tenant-b"]})
    assert (await h.request(metric_path("tenant-a"))).status == 200  # a pooled connection
    await h.stubs["a"].stop()
    doc = assert_status(await h.request(metric_path("tenant-a")), 503, "ServiceUnavailable")
    assert "'a'" in str(doc["message"])
    assert (await h.request(metric_path("tenant-b"))).status == 200
    assert (
        await h.sample(
            "metrics_router_upstream_errors_total", {"tenant": "a", "kind": "unreachable"}
        )
        == 1
    )


def test_rate_limited_log_logs_a_changed_state_at_once_and_counts_the_suppressed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = RateLimitedLog(10.0, logging.getLogger("router.test"))
    with caplog.at_level(logging.WARNING, logger="router.test"):
        log("a", 100.0, "failed %s", "x", state=("unreachable", ""))
        log("a", 101.0, "failed %s", "x", state=("unreachable", ""))  # suppressed
        log("b", 101.0, "failed %s", "y", state=("unreachable", ""))  # another key
        log("a", 102.0, "failed %s", "x", state=("unreachable", ""))  # suppressed
        log("a", 103.0, "failed %s", "z", state=("tls", "unknown-ca"))  # changed: at once
        log("a", 104.0, "failed %s", "z", state=("tls", "unknown-ca"))  # suppressed
        log("a", 113.5, "failed %s", "z", state=("tls", "unknown-ca"))  # period over
    assert [r.getMessage() for r in caplog.records] == [
        "failed x",
        "failed y",
        "failed z (2 similar suppressed)",
        "failed z (1 similar suppressed)",
    ]


async def test_a_tenant_outage_logs_one_line_not_one_per_request(
    start_router: StartRouter, caplog: pytest.LogCaptureFixture
) -> None:
    h = await start_router({"a": ["tenant-a"], "b": ["tenant-b"]})
    await h.stubs["a"].stop()
    with caplog.at_level(logging.WARNING, logger="router.proxy"):
        for _ in range(5):
            assert (await h.request(metric_path("tenant-a"))).status == 503
        await h.stubs["b"].stop()
        assert (await h.request(metric_path("tenant-b"))).status == 503
    records = [r for r in caplog.records if r.name == "router.proxy"]
    assert [r.getMessage() for r in records] == ["upstream error", "upstream error"]
    first, second = (r.fields for r in records)  # type: ignore[attr-defined]
    assert first["tenant"] == "a"
    assert first["namespace"] == "tenant-a"
    assert first["upstream"].startswith("https://127.0.0.1:")
    assert first["kind"] == "unreachable"
    assert second["tenant"] == "b"
    assert (
        await h.sample(
            "metrics_router_upstream_errors_total", {"tenant": "a", "kind": "unreachable"}
        )
        == 5
    )


async def test_upstream_slower_than_the_timeout_is_504(start_router: StartRouter) -> None:
    h = await start_router(
        {"a": ["tenant-a"], "b": ["tenant-b"]}, extra_args=["--upstream-timeout", "0.3"]
    )
    h.stubs["a"].behaviour.hang = True
    loop = asyncio.get_running_loop()
    started = loop.time()
    doc = assert_status(await h.request(metric_path("tenant-a")), 504, "Timeout")
    elapsed = loop.time() - started
    assert 0.25 <= elapsed < 3.0
    assert "0.3s" in str(doc["message"])
    assert (
        await h.sample("metrics_router_upstream_errors_total", {"tenant": "a", "kind": "timeout"})
        == 1
    )
    # The next request to the same tenant is not poisoned by the abandoned connection.
    h.stubs["a"].behaviour.hang = False
    assert (await h.request(metric_path("tenant-a"))).status == 200


async def test_upstream_delay_within_the_timeout_is_fine(start_router: StartRouter) -> None:
    h = await start_router({"a": ["tenant-a"]}, extra_args=["--upstream-timeout", "2"])
    h.stubs["a"].behaviour.delay = 0.2
    assert (await h.request(metric_path("tenant-a"))).status == 200


def _foreign_serving_cert(directory: Path) -> tuple[Path, Path]:
    ca = make_ca("some other CA")
    pair = issue_cert(
        ca, "127.0.0.1", server=True, dns_names=["localhost"], ip_addresses=["127.0.0.1"]
    )
    cert, key = directory / "foreign.crt", directory / "foreign.key"
    pair.write(cert, key)
    return cert, key


async def test_upstream_certificate_from_the_wrong_ca_is_502(
    start_router: StartRouter, tmp_path: Path
) -> None:
    cert, key = _foreign_serving_cert(tmp_path)
    h = await start_router(
        {"a": ["tenant-a"], "b": ["tenant-b"]},
        stub_kwargs={"a": {"cert_file": cert, "key_file": key}},
    )
    doc = assert_status(await h.request(metric_path("tenant-a")), 502, "InternalError")
    assert "certificate" in str(doc["message"])
    assert h.stubs["a"].seen == []
    assert (await h.request(metric_path("tenant-b"))).status == 200
    assert (
        await h.sample("metrics_router_upstream_errors_total", {"tenant": "a", "kind": "tls"}) == 1
    )


async def test_upstream_certificate_with_the_wrong_name_is_502(start_router: StartRouter) -> None:
    h = await start_router({"a": ["tenant-a"], "b": ["tenant-b"]})
    routes = h.routes_for({"a": ["tenant-a"], "b": ["tenant-b"]})
    # a's stub serves a's certificate; expecting b's KEDA Service name must fail.
    routes["a"] = (["tenant-a"], h.stubs["a"].url, "keda-operator-metrics-apiserver.b--sys.svc")
    routes["b"] = (["tenant-b"], h.stubs["b"].url, "keda-operator-metrics-apiserver.b--sys.svc")
    h.write_routes(routes)
    h.router.check_files()
    assert_status(await h.request(metric_path("tenant-a")), 502, "InternalError")
    assert h.stubs["a"].seen == []
    # The right serverName verifies.
    assert (await h.request(metric_path("tenant-b"))).status == 200


async def test_upstream_refusing_the_routers_client_certificate_is_502(
    start_router: StartRouter, pki: Pki
) -> None:
    # a's upstream trusts another client CA than the router's: the handshake fails.
    h = await start_router(
        {"a": ["tenant-a"], "b": ["tenant-b"]}, stub_kwargs={"a": {"client_ca_file": pki.rogue_ca}}
    )
    assert_status(await h.request(metric_path("tenant-a")), 502, "InternalError")
    assert h.stubs["a"].seen == []
    assert (await h.request(metric_path("tenant-b"))).status == 200


async def test_upstream_dropping_the_connection_is_502(start_router: StartRouter) -> None:
    h = await start_router({"a": ["tenant-a"], "b": ["tenant-b"]})
    h.stubs["a"].behaviour.drop = True
    assert_status(await h.request(metric_path("tenant-a")), 502, "InternalError")
    assert len(h.stubs["a"].seen) >= 1
    assert (
        await h.sample("metrics_router_upstream_errors_total", {"tenant": "a", "kind": "protocol"})
        == 1
    )
    assert (await h.request(metric_path("tenant-b"))).status == 200
    h.stubs["a"].behaviour.drop = False
    assert (await h.request(metric_path("tenant-a"))).status == 200


@pytest.mark.parametrize(
    "answer",
    [
        b"NOT HTTP AT ALL\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\ntruncated",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
        b"",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    ],
)
async def test_broken_upstream_responses_are_502(
    start_router: StartRouter, pki: Pki, answer: bytes
) -> None:
    async with raw_tls_upstream(pki, answering(answer)) as upstream:
        h = await start_with_upstream(start_router, upstream.url)
        assert_status(await h.request(metric_path("tenant-a")), 502, "InternalError")
        assert (await h.request(metric_path("tenant-b"))).status == 200


async def test_upstream_response_ending_at_eof_is_relayed_whole(
    start_router: StartRouter, pki: Pki
) -> None:
    body = b'{"kind":"ExternalMetricValueList","items":[]}' * 50

    async with raw_tls_upstream(
        pki, answering(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n" + body)
    ) as upstream:
        h = await start_with_upstream(start_router, upstream.url)
        reply = await h.request(metric_path("tenant-a"))
        assert reply.status == 200
        assert reply.body == body
        assert reply.headers["Content-Length"] == str(len(body))


async def test_interim_1xx_answer_is_not_relayed_as_the_final_answer(
    start_router: StartRouter, pki: Pki
) -> None:
    answer = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    )
    async with raw_tls_upstream(pki, answering(answer)) as upstream:
        h = await start_with_upstream(start_router, upstream.url)
        reply = await h.request(metric_path("tenant-a"))
        # Either the final answer or a 502: never the interim 100 as if it were the answer.
        assert (reply.status, reply.body) == (200, b"{}") or reply.status == 502


async def test_chunked_upstream_response_is_relayed_with_its_bytes(
    start_router: StartRouter, pki: Pki
) -> None:
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.kubernetes.protobuf\r\n"
        b"Transfer-Encoding: chunked\r\nX-Upstream: yes\r\n\r\n"
        b"4\r\nk8s\x00\r\n3\r\n\x01\x02\x03\r\n0\r\n\r\n"
    )
    async with raw_tls_upstream(pki, answering(answer)) as upstream:
        h = await start_with_upstream(start_router, upstream.url)
        reply = await h.request(metric_path("tenant-a"))
        assert reply.status == 200
        assert reply.body == b"k8s\x00\x01\x02\x03"
        assert reply.content_type == "application/vnd.kubernetes.protobuf"
        assert reply.headers["X-Upstream"] == "yes"
        assert "Transfer-Encoding" not in reply.headers


# --------------------------------------------------------------------------- isolation


async def test_a_hanging_tenant_gets_fast_429s_while_others_keep_answering(
    start_router: StartRouter,
) -> None:
    h = await start_router(
        {"a": ["tenant-a"], "b": ["tenant-b"]}, extra_args=["--max-inflight-per-tenant", "2"]
    )
    h.stubs["a"].behaviour.hang = True
    hung = [asyncio.create_task(h.request(metric_path("tenant-a"), within=30)) for _ in range(2)]
    await h.stubs["a"].wait_for_requests(2)
    assert await h.sample("metrics_router_inflight_requests", {"tenant": "a"}) == 2

    loop = asyncio.get_running_loop()
    for _ in range(3):
        started = loop.time()
        reply = await h.request(metric_path("tenant-a"), within=2)
        assert loop.time() - started < 1.0
        assert_status(reply, 429, "TooManyRequests")
        assert reply.headers["Retry-After"] == "1"
    # Tenant b is not affected: up to its own limit in parallel, then one after another.
    replies = await asyncio.gather(
        *(h.request(metric_path("tenant-b"), within=2) for _ in range(2))
    )
    replies += [await h.request(metric_path("tenant-b"), within=2) for _ in range(3)]
    assert [r.status for r in replies] == [200] * 5
    assert len(h.stubs["a"].seen) == 2  # the refused requests never reached a's upstream
    assert (
        await h.sample(
            "metrics_router_upstream_errors_total", {"tenant": "a", "kind": "overloaded"}
        )
        == 3
    )

    # Release the hung requests: the slots are given back (the next answer is no 429).
    await h.stubs["a"].stop()
    for reply in await asyncio.gather(*hung):
        assert reply.status in (502, 503)
    assert await h.sample("metrics_router_inflight_requests", {"tenant": "a"}) == 0
    assert_status(await h.request(metric_path("tenant-a")), 503, "ServiceUnavailable")


async def test_a_client_going_away_does_not_leak_an_inflight_slot(
    start_router: StartRouter,
) -> None:
    h = await start_router(
        {"a": ["tenant-a"]},
        extra_args=["--max-inflight-per-tenant", "1", "--upstream-timeout", "0.3"],
    )
    h.stubs["a"].behaviour.hang = True
    conn = await h.connect()
    conn.writer.write(build_request(metric_path("tenant-a"), HPA_IDENTITY))
    await h.stubs["a"].wait_for_requests(1)
    conn.writer.transport.abort()

    def released() -> bool:
        value = h.router.registry.get_sample_value(
            "metrics_router_inflight_requests", {"tenant": "a"}
        )
        return value == 0

    await wait_until(released, within=5)
    h.stubs["a"].behaviour.hang = False
    assert (await h.request(metric_path("tenant-a"))).status == 200


# --------------------------------------------------------------------------- never a 500


@pytest.mark.parametrize(
    "raw",
    [
        b"GET https://127.0.0.1" + metric_path("tenant-a").encode() + b" HTTP/1.1\r\n",
        b"OPTIONS * HTTP/1.1\r\n",
        b"GET /apis/external.metrics.k8s.io/v1beta1/namespaces/tenant-a/s0?q=%ZZ HTTP/1.1\r\n",
        b"GET /apis/external.metrics.k8s.io/v1beta1/namespaces/tenant-a/s0?q=\xff\xfe HTTP/1.1\r\n",
        b"GET /apis/external.metrics.k8s.io/v1beta1/namespaces/tenant-\xc3\xa9/s0 HTTP/1.1\r\n",
        b"GET /apis/external.metrics.k8s.io/v1beta1/namespaces/tenant-a/s0#frag HTTP/1.1\r\n",
        b"GET /apis/external.metrics.k8s.io/v1beta1/namespaces/tenant-a/s0 HTTP/1.0\r\n",
        b"HEAD /apis/external.metrics.k8s.io/v1beta1/namespaces/tenant-a/s0 HTTP/1.1\r\n",
        b"BREW /apis HTTP/1.1\r\n",
        b"GET /healthz?x=1 HTTP/1.1\r\n",
    ],
)
async def test_odd_requests_never_get_a_500(start_router: StartRouter, raw: bytes) -> None:
    h = await start_router({"a": ["tenant-a"]})
    conn = await h.connect()
    head = (
        raw
        + b"Host: 127.0.0.1\r\n"
        + build_request("/", HPA_IDENTITY, host=None).split(b"\r\n", 1)[1]
    )
    try:
        reply = await conn.send(head, within=5)
    except NoResponseError:
        return  # the server closed the connection: no 500 either
    assert reply.status < 500, (raw, reply.status, reply.body)


async def test_non_ascii_identity_values_pass_byte_for_byte(start_router: StartRouter) -> None:
    h = await start_router({"a": ["tenant-a"]})
    conn = await h.connect()
    head = (
        b"GET " + metric_path("tenant-a").encode() + b" HTTP/1.1\r\nHost: x\r\n"
        b"X-Remote-User: j\xc3\xa9r\xc3\xb4me\r\nX-Remote-Group: gr\xfcppe\r\n\r\n"
    )
    reply = await conn.send(head)
    assert reply.status == 200
    (seen,) = h.stubs["a"].seen
    # The stub decodes header bytes as latin-1: compare the bytes.
    assert seen.header("X-Remote-User")[0].encode("latin-1") == b"j\xc3\xa9r\xc3\xb4me"
    assert seen.header("X-Remote-Group")[0].encode("latin-1") == b"gr\xfcppe"


async def test_remembered_path_classifications_still_route_and_refuse_each_time(
    start_router: StartRouter,
) -> None:
    """The proxy remembers how each metric path classifies: routing, the in-flight limit and
    refusals still happen on every request."""
    h = await start_router({"a": ["tenant-a"], "b": ["tenant-b"]})
    for _ in range(3):
        assert (await h.request(metric_path("tenant-a"))).status == 200
        assert (await h.request(metric_path("tenant-a", "s1-other") + "?x=1")).status == 200
        assert_status(await h.request(metric_path("tenant-zz")), 404, "NotFound")
        assert_status(await h.request(metric_path("Tenant_A")), 400, "BadRequest")
    h.write_routes(h.routes_for({"b": ["tenant-b"]}))
    h.router.check_files()
    assert_status(await h.request(metric_path("tenant-a")), 404, "NotFound")
