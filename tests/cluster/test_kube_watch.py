"""router.kube against the fake API (real TLS, real kubernetes-asyncio client): list+watch,
bookmarks, 410 relists, dropped connections, outages, errors, and the fake's write paths."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio.client import ApiClient

from router.cluster import client as kube
from router.cluster.informer import Informer
from router.cluster.retry import Backoff
from tests.fakeapi import FakeKube, Signal, fast_backoff, running

pytestmark = pytest.mark.usefixtures("no_leftover_tasks")


class Watched:
    """An informer plus a Signal notified on every change and every restart."""

    def __init__(self, api: ApiClient, resource: str = "namespaces", **kw: Any) -> None:
        self.signal = Signal()
        self.changes = 0
        self.reasons: list[str] = []
        self.informer = Informer(
            api, resource, backoff=fast_backoff(), on_restart=self._restart, **kw
        )

    def _change(self) -> None:
        self.changes += 1
        self.signal.notify()

    def _restart(self, reason: str) -> None:
        self.reasons.append(reason)
        self.signal.notify()

    def run(self) -> Coroutine[Any, Any, None]:
        return self.informer.run(self._change)

    async def until(self, predicate: Callable[[], bool], within: float = 2.0) -> None:
        await self.signal.wait_for(predicate, within)

    @property
    def names(self) -> set[str]:
        return set(self.informer.cache)


def watching(fake: FakeKube, resource: str) -> Callable[[str, str, dict[str, str]], bool]:
    return lambda method, path, q: path.endswith(f"/{resource}") and q.get("watch") == "true"


# --------------------------------------------------------------------------- list + watch


async def test_list_pages_then_watch_add_modify_delete(fake: FakeKube, api: ApiClient) -> None:
    for i in range(7):
        fake.add_namespace(f"ns-{i}", {"team": "x"})
    w = Watched(api, page_size=3)
    async with running(w.run()):
        await asyncio.wait_for(w.informer.synced.wait(), 2)
        assert w.names == {f"ns-{i}" for i in range(7)}
        lists = [q for m, p, q in fake.requests if p == "/api/v1/namespaces" and "watch" not in q]
        assert len(lists) == 3  # 3 + 3 + 1 with continue tokens
        assert all(q["limit"] == "3" for q in lists)
        _, _, q = await fake.wait_request(watching(fake, "namespaces"))
        assert q["allowWatchBookmarks"] == "true"
        assert q["resourceVersion"] == str(fake.resource_version)
        assert int(q["timeoutSeconds"]) >= 300

        fake.add_namespace("ns-new")
        await w.until(lambda: "ns-new" in w.names)
        fake.set_labels("namespaces", "ns-new", {"color": "red"})
        await w.until(lambda: w.informer.cache["ns-new"]["metadata"]["labels"] == {"color": "red"})
        fake.delete("namespaces", "ns-0")
        await w.until(lambda: "ns-0" not in w.names)
        assert w.informer.resource_version == str(fake.resource_version)
        assert w.reasons == []


async def test_namespaced_list_with_label_selector_transitions(
    fake: FakeKube, api: ApiClient
) -> None:
    fake.add_service("a", "keda", {"app": "keda"})
    fake.add_service("a", "other", {"app": "web"})
    fake.add_service("b", "keda", {"app": "keda"})
    w = Watched(api, "services", namespace="a", label_selector="app in (keda, x)")
    async with running(w.run()):
        await asyncio.wait_for(w.informer.synced.wait(), 2)
        assert w.names == {"a/keda"}
        await fake.wait_watches("services")
        # Label change into the selector arrives as ADDED, out of it as DELETED.
        fake.set_labels("services", "other", {"app": "x"}, namespace="a")
        await w.until(lambda: "a/other" in w.names)
        fake.set_labels("services", "keda", {"app": "gone"}, namespace="a")
        await w.until(lambda: "a/keda" not in w.names)
        fake.add_service("b", "more", {"app": "keda"})  # other namespace: never seen
        fake.add_service("a", "late", {"app": "keda"})
        await w.until(lambda: "a/late" in w.names)
        assert w.names == {"a/other", "a/late"}


async def test_field_selector(fake: FakeKube, api: ApiClient) -> None:
    fake.add_configmap("kube-system", "wanted", {"k": "1"})
    fake.add_configmap("kube-system", "unwanted", {"k": "2"})
    w = Watched(api, "configmaps", namespace="kube-system", field_selector="metadata.name=wanted")
    async with running(w.run()):
        await asyncio.wait_for(w.informer.synced.wait(), 2)
        assert w.names == {"kube-system/wanted"}
        await fake.wait_watches("configmaps")
        fake.add_configmap("kube-system", "unwanted", {"k": "3"})
        fake.add_configmap("kube-system", "wanted", {"k": "4"})
        await w.until(lambda: w.informer.cache["kube-system/wanted"]["data"] == {"k": "4"})
        assert w.names == {"kube-system/wanted"}


async def test_normal_end_of_stream_rewatches_from_last_version(
    fake: FakeKube, api: ApiClient
) -> None:
    w = Watched(api)
    async with running(w.run()):
        await fake.wait_watches("namespaces")
        fake.add_namespace("one")
        await w.until(lambda: "one" in w.names)
        before = len(fake.requests)
        fake.end_watches()  # what the API server does at timeoutSeconds
        fake.add_namespace("two")  # happens between the two watches
        await w.until(lambda: "two" in w.names)
        later = [q for _, _, q in fake.requests[before:]]
        assert all(q.get("watch") == "true" for q in later)  # no relist
        assert w.reasons == []
        assert w.informer.restarts == 0


# --------------------------------------------------------------------------- bookmarks and 410


async def test_bookmark_moves_resource_version_and_avoids_relist(
    fake: FakeKube, api: ApiClient
) -> None:
    w = Watched(api)
    async with running(w.run()):
        await fake.wait_watches("namespaces")
        listed = w.informer.resource_version
        for i in range(3):  # other kinds move the global resourceVersion
            fake.add_configmap("default", f"cm-{i}", {})
        target = str(fake.resource_version)
        fake.bookmark()  # delivered before the end of the stream, in order
        fake.compact()
        fake.end_watches()
        await fake.wait_request(
            lambda m, p, q: q.get("watch") == "true" and q.get("resourceVersion") == target
        )
        assert target != listed
        fake.add_namespace("after-compaction")
        await w.until(lambda: "after-compaction" in w.names)
        assert w.informer.resource_version == str(fake.resource_version)
        assert w.reasons == []  # watched on from the bookmark, no 410


@pytest.mark.parametrize("as_http", [False, True], ids=["error-event", "http-410"])
async def test_410_gone_relists_and_catches_up(
    fake: FakeKube, api: ApiClient, as_http: bool
) -> None:
    fake.gone_as_http = as_http
    fake.add_namespace("stays")
    fake.add_namespace("goes")
    w = Watched(api)
    async with running(w.run()):
        await fake.wait_watches("namespaces")
        fake.drop_watches()
        await w.until(lambda: w.reasons == ["error"])
        # While the watch is away, the cluster changes and history is compacted.
        await fake.wait_watches("namespaces", 0)
        await fake.outage()
        fake.delete("namespaces", "goes")
        fake.add_namespace("new")
        fake.compact()
        await fake.recover()
        await w.until(lambda: "gone" in w.reasons, 3)
        await w.until(lambda: w.names == {"stays", "new"}, 3)
        relists = [q for _, p, q in fake.requests if "watch" not in q]
        assert len(relists) == 2
        assert w.informer.resource_version == str(fake.resource_version)


async def test_dropped_connection_resumes_without_relist(fake: FakeKube, api: ApiClient) -> None:
    w = Watched(api)
    async with running(w.run()):
        await fake.wait_watches("namespaces")
        fake.drop_watches()
        fake.add_namespace("during-drop")
        await w.until(lambda: "during-drop" in w.names)
        assert w.reasons == ["error"]
        assert w.informer.restarts == 1
        lists = [q for _, _, q in fake.requests if "watch" not in q]
        assert len(lists) == 1  # resumed from the resourceVersion: no relist


async def test_outage_keeps_cache_and_recovers(fake: FakeKube, api: ApiClient) -> None:
    fake.add_namespace("tenant-a")
    w = Watched(api)
    async with running(w.run()):
        await fake.wait_watches("namespaces")
        await fake.outage()
        await w.until(lambda: len(w.reasons) >= 3)  # several failed reconnects
        assert w.names == {"tenant-a"}  # the cache was not cleared
        assert w.informer.synced.is_set()
        await fake.recover()
        fake.add_namespace("tenant-b")
        await w.until(lambda: w.names == {"tenant-a", "tenant-b"}, 3)


async def test_first_list_retries_until_the_api_answers(fake: FakeKube, api: ApiClient) -> None:
    fake.add_namespace("x")
    fake.fail_next(2, status=500)
    w = Watched(api)
    async with running(w.run()):
        await asyncio.wait_for(w.informer.synced.wait(), 2)
        assert w.names == {"x"}
        assert w.reasons == ["error", "error"]


async def test_callback_error_is_not_retried(fake: FakeKube, api: ApiClient) -> None:
    def broken() -> None:
        raise ZeroDivisionError

    informer = Informer(api, "namespaces", backoff=fast_backoff())
    with pytest.raises(ZeroDivisionError):
        await asyncio.wait_for(informer.run(broken), 2)


# --------------------------------------------------------------------------- backoff


def test_backoff_is_capped_exponential_with_jitter() -> None:
    b = Backoff(initial=1.0, maximum=8.0, factor=2.0, jitter=0.5, rng=lambda: 0.0)
    assert [b.next() for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    b.reset()
    assert b.next() == 1.0
    j = Backoff(initial=1.0, maximum=8.0, jitter=0.5, rng=lambda: 1.0)
    assert j.next() == 0.5  # jitter takes off up to half
    r = Backoff(initial=1.0, maximum=8.0, rng=lambda: 0.0)
    assert r.next(retry_after=5.0) == 5.0  # Retry-After honoured
    assert r.next(retry_after=100.0) == 8.0  # but capped


# --------------------------------------------------------------------------- request()


async def test_request_maps_errors(fake: FakeKube, api: ApiClient) -> None:
    with pytest.raises(kube.KubeNotFound) as nf:
        await kube.request(api, "GET", kube.resource_path("namespaces", name="nope"))
    assert nf.value.status == 404
    fake.fail_next(1, status=429, retry_after=3)
    with pytest.raises(kube.KubeApiError) as busy:
        await kube.request(api, "GET", kube.resource_path("namespaces"))
    assert (busy.value.status, busy.value.retry_after) == (429, 3.0)


async def test_wrong_token_is_unauthorized(fake: FakeKube, tmp_path: Path) -> None:
    fake.token = "other"
    client = await kube.api_client(fake.kubeconfig)
    try:
        with pytest.raises(kube.KubeApiError) as exc:
            await kube.request(client, "GET", "/api/v1/namespaces")
        assert exc.value.status == 401
    finally:
        await client.close()


async def test_unreachable(fake: FakeKube, api: ApiClient) -> None:
    await fake.outage()
    with pytest.raises(kube.KubeUnreachable):
        await kube.request(api, "GET", "/api/v1/namespaces")


async def test_api_client_config_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(kube.KubeConfigError):
        await kube.api_client(tmp_path / "missing")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(kube.KubeConfigError, match="in-cluster"):
        await kube.api_client(None)


def test_resource_path() -> None:
    assert kube.resource_path("namespaces") == "/api/v1/namespaces"
    assert kube.resource_path("namespaces", name="a") == "/api/v1/namespaces/a"
    assert kube.resource_path("services", namespace="a") == "/api/v1/namespaces/a/services"
    assert (
        kube.resource_path(
            "networkpolicies", api_version="networking.k8s.io/v1", namespace="t", name="p"
        )
        == "/apis/networking.k8s.io/v1/namespaces/t/networkpolicies/p"
    )
    assert (
        kube.resource_path("ciliumclusterwidenetworkpolicies", api_version="cilium.io/v2")
        == "/apis/cilium.io/v2/ciliumclusterwidenetworkpolicies"
    )


# --------------------------------------------------------------------------- the fake's writes


async def test_server_side_apply_ownership_and_conflicts(fake: FakeKube, api: ApiClient) -> None:
    path = kube.resource_path(
        "networkpolicies", api_version="networking.k8s.io/v1", namespace="t", name="p"
    )

    def policy(**spec: Any) -> dict[str, Any]:
        return {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "p", "namespace": "t", "labels": {"owner": "router"}},
            "spec": spec,
        }

    async def apply(body: dict[str, Any], manager: str, force: bool = False) -> Any:
        query = [("fieldManager", manager)] + ([("force", "true")] if force else [])
        return await kube.request(
            api, "PATCH", path, body=body, content_type=kube.APPLY_PATCH, query=query
        )

    created = await apply(policy(podSelector={}, policyTypes=["Ingress"]), "router")
    rv = created["metadata"]["resourceVersion"]
    same = await apply(policy(podSelector={}, policyTypes=["Ingress"]), "router")
    assert same["metadata"]["resourceVersion"] == rv  # no change, no new version
    with pytest.raises(kube.KubeConflict):
        await apply(policy(policyTypes=["Egress"]), "someone-else")
    forced = await apply(policy(policyTypes=["Egress"]), "someone-else", force=True)
    assert forced["spec"]["policyTypes"] == ["Egress"]
    assert {m["manager"] for m in forced["metadata"]["managedFields"]} == {"router", "someone-else"}
    # router stops applying podSelector: its field goes away
    dropped = await apply(policy(policyTypes=["Egress"]), "router")
    assert "podSelector" not in dropped["spec"]
    with pytest.raises(kube.KubeApiError) as no_manager:
        await kube.request(api, "PATCH", path, body=policy(), content_type=kube.APPLY_PATCH)
    assert no_manager.value.status == 400
    listed = await kube.request(
        api,
        "GET",
        kube.resource_path("networkpolicies", api_version="networking.k8s.io/v1"),
        query=[("labelSelector", "owner=router")],
    )
    assert [i["metadata"]["name"] for i in listed["items"]] == ["p"]
    await kube.request(api, "DELETE", path)
    assert fake.get("networkpolicies", "p", "t", "networking.k8s.io/v1") is None


async def test_lease_update_conflict(fake: FakeKube, api: ApiClient) -> None:
    coll = kube.resource_path("leases", api_version="coordination.k8s.io/v1", namespace="m")
    lease = {"metadata": {"name": "router"}, "spec": {"holderIdentity": "a"}}
    created = await kube.request(api, "POST", coll, body=lease)
    with pytest.raises(kube.KubeConflict):
        await kube.request(api, "POST", coll, body=lease)  # AlreadyExists
    got = await kube.request(api, "GET", f"{coll}/router")
    got["spec"]["holderIdentity"] = "b"
    updated = await kube.request(api, "PUT", f"{coll}/router", body=got)
    assert updated["metadata"]["resourceVersion"] != created["metadata"]["resourceVersion"]
    stale = dict(created, spec={"holderIdentity": "c"})
    with pytest.raises(kube.KubeConflict):
        await kube.request(api, "PUT", f"{coll}/router", body=stale)
    ccnp = kube.resource_path("ciliumclusterwidenetworkpolicies", api_version="cilium.io/v2")
    cluster = await kube.request(api, "POST", ccnp, body={"metadata": {"name": "cw"}, "spec": {}})
    assert "namespace" not in cluster["metadata"]
    assert cluster["kind"] == "CiliumClusterwideNetworkPolicy"
