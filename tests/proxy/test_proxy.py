"""The request path end to end: aggregator -> router -> tenant KEDA stubs, real TLS on 127.0.0.1."""

from __future__ import annotations

import asyncio
import ssl

import aiohttp
import pytest
from yarl import URL

from router.core import status
from router.devtools.pki import Pki
from router.proxy import IdentityHeaders, forward_headers
from router.settings.serve import RequestHeaderSettings
from tests.conftest import (
    HPA_IDENTITY,
    METRIC_PREFIX,
    ClientCert,
    NoResponseError,
    RawConnection,
    StartRouter,
    answering,
    build_request,
    client_ssl_context,
    metric_path,
    raw_tls_upstream,
    start_with_upstream,
)
from tests.proxy.conftest import SessionFactory

pytestmark = pytest.mark.usefixtures("no_leftover_tasks")

AGGREGATOR_ACCEPT = (
    "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json"
)
PROTOBUF = "application/vnd.kubernetes.protobuf"


def _without_host(headers: tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers if k.lower() != "host"]


# --------------------------------------------------------------------------- routing


async def test_each_namespace_lands_on_its_own_tenants_stub(start_router: StartRouter) -> None:
    tenants = {f"t{i}": [f"t{i}-prod", f"t{i}-dev", f"team-{i}"] for i in range(6)}
    h = await start_router(
        tenants, stub_kwargs={t: {"value": f"{i}00m"} for i, t in enumerate(tenants)}
    )
    conn = await h.connect()
    expected: dict[str, list[str]] = {t: [] for t in tenants}
    # Interleave tenants so a routing mix-up cannot hide behind request order.
    for ns_index in range(3):
        for i, (tenant, namespaces) in enumerate(tenants.items()):
            ns = namespaces[ns_index]
            path = metric_path(ns, f"s{i}-prometheus")
            reply = await conn.request(path, HPA_IDENTITY)
            assert reply.status == 200, reply.body
            assert reply.headers["X-Stub-Tenant"] == tenant
            (item,) = reply.json()["items"]
            assert item["value"] == f"{i}00m"
            assert item["metricName"] == f"s{i}-prometheus"
            expected[tenant].append(path)
    for tenant, stub in h.stubs.items():
        assert [s.raw_path for s in stub.seen] == expected[tenant]


