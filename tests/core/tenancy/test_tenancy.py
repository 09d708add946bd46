"""core.tenancy: namespace -> tenant strategies, upstream discovery, conflicts (pure, no I/O)."""

from __future__ import annotations

import random
from collections.abc import Mapping

import pytest

from router.core.routes import Upstream
from router.core.tenancy import (
    HNC_DEPTH_SUFFIX,
    NamespaceInfo,
    ServiceInfo,
    resolve,
    tenant_of,
)
from router.settings import TenancySettings

ROOT = {"tenancy.metrics-router.io/root": "true"}
KEDA = {"app.kubernetes.io/name": "keda-operator-metrics-apiserver"}


def hnc(name: str, ancestors: Mapping[str, int], **extra: str) -> NamespaceInfo:
    """A namespace as HNC labels it: itself at depth 0 plus each ancestor at its distance."""
    labels = {f"{name}{HNC_DEPTH_SUFFIX}": "0"}
    labels.update({f"{a}{HNC_DEPTH_SUFFIX}": str(d) for a, d in ancestors.items()})
    labels.update(extra)
    return NamespaceInfo(name, labels)


def by_name(*nss: NamespaceInfo) -> dict[str, NamespaceInfo]:
    return {n.name: n for n in nss}


# --------------------------------------------------------------------------- strategies

LABEL = "tenancy.io/tenant"


@pytest.mark.parametrize(
    ("strategies", "name", "labels", "expected"),
    [
        # pattern (default: the tenant is named after its root namespace, as hnc names it)
        (("pattern",), "tenant-a", {}, "tenant-a"),
        (("pattern",), "tenant-a--dev", {}, "tenant-a"),
        (("pattern",), "tenant-b42--sys", {}, "tenant-b42"),
        (("pattern",), "kube-system", {}, None),
        (("pattern",), "tenant-", {}, None),
        (("pattern",), "tenant-A", {}, None),
        (("pattern",), "my-tenant-a", {}, None),  # anchored
        # label
        (("label",), "anything", {LABEL: "blue"}, "blue"),
        (("label",), "anything", {LABEL: ""}, None),
        (("label",), "anything", {"other": "x"}, None),
        # first match wins, in the configured order
        (("label", "pattern"), "tenant-a", {LABEL: "blue"}, "blue"),
        (("pattern", "label"), "tenant-a", {LABEL: "blue"}, "tenant-a"),
        (("label", "pattern"), "tenant-a", {}, "tenant-a"),
        (("hnc", "label", "pattern"), "tenant-c", {LABEL: "blue"}, "blue"),
        (("hnc", "pattern"), "tenant-c", {}, "tenant-c"),
        ((), "tenant-a", {LABEL: "blue"}, None),
    ],
)
def test_strategies(
    strategies: tuple[str, ...], name: str, labels: dict[str, str], expected: str | None
) -> None:
    settings = TenancySettings(strategies=strategies, tenant_label=LABEL)
    ns = NamespaceInfo(name, labels)
    assert tenant_of(ns, {name: ns}, settings) == expected


def test_label_strategy_without_label_key_is_skipped() -> None:
    settings = TenancySettings(strategies=("label", "pattern"), tenant_label=None)
    ns = NamespaceInfo("tenant-z", {LABEL: "blue"})
    assert tenant_of(ns, {}, settings) == "tenant-z"


def test_custom_pattern() -> None:
    settings = TenancySettings(strategies=("pattern",), tenant_pattern=r"^(?P<tenant>[a-z]+)-")
    assert tenant_of(NamespaceInfo("team-x"), {}, settings) == "team"
    assert tenant_of(NamespaceInfo("nodash"), {}, settings) is None


# --------------------------------------------------------------------------- hnc trees

HNC = TenancySettings(strategies=("hnc",))


def test_hnc_tree() -> None:
    # org (not a root) -> acme (root) -> acme-dev -> acme-dev-feature; other (no root)
    org = hnc("org", {})
    acme = hnc("acme", {"org": 1}, **ROOT)
    dev = hnc("acme-dev", {"acme": 1, "org": 2})
    feature = hnc("acme-dev-feature", {"acme-dev": 1, "acme": 2, "org": 3})
    other = hnc("other", {"org": 1})
    known = by_name(org, acme, dev, feature, other)
    assert tenant_of(acme, known, HNC) == "acme"  # a root is its own tenant
    assert tenant_of(dev, known, HNC) == "acme"
    assert tenant_of(feature, known, HNC) == "acme"
    assert tenant_of(other, known, HNC) is None
    assert tenant_of(org, known, HNC) is None


