"""PolicySync through the fake API server and the real kubernetes-asyncio client: server-side
apply, pruning of owned objects only, retries, resync reverting hand edits, leader hand-over."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from router.cli.policy_options import (
    add_policy_arguments,
    parse_duration,
    policy_settings_from_args,
)
from router.cluster import client as kube
from router.cluster.lease import LeaderElector
from router.cluster.policy_loop import FIELD_MANAGER, PolicySync, PolicySyncSettings
from router.core.policy import (
    KIND_CILIUM,
    KIND_NETWORKPOLICY,
    OWNER_LABEL,
    parse_policy_config,
)
from router.core.tenancy import NamespaceInfo, Resolution, resolve
from router.metrics import PolicyMetrics
from router.settings import LeaderElectionSettings, TenancySettings
from tests.conftest import wait_until as poll_until
from tests.core.policy.trees import talk_tree
from tests.fakeapi import FakeKube

pytestmark = pytest.mark.usefixtures("no_leftover_tasks")

NP = ("networking.k8s.io/v1", "networkpolicies")
CCNP = ("cilium.io/v2", "ciliumclusterwidenetworkpolicies")
LEASE = ("coordination.k8s.io/v1", "leases")
CONFIG = parse_policy_config("kubeAPIServer: {cidrs: [172.18.0.2/32]}\n")
FAST_ELECTION = {"lease_duration": 1.0, "renew_deadline": 0.6, "retry_period": 0.05}


def settings(
    identity: str = "r1", *, elect: bool = True, resync: float = 300.0, **kw: Any
) -> PolicySyncSettings:
    return PolicySyncSettings(
        kind=kw.pop("kind", KIND_NETWORKPOLICY),
        config=kw.pop("config", CONFIG),
        resync_period=resync,
        leader_election=LeaderElectionSettings(
            enabled=elect,
            identity=identity,
            lease_duration=FAST_ELECTION["lease_duration"],
            renew_deadline=FAST_ELECTION["renew_deadline"],
            retry_period=FAST_ELECTION["retry_period"],
        ),
        backoff_initial=0.02,
        backoff_maximum=0.1,
        **kw,
    )


def seed(fake: FakeKube) -> tuple[Resolution, list[dict[str, Any]]]:
    objs, services = talk_tree()
    for obj in objs.values():
        fake.put("namespaces", obj)
    resolution = resolve(
        [NamespaceInfo.from_object(o) for o in objs.values()],
        services,
        TenancySettings(strategies=("hnc",)),
    )
    return resolution, [copy.deepcopy(o) for o in objs.values()]


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


@asynccontextmanager
async def running(
    fake: FakeKube, s: PolicySyncSettings, registry: CollectorRegistry | None = None
) -> AsyncIterator[PolicySync]:
    api = await kube.api_client(fake.kubeconfig)
    sync = PolicySync(
        api, kind=s.kind, settings=s, metrics=PolicyMetrics(registry or CollectorRegistry())
    )
    task = asyncio.create_task(sync.run())
    try:
        yield sync
    finally:
        await sync.stop()
        await asyncio.wait_for(task, 5)
        await api.close()


def lease(fake: FakeKube) -> dict[str, Any]:
    obj = fake.get(LEASE[1], "metrics-router", "metrics-router", LEASE[0])
    assert obj is not None
    return obj


def policies(fake: FakeKube, gvr: tuple[str, str] = NP) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in fake.objects(gvr[1], api_version=gvr[0])}


@pytest.mark.parametrize(("kind", "gvr"), [(KIND_NETWORKPOLICY, NP), (KIND_CILIUM, CCNP)])
async def test_applies_every_object_with_server_side_apply(
    tmp_path: Path, kind: str, gvr: tuple[str, str]
) -> None:
    registry = CollectorRegistry()
    async with FakeKube(tmp_path) as fake:
        resolution, namespaces = seed(fake)
        async with running(fake, settings(kind=kind, elect=False), registry) as sync:
            sync.update(resolution, namespaces)
            await poll_until(lambda: sync.passes >= 1)
            assert sync.last_result is not None
            assert sync.last_result.ok
            got = policies(fake, gvr)
            assert len(got) == 9
            for obj in got.values():
                assert obj["metadata"]["labels"][OWNER_LABEL] == "metrics-router"
                assert [m["manager"] for m in obj["metadata"]["managedFields"]] == [FIELD_MANAGER]
            applies = [r for r in fake.requests if r[0] == "PATCH"]
            assert len(applies) == 9
            assert all(q == {"fieldManager": FIELD_MANAGER, "force": "true"} for _, _, q in applies)
            assert value(registry, "metrics_router_policy_applies_total", result="success") == 9
            assert value(registry, "metrics_router_leader") == 1

            # The same tenants again: nothing differs, nothing is written.
            sync.update(resolution, namespaces)
            await poll_until(lambda: sync.passes >= 2)
            assert len([r for r in fake.requests if r[0] == "PATCH"]) == 9
            assert sync.last_result.applied == ()


async def test_prunes_owned_objects_only(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    async with FakeKube(tmp_path) as fake:
        resolution, namespaces = seed(fake)
        foreign = {
            "apiVersion": NP[0],
            "kind": "NetworkPolicy",
            "metadata": {"name": "default-deny", "namespace": "tenant-b--sys",
                         "labels": {"app.kubernetes.io/managed-by": "helm"}},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress"]},
        }  # fmt: skip
        unlabelled = copy.deepcopy(foreign)
        unlabelled["metadata"] = {"name": "metrics-router-tenant-b-keda-operator-copy",
                                  "namespace": "tenant-b--sys"}  # fmt: skip
        stale = copy.deepcopy(foreign)
        stale["metadata"] = {"name": "metrics-router-gone-keda-operator", "namespace": "gone--sys",
                             "labels": {OWNER_LABEL: "metrics-router"}}  # fmt: skip
        for obj in (foreign, unlabelled, stale):
            fake.put(NP[1], obj, api_version=NP[0])
        async with running(fake, settings(elect=False), registry) as sync:
            sync.update(resolution, namespaces)
            await poll_until(lambda: sync.passes >= 1)
            names = set(policies(fake))
            assert "metrics-router-gone-keda-operator" not in names
            assert {"default-deny", "metrics-router-tenant-b-keda-operator-copy"} <= names
            assert value(registry, "metrics_router_policy_prunes_total") == 1

            # Tenant b leaves: its 4 objects go, the foreign ones stay.
            without_b = Resolution(
                table=type(resolution.table).from_tenants(
                    [t for t in resolution.table.tenants if t.name != "tenant-b"]
                ),
                tenants={"tenant-a": resolution.tenants["tenant-a"]},
            )
            sync.update(without_b, namespaces)
            await poll_until(lambda: sync.passes >= 2)
            names = set(policies(fake))
            assert not any(
                n.startswith("metrics-router-tenant-b-")
                and n.endswith(("operator", "apiserver", "webhooks", "egress"))
                for n in names
            )
            assert {"default-deny", "metrics-router-tenant-b-keda-operator-copy"} <= names
            assert len(names) == 5 + 2
            assert value(registry, "metrics_router_policy_prunes_total") == 5


async def test_periodic_resync_reverts_a_hand_edit(tmp_path: Path) -> None:
    async with FakeKube(tmp_path) as fake:
        resolution, namespaces = seed(fake)
        async with running(fake, settings(elect=False, resync=0.05)) as sync:
            sync.update(resolution, namespaces)
            await poll_until(lambda: sync.passes >= 1)
            name = "metrics-router-tenant-a-keda-operator"
            original = policies(fake)[name]["spec"]
            edited = copy.deepcopy(policies(fake)[name])
            edited["spec"]["egress"] = [{}]  # allow everything, by hand
            fake.put(NP[1], edited, api_version=NP[0])
            assert policies(fake)[name]["spec"]["egress"] == [{}]
            seen = sync.passes
            await poll_until(lambda: sync.passes >= seen + 2)  # no update(): the resync
            assert policies(fake)[name]["spec"] == original


async def test_annotation_edits_in_a_live_namespace_cache_count_at_the_next_resync(
    tmp_path: Path,
) -> None:
    async with FakeKube(tmp_path) as fake:
        resolution, namespaces = seed(fake)
        cache = {o["metadata"]["name"]: o for o in namespaces}  # stands for Informer.cache
        async with running(fake, settings(elect=False, resync=0.05)) as sync:
            sync.update(resolution, cache)
            await poll_until(lambda: sync.passes >= 1)
            name = "metrics-router-tenant-a-keda-operator"
            assert {"ipBlock": {"cidr": "203.0.113.0/24"}} in policies(fake)[name]["spec"][
                "egress"
            ][-1]["to"]
            edited = copy.deepcopy(cache["tenant-a"])
            edited["metadata"]["annotations"]["tenancy.metrics-router.io/egress-cidrs"] = (
                "192.0.2.0/24"
            )
            cache["tenant-a"] = edited  # the informer replaces objects on change
            seen = sync.passes
            await poll_until(lambda: sync.passes >= seen + 2)  # no update() call
            assert policies(fake)[name]["spec"]["egress"][-1]["to"] == [
                {"ipBlock": {"cidr": "192.0.2.0/24"}}
            ]


class FailingApplies(FakeKube):
    """The fake API, failing the first ``failures`` server-side applies with a 500."""

    failures = 2

    async def _dispatch(
        self, request: web.BaseRequest, query: dict[str, str]
    ) -> web.StreamResponse:
        if request.method == "PATCH" and self.failures > 0:
            self.failures -= 1
            return web.json_response({"kind": "Status", "code": 500, "reason": "InternalError",
                                      "message": "etcd is sad"}, status=500)  # fmt: skip
        return await super()._dispatch(request, query)


async def test_failed_applies_are_counted_and_retried_with_backoff(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    async with FailingApplies(tmp_path) as fake:
        resolution, namespaces = seed(fake)
        async with running(fake, settings(elect=False), registry) as sync:
            sync.update(resolution, namespaces)
            await poll_until(lambda: sync.passes >= 1)
            assert sync.last_result is not None
            assert len(sync.last_result.failed) == 2
            assert value(registry, "metrics_router_policy_applies_total", result="failure") == 2
            await poll_until(lambda: sync.passes >= 2)  # retried without any update()
            assert sync.last_result.ok
            assert len(sync.last_result.applied) == 2
            assert len(policies(fake)) == 9
            assert value(registry, "metrics_router_policy_applies_total", result="success") == 9


async def test_refused_render_leaves_the_cluster_alone(tmp_path: Path) -> None:
    async with FakeKube(tmp_path) as fake:
        resolution, namespaces = seed(fake)
        owned = {
            "apiVersion": NP[0], "kind": "NetworkPolicy",
            "metadata": {"name": "metrics-router-x", "namespace": "x",
                         "labels": {OWNER_LABEL: "metrics-router"}},
            "spec": {"podSelector": {}},
        }  # fmt: skip
        fake.put(NP[1], owned, api_version=NP[0])
        # No kubeAPIServer.cidrs and no default/kubernetes endpoints to discover them from.
        s = settings(elect=False, config=parse_policy_config(""))
        async with running(fake, s) as sync:
            sync.update(resolution, namespaces)
            await poll_until(lambda: sync.passes >= 1)
            assert sync.last_result is not None
            assert sync.last_result.error
            assert list(policies(fake)) == ["metrics-router-x"]
            assert not [r for r in fake.requests if r[0] in ("PATCH", "DELETE")]


async def test_reads_root_annotations_when_given_namespace_infos(tmp_path: Path) -> None:
    async with FakeKube(tmp_path) as fake:
        resolution, namespaces = seed(fake)
        async with running(fake, settings(elect=False)) as sync:
            sync.update(resolution, [NamespaceInfo.from_object(o) for o in namespaces])
            await poll_until(lambda: sync.passes >= 1)
            op = policies(fake)["metrics-router-tenant-a-keda-operator"]
            assert {"ipBlock": {"cidr": "203.0.113.0/24"}} in op["spec"]["egress"][-1]["to"]
            assert ("GET", "/api/v1/namespaces/tenant-a", {}) in fake.requests


async def wait_until(predicate: Callable[[], bool], fake: FakeKube, within: float = 5.0) -> None:
    """Re-check after every API request (the fake's request signal), no sleeping."""
    await fake.wait_changed(predicate, within)


async def test_only_the_leader_writes_and_hands_over_on_release(tmp_path: Path) -> None:
    reg1, reg2 = CollectorRegistry(), CollectorRegistry()
    async with FakeKube(tmp_path) as fake:
        resolution, namespaces = seed(fake)
        async with running(fake, settings("r1"), reg1) as first:
            await asyncio.wait_for(first.wait_leader(), 5)
            held = lease(fake)
            assert held is not None
            assert held["spec"]["holderIdentity"] == "r1"
            assert first.passes == 0  # leader, but no tenants yet: nothing written
            first.update(resolution, namespaces)
            await poll_until(lambda: first.passes >= 1)
            assert len(policies(fake)) == 9
            async with running(fake, settings("r2"), reg2) as second:
                second.update(resolution, namespaces)
                # r2 keeps trying while r1 renews: several lease rounds, still a follower.
                rounds = len([r for r in fake.requests if r[1].endswith("/leases/metrics-router")])
                await wait_until(
                    lambda: (
                        len([r for r in fake.requests if r[1].endswith("/leases/metrics-router")])
                        >= rounds + 6
                    ),
                    fake,
                )
                assert not second.is_leader
                assert second.passes == 0
                assert value(reg2, "metrics_router_leader") == 0
                await first.stop()  # releases the Lease
                await asyncio.wait_for(second.wait_leader(), 5)
                await poll_until(lambda: second.passes >= 1)
                assert value(reg1, "metrics_router_leader") == 0
                assert value(reg2, "metrics_router_leader") == 1
                held = lease(fake)
                assert held["spec"]["holderIdentity"] == "r2"
                assert held["spec"]["leaseTransitions"] == 1
            held = lease(fake)
            assert held["spec"]["holderIdentity"] == ""  # r2 released it on stop


async def test_the_lease_loop_retries_by_the_one_retry_policy(tmp_path: Path) -> None:
    """A failed Lease request is retried after the server's Retry-After (capped at the renew
    deadline), not after the short retry period; a plain failure after the retry period."""
    le = LeaderElectionSettings(
        identity="r1", lease_duration=3.0, renew_deadline=2.0, retry_period=0.05
    )
    async with FakeKube(tmp_path) as fake:
        api = await kube.api_client(fake.kubeconfig)
        elector = LeaderElector(api, le, lambda leader: None)
        loop = asyncio.get_running_loop()

        def lease_requests() -> int:
            return len([r for r in fake.requests if "/leases" in r[1]])

        fake.fail_next(1, status=429, retry_after=1)
        task = asyncio.create_task(elector.run())
        try:
            await wait_until(lambda: lease_requests() >= 1, fake)
            failed_at = loop.time()
            await wait_until(lambda: lease_requests() >= 2, fake)
            assert loop.time() - failed_at >= 0.9  # Retry-After: 1, not the 0.05 s period
            await wait_until(lambda: elector.is_leader, fake)
            fake.fail_next(1, status=500)
            seen = lease_requests()
            await wait_until(lambda: lease_requests() >= seen + 1, fake)
            failed_at = loop.time()
            await wait_until(lambda: lease_requests() >= seen + 2, fake)
            assert loop.time() - failed_at < 0.9  # no Retry-After: the retry period
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await api.close()


async def test_an_expired_lease_of_a_dead_leader_is_taken_over(tmp_path: Path) -> None:
    async with FakeKube(tmp_path) as fake:
        fake.put(
            LEASE[1],
            {
                "apiVersion": LEASE[0], "kind": "Lease",
                "metadata": {"name": "metrics-router", "namespace": "metrics-router"},
                "spec": {"holderIdentity": "ghost", "leaseDurationSeconds": 1,
                         "renewTime": "2024-01-01T00:00:00.000000Z", "leaseTransitions": 3},
            },
            api_version=LEASE[0],
        )  # fmt: skip
        started = time.monotonic()
        async with running(fake, settings("r1")) as sync:
            await asyncio.wait_for(sync.wait_leader(), 5)
            # Expiry is judged on our own clock from when we first saw the record.
            assert time.monotonic() - started >= 1.0
        held = lease(fake)
        assert held["spec"]["leaseTransitions"] == 4


def test_flags() -> None:
    parser = argparse.ArgumentParser()
    add_policy_arguments(parser)
    args = parser.parse_args([])
    errors: list[str] = []
    assert policy_settings_from_args(args, errors) is None
    assert errors == []
    args = parser.parse_args(
        ["--manage-network-policies", "--network-policy-kind", "cilium", "--leader-elect=false",
         "--leader-election-namespace", "ops", "--leader-election-lease-name", "mr-lock",
         "--policy-resync-period", "90s"]
    )  # fmt: skip
    s = policy_settings_from_args(args, errors)
    assert errors == []
    assert s is not None
    assert (s.kind, s.resync_period, s.leader_election.enabled) == (KIND_CILIUM, 90.0, False)
    assert (s.leader_election.namespace, s.leader_election.lease_name) == ("ops", "mr-lock")
    assert parser.parse_args(["--leader-elect"]).leader_elect is True
    args = parser.parse_args(
        ["--manage-network-policies", "--policy-resync-period", "soon",
         "--leader-elect-retry-period", "20s", "--policy-config", "/nonexistent"]
    )  # fmt: skip
    assert policy_settings_from_args(args, errors) is not None
    assert any("--policy-resync-period" in e for e in errors)
    assert any("retry-period" in e for e in errors)
    assert any("--policy-config" in e for e in errors)


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90.0), ("5m", 300.0), ("1h30m", 5400.0), ("1.5s", 1.5)]
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "5x", "s5"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)