async def test_identity_and_request_headers_arrive_byte_for_byte_in_order(
    start_router: StartRouter,
) -> None:
    h = await start_router()
    sent = [
        ("User-Agent", "kube-controller-manager/v1.33.1 (linux/amd64) kubernetes/8adc0f0"),
        ("Accept", f"{PROTOBUF}, application/json"),
        ("Audit-ID", "9b0f1c2e-0d4e-4e8f-8c3b-0a6f5c6d7e8f"),
        ("X-Forwarded-For", "10.0.0.7"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Uri", metric_path("tenant-b")),
        ("X-Remote-User", "system:serviceaccount:kube-system:horizontal-pod-autoscaler"),
        ("X-Remote-Uid", "6b1c1e5e-2f4a-4c1e-9a53-0d7b5a0c9e11"),
        ("X-Remote-Group", "system:serviceaccounts"),
        ("x-remote-group", "system:authenticated"),
        ("X-REMOTE-GROUP", "tenants:b"),
        ("X-Remote-Extra-Acme.com%2Fproject", "blue"),
        ("X-Remote-Extra-Acme.com%2Fproject", "green"),
        ("X-Remote-Extra-authentication.kubernetes.io%2Fcredential-id", "JTI=abc%20def"),
        ("X-Remote-Extra-Scopes", "view, edit"),
        ("Accept-Encoding", "gzip"),
    ]
    reply = await h.request(metric_path("tenant-b"), sent)
    assert reply.status == 200, reply.body
    (seen,) = h.stubs["b"].seen
    assert _without_host(seen.headers) == sent
    assert seen.user == "system:serviceaccount:kube-system:horizontal-pod-autoscaler"
    assert seen.uid == "6b1c1e5e-2f4a-4c1e-9a53-0d7b5a0c9e11"
    assert seen.groups == ("system:serviceaccounts", "system:authenticated", "tenants:b")
    assert seen.extras_dict["acme.com/project"] == ("blue", "green")
    assert seen.header("Audit-ID") == ["9b0f1c2e-0d4e-4e8f-8c3b-0a6f5c6d7e8f"]
    # The Host upstream is the upstream's own name, not the router's.
    assert seen.header("Host") == [f"127.0.0.1:{h.stubs['b'].port}"]
    assert not h.stubs["a"].seen
    assert not h.stubs["c"].seen


@pytest.mark.parametrize(
    "query",
    [
        "?labelSelector=scaledobject.keda.sh%2Fname%3Dapp",
        "?labelSelector=env%20in%20(prod%2Cstaging),tier!=db&x=%E2%9C%93",
        "?labelSelector=a%3Db&labelSelector=c%3Dd&empty=&flag",
        "?q=%25%2F%3F%23%26%2B+plus",
        "?",
    ],
)
async def test_query_string_arrives_exactly(start_router: StartRouter, query: str) -> None:
    h = await start_router({"a": ["tenant-a"]})
    path = metric_path("tenant-a") + query
    reply = await h.request(path)
    assert reply.status == 200, reply.body
    (seen,) = h.stubs["a"].seen
    assert seen.raw_path == path


async def test_label_selector_reaches_the_upstream_decoded_once(
    start_router: StartRouter,
) -> None:
    h = await start_router({"a": ["tenant-a"]})
    reply = await h.request(
        metric_path("tenant-a", "s0-rabbitmq-queue")
        + "?labelSelector=scaledobject.keda.sh%2Fname%3Dworker"
    )
    doc = reply.json()
    assert doc["kind"] == "ExternalMetricValueList"
    assert doc["items"][0]["metricLabels"] == {"scaledobject.keda.sh/name": "worker"}


async def test_protobuf_accept_and_binary_body_pass_through_untouched(
    start_router: StartRouter,
) -> None:
    body = b"k8s\x00" + bytes(range(256)) * 8 + b"\r\n\r\n\x00"
    h = await start_router({"a": ["tenant-a"]})
    h.stubs["a"].behaviour.body = body
    h.stubs["a"].behaviour.content_type = PROTOBUF
    reply = await h.request(metric_path("tenant-a"), [*HPA_IDENTITY, ("Accept", PROTOBUF)])
    assert reply.status == 200
    assert reply.body == body
    assert reply.content_type == PROTOBUF
    assert reply.headers["Content-Length"] == str(len(body))
    assert h.stubs["a"].seen[0].header("Accept") == [PROTOBUF]


@pytest.mark.parametrize(
    ("code", "reason"), [(403, "Forbidden"), (404, "NotFound"), (429, "TooManyRequests")]
)
async def test_upstream_status_errors_pass_through_unchanged(
    start_router: StartRouter, code: int, reason: str
) -> None:
    h = await start_router({"a": ["tenant-a"]})
    message = (
        'externalmetrics.external.metrics.k8s.io "s0-prometheus" is forbidden: User "bob" cannot '
        'get resource "externalmetrics" in API group "external.metrics.k8s.io"'
    )
    h.stubs["a"].behaviour.fail_status = code
    h.stubs["a"].behaviour.fail_message = message
    reply = await h.request(metric_path("tenant-a"))
    direct = await h.direct("a", metric_path("tenant-a"))
    assert direct.status == code
    assert direct.json()["reason"] == reason
    assert reply.status == code
    assert reply.body == direct.body  # the upstream's bytes, not a re-encoding
    assert reply.content_type == direct.content_type
    stub_headers = [(k, v) for k, v in direct.raw_headers if k.startswith("X-Stub-")]
    assert [(k, v) for k, v in reply.raw_headers if k.startswith("X-Stub-")] == stub_headers


async def test_success_answers_pass_through_unchanged(start_router: StartRouter) -> None:
    h = await start_router({"a": ["tenant-a"]})
    h.stubs["a"].behaviour.body = b'{"kind":"ExternalMetricValueList" ,  "items":[]}'
    reply = await h.request(metric_path("tenant-a"))
    direct = await h.direct("a", metric_path("tenant-a"))
    assert (reply.status, reply.body, reply.content_type) == (
        direct.status,
        direct.body,
        direct.content_type,
    )
    assert reply.body == b'{"kind":"ExternalMetricValueList" ,  "items":[]}'


async def test_upstream_response_without_content_type_gets_none_added(
    start_router: StartRouter, pki: Pki
) -> None:
    async with raw_tls_upstream(
        pki, answering(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n\x00\x01\x02\x03")
    ) as upstream:
        h = await start_with_upstream(start_router, upstream.url)
        reply = await h.request(metric_path("tenant-a"))
    assert reply.status == 200
    assert reply.body == b"\x00\x01\x02\x03"
    assert "Content-Type" not in reply.headers, reply.raw_headers


async def test_upstream_response_header_bytes_pass_through_unchanged(
    start_router: StartRouter, pki: Pki
) -> None:
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\n"
        b'Content-Length: 2\r\nWarning: 299 - "caf\xc3\xa9"\r\nX-Latin: \xe9t\xe9\r\n\r\n{}'
    )

    async with raw_tls_upstream(pki, answering(head)) as upstream:
        h = await start_with_upstream(start_router, upstream.url)
        conn = await h.connect()
        conn.writer.write(build_request(metric_path("tenant-a"), HPA_IDENTITY))
        data = b""
        while not data.endswith(b"{}"):
            chunk = await asyncio.wait_for(conn.reader.read(4096), 5)
            assert chunk
            data += chunk
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b'\r\nWarning: 299 - "caf\xc3\xa9"\r\n' in data
    assert b"\r\nX-Latin: \xe9t\xe9\r\n" in data


async def test_the_upstreams_audit_id_is_not_relayed(start_router: StartRouter, pki: Pki) -> None:
    """kube-apiserver sets its own Audit-Id on the answer; a relayed one would appear twice."""
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        b"Audit-Id: 11111111-2222-3333-4444-555555555555\r\nX-Kept: 1\r\n"
        b"Content-Length: 2\r\n\r\n{}"
    )
    async with raw_tls_upstream(pki, answering(head)) as upstream:
        h = await start_with_upstream(start_router, upstream.url)
        reply = await h.request(metric_path("tenant-a"))
    assert reply.status == 200
    names = [name.lower() for name, _ in reply.raw_headers]
    assert "audit-id" not in names, reply.raw_headers
    assert "x-kept" in names


