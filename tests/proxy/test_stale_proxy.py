"""Stale answers end to end: a real router, real KEDA stubs over mTLS, stubs stopped or failing."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from typing import Any

import aiohttp
import pytest
from kubernetes_asyncio.client import ApiClient
from prometheus_client import CollectorRegistry

from router.cluster.routes_loop import ClusterRoutes
from router.core.routes import RouteTable
from router.core.tenancy import SERVE_STALE_ANNOTATION
from router.metrics import ClusterMetrics
from router.settings import TenancySettings
from tests.conftest import (
    HPA_IDENTITY,
    Reply,
    RouterHarness,
    StartRouter,
    build_request,
    metric_path,
)
from tests.fakeapi import FakeKube, Signal, running
from tests.proxy.test_stale import parse_warning_header

pytestmark = pytest.mark.usefixtures("no_leftover_tasks")

PATH = metric_path("tenant-a") + "?labelSelector=scaledobject.keda.sh%2Fname%3Dapp"
ONE_GROUP_MORE = (*HPA_IDENTITY, ("X-Remote-Group", "system:masters"))
ONE_GROUP_LESS = tuple(h for h in HPA_IDENTITY if h != ("X-Remote-Group", "system:authenticated"))


def assert_stale(reply: Reply, fresh: Reply, reason_words: str) -> int:
    """The answer is the fresh body with its content type, a 299 warning and Age; the age."""
    assert reply.status == 200, reply.body
    assert reply.body == fresh.body
    assert reply.content_type == fresh.content_type
    (warning,) = reply.headers.getall("Warning")
    code, agent, text, _ = parse_warning_header(warning)
    assert (code, agent) == (299, "-")
    assert text.startswith("stale metric value from ")
    assert text.endswith(" ago: " + reason_words)
    age = int(reply.headers["Age"])
    assert 0 <= age < 30
    assert "X-Stub-Tenant" not in reply.headers  # nothing of the failed answer leaks in
    return age


async def routes_json(h: RouterHarness) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(h.metrics_url + "/routes") as resp,
    ):
        assert resp.status == 200
        doc: dict[str, Any] = json.loads(await resp.text())
    return {t["tenant"]: t for t in doc["tenants"]}


async def stale_router(
    start_router: StartRouter, extra_args: Sequence[str] = ("--serve-stale-for", "30s")
) -> RouterHarness:
    return await start_router({"a": ["tenant-a"], "b": ["tenant-b"]}, extra_args=extra_args)


# --------------------------------------------------------------------------- the failures


@pytest.mark.parametrize(
    ("failure", "reason", "words"),
    [
        ("stopped", "unreachable", "the tenant's metrics server is unreachable"),
        ("503", "upstream_503", "the tenant's metrics server answered 503"),
        ("500", "upstream_500", "the tenant's metrics server answered 500"),
        ("drop", "protocol", "the tenant's metrics server sent a broken response"),
    ],
)
async def test_a_caller_gets_its_own_last_answer_while_the_tenant_fails(
    start_router: StartRouter, failure: str, reason: str, words: str
) -> None:
    h = await stale_router(start_router)
    stub = h.stubs["a"]
    fresh = await h.request(PATH)
    assert fresh.status == 200
    assert "Warning" not in fresh.headers
    port = stub.port
    if failure == "stopped":
        await stub.stop()
    elif failure == "drop":
        stub.behaviour.drop = True
    else:
        stub.behaviour.fail_status = int(failure)

    reply = await h.request(PATH)
    assert_stale(reply, fresh, words)
    # Another identity, even with one group more or less, gets the failure, never the body.
    for other in (ONE_GROUP_MORE, ONE_GROUP_LESS):
        refused = await h.request(PATH, other)
        assert refused.status in (500, 502, 503), refused.body
        assert refused.json()["kind"] == "Status"
    # Tenant b is not affected, and never answered from a's entries.
    assert (await h.request(metric_path("tenant-b"))).headers.get("Warning") is None

    labels = {"tenant": "a", "reason": reason}
    assert await h.sample("metrics_router_stale_answers_total", labels) == 1
    assert await h.sample("metrics_router_stale_answer_age_seconds_count", {"tenant": "a"}) == 1
    assert await h.sample("metrics_router_requests_total", {"tenant": "a", "code": "200"}) == 2
    view = (await routes_json(h))["a"]["staleAnswers"]
    assert view["enabled"] is True
    assert view["serveStaleFor"] == "30s"
    assert view["entries"] == 1
    assert view["lastServed"] is not None
    assert (await routes_json(h))["b"]["staleAnswers"]["lastServed"] is None

    # The tenant comes back: fresh answers again, no warning.
    if failure == "stopped":
        await stub.start(port=port or 0)
    stub.behaviour.drop = False
    stub.behaviour.fail_status = None
    stub.behaviour.value = "43"
    again = await h.request(PATH)
    assert again.status == 200
    assert "Warning" not in again.headers
    assert again.json()["items"][0]["value"] == "43"


async def test_a_timeout_is_answered_stale_when_it_expires(start_router: StartRouter) -> None:
    h = await stale_router(start_router, ("--serve-stale-for", "30s", "--upstream-timeout", "0.3"))
    fresh = await h.request(PATH)
    h.stubs["a"].behaviour.delay = 30.0  # released when the stub stops at teardown
    assert_stale(await h.request(PATH), fresh, "the tenant's metrics server timed out")
    assert (
        await h.sample("metrics_router_stale_answers_total", {"tenant": "a", "reason": "timeout"})
        == 1
    )
    assert (await h.request(PATH, ONE_GROUP_MORE)).status == 504


async def test_the_error_comes_back_after_the_duration(start_router: StartRouter) -> None:
    duration = 1.0
    h = await stale_router(start_router, ("--serve-stale-for", f"{duration}s"))
    fresh = await h.request(PATH)
    remembered_by = time.monotonic()  # the router stored it before this reply was read
    await h.stubs["a"].stop()
    assert_stale(await h.request(PATH), fresh, "the tenant's metrics server is unreachable")
    # Let the duration pass (this waits for time itself, not for another task).
    await asyncio.sleep(max(0.0, remembered_by + duration + 0.05 - time.monotonic()))
    late = await h.request(PATH)
    assert late.status == 503
    assert late.json()["reason"] == "ServiceUnavailable"
    assert (await routes_json(h))["a"]["staleAnswers"]["entries"] == 0


@pytest.mark.parametrize("code", [401, 403, 404])
async def test_upstream_authorisation_and_not_found_pass_through(
    start_router: StartRouter, code: int
) -> None:
    h = await stale_router(start_router)
    assert (await h.request(PATH)).status == 200
    h.stubs["a"].behaviour.fail_status = code
    reply = await h.request(PATH)
    assert reply.status == code
    assert "Warning" not in reply.headers
    assert reply.json()["code"] == code
    assert "metrics_router_stale_answers_total{" not in await h.metrics_text()


async def test_errors_are_never_remembered(start_router: StartRouter) -> None:
    h = await stale_router(start_router)
    h.stubs["a"].behaviour.fail_status = 503
    first = await h.request(PATH)
    assert first.status == 503
    await h.stubs["a"].stop()
    reply = await h.request(PATH)
    assert reply.status == 503  # the router's own 503: nothing was remembered to replace it
    assert reply.json()["message"] == "tenant 'a' metrics server is unreachable"
    assert (await routes_json(h))["a"]["staleAnswers"]["entries"] == 0


async def test_off_by_default(start_router: StartRouter) -> None:
    h = await stale_router(start_router, ())
    assert (await h.request(PATH)).status == 200
    await h.stubs["a"].stop()
    assert (await h.request(PATH)).status == 503
    view = (await routes_json(h))["a"]["staleAnswers"]
    assert view == {"enabled": False, "serveStaleFor": "0s", "entries": 0, "lastServed": None}


async def test_over_the_inflight_limit_answers_stale(start_router: StartRouter) -> None:
    h = await stale_router(
        start_router, ("--serve-stale-for", "30s", "--max-inflight-per-tenant", "1")
    )
    stub = h.stubs["a"]
    fresh = await h.request(PATH)
    stub.behaviour.hang = True
    hung = await h.connect()
    hung.writer.write(build_request(PATH, HPA_IDENTITY))
    await stub.wait_for_requests(2)  # the hung request is in flight upstream
    assert_stale(await h.request(PATH), fresh, "the tenant has too many requests in flight")
    assert (await h.request(PATH, ONE_GROUP_MORE)).status == 429
    labels = {"tenant": "a", "reason": "overloaded"}
    assert await h.sample("metrics_router_stale_answers_total", labels) == 1


# --------------------------------------------------------------------------- per-tenant settings


async def test_routes_file_sets_the_duration_per_tenant(start_router: StartRouter) -> None:
    h = await stale_router(start_router, ())
    routes = h.routes_for({"a": ["tenant-a"], "b": ["tenant-b"]})
    h.write_routes(routes)
    text = h.routes_file.read_text().replace(
        f"upstream: {h.stubs['a'].url}\n", f"upstream: {h.stubs['a'].url}\n    serveStaleFor: 1m\n"
    )
    assert "serveStaleFor" in text
    h.routes_file.write_text(text)
    h.router.check_files()
    tenants = await routes_json(h)
    assert tenants["a"]["staleAnswers"]["serveStaleFor"] == "1m"
    assert tenants["b"]["staleAnswers"]["enabled"] is False

    fresh_a = await h.request(PATH)
    assert (await h.request(metric_path("tenant-b"))).status == 200
    await h.stubs["a"].stop()
    await h.stubs["b"].stop()
    assert_stale(await h.request(PATH), fresh_a, "the tenant's metrics server is unreachable")
    assert (await h.request(metric_path("tenant-b"))).status == 503

    # Tenant a leaves the routes: its entries go with it, and do not come back with it.
    h.write_routes({"b": routes["b"]})
    h.router.check_files()
    assert "a" not in await routes_json(h)
    h.routes_file.write_text(text)
    h.router.check_files()
    assert (await routes_json(h))["a"]["staleAnswers"]["entries"] == 0
    assert (await h.request(PATH)).status == 503


# --------------------------------------------------------------------------- cluster mode


def keda_service(annotations: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": "keda-operator-metrics-apiserver",
            "namespace": "tenant-a--sys",
            "labels": {"app.kubernetes.io/name": "keda-operator-metrics-apiserver"},
            "annotations": annotations,
        },
        "spec": {"type": "ClusterIP", "ports": [{"name": "https", "port": 443}]},
    }


async def test_service_annotation_sets_the_tenant_duration(fake: FakeKube, api: ApiClient) -> None:
    fake.add_namespace("tenant-a")
    fake.add_namespace("tenant-a--sys")
    fake.put("services", keda_service({SERVE_STALE_ANNOTATION: "45s"}))
    tables: list[RouteTable] = []
    changed = Signal()

    def on_table(table: RouteTable) -> None:
        tables.append(table)
        changed.notify()

    settings = TenancySettings(strategies=("pattern",))
    routes = ClusterRoutes(
        api, settings, metrics=ClusterMetrics(CollectorRegistry()), on_table=on_table
    )

    def stale_for() -> float | None:
        tenant = tables[-1].tenant("tenant-a") if tables else None
        return None if tenant is None else tenant.serve_stale_for

    async with running(routes.run()):
        await changed.wait_for(lambda: stale_for() == 45.0, 2.0)
        fake.put("services", keda_service({SERVE_STALE_ANNOTATION: "0"}))  # turned off
        await changed.wait_for(lambda: stale_for() == 0.0, 2.0)
        fake.put("services", keda_service({}))  # removed: the --serve-stale-for default
        await changed.wait_for(lambda: stale_for() is None, 2.0)
