"""RouteTable and the routes file format (pure)."""

from __future__ import annotations

import dataclasses
import textwrap

import pytest

from router.core.routes import (
    DEFAULT_TENANT,
    Route,
    RoutesError,
    RouteTable,
    Tenant,
    Upstream,
    parse_routes_file,
)
from tests.conftest import DESIGN_ROUTES

EXAMPLE = DESIGN_ROUTES


def test_parse_the_design_example() -> None:
    table = parse_routes_file(EXAMPLE)
    a = table.lookup("tenant-a")
    assert a is not None
    assert a.tenant == "a"
    assert a.upstream.url == "https://127.0.0.1:7001"
    assert a.upstream.host == "127.0.0.1"
    assert a.upstream.port == 7001
    assert a.upstream.tls_name == "keda-operator-metrics-apiserver.tenant-a--sys.svc"
    assert table.lookup("tenant-a--dev") == a
    b = table.lookup("tenant-b")
    assert b == Route("b", Upstream("https://127.0.0.1:7002", "127.0.0.1", 7002, None))
    assert b.upstream.tls_name == "127.0.0.1"
    assert table.lookup("tenant-c") is None
    assert table.lookup("") is None
    assert table.namespace_count == 3
    assert [t.name for t in table.tenants] == ["a", "b"]
    assert table.tenant("b") is not None
    assert table.tenant("zzz") is None
    assert {u.port for u in table.upstreams()} == {7001, 7002}


def test_table_is_immutable() -> None:
    table = parse_routes_file(EXAMPLE)
    with pytest.raises(TypeError):
        table.by_namespace["tenant-x"] = Route("x", Upstream.parse("https://x"))  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        table.default = None  # type: ignore[misc]


def test_default_upstream_takes_unrouted_namespaces() -> None:
    doc = (
        EXAMPLE
        + "default:\n  upstream: https://10.0.0.9:6443\n  serverName: keda.kube-system.svc\n"
    )
    table = parse_routes_file(doc)
    other = table.lookup("kube-system")
    assert other is not None
    assert other.tenant == DEFAULT_TENANT
    assert other.upstream.url == "https://10.0.0.9:6443"
    assert other.upstream.tls_name == "keda.kube-system.svc"
    route_a = table.lookup("tenant-a")
    assert route_a is not None
    assert route_a.tenant == "a"
    assert other.upstream in table.upstreams()


def test_default_upstream_argument_is_used_when_the_file_has_none() -> None:
    fallback = Upstream.parse("https://127.0.0.1:9999")
    table = parse_routes_file(EXAMPLE, default=fallback)
    route = table.lookup("elsewhere")
    assert route == Route(DEFAULT_TENANT, fallback)


def test_namespace_claimed_by_two_tenants_is_refused_with_both_names() -> None:
    doc = textwrap.dedent(
        """
        tenants:
          a: {namespaces: [shared, tenant-a], upstream: "https://127.0.0.1:1"}
          b: {namespaces: [shared], upstream: "https://127.0.0.1:2"}
        """
    )
    with pytest.raises(RoutesError) as info:
        parse_routes_file(doc)
    assert len(info.value.errors) == 1
    assert "'shared'" in info.value.errors[0]
    assert "'a'" in info.value.errors[0]
    assert "'b'" in info.value.errors[0]


def test_from_tenants_conflict() -> None:
    up = Upstream.parse("https://127.0.0.1:1")
    with pytest.raises(RoutesError, match="claimed by tenants"):
        RouteTable.from_tenants([Tenant("x", ("n1", "n2"), up), Tenant("y", ("n2",), up)])


def test_from_tenants_is_order_independent() -> None:
    ups = [Upstream.parse(f"https://127.0.0.1:{p}") for p in (1, 2, 3)]
    tenants = [Tenant(f"t{i}", (f"ns-{i}", f"ns-{i}-b"), u) for i, u in enumerate(ups)]
    t1 = RouteTable.from_tenants(tenants)
    t2 = RouteTable.from_tenants(reversed(tenants))
    assert t1 == t2
    for i, u in enumerate(ups):
        assert t1.lookup(f"ns-{i}-b") == Route(f"t{i}", u)