async def test_request_body_is_never_forwarded_or_parsed_as_a_request(
    start_router: StartRouter,
) -> None:
    h = await start_router({"a": ["tenant-a"], "b": ["tenant-b"]})
    conn = await h.connect()
    smuggled = build_request(metric_path("tenant-b"), HPA_IDENTITY)
    head = build_request(
        metric_path("tenant-a"), [*HPA_IDENTITY, ("Content-Length", str(len(smuggled)))]
    )
    reply = await conn.send(head + smuggled)
    assert reply.headers["X-Stub-Tenant"] == "a"
    chunked = build_request(
        metric_path("tenant-a"), [*HPA_IDENTITY, ("Transfer-Encoding", "chunked")]
    )
    body = f"{len(smuggled):x}\r\n".encode() + smuggled + b"\r\n0\r\n\r\n"
    reply = await conn.send(chunked + body)
    assert reply.headers["X-Stub-Tenant"] == "a"
    reply = await conn.request(metric_path("tenant-a"), HPA_IDENTITY)
    assert reply.headers["X-Stub-Tenant"] == "a"
    assert h.stubs["b"].seen == []
    assert len(h.stubs["a"].seen) == 3
    for seen in h.stubs["a"].seen:
        names = {k.lower() for k, _ in seen.headers}
        assert "transfer-encoding" not in names
        assert seen.header("Content-Length") in ([], ["0"])


async def test_upstream_sees_the_routers_client_certificate(start_router: StartRouter) -> None:
    h = await start_router({"a": ["tenant-a"]})
    reply = await h.request(metric_path("tenant-a"))
    assert reply.status == 200
    assert h.stubs["a"].seen[0].peer_cn == "metrics-router"
    assert reply.headers["X-Stub-Peer-CN"] == "metrics-router"


# --------------------------------------------------------------------------- header hygiene


async def test_credentials_impersonation_and_hop_by_hop_headers_are_not_forwarded(
    start_router: StartRouter,
) -> None:
    h = await start_router({"a": ["tenant-a"]})
    dropped = [
        ("Authorization", "Bearer secret-token"),
        ("Impersonate-User", "system:admin"),
        ("Impersonate-Group", "system:masters"),
        ("Impersonate-Uid", "0"),
        ("Impersonate-Extra-Scopes", "all"),
        ("Cookie", "session=abc"),
        ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
        ("Proxy-Connection", "keep-alive"),
        ("Keep-Alive", "timeout=5"),
        ("TE", "trailers"),
        ("Trailer", "X-Checksum"),
        ("Upgrade", "h2c"),
        ("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA"),
        ("Connection", "keep-alive, X-Private-Hop"),
        ("X-Private-Hop", "do-not-forward"),
    ]
    kept = [("X-Custom", "kept"), *HPA_IDENTITY]
    reply = await h.request(
        metric_path("tenant-a"), [*dropped[:7], kept[0], *dropped[7:], *kept[1:]]
    )
    assert reply.status == 200, reply.body
    (seen,) = h.stubs["a"].seen
    names = {k.lower() for k, _ in seen.headers}
    for name, _ in dropped:
        assert name.lower() not in names, name
    assert _without_host(seen.headers) == kept


@pytest.mark.parametrize(
    "connection",
    [
        "X-Remote-User, X-Remote-Group",
        "x-remote-uid,x-remote-extra-acme.com%2fproject",
        "close, X-Remote-User, X-Remote-Uid, X-Remote-Group, X-Remote-Extra-Acme.com%2Fproject",
    ],
)
async def test_connection_header_cannot_drop_or_alter_identity(
    start_router: StartRouter, connection: str
) -> None:
    h = await start_router({"a": ["tenant-a"]})
    reply = await h.request(metric_path("tenant-a"), [("Connection", connection), *HPA_IDENTITY])
    assert reply.status == 200, reply.body
    (seen,) = h.stubs["a"].seen
    assert _without_host(seen.headers) == list(HPA_IDENTITY)


