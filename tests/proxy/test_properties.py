"""Property tests: no namespace ever reaches another tenant, no input ever gets a 500."""

from __future__ import annotations

import re
import string

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from router.core import paths, status
from router.core.names import is_dns1123_label
from router.core.routes import (
    DEFAULT_TENANT,
    RoutesError,
    RouteTable,
    Tenant,
    Upstream,
    parse_routes_file,
)
from tests.conftest import (
    HPA_IDENTITY,
    METRIC_PREFIX,
    NoResponseError,
    RouterHarness,
    StartRouter,
    routes_yaml,
)

pytestmark = pytest.mark.usefixtures("no_leftover_tasks")

# Independent restatement of the rules (not the module's own regular expressions).
_LABEL_CHARS = string.ascii_lowercase + string.digits + "-"
_METRIC_CHARS = string.ascii_letters + string.digits + "._:-"

dns_labels = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?\Z")


def expected_metric_ok(metric: str) -> bool:
    return (
        1 <= len(metric) <= 253
        and metric[0].isascii()
        and metric[0].isalnum()
        and all(c in _METRIC_CHARS for c in metric)
        and ".." not in metric
    )


def expected_namespace_ok(ns: str) -> bool:
    return (
        1 <= len(ns) <= 63 and all(c in _LABEL_CHARS for c in ns) and ns[0] != "-" and ns[-1] != "-"
    )


# --------------------------------------------------------------------------- route tables


@st.composite
def tenant_sets(draw: st.DrawFn) -> list[Tenant]:
    names = draw(st.lists(dns_labels, min_size=1, max_size=8, unique=True))
    namespaces = draw(st.lists(dns_labels, min_size=len(names), max_size=25, unique=True))
    owners = [draw(st.integers(0, len(names) - 1)) for _ in namespaces]
    # every tenant gets at least one namespace
    for i in range(len(names)):
        owners[i] = i
    tenants = []
    for i, name in enumerate(names):
        owned = tuple(ns for ns, o in zip(namespaces, owners, strict=True) if o == i)
        tenants.append(Tenant(name, owned, Upstream.parse(f"https://127.0.0.1:{7000 + i}")))
    return tenants


@given(tenant_sets(), st.lists(dns_labels, max_size=20), st.booleans())
def test_lookup_never_returns_another_tenants_upstream(
    tenants: list[Tenant], probes: list[str], with_default: bool
) -> None:
    default = Upstream.parse("https://127.0.0.1:6999") if with_default else None
    table = RouteTable.from_tenants(tenants, default=default)
    owner = {ns: t for t in tenants for ns in t.namespaces}
    for ns, tenant in owner.items():
        route = table.lookup(ns)
        assert route is not None
        assert route.tenant == tenant.name
        assert route.upstream == tenant.upstream
    for ns in probes:
        route = table.lookup(ns)
        if ns in owner:
            assert route is not None
            assert route.upstream == owner[ns].upstream
        elif default is None:
            assert route is None
        else:
            assert route is not None
            assert (route.tenant, route.upstream) == (DEFAULT_TENANT, default)
            assert all(route.upstream != t.upstream for t in tenants)


@given(tenant_sets())
def test_routes_file_round_trip_routes_the_same(tenants: list[Tenant]) -> None:
    text = routes_yaml({t.name: (t.namespaces, t.upstream.url, None) for t in tenants})
    table = parse_routes_file(text)
    assert table == RouteTable.from_tenants(tenants)


@given(tenant_sets(), st.data())
def test_a_namespace_claimed_twice_is_always_refused(
    tenants: list[Tenant], data: st.DataObject
) -> None:
    if len(tenants) < 2:
        return
    i = data.draw(st.integers(0, len(tenants) - 1))
    j = data.draw(st.integers(0, len(tenants) - 2))
    j = j + 1 if j >= i else j
    stolen = tenants[i].namespaces[0]
    thief = tenants[j]
    tenants[j] = Tenant(thief.name, (*thief.namespaces, stolen), thief.upstream)
    with pytest.raises(RoutesError, match=re.escape(repr(stolen))):
        RouteTable.from_tenants(tenants)


# --------------------------------------------------------------------------- paths

segment = st.one_of(
    dns_labels,
    st.text(alphabet=string.ascii_letters + string.digits + "-._:%~", max_size=30),
    st.text(max_size=20),
    st.sampled_from(["..", ".", "", "%2F", "%2e%2e", "a%2Fb", "A", "-a", "a-", "s0..x", "x" * 254]),
)


@given(st.text(max_size=200))
def test_classify_never_raises_on_any_text(path: str) -> None:
    result = paths.classify(path)
    assert isinstance(result, paths.Target | status.StatusError)
    if isinstance(result, status.StatusError):
        assert result.code in (400, 404)


@given(segment, segment, st.sampled_from(["", "/", "/x", "//"]))
def test_classify_never_yields_a_metric_target_for_an_invalid_name(
    namespace: str, metric: str, suffix: str
) -> None:
    path = f"{METRIC_PREFIX}/{namespace}/{metric}{suffix}"
    result = paths.classify(path)
    if isinstance(result, paths.Target) and result.kind is paths.Kind.METRIC:
        assert suffix == ""
        assert (result.namespace, result.metric) == (namespace, metric)
        assert expected_namespace_ok(result.namespace)
        assert is_dns1123_label(result.namespace)
        assert expected_metric_ok(result.metric)
        assert f"{METRIC_PREFIX}/{result.namespace}/{result.metric}" == path
    elif suffix == "" and "/" not in namespace + metric:
        # Valid names must be forwarded: the check is not simply "refuse everything".
        assert not (expected_namespace_ok(namespace) and expected_metric_ok(metric))