@pytest.mark.parametrize(
    ("doc", "fragment"),
    [
        ("", "want a mapping"),
        ("[]", "want a mapping"),
        ("tenants: []", "want a mapping"),
        ("tenants: {}\nextra: 1", "unknown top-level key 'extra'"),
        (": : :\n  - [", "not valid YAML"),
        ("tenants:\n  A: {namespaces: [x], upstream: 'https://h'}", "DNS-1123 label"),
        ("tenants:\n  a: [x]", "want a mapping with 'namespaces'"),
        ("tenants:\n  a: {namespaces: [], upstream: 'https://h'}", "non-empty list"),
        ("tenants:\n  a: {namespaces: x, upstream: 'https://h'}", "non-empty list"),
        ("tenants:\n  a: {namespaces: [Bad_NS], upstream: 'https://h'}", "'Bad_NS' is not"),
        ("tenants:\n  a: {namespaces: [x, x], upstream: 'https://h'}", "twice"),
        ("tenants:\n  a: {namespaces: [x], upstream: 'http://h'}", "https://"),
        ("tenants:\n  a: {namespaces: [x], upstream: 'https://h/path'}", "no path"),
        ("tenants:\n  a: {namespaces: [x], upstream: 'https://h?q=1'}", "no path"),
        ("tenants:\n  a: {namespaces: [x], upstream: 'https://u@h'}", "no path"),
        ("tenants:\n  a: {namespaces: [x], upstream: 'https://h:99999'}", "upstream"),
        ("tenants:\n  a: {namespaces: [x], upstream: 'https://'}", "no host"),
        ("tenants:\n  a: {namespaces: [x], upstream: 42}", "https:// URL"),
        (
            "tenants:\n  a: {namespaces: [x], upstream: 'https://h', serverName: 'a b'}",
            "serverName",
        ),
        ("tenants:\n  a: {namespaces: [x], upstream: 'https://h', serverName: 3}", "DNS name"),
        ("tenants:\n  a: {namespaces: [x], upstream: 'https://h', port: 3}", "unknown key 'port'"),
        ("tenants: {}\ndefault: {upstream: 'http://h'}", "default: "),
        ("tenants: {}\ndefault: 'https://h'", "default: want a mapping"),
    ],
)
def test_bad_routes_files_are_refused_with_a_clear_message(doc: str, fragment: str) -> None:
    with pytest.raises(RoutesError) as info:
        parse_routes_file(doc)
    assert fragment in str(info.value)


def test_every_error_is_reported_at_once() -> None:
    doc = textwrap.dedent(
        """
        tenants:
          a: {namespaces: [Bad], upstream: "http://h"}
          b: {namespaces: [], upstream: "https://h"}
        surprise: true
        """
    )
    with pytest.raises(RoutesError) as info:
        parse_routes_file(doc)
    text = "; ".join(info.value.errors)
    assert "surprise" in text
    assert "tenants.a.namespaces" in text
    assert "tenants.a: upstream" in text
    assert "tenants.b.namespaces" in text


@pytest.mark.parametrize(
    ("url", "normalised", "host", "port"),
    [
        ("https://127.0.0.1", "https://127.0.0.1:443", "127.0.0.1", 443),
        ("https://127.0.0.1:7001/", "https://127.0.0.1:7001", "127.0.0.1", 7001),
        ("https://[::1]:6443", "https://[::1]:6443", "::1", 6443),
        (
            "https://keda.tenant-a--sys.svc:443",
            "https://keda.tenant-a--sys.svc:443",
            "keda.tenant-a--sys.svc",
            443,
        ),
    ],
)
def test_upstream_parse(url: str, normalised: str, host: str, port: int) -> None:
    up = Upstream.parse(url)
    assert (up.url, up.host, up.port, up.tls_name) == (normalised, host, port, host)


def test_tenants_with_many_namespaces_each_route_to_their_own_upstream() -> None:
    lines = ["tenants:"]
    for t in range(20):
        ns = ", ".join(f"t{t}-ns{i}" for i in range(10))
        lines.append(f"  t{t}: {{namespaces: [{ns}], upstream: 'https://127.0.0.1:{7000 + t}'}}")
    table = parse_routes_file("\n".join(lines))
    assert table.namespace_count == 200
    for t in range(20):
        for i in range(10):
            route = table.lookup(f"t{t}-ns{i}")
            assert route is not None
            assert (route.tenant, route.upstream.port) == (f"t{t}", 7000 + t)