async def test_custom_username_header_is_renamed_and_a_literal_x_remote_user_dropped(
    start_router: StartRouter,
) -> None:
    h = await start_router(
        {"a": ["tenant-a"]},
        extra_args=[
            "--requestheader-username-headers", "X-Aggregator-User",
            "--requestheader-group-headers", "X-Aggregator-Group",
            "--requestheader-extra-headers-prefix", "X-Aggregator-Extra-",
        ],
    )  # fmt: skip
    sent = [
        ("X-Remote-User", "mallory"),
        ("X-Aggregator-User", "alice"),
        ("X-Remote-Group", "system:masters"),
        ("X-Aggregator-Group", "devs"),
        ("X-Aggregator-Group", "system:authenticated"),
        ("X-Aggregator-Extra-Acme.com%2Fproject", "blue"),
        ("X-Remote-Extra-Scopes", "root"),
        ("X-Remote-Uid", "1000"),
    ]
    reply = await h.request(metric_path("tenant-a"), sent)
    assert reply.status == 200, reply.body
    (seen,) = h.stubs["a"].seen
    assert _without_host(seen.headers) == [
        ("X-Remote-User", "alice"),
        ("X-Remote-Group", "devs"),
        ("X-Remote-Group", "system:authenticated"),
        ("X-Remote-Extra-Acme.com%2Fproject", "blue"),
        ("X-Remote-Uid", "1000"),
    ]
    assert seen.user == "alice"
    assert "system:masters" not in seen.groups
    assert "scopes" not in seen.extras_dict


async def test_custom_username_header_alone_is_not_a_user(start_router: StartRouter) -> None:
    h = await start_router(
        {"a": ["tenant-a"]}, extra_args=["--requestheader-username-headers", "X-Aggregator-User"]
    )
    reply = await h.request(metric_path("tenant-a"), [("X-Remote-User", "mallory")])
    assert reply.status == 401
    assert reply.json()["reason"] == "Unauthorized"
    assert h.seen_total() == 0


def test_forward_headers_pure() -> None:
    ids = IdentityHeaders.from_settings(RequestHeaderSettings())
    raw = (
        (b"Connection", b"X-Remote-User, Foo"),
        (b"X-Remote-User", b"alice"),
        (b"Foo", b"dropped"),
        (b"Host", b"router:443"),
        (b"Content-Length", b"0"),
        (b"Impersonate-User", b"root"),
        (b"X-Remote-Group", b"g1"),
        (b"Bar", b"kept"),
    )
    fwd = forward_headers(raw, ids)
    assert fwd.has_user
    assert fwd.headers == b"X-Remote-User: alice\r\nX-Remote-Group: g1\r\nBar: kept\r\n"
    assert not forward_headers(((b"X-Remote-User", b""),), ids).has_user
    assert not forward_headers(((b"X-Remote-Group", b"g"),), ids).has_user


# --------------------------------------------------------------------------- local answers


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
async def test_other_methods_are_405(start_router: StartRouter, method: str) -> None:
    h = await start_router({"a": ["tenant-a"]})
    reply = await h.request(
        metric_path("tenant-a"), [*HPA_IDENTITY, ("Content-Length", "0")], method=method
    )
    assert reply.status == 405
    doc = reply.json()
    assert (doc["kind"], doc["reason"], doc["code"]) == ("Status", "MethodNotAllowed", 405)
    assert reply.headers["Allow"] == "GET"
    assert h.seen_total() == 0


@pytest.mark.parametrize(
    "target",
    [
        f"{METRIC_PREFIX}/Tenant-A/s0-prometheus",
        f"{METRIC_PREFIX}/tenant_a/s0-prometheus",
        f"{METRIC_PREFIX}/../s0-prometheus",
        f"{METRIC_PREFIX}/tenant-a/../tenant-b/s0-prometheus",
        f"{METRIC_PREFIX}/tenant-a/..",
        "/apis/external.metrics.k8s.io/v1beta1/namespaces/tenant-a%2F..%2Ftenant-b/s0",
        f"{METRIC_PREFIX}/tenant-a%2Fx/s0-prometheus",
        f"{METRIC_PREFIX}/tenant-a/s0%2Fprometheus",
        f"{METRIC_PREFIX}/tenant-a/s0..x",
        f"{METRIC_PREFIX}/tenant-a/-s0",
        f"{METRIC_PREFIX}/tenant-a/{'m' * 300}",
        "/apis/external.metrics.k8s.io/%2e%2e/x",
        "//apis",
    ],
)
async def test_malformed_paths_are_400_and_never_forwarded(
    start_router: StartRouter, target: str
) -> None:
    h = await start_router({"a": ["tenant-a"], "b": ["tenant-b"]})
    reply = await h.request(target)
    assert reply.status == 400, (target, reply.body)
    doc = reply.json()
    assert (doc["kind"], doc["reason"], doc["code"]) == ("Status", "BadRequest", 400)
    assert reply.content_type == "application/json"
    assert h.seen_total() == 0


async def test_unknown_namespace_is_404_not_found(start_router: StartRouter) -> None:
    h = await start_router({"a": ["tenant-a"]})
    reply = await h.request(metric_path("tenant-z"))
    assert reply.status == 404
    doc = reply.json()
    assert (doc["kind"], doc["reason"], doc["code"]) == ("Status", "NotFound", 404)
    assert "tenant-z" in doc["message"]
    assert h.seen_total() == 0


@pytest.mark.parametrize(
    "target",
    [
        "/",
        "/api/v1/namespaces/tenant-a/pods",
        "/apis/custom.metrics.k8s.io/v1beta2",
        "/apis/external.metrics.k8s.io/v1beta2/namespaces/tenant-a/s0",
        f"{METRIC_PREFIX}/tenant-a",
        f"{METRIC_PREFIX}/tenant-a/s0-prometheus/extra",
        "/metrics",
    ],
)
async def test_unknown_paths_are_404(start_router: StartRouter, target: str) -> None:
    h = await start_router({"a": ["tenant-a"]})
    reply = await h.request(target)
    assert reply.status == 404
    assert reply.json()["reason"] == "NotFound"
    assert h.seen_total() == 0