def test_hnc_root_label_value_must_match() -> None:
    acme = hnc("acme", {}, **{"tenancy.metrics-router.io/root": "false"})
    dev = hnc("acme-dev", {"acme": 1})
    assert tenant_of(dev, by_name(acme, dev), HNC) is None
    custom = TenancySettings(strategies=("hnc",), tenant_root_label=("example.com/tenant", "yes"))
    acme2 = hnc("acme", {}, **{"example.com/tenant": "yes"})
    assert tenant_of(dev, by_name(acme2, dev), custom) == "acme"


def test_hnc_unknown_root_falls_through_to_next_strategy() -> None:
    # The root is hidden (e.g. by --namespace-selector): hnc gives no answer, pattern does.
    dev = hnc("tenant-q--dev", {"tenant-q": 1})
    settings = TenancySettings(strategies=("hnc", "pattern"))
    assert tenant_of(dev, by_name(dev), settings) == "tenant-q"


def test_hnc_nested_roots_topmost_wins_and_conflict_is_reported() -> None:
    acme = hnc("acme", {}, **ROOT)
    team = hnc("acme-team", {"acme": 1}, **ROOT)
    leaf = hnc("acme-team-x", {"acme-team": 1, "acme": 2})
    res = resolve(
        [acme, team, leaf], [], TenancySettings(strategies=("hnc",), upstream_template=TPL)
    )
    assert res.tenants == {"acme": ("acme", "acme-team", "acme-team-x")}
    conflicts = {c.subject: c for c in res.conflicts}
    assert set(conflicts) == {"acme-team", "acme-team-x"}
    c = conflicts["acme-team-x"]
    assert (c.kind, c.chosen, c.rejected) == ("namespace", "acme", ("acme-team",))
    assert "acme-team-x" in c.message


def test_hnc_malformed_depth_labels_are_ignored() -> None:
    acme = hnc("acme", {}, **ROOT)
    dev = NamespaceInfo("acme-dev", {f"acme{HNC_DEPTH_SUFFIX}": "not-a-number"})
    assert tenant_of(dev, by_name(acme, dev), HNC) is None


# --------------------------------------------------------------------------- upstreams

TPL = "https://keda-operator-metrics-apiserver.{tenant}--sys.svc:443"
PATTERN = TenancySettings(strategies=("pattern",))


def test_template_upstream() -> None:
    settings = TenancySettings(strategies=("pattern",), upstream_template=TPL)
    ignored = ServiceInfo("tenant-a", "keda", KEDA, (("https", 443),))
    res = resolve([NamespaceInfo("tenant-a"), NamespaceInfo("tenant-a--dev")], [ignored], settings)
    route = res.table.lookup("tenant-a--dev")
    assert route is not None
    assert route.tenant == "tenant-a"
    assert route.upstream.url == "https://keda-operator-metrics-apiserver.tenant-a--sys.svc:443"
    assert route.upstream.tls_name == "keda-operator-metrics-apiserver.tenant-a--sys.svc"
    assert res.unrouted == {}


def test_template_that_gives_a_bad_url_leaves_the_tenant_unrouted() -> None:
    settings = TenancySettings(strategies=("label",), tenant_label=LABEL,
                               upstream_template="https://{tenant}.example:443")  # fmt: skip
    res = resolve([NamespaceInfo("x", {LABEL: "bad/name"})], [], settings)
    assert res.table.lookup("x") is None
    assert "bad/name" in res.unrouted
    assert res.tenants == {"bad/name": ("x",)}


def test_discovered_service_upstream() -> None:
    nss = [NamespaceInfo("tenant-a"), NamespaceInfo("tenant-a--sys"), NamespaceInfo("tenant-b")]
    svc = ServiceInfo("tenant-a--sys", "keda-operator-metrics-apiserver", KEDA,
                      (("metrics", 8080), ("https", 6443)))  # fmt: skip
    res = resolve(nss, [svc], PATTERN)
    route = res.table.lookup("tenant-a")
    assert route is not None
    assert route.upstream == Upstream.parse(
        "https://keda-operator-metrics-apiserver.tenant-a--sys.svc:6443",
        "keda-operator-metrics-apiserver.tenant-a--sys.svc",
    )
    assert res.table.lookup("tenant-a--sys") == route
    # tenant b has no Service: known, but not routed
    assert res.table.lookup("tenant-b") is None
    assert res.tenants["tenant-b"] == ("tenant-b",)
    assert "no metrics Service" in res.unrouted["tenant-b"]


