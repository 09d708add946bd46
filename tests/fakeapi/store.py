"""The fake API's storage: objects by (api_version, resource), resourceVersions, watch events.

One global, monotonically increasing resourceVersion (like etcd) shared by all kinds. Every
change is an event kept in a history (watches replay it from a resourceVersion) and offered to
every open watch through its filter (selector transitions become ADDED / DELETED as in the real
API). ``compact()`` forgets the history: a watch or a continued list from before it gets 410.
The synchronous test helpers (``add_namespace``, ``put``, ``delete``, ...) live here.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tests.fakeapi.apply import Owners, apply_config
from tests.fakeapi.errors import ApiStatus, status_body
from tests.fakeapi.selectors import Filter
from tests.fakeapi.waiting import Signal

Obj = dict[str, Any]
GVR = tuple[str, str]  # (api_version, resource)
Key = tuple[str, str]  # (namespace or "", name)

KINDS = {
    "namespaces": "Namespace",
    "services": "Service",
    "configmaps": "ConfigMap",
    "secrets": "Secret",
    "pods": "Pod",
    "leases": "Lease",
    "networkpolicies": "NetworkPolicy",
    "ciliumnetworkpolicies": "CiliumNetworkPolicy",
    "ciliumclusterwidenetworkpolicies": "CiliumClusterwideNetworkPolicy",
    "apiservices": "APIService",
    "endpointslices": "EndpointSlice",
    "deployments": "Deployment",
}

END = object()  # end the watch stream normally
DROP = object()  # abort the connection mid-stream


def kind_of(resource: str) -> str:
    return KINDS.get(resource) or resource[:1].upper() + resource[1:].rstrip("s")


@dataclass
class Watcher:
    """An open watch: what it selects, and the queue of events (or END / DROP) it streams."""

    gvr: GVR
    filter: Filter
    bookmarks: bool
    queue: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)


@dataclass
class Event:
    rv: int
    gvr: GVR
    type: str
    obj: Obj
    old: Obj | None


def _same(a: Obj, b: Obj) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def translate(flt: Filter, event: Event) -> Obj | None:
    """What a watcher with this filter sees of an event (selector transitions included)."""
    new_match = flt.matches(event.obj)
    old_match = event.old is not None and flt.matches(event.old)
    if event.type == "ADDED":
        return {"type": "ADDED", "object": event.obj} if new_match else None
    if event.type == "DELETED":
        return {"type": "DELETED", "object": event.obj} if old_match else None
    if new_match and old_match:
        return {"type": "MODIFIED", "object": event.obj}
    if new_match:
        return {"type": "ADDED", "object": event.obj}
    if old_match:
        return {"type": "DELETED", "object": event.obj}
    return None


def _too_old(rv: int, compacted: int) -> str:
    return f"too old resource version: {rv} ({compacted})"


class Store:
    def __init__(self) -> None:
        self.gone_as_http = False  # a watch from a compacted rv: HTTP 410, not an ERROR event
        self._store: dict[GVR, dict[Key, Obj]] = {}
        self._owners: dict[tuple[GVR, Key], Owners] = {}
        self._history: list[Event] = []
        self._rv = 1
        self._compacted = 0
        self._watchers: list[Watcher] = []
        self._changed = Signal()  # notified on every request and every watch opened or closed

    # ------------------------------------------------------------------ store operations

    @property
    def resource_version(self) -> int:
        return self._rv

    def _next_rv(self) -> int:
        self._rv += 1
        return self._rv

    def _emit(self, gvr: GVR, kind: str, obj: Obj, old: Obj | None) -> None:
        event = Event(int(obj["metadata"]["resourceVersion"]), gvr, kind, obj, old)
        self._history.append(event)
        for w in list(self._watchers):
            if w.gvr == gvr:
                out = translate(w.filter, event)
                if out is not None:
                    w.queue.put_nowait(out)

    def _create(self, gvr: GVR, obj: Obj) -> Obj:
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        key = (meta.get("namespace") or "", meta["name"])
        bucket = self._store.setdefault(gvr, {})
        if key in bucket:
            raise ApiStatus(409, "AlreadyExists", f'{gvr[1]} "{key[1]}" already exists')
        obj.setdefault("apiVersion", gvr[0])
        obj.setdefault("kind", kind_of(gvr[1]))
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = "2024-01-01T00:00:00Z"
        meta["resourceVersion"] = str(self._next_rv())
        meta.setdefault("generation", 1)
        bucket[key] = obj
        self._emit(gvr, "ADDED", obj, None)
        return obj

    def _replace(self, gvr: GVR, obj: Obj, *, check_rv: bool) -> Obj:
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        key = (meta.get("namespace") or "", meta["name"])
        old = self._store.get(gvr, {}).get(key)
        if old is None:
            raise ApiStatus(404, "NotFound", f'{gvr[1]} "{key[1]}" not found')
        given = meta.get("resourceVersion")
        if check_rv and given and given != old["metadata"]["resourceVersion"]:
            raise ApiStatus(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {gvr[1]} "{key[1]}": the object has been '
                "modified; please apply your changes to the latest version and try again",
            )
        obj.setdefault("apiVersion", old.get("apiVersion", gvr[0]))
        obj.setdefault("kind", old.get("kind", kind_of(gvr[1])))
        for k in ("uid", "creationTimestamp", "generation", "managedFields"):
            if k in old["metadata"]:
                meta.setdefault(k, old["metadata"][k])
        meta["resourceVersion"] = old["metadata"]["resourceVersion"]
        if _same(obj, old):
            return old
        meta["resourceVersion"] = str(self._next_rv())
        self._store[gvr][key] = obj
        self._emit(gvr, "MODIFIED", obj, old)
        return obj

    def _delete(self, gvr: GVR, key: Key) -> Obj:
        old = self._store.get(gvr, {}).pop(key, None)
        if old is None:
            raise ApiStatus(404, "NotFound", f'{gvr[1]} "{key[1]}" not found')
        self._owners.pop((gvr, key), None)
        gone = copy.deepcopy(old)
        gone["metadata"]["resourceVersion"] = str(self._next_rv())
        self._emit(gvr, "DELETED", gone, old)
        return gone

    def _delete_matching(self, gvr: GVR, flt: Filter) -> None:
        bucket = self._store.get(gvr, {})
        for key in [k for k, o in sorted(bucket.items()) if flt.matches(o)]:
            self._delete(gvr, key)

    def _apply(self, gvr: GVR, key: Key, config: Obj, manager: str, force: bool) -> Obj:
        old = self._store.get(gvr, {}).get(key)
        owners = self._owners.get((gvr, key), {})
        merged, owners = apply_config(gvr[0], key, old, owners, config, manager, force=force)
        self._owners[(gvr, key)] = owners
        if old is None:
            return self._create(gvr, merged)
        return self._replace(gvr, merged, check_rv=False)

    def _list(self, gvr: GVR, flt: Filter, query: Mapping[str, str]) -> Obj:
        """A list answer, paged by ``limit`` / ``continue`` (410 when continued past compact)."""
        list_rv = self._rv
        start: tuple[str, str] | None = None
        if query.get("continue"):
            token = json.loads(base64.b64decode(query["continue"]))
            list_rv, start = int(token["rv"]), (token["ns"], token["name"])
            if list_rv < self._compacted:
                raise ApiStatus(
                    410, "Expired", "The provided continue parameter is too old to display a "
                    "consistent list result. You can start a new list without the continue "
                    "parameter.",
                )  # fmt: skip
        limit = int(query.get("limit") or 0)
        bucket = self._store.get(gvr, {})
        items: list[Obj] = []
        cont: str | None = None
        for key in sorted(bucket):
            if start is not None and key <= start:
                continue
            obj = bucket[key]
            if not flt.matches(obj):
                continue
            if limit and len(items) == limit:
                last = items[-1]["metadata"]
                token = {"rv": list_rv, "ns": last.get("namespace") or "", "name": last["name"]}
                cont = base64.b64encode(json.dumps(token).encode()).decode()
                break
            items.append(obj)
        meta: Obj = {"resourceVersion": str(list_rv)}
        if cont:
            meta["continue"] = cont
        return {
            "kind": f"{kind_of(gvr[1])}List",
            "apiVersion": gvr[0],
            "metadata": meta,
            "items": items,
        }

    def _open_watch(self, gvr: GVR, flt: Filter, query: Mapping[str, str]) -> Watcher:
        """Register a watch with its first events queued: a replay from ``resourceVersion``,
        a synthetic ADDED per object without one, or a 410 ERROR event (HTTP 410 raised with
        ``gone_as_http``) when it is older than the compaction point. Replay and registration
        happen in one synchronous step: nothing is missed."""
        rv_text = query.get("resourceVersion") or ""
        rv = int(rv_text) if rv_text.isdigit() else 0
        if rv and rv < self._compacted and self.gone_as_http:
            raise ApiStatus(410, "Expired", _too_old(rv, self._compacted))
        watcher = Watcher(gvr, flt, query.get("allowWatchBookmarks") in ("true", "1"))
        if rv and rv < self._compacted:
            gone = status_body(410, "Expired", _too_old(rv, self._compacted))
            watcher.queue.put_nowait({"type": "ERROR", "object": gone})
            watcher.queue.put_nowait(END)
        elif rv:
            for event in self._history:
                if event.rv > rv and event.gvr == gvr:
                    out = translate(flt, event)
                    if out is not None:
                        watcher.queue.put_nowait(out)
        else:
            for _, obj in sorted(self._store.get(gvr, {}).items()):
                if flt.matches(obj):
                    watcher.queue.put_nowait({"type": "ADDED", "object": obj})
        self._watchers.append(watcher)
        self._changed.notify()
        return watcher

    def _close_watch(self, watcher: Watcher) -> None:
        self._watchers.remove(watcher)
        self._changed.notify()

    # ------------------------------------------------------------------ test helpers

    def put(self, resource: str, obj: Obj, api_version: str = "v1") -> Obj:
        """Create, or replace (no resourceVersion check) when it exists."""
        gvr = (api_version, resource)
        meta = obj["metadata"]
        key = (meta.get("namespace") or "", meta["name"])
        if key in self._store.get(gvr, {}):
            obj = copy.deepcopy(obj)
            obj["metadata"].pop("resourceVersion", None)
            return self._replace(gvr, obj, check_rv=False)
        return self._create(gvr, obj)

    def add_namespace(self, name: str, labels: Mapping[str, str] | None = None) -> Obj:
        return self.put(
            "namespaces",
            {"apiVersion": "v1", "kind": "Namespace",
             "metadata": {"name": name, "labels": dict(labels or {})}},
        )  # fmt: skip

    def add_service(
        self,
        namespace: str,
        name: str,
        labels: Mapping[str, str] | None = None,
        ports: Iterable[tuple[str | None, int]] = (("https", 443),),
    ) -> Obj:
        port_list = []
        for pname, number in ports:
            p: Obj = {"port": number, "protocol": "TCP", "targetPort": number}
            if pname:
                p["name"] = pname
            port_list.append(p)
        return self.put(
            "services",
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": name, "namespace": namespace, "labels": dict(labels or {})},
                "spec": {"type": "ClusterIP", "ports": port_list},
            },
        )

    def add_configmap(self, namespace: str, name: str, data: Mapping[str, str]) -> Obj:
        return self.put(
            "configmaps",
            {"apiVersion": "v1", "kind": "ConfigMap",
             "metadata": {"name": name, "namespace": namespace}, "data": dict(data)},
        )  # fmt: skip

    def add_endpoints(
        self,
        namespace: str,
        service: str,
        addresses: Iterable[str],
        ports: Iterable[tuple[str | None, int]] = (("https", 443),),
        *,
        ready: bool = True,
    ) -> Obj:
        """The EndpointSlice ``<service>`` of a Service (label kubernetes.io/service-name)."""
        port_list: list[Obj] = []
        for pname, number in ports:
            port_list.append(
                {"port": number, "protocol": "TCP", **({"name": pname} if pname else {})}
            )
        return self.put(
            "endpointslices",
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {"name": service, "namespace": namespace,
                             "labels": {"kubernetes.io/service-name": service}},
                "addressType": "IPv4",
                "ports": port_list,
                "endpoints": [
                    {"addresses": [a], "conditions": {"ready": ready}} for a in addresses
                ],
            },
            api_version="discovery.k8s.io/v1",
        )  # fmt: skip

    def set_labels(
        self,
        resource: str,
        name: str,
        labels: Mapping[str, str],
        namespace: str | None = None,
        api_version: str = "v1",
    ) -> Obj:
        current = self.get(resource, name, namespace, api_version)
        if current is None:
            raise KeyError(f"{resource} {namespace}/{name}")
        obj = copy.deepcopy(current)
        obj["metadata"]["labels"] = dict(labels)
        return self.put(resource, obj, api_version)

    def delete(
        self, resource: str, name: str, namespace: str | None = None, api_version: str = "v1"
    ) -> Obj:
        return self._delete((api_version, resource), (namespace or "", name))

    def get(
        self, resource: str, name: str, namespace: str | None = None, api_version: str = "v1"
    ) -> Obj | None:
        return self._store.get((api_version, resource), {}).get((namespace or "", name))

    def objects(
        self, resource: str, namespace: str | None = None, api_version: str = "v1"
    ) -> list[Obj]:
        bucket = self._store.get((api_version, resource), {})
        return [o for (ns, _), o in sorted(bucket.items()) if namespace is None or ns == namespace]

    def compact(self) -> int:
        """Forget the history up to now: watches from an older resourceVersion get 410."""
        self._compacted = self._rv
        self._history.clear()
        return self._compacted

    def bookmark(self) -> None:
        for w in self._watchers:
            if w.bookmarks:
                w.queue.put_nowait(
                    {
                        "type": "BOOKMARK",
                        "object": {
                            "kind": kind_of(w.gvr[1]),
                            "apiVersion": w.gvr[0],
                            "metadata": {"resourceVersion": str(self._rv)},
                        },
                    }
                )

    def _end_all(self, how: object) -> None:
        for w in self._watchers:
            w.queue.put_nowait(how)

    def end_watches(self) -> None:
        """End every watch stream normally, as the API server does at timeoutSeconds."""
        self._end_all(END)

    def drop_watches(self) -> None:
        """Abort every watch connection mid-stream (no final chunk)."""
        self._end_all(DROP)

    def watch_count(self, resource: str) -> int:
        return sum(1 for w in self._watchers if w.gvr[1] == resource)

    async def wait_watches(self, resource: str, count: int = 1, within: float = 2.0) -> None:
        await self._changed.wait_for(lambda: self.watch_count(resource) >= count, within)

    async def wait_changed(self, predicate: Callable[[], bool], within: float = 2.0) -> None:
        """Re-check ``predicate`` after every request and watch change; TimeoutError if never."""
        await self._changed.wait_for(predicate, within)