async def test_discovery_apis_legacy(start_router: StartRouter) -> None:
    h = await start_router({"a": ["tenant-a"]})
    reply = await h.request("/apis", [*HPA_IDENTITY, ("Accept", "application/json, */*")])
    assert reply.status == 200
    assert reply.content_type == "application/json"
    doc = reply.json()
    assert doc["kind"] == "APIGroupList"
    (group,) = doc["groups"]
    assert group["name"] == "external.metrics.k8s.io"
    assert group["preferredVersion"]["groupVersion"] == "external.metrics.k8s.io/v1beta1"
    assert h.seen_total() == 0


async def test_discovery_apis_aggregated_v2(start_router: StartRouter) -> None:
    h = await start_router({"a": ["tenant-a"]})
    identity = [("X-Remote-User", "system:kube-aggregator"), ("X-Remote-Group", "system:masters")]
    reply = await h.request("/apis", [*identity, ("Accept", AGGREGATOR_ACCEPT)])
    assert reply.status == 200
    assert reply.content_type == status.DISCOVERY_V2
    doc = reply.json()
    assert doc["kind"] == "APIGroupDiscoveryList"
    assert doc["apiVersion"] == "apidiscovery.k8s.io/v2"
    resources = doc["items"][0]["versions"][0]["resources"]
    assert [r["resource"] for r in resources] == ["externalmetrics"]


async def test_discovery_group_and_group_version(start_router: StartRouter) -> None:
    h = await start_router({"a": ["tenant-a"]})
    # The aggregator's availability probe: no X-Remote-User needed, answered locally.
    group = await h.request("/apis/external.metrics.k8s.io", [])
    assert group.status == 200
    assert group.json()["kind"] == "APIGroup"
    gv = await h.request("/apis/external.metrics.k8s.io/v1beta1", [])
    assert gv.status == 200
    assert gv.content_type == "application/json"
    doc = gv.json()
    assert doc["kind"] == "APIResourceList"
    assert doc["groupVersion"] == "external.metrics.k8s.io/v1beta1"
    (res,) = doc["resources"]
    assert res["name"] == "externalmetrics"
    assert res["namespaced"] is True
    assert res["kind"] == "ExternalMetricValueList"
    assert res["verbs"] == ["get"]
    assert h.seen_total() == 0


async def test_discovery_is_answered_while_every_upstream_is_down(
    start_router: StartRouter,
) -> None:
    h = await start_router({"a": ["tenant-a"]})
    await h.stubs["a"].stop()
    reply = await h.request("/apis/external.metrics.k8s.io/v1beta1")
    assert reply.status == 200


@pytest.mark.parametrize("target", ["/openapi/v2", "/openapi/v3"])
async def test_openapi_is_404_status(start_router: StartRouter, target: str) -> None:
    h = await start_router({"a": ["tenant-a"]})
    reply = await h.request(target, [("X-Remote-User", "system:aggregator")])
    assert reply.status == 404
    doc = reply.json()
    assert (doc["kind"], doc["reason"], doc["code"]) == ("Status", "NotFound", 404)


@pytest.mark.parametrize("target", ["/healthz", "/livez", "/readyz"])
async def test_health_needs_no_client_certificate(start_router: StartRouter, target: str) -> None:
    h = await start_router({"a": ["tenant-a"]})
    reply = await h.request(target, [], cert="none")
    assert reply.status == 200
    assert reply.body == b"ok\n"


async def test_discovery_needs_a_client_certificate(start_router: StartRouter) -> None:
    h = await start_router({"a": ["tenant-a"]})
    reply = await h.request("/apis/external.metrics.k8s.io/v1beta1", [], cert="none")
    assert reply.status == 401


@pytest.mark.parametrize(
    ("method", "target", "cert"),
    [
        ("GET", "/no/such/path", "none"),
        ("GET", "/apis/external.metrics.k8s.io/v1beta1/namespaces/a%2F..%2Fb/m", "none"),
        ("POST", "/apis/external.metrics.k8s.io/v1beta1/namespaces/tenant-a/m", "none"),
        ("GET", "/no/such/path", "other"),
        ("DELETE", "/apis", "other"),
    ],
)
async def test_unauthenticated_callers_learn_nothing_about_paths_or_methods(
    start_router: StartRouter, method: str, target: str, cert: ClientCert
) -> None:
    # Authentication comes first, as in kube-apiserver: 401, never 400/404/405.
    h = await start_router({"a": ["tenant-a"]})
    reply = await h.request(target, [], cert=cert, method=method)
    assert reply.status == 401
    assert reply.json()["reason"] == "Unauthorized"
    assert h.seen_total() == 0


# --------------------------------------------------------------------------- transport