@pytest.mark.parametrize(
    ("ports", "expected"),
    [
        ((("metrics", 8080), ("https", 6443), (None, 443)), 6443),  # named https first
        ((("metrics", 8080), (None, 443)), 443),  # then 443
        ((("metrics", 8080), ("other", 9443)), 8080),  # then the first
    ],
)
def test_service_port_choice(ports: tuple[tuple[str | None, int], ...], expected: int) -> None:
    res = resolve([NamespaceInfo("tenant-a")], [ServiceInfo("tenant-a", "m", KEDA, ports)], PATTERN)
    route = res.table.lookup("tenant-a")
    assert route is not None
    assert route.upstream.port == expected


def test_service_without_ports_leaves_tenant_unrouted() -> None:
    res = resolve([NamespaceInfo("tenant-a")], [ServiceInfo("tenant-a", "m", KEDA, ())], PATTERN)
    assert res.table.lookup("tenant-a") is None
    assert "no ports" in res.unrouted["tenant-a"]


def test_two_services_for_one_tenant_first_by_namespace_and_name_wins() -> None:
    nss = [NamespaceInfo("tenant-a"), NamespaceInfo("tenant-a--sys")]
    svcs = [
        ServiceInfo("tenant-a--sys", "keda", KEDA, (("https", 443),)),
        ServiceInfo("tenant-a", "zz", KEDA, (("https", 443),)),
        ServiceInfo("tenant-a", "aa", KEDA, (("https", 443),)),
    ]
    for order in (svcs, svcs[::-1]):
        res = resolve(nss, order, PATTERN)
        route = res.table.lookup("tenant-a")
        assert route is not None
        assert route.upstream.host == "aa.tenant-a.svc"
        (conflict,) = res.conflicts
        assert conflict.kind == "service"
        assert conflict.subject == "tenant-a"
        assert conflict.chosen == "tenant-a/aa"
        assert conflict.rejected == ("tenant-a/zz", "tenant-a--sys/keda")


def test_service_in_a_namespace_of_no_tenant_is_ignored() -> None:
    res = resolve(
        [NamespaceInfo("tenant-a"), NamespaceInfo("keda")],
        [ServiceInfo("keda", "keda-operator-metrics-apiserver", KEDA, (("https", 443),))],
        PATTERN,
    )
    assert res.table.lookup("tenant-a") is None
    assert res.conflicts == ()


def test_default_upstream_for_other_namespaces() -> None:
    default = Upstream.parse("https://keda.keda.svc:443")
    res = resolve([NamespaceInfo("kube-system")], [], PATTERN, default=default)
    route = res.table.lookup("kube-system")
    assert route is not None
    assert route.upstream == default


def test_resolution_is_deterministic_in_input_order() -> None:
    rng = random.Random(7)
    nss = [NamespaceInfo(f"tenant-{t}--{i}") for t in "abcde" for i in range(5)]
    nss += [NamespaceInfo(f"tenant-{t}") for t in "abcde"]
    svcs = [ServiceInfo(f"tenant-{t}--{i}", "keda", KEDA, (("https", 443),))
            for t in "abcde" for i in (1, 3)]  # fmt: skip
    first = resolve(nss, svcs, PATTERN)
    for _ in range(5):
        rng.shuffle(nss)
        rng.shuffle(svcs)
        again = resolve(nss, svcs, PATTERN)
        assert again == first
    assert first.tenants["tenant-c"] == tuple(
        sorted(["tenant-c", *(f"tenant-c--{i}" for i in range(5))])
    )
    assert len(first.conflicts) == 5


# --------------------------------------------------------------------------- from API objects


def test_from_object() -> None:
    ns = NamespaceInfo.from_object(
        {"metadata": {"name": "tenant-a", "labels": {"a": "b"}, "resourceVersion": "5"}}
    )
    assert ns == NamespaceInfo("tenant-a", {"a": "b"})
    assert NamespaceInfo.from_object({"metadata": {"name": "bare"}}).labels == {}
    svc = ServiceInfo.from_object(
        {
            "metadata": {"name": "keda", "namespace": "tenant-a", "labels": KEDA},
            "spec": {"ports": [{"name": "https", "port": 443}, {"port": 8080}, {"name": "x"}]},
        }
    )
    assert svc == ServiceInfo("tenant-a", "keda", KEDA, (("https", 443), (None, 8080)))
    assert ServiceInfo.from_object({"metadata": {"name": "s", "namespace": "n"}}).ports == ()