# --------------------------------------------------------------------------- the real proxy

ROUTED = {
    "a": ["tenant-a", "tenant-a--dev", "shared-name-a"],
    "b": ["tenant-b", "b"],
    "c": ["tenant-c", "tenant-c--x--y"],
}
OWNER = {ns: t for t, nss in ROUTED.items() for ns in nss}
_SEEN_NS = re.compile(r"^/apis/external\.metrics\.k8s\.io/v1beta1/namespaces/([^/?]+)/")

_TARGET_CHARS = string.ascii_letters + string.digits + "-._~%/:@!$&'()*+,;=?"
routed_namespaces = st.sampled_from(sorted(OWNER))
namespaces_for_proxy = st.one_of(
    routed_namespaces,
    routed_namespaces,
    routed_namespaces,
    dns_labels,
    st.text(alphabet=_TARGET_CHARS, min_size=1, max_size=20),
)
valid_metrics = st.sampled_from(["s0-prometheus", "s1-rabbitmq-queue", "s2-kafka.lag:x"])
metrics_for_proxy = st.one_of(
    valid_metrics,
    valid_metrics,
    st.text(alphabet=_TARGET_CHARS, min_size=1, max_size=20),
)
metric_targets = st.builds(
    lambda ns, m, q: f"{METRIC_PREFIX}/{ns}/{m}{q}",
    namespaces_for_proxy,
    metrics_for_proxy,
    st.one_of(st.just(""), st.text(alphabet=_TARGET_CHARS, max_size=30).map(lambda q: "?" + q)),
)
targets = st.one_of(
    metric_targets,
    metric_targets,
    metric_targets,
    st.sampled_from(
        [
            "/apis",
            "/apis/external.metrics.k8s.io",
            "/apis/external.metrics.k8s.io/v1beta1",
            "/openapi/v2",
            "/healthz",
            "/readyz",
            "/",
        ]
    ),
    st.text(alphabet=_TARGET_CHARS, min_size=1, max_size=60).map(lambda p: "/" + p),
)
header_names = st.one_of(
    st.sampled_from(
        [
            "X-Remote-User",
            "X-Remote-Group",
            "X-Remote-Uid",
            "X-Remote-Extra-Acme.com%2Fp",
            "Connection",
            "Authorization",
            "Impersonate-User",
            "Impersonate-Group",
            "Accept",
            "Audit-ID",
            "Cookie",
            "Keep-Alive",
            "Proxy-Authorization",
            "TE",
            "X-Forwarded-For",
        ]
    ),
    st.text(alphabet=string.ascii_letters + string.digits + "-_", min_size=1, max_size=20),
)
header_values = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40
).map(str.strip)
methods = st.sampled_from(["GET"] * 8 + ["HEAD", "POST", "PUT", "DELETE", "OPTIONS"])


@pytest.fixture
async def proxy_harness(start_router: StartRouter) -> RouterHarness:
    return await start_router(ROUTED)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    method=methods,
    target=targets,
    identity=st.sampled_from([True, True, True, False]),
    headers=st.lists(st.tuples(header_names, header_values), max_size=6),
)
async def test_through_the_proxy_no_500_and_no_cross_tenant_delivery(
    proxy_harness: RouterHarness,
    method: str,
    target: str,
    identity: bool,
    headers: list[tuple[str, str]],
) -> None:
    h = proxy_harness
    before = {t: len(s.seen) for t, s in h.stubs.items()}
    sent = [*(HPA_IDENTITY if identity else ()), *headers]
    conn = await h.connect()
    try:
        reply = await conn.request(target, sent, method=method, within=10)
    except NoResponseError:
        reply = None  # the server closed the connection on input it could not parse
    finally:
        await conn.close()
    if reply is not None:
        assert reply.status != 500, (method, target, sent, reply.body)
        assert reply.status < 500 or (reply.status == 503 and b"not ready" in reply.body), (
            method,
            target,
            reply.status,
            reply.body,
        )
    new = {t: s.seen[before[t] :] for t, s in h.stubs.items()}
    for tenant, seen in new.items():
        for request in seen:
            m = _SEEN_NS.match(request.raw_path)
            assert m is not None, request.raw_path
            assert OWNER.get(m.group(1)) == tenant, (request.raw_path, tenant)
            assert request.raw_path == target
            assert request.method == "GET"
            assert request.peer_cn == "metrics-router"
    delivered = sum(len(v) for v in new.values())
    event(f"delivered={delivered} status={reply.status if reply else None}")
    assert delivered <= 1
    if delivered:
        assert reply is not None
        assert method == "GET"
        target_kind = paths.classify(target.partition("?")[0])
        assert isinstance(target_kind, paths.Target)
        assert target_kind.kind is paths.Kind.METRIC
        assert target_kind.namespace in OWNER