async def test_alpn_offers_only_http11(start_router: StartRouter) -> None:
    h = await start_router({"a": ["tenant-a"]})
    ctx = client_ssl_context(h.pki, alpn=["h2", "http/1.1"])
    conn = await RawConnection.open(h.port, ctx)
    try:
        assert conn.ssl_object.selected_alpn_protocol() == "http/1.1"
        reply = await conn.request(metric_path("tenant-a"), HPA_IDENTITY)
        assert reply.status == 200
    finally:
        await conn.close()
    # A client offering only h2 is not told h2 was accepted.
    ctx = client_ssl_context(h.pki, alpn=["h2"])
    try:
        conn = await RawConnection.open(h.port, ctx)
    except ssl.SSLError:
        return  # no_application_protocol alert: also fine
    try:
        assert conn.ssl_object.selected_alpn_protocol() is None
    finally:
        await conn.close()


async def test_upstream_connections_are_kept_alive_and_reused(start_router: StartRouter) -> None:
    h = await start_router({"a": ["tenant-a"], "b": ["tenant-b"]})
    conn = await h.connect()
    for _ in range(40):
        reply = await conn.request(metric_path("tenant-a"), HPA_IDENTITY)
        assert reply.status == 200
    assert len(h.stubs["a"].seen) == 40
    assert h.stubs["a"].connections == 1
    # Concurrent requests from many clients share a small pool.
    conns = [await h.connect() for _ in range(8)]

    async def burst(c: RawConnection) -> list[int]:
        return [(await c.request(metric_path("tenant-b"), HPA_IDENTITY)).status for _ in range(5)]

    results = await asyncio.gather(*(burst(c) for c in conns))
    assert all(code == 200 for codes in results for code in codes)
    assert len(h.stubs["b"].seen) == 40
    assert 1 <= h.stubs["b"].connections <= 8


async def test_many_concurrent_requests_each_get_their_own_answer(
    start_router: StartRouter,
) -> None:
    tenants = {"a": ["tenant-a", "tenant-a--dev"], "b": ["tenant-b"], "c": ["tenant-c"]}
    owner = {ns: t for t, nss in tenants.items() for ns in nss}
    h = await start_router(tenants)
    for stub in h.stubs.values():
        stub.behaviour.delay = 0.01  # keep requests overlapping
    conns = [await h.connect() for _ in range(24)]
    namespaces = sorted(owner)

    async def client(index: int, conn: RawConnection) -> None:
        for round_ in range(6):
            ns = namespaces[(index + round_) % len(namespaces)]
            query = f"?labelSelector=req%3D{index}-{round_}"
            reply = await conn.request(metric_path(ns, f"s{index}-m{round_}") + query, HPA_IDENTITY)
            assert reply.status == 200, reply.body
            assert reply.headers["X-Stub-Tenant"] == owner[ns]
            (item,) = reply.json()["items"]
            assert item["metricName"] == f"s{index}-m{round_}"
            assert item["metricLabels"] == {"req": f"{index}-{round_}"}

    await asyncio.gather(*(client(i, c) for i, c in enumerate(conns)))
    total = 0
    for tenant, stub in h.stubs.items():
        for seen in stub.seen:
            ns = seen.raw_path.split("/")[5]
            assert owner[ns] == tenant
        total += len(stub.seen)
    assert total == 24 * 6


async def test_large_bodies_are_relayed_whole(start_router: StartRouter) -> None:
    body = bytes(range(256)) * 8192  # 2 MiB
    h = await start_router({"a": ["tenant-a"]})
    h.stubs["a"].behaviour.body = body
    h.stubs["a"].behaviour.content_type = PROTOBUF
    reply = await h.request(metric_path("tenant-a"))
    assert reply.status == 200
    assert len(reply.body) == len(body)
    assert reply.body == body


async def test_upstream_closing_idle_connections_is_retried_transparently(
    start_router: StartRouter, pki: Pki
) -> None:
    # An upstream that closes every connection after one answer without saying so.
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    async with raw_tls_upstream(pki, answering(answer)) as upstream:
        h = await start_with_upstream(start_router, upstream.url)
        conn = await h.connect()
        for _ in range(5):
            reply = await conn.request(metric_path("tenant-a"), HPA_IDENTITY)
            assert (reply.status, reply.body) == (200, b"{}")


async def test_default_upstream_takes_namespaces_of_no_tenant(start_router: StartRouter) -> None:
    h = await start_router({"a": ["tenant-a"], "c": ["tenant-c"]})
    h2 = await start_router(
        {"b": ["tenant-b"]}, extra_args=["--default-upstream", h.stubs["c"].url]
    )
    reply = await h2.request(metric_path("kube-system"))
    assert reply.status == 200
    assert reply.headers["X-Stub-Tenant"] == "c"
    assert (await h2.request(metric_path("tenant-b"))).headers["X-Stub-Tenant"] == "b"
    assert (
        await h2.sample("metrics_router_requests_total", {"tenant": "(default)", "code": "200"})
        == 1
    )
    async with aiohttp.ClientSession() as session, session.get(h2.metrics_url + "/routes") as resp:
        assert (await resp.json())["default"] == h.stubs["c"].url


