"""router.cluster.routes_loop against the fake API: live route tables, coalescing, conflicts,
metrics, outages, and the extension-apiserver-authentication follower."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest
from kubernetes_asyncio.client import ApiClient
from prometheus_client import CollectorRegistry

from router import logs
from router.cluster.requestheader import RequestHeaderFollower, parse_auth_configmap
from router.cluster.routes_loop import ClusterRoutes
from router.core.routes import RouteTable
from router.metrics import ClusterMetrics, ProxyMetrics
from router.settings import TenancySettings
from router.settings.serve import (
    DEFAULT_GROUP_HEADERS,
    DEFAULT_USERNAME_HEADERS,
    RequestHeaderSettings,
)
from tests.fakeapi import FakeKube, Signal, fast_backoff, running

KEDA = {"app.kubernetes.io/name": "keda-operator-metrics-apiserver"}
TPL = "https://keda-operator-metrics-apiserver.{tenant}--sys.svc:443"
AUTH_NS, AUTH = "kube-system", "extension-apiserver-authentication"
CA_PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


pytestmark = pytest.mark.usefixtures("no_leftover_tasks")


class Tables:
    """Collects every table handed to on_table; wait_for(predicate on the latest)."""

    def __init__(self) -> None:
        self.seen: list[RouteTable] = []
        self.signal = Signal()

    def __call__(self, table: RouteTable) -> None:
        self.seen.append(table)
        self.signal.notify()

    @property
    def latest(self) -> RouteTable:
        return self.seen[-1]

    def routes(self, ns: str) -> str | None:
        if not self.seen:
            return None
        route = self.latest.lookup(ns)
        return None if route is None else route.tenant

    async def until(self, predicate: Any, within: float = 1.0) -> None:
        await self.signal.wait_for(lambda: bool(self.seen) and predicate(), within)


def make_routes(
    api: ApiClient, settings: TenancySettings, tables: Tables, registry: CollectorRegistry
) -> ClusterRoutes:
    return ClusterRoutes(
        api, settings, metrics=ClusterMetrics(registry), on_table=tables, backoff=fast_backoff
    )


# The tenants here are the short names ("a" for tenant-a): a custom --tenant-pattern.
SHORT_NAMES = r"^tenant-(?P<tenant>[a-z0-9]+)(--.+)?$"
PATTERN = TenancySettings(strategies=("pattern",), tenant_pattern=SHORT_NAMES)
PATTERN_TPL = TenancySettings(
    strategies=("pattern",), tenant_pattern=SHORT_NAMES, upstream_template=TPL
)


async def test_namespace_added_and_deleted_live(fake: FakeKube, api: ApiClient) -> None:
    fake.add_namespace("tenant-a")
    fake.add_namespace("kube-system")
    tables, registry = Tables(), CollectorRegistry()
    routes = make_routes(api, PATTERN_TPL, tables, registry)
    assert registry.get_sample_value("metrics_router_synced") == 0
    async with running(routes.run()):
        await asyncio.wait_for(routes.synced.wait(), 2)
        assert tables.routes("tenant-a") == "a"
        assert tables.routes("kube-system") is None
        assert registry.get_sample_value("metrics_router_synced") == 1
        assert (registry.get_sample_value("metrics_router_last_sync_timestamp_seconds") or 0) > 0

        fake.add_namespace("tenant-a--dev")
        await tables.until(lambda: tables.routes("tenant-a--dev") == "a")  # within 1 s
        fake.add_namespace("tenant-b")
        await tables.until(lambda: tables.routes("tenant-b") == "b")
        fake.delete("namespaces", "tenant-a--dev")
        await tables.until(lambda: tables.routes("tenant-a--dev") is None)
        assert tables.routes("tenant-a") == "a"
        assert routes.resolution is not None
        assert routes.resolution.tenants == {"a": ("tenant-a",), "b": ("tenant-b",)}


async def test_discovered_services(fake: FakeKube, api: ApiClient) -> None:
    fake.add_namespace("tenant-a")
    fake.add_namespace("tenant-a--sys")
    fake.add_namespace("tenant-b")
    fake.add_service("tenant-a--sys", "keda-operator-metrics-apiserver", KEDA)
    fake.add_service("tenant-b", "web", {"app": "web"})  # not a metrics Service
    tables = Tables()
    routes = make_routes(api, PATTERN, tables, CollectorRegistry())
    async with running(routes.run()):
        await asyncio.wait_for(routes.synced.wait(), 2)
        # The very first table is complete: both informers had synced.
        route = tables.seen[0].lookup("tenant-a")
        assert route is not None
        assert route.upstream.url == "https://keda-operator-metrics-apiserver.tenant-a--sys.svc:443"
        assert tables.routes("tenant-b") is None
        assert routes.resolution is not None
        assert "b" in routes.resolution.unrouted

        fake.add_service("tenant-b", "keda", KEDA, ports=(("metrics", 8080), ("https", 6443)))
        await tables.until(lambda: tables.routes("tenant-b") == "b")
        b = tables.latest.lookup("tenant-b")
        assert b is not None
        assert (b.upstream.host, b.upstream.port) == ("keda.tenant-b.svc", 6443)
        fake.delete("services", "keda", "tenant-b")
        await tables.until(lambda: tables.routes("tenant-b") is None)


async def test_bursts_are_coalesced_and_unchanged_tables_not_published(
    fake: FakeKube, api: ApiClient
) -> None:
    fake.add_namespace("tenant-a")
    tables = Tables()
    routes = make_routes(api, PATTERN_TPL, tables, CollectorRegistry())
    async with running(routes.run()):
        await asyncio.wait_for(routes.synced.wait(), 2)
        await fake.wait_watches("namespaces")
        assert len(tables.seen) == 1
        computed = routes.recomputes
        for i in range(300):
            fake.add_namespace(f"tenant-{i}")
        await tables.until(lambda: tables.latest.namespace_count == 301, within=5.0)
        # not one per event: at most one per min_interval (0.05 s) while the burst lasts
        assert routes.recomputes - computed < 100
        published = len(tables.seen)
        # A namespace of no tenant changes nothing: no table is published for it ...
        fake.add_namespace("kube-public")
        fake.add_namespace("tenant-z")
        await tables.until(lambda: tables.routes("tenant-z") == "z")
        # ... so exactly one more table arrived, for tenant-z.
        assert len(tables.seen) == published + 1


async def test_conflicts_counted_and_logged_once(
    fake: FakeKube, api: ApiClient, caplog: pytest.LogCaptureFixture
) -> None:
    fake.add_namespace("tenant-a")
    fake.add_namespace("tenant-a--sys")
    fake.add_service("tenant-a--sys", "keda", KEDA)
    fake.add_service("tenant-a", "keda", KEDA)
    tables, registry = Tables(), CollectorRegistry()
    routes = make_routes(api, PATTERN, tables, registry)

    def host(ns: str) -> str | None:
        route = tables.latest.lookup(ns)
        return None if route is None else route.upstream.host

    def conflicts() -> float | None:
        return registry.get_sample_value(
            "metrics_router_route_conflicts_total", {"kind": "service"}
        )

    with caplog.at_level(logging.WARNING, logger="router.cluster.routes_loop"):
        async with running(routes.run()):
            await asyncio.wait_for(routes.synced.wait(), 2)
            route = tables.latest.lookup("tenant-a--sys")
            assert route is not None
            assert route.upstream.host == "keda.tenant-a.svc"  # first by namespace/name
            assert conflicts() == 1
            fake.add_namespace("tenant-a--dev")  # recompute, same conflict
            await tables.until(lambda: tables.routes("tenant-a--dev") == "a")
            assert conflicts() == 1
            fake.delete("services", "keda", "tenant-a")
            await tables.until(lambda: host("tenant-a") == "keda.tenant-a--sys.svc")
            fake.add_service("tenant-a", "keda", KEDA)  # the conflict comes back: new again
            await tables.until(lambda: host("tenant-a") == "keda.tenant-a.svc")
            assert conflicts() == 2
    logged = [r for r in caplog.records if "route conflict" in r.getMessage()]
    assert len(logged) == 2
    assert (
        registry.get_sample_value("metrics_router_route_conflicts_total", {"kind": "namespace"})
        == 0
    )


async def test_outage_keeps_routes_and_counts_restarts(fake: FakeKube, api: ApiClient) -> None:
    fake.add_namespace("tenant-a")
    tables, registry = Tables(), CollectorRegistry()
    routes = make_routes(api, PATTERN_TPL, tables, registry)
    async with running(routes.run()):
        await asyncio.wait_for(routes.synced.wait(), 2)
        await fake.wait_watches("namespaces")
        await fake.wait_watches("services")
        await fake.outage()
        restarts = Signal()
        counted = routes.namespaces.on_restart
        assert counted is not None

        def on_restart(reason: str) -> None:
            counted(reason)
            restarts.notify()

        routes.namespaces.on_restart = on_restart
        await restarts.wait_for(lambda: restarts.count >= 2, 2)
        assert len(tables.seen) == 1  # nothing was published during the outage
        assert tables.routes("tenant-a") == "a"
        assert (
            registry.get_sample_value(
                "metrics_router_watch_restarts_total", {"resource": "namespaces"}
            )
            or 0
        ) >= 1
        await fake.recover()
        fake.add_namespace("tenant-b")
        await tables.until(lambda: tables.routes("tenant-b") == "b", 3)
        assert tables.routes("tenant-a") == "a"


async def test_first_table_waits_for_both_informers(fake: FakeKube, api: ApiClient) -> None:
    fake.add_namespace("tenant-a")
    fake.add_service("tenant-a", "keda", KEDA)
    fake.fail_next(3)  # the first lists fail, in whatever order the informers ask
    tables = Tables()
    routes = make_routes(api, PATTERN, tables, CollectorRegistry())
    async with running(routes.run()):
        await asyncio.wait_for(routes.synced.wait(), 2)
        assert tables.seen[0].lookup("tenant-a") is not None


async def test_route_table_log_line_carries_its_fields_as_keys(
    fake: FakeKube, api: ApiClient, caplog: pytest.LogCaptureFixture
) -> None:
    fake.add_namespace("tenant-a")
    fake.add_namespace("tenant-a--dev")
    routes = make_routes(api, PATTERN_TPL, Tables(), CollectorRegistry())
    with caplog.at_level(logging.INFO, logger="router"):
        async with running(routes.run()):
            await asyncio.wait_for(routes.synced.wait(), 2)
    (record,) = [r for r in caplog.records if r.getMessage() == "route table updated"]
    doc = json.loads(logs.JsonFormatter().format(record))
    assert (doc["tenants"], doc["namespaces"], doc["unrouted_tenants"]) == (1, 2, 0)


def test_metrics_share_a_registry_with_the_proxy_metrics() -> None:
    registry = CollectorRegistry()
    ProxyMetrics(registry)
    ClusterMetrics(registry)
    names = {m.name for m in registry.collect()}
    assert {"metrics_router_watch_restarts", "metrics_router_synced"} <= names


# --------------------------------------------------------------------------- requestheader

GOOD = {
    "client-ca-file": CA_PEM,
    "requestheader-client-ca-file": CA_PEM,
    "requestheader-allowed-names": '["front-proxy-client"]',
    "requestheader-username-headers": '["X-Remote-User"]',
    "requestheader-uid-headers": '["X-Remote-Uid"]',
    "requestheader-group-headers": '["X-Remote-Group"]',
    "requestheader-extra-headers-prefix": '["X-Remote-Extra-"]',
}


def test_parse_auth_configmap() -> None:
    s = parse_auth_configmap(GOOD)
    assert s == RequestHeaderSettings(
        client_ca_pem=CA_PEM.encode(),
        allowed_names=("front-proxy-client",),
        username_headers=("X-Remote-User",),
        uid_headers=("X-Remote-Uid",),
        group_headers=("X-Remote-Group",),
        extra_headers_prefixes=("X-Remote-Extra-",),
    )


@pytest.mark.parametrize(
    ("changes", "check"),
    [
        ({"requestheader-allowed-names": "[]"}, lambda s: s.allowed_names == ()),
        ({"requestheader-allowed-names": None}, lambda s: s.allowed_names == ()),
        (
            {"requestheader-username-headers": None},
            lambda s: s.username_headers == DEFAULT_USERNAME_HEADERS,
        ),
        (
            {"requestheader-group-headers": "[]"},
            lambda s: s.group_headers == DEFAULT_GROUP_HEADERS,
        ),
        ({"requestheader-allowed-names": '["a", "b"]'}, lambda s: s.allowed_names == ("a", "b")),
        (
            {"requestheader-extra-headers-prefix": '["X-A-", "X-B-"]'},
            lambda s: s.extra_headers_prefixes == ("X-A-", "X-B-"),
        ),
    ],
)
def test_parse_auth_configmap_defaults(changes: dict[str, str | None], check: Any) -> None:
    data = {k: v for k, v in (GOOD | changes).items() if v is not None}
    assert check(parse_auth_configmap(data))


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"requestheader-client-ca-file": None}, "requestheader-client-ca-file"),
        ({"requestheader-client-ca-file": "garbage"}, "requestheader-client-ca-file"),
        ({"requestheader-allowed-names": "front-proxy-client"}, "not a JSON array"),
        ({"requestheader-group-headers": '{"a": 1}'}, "array of strings"),
        ({"requestheader-username-headers": "[1]"}, "array of strings"),
    ],
)
def test_parse_auth_configmap_errors(changes: dict[str, str | None], problem: str) -> None:
    data = {k: v for k, v in (GOOD | changes).items() if v is not None}
    with pytest.raises(ValueError, match=problem):
        parse_auth_configmap(data)


async def test_requestheader_follower(fake: FakeKube, api: ApiClient) -> None:
    fake.add_configmap("kube-system", "extension-apiserver-authentication", GOOD)
    fake.add_configmap("kube-system", "other", {"x": "y"})
    seen: list[RequestHeaderSettings] = []
    signal = Signal()

    def on_change(settings: RequestHeaderSettings) -> None:
        seen.append(settings)
        signal.notify()

    follower = RequestHeaderFollower(
        api, on_change, metrics=ClusterMetrics(CollectorRegistry()), backoff=fast_backoff()
    )
    async with running(follower.run()):
        await asyncio.wait_for(follower.got_first.wait(), 2)
        assert seen[0].allowed_names == ("front-proxy-client",)
        await fake.wait_watches("configmaps")
        # A change that does not alter the settings is not passed on ...
        fake.add_configmap(AUTH_NS, AUTH, GOOD | {"client-ca-file": CA_PEM + CA_PEM})
        # ... nor is a broken one (the last good settings stay) ...
        fake.add_configmap(AUTH_NS, AUTH, GOOD | {"requestheader-allowed-names": "nope"})
        # ... but a real change is.
        fake.add_configmap(AUTH_NS, AUTH, GOOD | {"requestheader-allowed-names": '["aggregator"]'})
        await signal.wait_for(lambda: len(seen) == 2)
        assert seen[1].allowed_names == ("aggregator",)
        assert follower.settings == seen[1]
        fake.delete("configmaps", "extension-apiserver-authentication", "kube-system")
        fake.add_configmap("kube-system", "extension-apiserver-authentication", GOOD)
        await signal.wait_for(lambda: len(seen) == 3)
        assert seen[2] == seen[0]
        assert [r for _, p, q in fake.requests if "watch" in q for r in [q["fieldSelector"]]] == [
            "metadata.name=extension-apiserver-authentication"
        ]