# --------------------------------------------------------------------------- HTTP/1.1 server


async def test_pipelined_requests_are_answered_in_order(start_router: StartRouter) -> None:
    h = await start_router({"a": ["tenant-a"], "b": ["tenant-b"]})
    h.stubs["a"].behaviour.delay = 0.1  # the first answer is the slower one
    conn = await h.connect()
    first = await conn.send(
        build_request(metric_path("tenant-a", "s0-first"), HPA_IDENTITY)
        + build_request(metric_path("tenant-b", "s1-second"), HPA_IDENTITY)
        + build_request("/apis/external.metrics.k8s.io/v1beta1", HPA_IDENTITY)
    )
    second = await conn.read_reply()
    third = await conn.read_reply()
    assert first.headers["X-Stub-Tenant"] == "a"
    assert first.json()["items"][0]["metricName"] == "s0-first"
    assert second.headers["X-Stub-Tenant"] == "b"
    assert second.json()["items"][0]["metricName"] == "s1-second"
    assert third.json()["kind"] == "APIResourceList"


async def test_connection_close_is_honoured(start_router: StartRouter) -> None:
    h = await start_router({"a": ["tenant-a"]})
    conn = await h.connect()
    reply = await conn.request(metric_path("tenant-a"), [*HPA_IDENTITY, ("Connection", "close")])
    assert reply.status == 200
    assert await conn.closed_by_peer()


async def test_http10_request_is_answered_and_closed(start_router: StartRouter) -> None:
    h = await start_router({"a": ["tenant-a"]})
    conn = await h.connect()
    head = build_request(metric_path("tenant-a"), HPA_IDENTITY).replace(b"HTTP/1.1", b"HTTP/1.0", 1)
    reply = await conn.send(head)
    assert reply.status == 200
    assert reply.json()["kind"] == "ExternalMetricValueList"
    assert await conn.closed_by_peer()


async def test_a_user_in_a_hundred_groups_keeps_every_group_in_order(
    start_router: StartRouter,
) -> None:
    h = await start_router({"a": ["tenant-a"]})
    groups = [("X-Remote-Group", f"team-{i:03d}") for i in range(90)]
    extras = [("X-Remote-Extra-Acme.com%2Fteam", f"v{i}") for i in range(20)]
    sent = [("X-Remote-User", "alice"), *groups, *extras]
    reply = await h.request(metric_path("tenant-a"), sent)
    assert reply.status == 200
    (seen,) = h.stubs["a"].seen
    assert _without_host(seen.headers) == sent


async def test_a_user_in_hundreds_of_groups_is_forwarded(
    start_router: StartRouter, pki: Pki
) -> None:
    # The aggregator sends one X-Remote-Group line per group; KEDA (Go net/http) limits header
    # bytes (1 MiB), not lines. A user in 300 groups must not be refused by the router.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
        )
        await writer.drain()

    groups = [("X-Remote-Group", f"team-{i:03d}") for i in range(300)]
    async with raw_tls_upstream(pki, handler) as upstream:
        h = await start_with_upstream(start_router, upstream.url)
        reply = await h.request(metric_path("tenant-a"), [("X-Remote-User", "alice"), *groups])
    assert reply.status == 200, reply.body
    (head,) = upstream.heads
    lines = head.decode().split("\r\n")
    assert [ln for ln in lines if ln.startswith("X-Remote-Group:")] == [
        f"{k}: {v}" for k, v in groups
    ]


@pytest.mark.parametrize(
    "raw",
    [
        b"\x16\x03\x01garbage\r\n\r\n",
        b"GET\r\n\r\n",
        b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Header Name: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
        b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nX-Big: " + b"v" * 70000 + b"\r\n\r\n",
    ],
    ids=[
        "tls-in-tls",
        "no-target",
        "bad-version",
        "bad-header-name",
        "two-content-lengths",
        "te-and-cl",
        "huge-target",
        "huge-header",
    ],
)
async def test_malformed_requests_get_a_4xx_or_a_close_never_a_hang(
    start_router: StartRouter, raw: bytes
) -> None:
    h = await start_router({"a": ["tenant-a"]})
    conn = await h.connect()
    try:
        reply = await conn.send(raw, within=5)
    except (NoResponseError, ConnectionError):
        pass  # closed without an answer
    else:
        assert 400 <= reply.status < 500, (reply.status, reply.body)
        assert await conn.closed_by_peer()
    assert h.seen_total() == 0


async def test_aiohttp_clients_with_other_certificates_are_refused(
    start_router: StartRouter, client_session: SessionFactory
) -> None:
    h = await start_router({"a": ["tenant-a"]})
    url = URL(h.url + metric_path("tenant-a"), encoded=True)
    refused: tuple[ClientCert, ...] = ("none", "other")
    for cert in refused:
        async with client_session(cert).get(url, headers=list(HPA_IDENTITY)) as resp:
            assert resp.status == 401
            assert (await resp.json())["reason"] == "Unauthorized"
    with pytest.raises(aiohttp.ClientError):
        async with client_session("rogue").get(url, headers=list(HPA_IDENTITY)) as resp:
            await resp.read()
    assert h.seen_total() == 0


async def test_aiohttp_client_through_the_router(
    start_router: StartRouter, client_session: SessionFactory
) -> None:
    h = await start_router({"a": ["tenant-a"]})
    session = client_session("front-proxy")
    url = URL(h.url + metric_path("tenant-a") + "?labelSelector=app%3Dweb", encoded=True)
    async with session.get(url, headers=list(HPA_IDENTITY)) as resp:
        assert resp.status == 200
        doc = await resp.json()
    assert doc["items"][0]["metricLabels"] == {"app": "web"}
    assert h.stubs["a"].seen[0].groups == (
        "system:serviceaccounts",
        "system:serviceaccounts:kube-system",
        "system:authenticated",
    )


# --------------------------------------------------------------------------- operation


async def test_metrics_port_exports_the_request_path(start_router: StartRouter) -> None:
    h = await start_router({"a": ["tenant-a"], "b": ["tenant-b", "tenant-b2"]})
    for _ in range(3):
        assert (await h.request(metric_path("tenant-a"))).status == 200
    assert (await h.request(metric_path("tenant-zzz"))).status == 404
    assert (await h.request(metric_path("tenant-a"), cert="none")).status == 401
    await h.stubs["b"].stop()
    assert (await h.request(metric_path("tenant-b"))).status == 503

    assert await h.sample("metrics_router_requests_total", {"tenant": "a", "code": "200"}) == 3
    assert await h.sample("metrics_router_requests_total", {"tenant": "b", "code": "503"}) == 1
    assert await h.sample("metrics_router_requests_total", {"tenant": "", "code": "404"}) == 1
    assert await h.sample("metrics_router_request_duration_seconds_count", {"tenant": "a"}) == 3
    assert (
        await h.sample(
            "metrics_router_request_duration_seconds_bucket", {"tenant": "a", "le": "+Inf"}
        )
        == 3
    )
    assert (
        await h.sample(
            "metrics_router_upstream_errors_total", {"tenant": "b", "kind": "unreachable"}
        )
        == 1
    )
    assert (
        await h.sample("metrics_router_unauthorized_requests_total", {"reason": "no-certificate"})
        == 1
    )
    assert await h.sample("metrics_router_inflight_requests", {"tenant": "a"}) == 0
    assert await h.sample("metrics_router_routes") == 3
    assert await h.sample("metrics_router_tenants") == 2
    from cryptography import x509

    serving = x509.load_pem_x509_certificate(h.pki.router_serving_cert.read_bytes())
    assert await h.sample(
        "metrics_router_certificate_expiry_timestamp_seconds", {"certificate": "serving"}
    ) == pytest.approx(serving.not_valid_after_utc.timestamp())
    client = x509.load_pem_x509_certificate(h.pki.router_client_cert.read_bytes())
    assert await h.sample(
        "metrics_router_certificate_expiry_timestamp_seconds", {"certificate": "proxy-client"}
    ) == pytest.approx(client.not_valid_after_utc.timestamp())


async def test_routes_endpoint(start_router: StartRouter) -> None:
    h = await start_router({"a": ["tenant-a", "tenant-a--dev"], "b": ["tenant-b"]})
    await h.stubs["b"].stop()
    assert (await h.request(metric_path("tenant-b"))).status == 503
    async with aiohttp.ClientSession() as session, session.get(h.metrics_url + "/routes") as resp:
        assert resp.status == 200
        doc = await resp.json()
    assert doc["source"] == f"file:{h.routes_file}"
    assert doc["namespaces"] == 3
    by_tenant = {t["tenant"]: t for t in doc["tenants"]}
    assert by_tenant["a"]["namespaces"] == ["tenant-a", "tenant-a--dev"]
    assert by_tenant["a"]["upstream"] == h.stubs["a"].url
    assert by_tenant["a"]["lastUpstreamError"] is None
    assert by_tenant["b"]["lastUpstreamError"]["kind"] == "unreachable"
    assert doc["default"] is None


async def test_metrics_port_health(start_router: StartRouter) -> None:
    h = await start_router({"a": ["tenant-a"]})
    async with aiohttp.ClientSession() as session:
        for path in ("/healthz", "/livez", "/readyz"):
            async with session.get(h.metrics_url + path) as resp:
                assert resp.status == 200, path


async def test_graceful_stop_lets_the_request_in_flight_finish(start_router: StartRouter) -> None:
    h = await start_router({"a": ["tenant-a"]})
    stub = h.stubs["a"]
    stub.behaviour.delay = 0.5
    conn = await h.connect()
    in_flight = asyncio.create_task(conn.request(metric_path("tenant-a"), HPA_IDENTITY))
    await stub.wait_for_requests(1)
    stopping = asyncio.create_task(h.router.stop())
    reply = await in_flight
    assert reply.status == 200
    assert reply.json()["kind"] == "ExternalMetricValueList"
    await asyncio.wait_for(stopping, 10)
    assert not h.router.ready
    with pytest.raises(ConnectionRefusedError):
        await RawConnection.open(h.port, client_ssl_context(h.pki))
