"""A fake Kubernetes API server for tests: real HTTP over real TLS on 127.0.0.1.

It speaks enough of the API protocol for the real kubernetes-asyncio client (through
``router.kube.api_client(kubeconfig)``) to list, watch, get, create, update, patch, apply and
delete any resource at any group/version path, namespaced or cluster-scoped.

Public API
----------
``FakeKube(directory: Path, token="fake-token")``
    ``async with FakeKube(tmp_path) as fake:`` starts it (``await fake.start()`` /
    ``await fake.stop()`` by hand). ``fake.port``, ``fake.url``, ``fake.kubeconfig`` (a kubeconfig
    file written into ``directory``; ``write_kubeconfig(path)`` writes another), ``fake.ca_pem``.
    Requests need ``Authorization: Bearer <token>`` (401 otherwise).

Protocol
    - one global, monotonically increasing resourceVersion (like etcd) shared by all kinds;
    - list: ``labelSelector`` (``k=v``, ``k==v``, ``k!=v``, ``k in (a,b)``, ``k notin (a,b)``,
      ``k``, ``!k``), ``fieldSelector`` (``a.b=v``, ``a.b!=v`` on any dotted path),
      ``limit``/``continue`` paging, ``metadata.resourceVersion`` in the answer;
    - watch (``watch=true``): chunked JSON lines ADDED / MODIFIED / DELETED / BOOKMARK (when
      ``allowWatchBookmarks``), from ``resourceVersion`` (history replay) or, without one, a
      synthetic ADDED per existing object; selector transitions become ADDED / DELETED as in the
      real API; ``timeoutSeconds`` honoured; a resourceVersion older than the compaction point
      gets an ERROR event with a 410 Status (or HTTP 410 with ``fake.gone_as_http = True``);
    - POST create (409 AlreadyExists), PUT update (409 Conflict on a stale
      ``metadata.resourceVersion``, 404 when missing), DELETE (object, or collection with
      selectors), PATCH ``application/merge-patch+json`` / ``strategic-merge-patch+json``
      (treated as merge patch) and ``application/apply-patch+yaml`` server-side apply
      (``fieldManager`` required, field ownership per manager, 409 on a conflicting field owned
      by another manager unless ``force=true``, fields the manager stopped applying removed,
      no new resourceVersion when nothing changed). ``metadata.managedFields`` lists managers.

Test helpers (synchronous unless marked async; call them from the test's event loop)
    ``add_namespace(name, labels=None)``, ``set_labels(resource, name, labels, namespace=None)``,
    ``add_service(namespace, name, labels=None, ports=(("https", 443),))``,
    ``add_configmap(namespace, name, data)``, ``add_endpoints(namespace, service, addresses,
    ports=(("https", 443),), ready=True)`` (its EndpointSlice),
    ``put(resource, obj, api_version="v1")``
    (create or replace), ``delete(resource, name, namespace=None, api_version="v1")``,
    ``get(resource, name, namespace=None, api_version="v1")``, ``objects(resource, ...)``,
    ``resource_version`` (current, int), ``compact()`` (history before now is gone),
    ``bookmark()`` (BOOKMARK to every watch), ``end_watches()`` (normal end of stream, as a
    server timeout), ``drop_watches()`` (connections aborted mid-stream),
    ``fail_next(count, status=500, retry_after=None)`` (the next requests get that error),
    ``async outage()`` (stop listening, abort every connection) / ``async recover()`` (listen
    again on the same port), ``requests`` (log of ``(method, path, query dict)``),
    ``watch_count(resource)``, ``async wait_watches(resource, count=1, within=2.0)``,
    ``async wait_request(predicate, within=2.0)``, ``proxy_forbidden`` (bool).
    The services proxy ``/api/v1/namespaces/NS/services/[SCHEME:]NAME[:PORT]/proxy/PATH``
    forwards a GET to the first ready endpoint of that port (its EndpointSlice).
``Signal``
    A condition to wait on without sleeps: ``notify()`` from a callback,
    ``await signal.wait_for(predicate, within=1.0)`` re-checks ``predicate()`` after each
    notify and raises TimeoutError when it never holds.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import json
import re
import ssl
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
import yaml
from aiohttp import web

from router.certs import CertAndKey, issue_cert, make_ca
from router.cluster.retry import Backoff

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

_END = object()  # end the watch stream normally
_DROP = object()  # abort the connection mid-stream


def kind_of(resource: str) -> str:
    return KINDS.get(resource) or resource[:1].upper() + resource[1:].rstrip("s")


# --------------------------------------------------------------------------- selectors


@dataclass(frozen=True)
class _Requirement:
    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!exists"
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.op == "exists":
            return self.key in labels
        if self.op == "!exists":
            return self.key not in labels
        if self.op in ("=", "in"):
            return self.key in labels and labels[self.key] in self.values
        # "!=" and "notin" match when the key is absent, as in Kubernetes
        return labels.get(self.key) not in self.values


def _split_top(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


_SET_RE = re.compile(r"^([^\s!=()]+)\s+(in|notin)\s+\(([^)]*)\)$")


def parse_label_selector(text: str | None) -> list[_Requirement]:
    reqs: list[_Requirement] = []
    for part in _split_top(text or ""):
        m = _SET_RE.match(part)
        if m:
            values = frozenset(v.strip() for v in m.group(3).split(",") if v.strip())
            reqs.append(_Requirement(m.group(1), m.group(2), values))
        elif "!=" in part:
            k, v = part.split("!=", 1)
            reqs.append(_Requirement(k.strip(), "!=", frozenset([v.strip()])))
        elif "==" in part:
            k, v = part.split("==", 1)
            reqs.append(_Requirement(k.strip(), "=", frozenset([v.strip()])))
        elif "=" in part:
            k, v = part.split("=", 1)
            reqs.append(_Requirement(k.strip(), "=", frozenset([v.strip()])))
        elif part.startswith("!"):
            reqs.append(_Requirement(part[1:].strip(), "!exists"))
        else:
            reqs.append(_Requirement(part, "exists"))
    return reqs


def _field_value(obj: Mapping[str, Any], path: str) -> str:
    cur: Any = obj
    for part in path.split("."):
        if not isinstance(cur, Mapping):
            return ""
        cur = cur.get(part)
    return "" if cur is None else str(cur)


def parse_field_selector(text: str | None) -> list[tuple[str, bool, str]]:
    out = []
    for part in _split_top(text or ""):
        if "!=" in part:
            k, v = part.split("!=", 1)
            out.append((k.strip(), False, v.strip()))
        else:
            k, v = part.replace("==", "=").split("=", 1)
            out.append((k.strip(), True, v.strip()))
    return out


@dataclass
class _Filter:
    namespace: str | None
    labels: list[_Requirement]
    fields: list[tuple[str, bool, str]]

    def matches(self, obj: Mapping[str, Any]) -> bool:
        meta = obj.get("metadata") or {}
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        labels = meta.get("labels") or {}
        if not all(r.matches(labels) for r in self.labels):
            return False
        return all((_field_value(obj, p) == v) == eq for p, eq, v in self.fields)


# --------------------------------------------------------------------------- merge / apply


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            result.pop(k, None)
        else:
            result[k] = merge_patch(result.get(k), v)
    return result


def _leaves(obj: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Leaf paths of an applied configuration (lists are atomic leaves)."""
    if isinstance(obj, dict) and obj:
        out: dict[tuple[str, ...], Any] = {}
        for k, v in obj.items():
            out.update(_leaves(v, (*prefix, str(k))))
        return out
    return {prefix: obj}


def _get_path(obj: Any, path: tuple[str, ...]) -> Any:
    cur = obj
    for p in path:
        if not isinstance(cur, dict) or p not in cur:
            return _MISSING
        cur = cur[p]
    return cur


def _remove_path(obj: dict[str, Any], path: tuple[str, ...]) -> None:
    parents = [obj]
    cur: Any = obj
    for p in path[:-1]:
        cur = cur.get(p) if isinstance(cur, dict) else None
        if not isinstance(cur, dict):
            return
        parents.append(cur)
    cur.pop(path[-1], None)
    # prune emptied maps
    for i in range(len(path) - 1, 0, -1):
        if parents[i] == {}:
            parents[i - 1].pop(path[i - 1], None)


_MISSING = object()
_IDENTITY_PATHS = {("apiVersion",), ("kind",), ("metadata", "name"), ("metadata", "namespace")}


class _ApiStatus(Exception):
    def __init__(self, code: int, reason: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message
        self.headers = headers or {}


def status_body(code: int, reason: str, message: str) -> Obj:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


# --------------------------------------------------------------------------- the server


@dataclass
class _Watcher:
    gvr: GVR
    filter: _Filter
    bookmarks: bool
    queue: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)


@dataclass
class _Event:
    rv: int
    gvr: GVR
    type: str
    obj: Obj
    old: Obj | None


class Signal:
    """Wait for a condition without sleeping: notify() on change, wait_for(predicate)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.count = 0

    def notify(self) -> None:
        self.count += 1
        event, self._event = self._event, asyncio.Event()
        event.set()

    async def wait_for(self, predicate: Callable[[], bool], within: float = 1.0) -> None:
        """Return once predicate() holds, re-checked after each notify; TimeoutError if never."""

        async def waiter() -> None:
            while not predicate():
                await self._event.wait()

        await asyncio.wait_for(waiter(), within)


class FakeKube:
    def __init__(self, directory: Path, token: str = "fake-token") -> None:
        self.directory = Path(directory)
        self.token = token
        self.port = 0
        self.gone_as_http = False
        self.proxy_forbidden = False  # services/proxy answers 403, as without RBAC for it
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self._store: dict[GVR, dict[Key, Obj]] = {}
        self._owners: dict[tuple[GVR, Key], dict[tuple[str, ...], str]] = {}
        self._history: list[_Event] = []
        self._rv = 1
        self._compacted = 0
        self._watchers: list[_Watcher] = []
        self._failures: list[tuple[int, float | None]] = []
        self._changed = Signal()
        self._runner: web.ServerRunner | None = None
        self._ssl: ssl.SSLContext | None = None
        self.ca_pem = b""
        self.kubeconfig = self.directory / "fake-kubeconfig.yaml"

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> FakeKube:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        if self._ssl is None:
            ca = make_ca("fake-kube-ca")
            leaf: CertAndKey = issue_cert(
                ca,
                "fake-kube-apiserver",
                server=True,
                dns_names=["localhost"],
                ip_addresses=["127.0.0.1"],
            )
            cert, key = self.directory / "fake-kube.crt", self.directory / "fake-kube.key"
            leaf.write(cert, key)
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(cert, key)
            self._ssl = ctx
            self.ca_pem = ca.cert_pem()
        await self._listen()
        self.write_kubeconfig(self.kubeconfig)

    async def _listen(self) -> None:
        server = web.Server(self._handle)
        runner = web.ServerRunner(server, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.port, ssl_context=self._ssl)
        await site.start()
        self._runner = runner
        if not self.port:
            self.port = int(runner.addresses[0][1])

    async def stop(self) -> None:
        self._end_all(_DROP)
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def outage(self) -> None:
        """The API goes away: listening stops, every open connection is aborted."""
        await self.stop()

    async def recover(self) -> None:
        """The API comes back on the same port (same certificate, same data)."""
        await self._listen()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def write_kubeconfig(self, path: Path) -> Path:
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "fake",
                    "cluster": {
                        "server": self.url,
                        "certificate-authority-data": base64.b64encode(self.ca_pem).decode(),
                    },
                }
            ],
            "users": [{"name": "fake", "user": {"token": self.token}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
            "current-context": "fake",
        }
        path.write_text(yaml.safe_dump(doc))
        return path

    # ------------------------------------------------------------------ store operations

    @property
    def resource_version(self) -> int:
        return self._rv

    def _next_rv(self) -> int:
        self._rv += 1
        return self._rv

    def _emit(self, gvr: GVR, kind: str, obj: Obj, old: Obj | None) -> None:
        event = _Event(int(obj["metadata"]["resourceVersion"]), gvr, kind, obj, old)
        self._history.append(event)
        for w in list(self._watchers):
            if w.gvr == gvr:
                out = _translate(w.filter, event)
                if out is not None:
                    w.queue.put_nowait(out)

    def _create(self, gvr: GVR, obj: Obj) -> Obj:
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        key = (meta.get("namespace") or "", meta["name"])
        bucket = self._store.setdefault(gvr, {})
        if key in bucket:
            raise _ApiStatus(409, "AlreadyExists", f'{gvr[1]} "{key[1]}" already exists')
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
            raise _ApiStatus(404, "NotFound", f'{gvr[1]} "{key[1]}" not found')
        given = meta.get("resourceVersion")
        if check_rv and given and given != old["metadata"]["resourceVersion"]:
            raise _ApiStatus(
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
            raise _ApiStatus(404, "NotFound", f'{gvr[1]} "{key[1]}" not found')
        self._owners.pop((gvr, key), None)
        gone = copy.deepcopy(old)
        gone["metadata"]["resourceVersion"] = str(self._next_rv())
        self._emit(gvr, "DELETED", gone, old)
        return gone

    def _apply(self, gvr: GVR, key: Key, config: Obj, manager: str, force: bool) -> Obj:
        owners_key = (gvr, key)
        owners = dict(self._owners.get(owners_key, {}))
        old = self._store.get(gvr, {}).get(key)
        leaves = {p: v for p, v in _leaves(config).items() if p not in _IDENTITY_PATHS}
        conflicts = []
        if old is not None:
            for path, value in leaves.items():
                holder = owners.get(path)
                if holder is not None and holder != manager and _get_path(old, path) != value:
                    conflicts.append((path, holder))
        if conflicts and not force:
            msg = "; ".join(f'conflict with "{h}": .{".".join(p)}' for p, h in conflicts)
            raise _ApiStatus(409, "Conflict", f"Apply failed with {len(conflicts)} conflict: {msg}")
        base = copy.deepcopy(old) if old is not None else {}
        # fields this manager applied before and no longer applies, owned by nobody else
        for path, holder in list(owners.items()):
            if holder == manager and path not in leaves:
                del owners[path]
                if old is not None:
                    _remove_path(base, path)
        merged = merge_patch(base, config)
        for path in leaves:
            owners[path] = manager
        meta = merged.setdefault("metadata", {})
        meta["name"], meta["namespace"] = key[1], key[0] or None
        if not key[0]:
            meta.pop("namespace", None)
        managers = sorted(set(owners.values()))
        meta["managedFields"] = [
            {"manager": m, "operation": "Apply", "apiVersion": gvr[0]} for m in managers
        ]
        self._owners[owners_key] = owners
        if old is None:
            return self._create(gvr, merged)
        merged["metadata"].pop("resourceVersion", None)
        return self._replace(gvr, merged, check_rv=False)

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
        self._end_all(_END)

    def drop_watches(self) -> None:
        """Abort every watch connection mid-stream (no final chunk)."""
        self._end_all(_DROP)

    def fail_next(
        self, count: int = 1, status: int = 500, retry_after: float | None = None
    ) -> None:
        self._failures.extend([(status, retry_after)] * count)

    def watch_count(self, resource: str) -> int:
        return sum(1 for w in self._watchers if w.gvr[1] == resource)

    async def wait_watches(self, resource: str, count: int = 1, within: float = 2.0) -> None:
        await self._changed.wait_for(lambda: self.watch_count(resource) >= count, within)

    async def wait_request(
        self, predicate: Callable[[str, str, dict[str, str]], bool], within: float = 2.0
    ) -> tuple[str, str, dict[str, str]]:
        found: list[tuple[str, str, dict[str, str]]] = []

        def check() -> bool:
            found[:] = [r for r in self.requests if predicate(*r)]
            return bool(found)

        await self._changed.wait_for(check, within)
        return found[0]

    # ------------------------------------------------------------------ HTTP

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        query = dict(request.query)
        self.requests.append((request.method, request.path, query))
        self._changed.notify()
        try:
            if request.headers.get("Authorization") != f"Bearer {self.token}":
                raise _ApiStatus(401, "Unauthorized", "Unauthorized")
            if self._failures:
                status, retry_after = self._failures.pop(0)
                headers = {} if retry_after is None else {"Retry-After": str(int(retry_after))}
                raise _ApiStatus(status, "InternalError", "injected failure", headers)
            if _PROXY_PATH.match(request.path):
                return await self._proxy(request)
            return await self._dispatch(request, query)
        except _ApiStatus as exc:
            return web.json_response(
                status_body(exc.code, exc.reason, exc.message), status=exc.code,
                headers=exc.headers,
            )  # fmt: skip

    async def _proxy(self, request: web.BaseRequest) -> web.StreamResponse:
        """The services proxy: GET to the first ready endpoint of the Service's port."""
        if self.proxy_forbidden:
            raise _ApiStatus(403, "Forbidden", 'cannot get resource "services/proxy"')
        match = _PROXY_PATH.match(request.path)
        assert match is not None
        namespace, ref, rest = match.group(1), match.group(2), match.group(3) or "/"
        parts = ref.split(":")
        scheme = parts.pop(0) if len(parts) == 3 else "http"
        name, port_ref = parts[0], parts[1] if len(parts) > 1 else ""
        svc = self.get("services", name, namespace)
        if svc is None:
            raise _ApiStatus(404, "NotFound", f'services "{name}" not found')
        ports = svc["spec"].get("ports") or []
        port = (
            next((p for p in ports if port_ref in (p.get("name"), str(p["port"]))), None)
            if port_ref
            else (ports[0] if ports else None)
        )
        if port is None:
            raise _ApiStatus(503, "ServiceUnavailable", f"no port {port_ref!r} on {name}")
        target = None
        for s in self.objects("endpointslices", namespace, "discovery.k8s.io/v1"):
            if s["metadata"].get("labels", {}).get("kubernetes.io/service-name") != name:
                continue
            numbers = [p["port"] for p in s.get("ports") or () if p.get("name") == port.get("name")]
            ready = [
                a
                for e in s.get("endpoints") or ()
                if (e.get("conditions") or {}).get("ready") is not False
                for a in e["addresses"]
            ]
            if numbers and ready:
                target = f"{scheme}://{ready[0]}:{numbers[0]}{rest}"
                break
        if target is None:
            raise _ApiStatus(
                503, "ServiceUnavailable", f'no endpoints available for service "{name}"'
            )
        async with aiohttp.ClientSession() as session, session.get(target, ssl=False) as resp:
            body = await resp.read()
            ctype = resp.headers.get("Content-Type", "application/octet-stream")
        return web.Response(status=resp.status, body=body, headers={"Content-Type": ctype})

    async def _dispatch(
        self, request: web.BaseRequest, query: dict[str, str]
    ) -> web.StreamResponse:
        gvr, namespace, name = _parse_path(request.path)
        method = request.method
        if name is None:
            flt = _Filter(
                namespace,
                parse_label_selector(query.get("labelSelector")),
                parse_field_selector(query.get("fieldSelector")),
            )
            if method == "GET" and query.get("watch") in ("true", "1"):
                return await self._watch(request, gvr, flt, query)
            if method == "GET":
                return web.json_response(self._list(gvr, flt, query))
            if method == "POST":
                body = await request.json()
                body.setdefault("metadata", {})
                if namespace is not None:
                    body["metadata"]["namespace"] = namespace
                return web.json_response(self._create(gvr, body), status=201)
            if method == "DELETE":
                bucket = self._store.get(gvr, {})
                for key in [k for k, o in sorted(bucket.items()) if flt.matches(o)]:
                    self._delete(gvr, key)
                return web.json_response(status_body(200, "", "") | {"status": "Success"})
            raise _ApiStatus(405, "MethodNotAllowed", f"{method} not allowed on a collection")
        key = (namespace or "", name)
        if method == "GET":
            obj = self._store.get(gvr, {}).get(key)
            if obj is None:
                raise _ApiStatus(404, "NotFound", f'{gvr[1]} "{name}" not found')
            return web.json_response(obj)
        if method == "DELETE":
            return web.json_response(self._delete(gvr, key))
        if method == "PUT":
            body = await request.json()
            body.setdefault("metadata", {})
            if body["metadata"].get("name") not in (None, name):
                raise _ApiStatus(400, "BadRequest", "the name of the object does not match")
            body["metadata"]["name"] = name
            if namespace is not None:
                body["metadata"]["namespace"] = namespace
            return web.json_response(self._replace(gvr, body, check_rv=True))
        if method == "PATCH":
            ctype = request.headers.get("Content-Type", "").split(";")[0].strip()
            raw = await request.text()
            if ctype == "application/apply-patch+yaml":
                manager = query.get("fieldManager")
                if not manager:
                    raise _ApiStatus(
                        400, "BadRequest", "fieldManager is required for apply requests"
                    )
                config = yaml.safe_load(raw)
                if not isinstance(config, dict):
                    raise _ApiStatus(400, "BadRequest", "apply body must be an object")
                force = query.get("force") in ("true", "1")
                return web.json_response(self._apply(gvr, key, config, manager, force))
            if ctype in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
                old = self._store.get(gvr, {}).get(key)
                if old is None:
                    raise _ApiStatus(404, "NotFound", f'{gvr[1]} "{name}" not found')
                patched = merge_patch(old, json.loads(raw))
                patched["metadata"]["name"] = name
                given = (json.loads(raw).get("metadata") or {}).get("resourceVersion")
                if not given:
                    patched["metadata"].pop("resourceVersion", None)
                return web.json_response(self._replace(gvr, patched, check_rv=bool(given)))
            raise _ApiStatus(415, "UnsupportedMediaType", f"unsupported patch type {ctype!r}")
        raise _ApiStatus(405, "MethodNotAllowed", f"{method} not allowed")

    def _list(self, gvr: GVR, flt: _Filter, query: Mapping[str, str]) -> Obj:
        list_rv = self._rv
        start: tuple[str, str] | None = None
        if query.get("continue"):
            token = json.loads(base64.b64decode(query["continue"]))
            list_rv, start = int(token["rv"]), (token["ns"], token["name"])
            if list_rv < self._compacted:
                raise _ApiStatus(
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

    async def _watch(
        self, request: web.BaseRequest, gvr: GVR, flt: _Filter, query: Mapping[str, str]
    ) -> web.StreamResponse:
        rv_text = query.get("resourceVersion") or ""
        rv = int(rv_text) if rv_text.isdigit() else 0
        if rv and rv < self._compacted and self.gone_as_http:
            raise _ApiStatus(410, "Expired", f"too old resource version: {rv} ({self._compacted})")
        watcher = _Watcher(gvr, flt, query.get("allowWatchBookmarks") in ("true", "1"))
        # Replay and registration happen in one synchronous step: nothing is missed.
        if rv and rv < self._compacted:
            watcher.queue.put_nowait(
                {
                    "type": "ERROR",
                    "object": status_body(
                        410, "Expired", f"too old resource version: {rv} ({self._compacted})"
                    ),
                }
            )
            watcher.queue.put_nowait(_END)
        elif rv:
            for event in self._history:
                if event.rv > rv and event.gvr == gvr:
                    out = _translate(flt, event)
                    if out is not None:
                        watcher.queue.put_nowait(out)
        else:
            for _, obj in sorted(self._store.get(gvr, {}).items()):
                if flt.matches(obj):
                    watcher.queue.put_nowait({"type": "ADDED", "object": obj})
        self._watchers.append(watcher)
        self._changed.notify()
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        timeout = float(query.get("timeoutSeconds") or 1800)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            await response.prepare(request)
            while True:
                try:
                    item = await asyncio.wait_for(watcher.queue.get(), deadline - loop.time())
                except TimeoutError:
                    break
                if item is _END:
                    break
                if item is _DROP:
                    if request.transport is not None:
                        request.transport.abort()
                    return response
                await response.write(json.dumps(item).encode() + b"\n")
            await response.write_eof()
        except (ConnectionError, RuntimeError):
            pass  # client went away
        finally:
            self._watchers.remove(watcher)
            self._changed.notify()
        return response


def _same(a: Obj, b: Obj) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _translate(flt: _Filter, event: _Event) -> Obj | None:
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


_PROXY_PATH = re.compile(r"^/api/v1/namespaces/([^/]+)/services/([^/]+)/proxy(/.*)?$")


def _parse_path(path: str) -> tuple[GVR, str | None, str | None]:
    parts = [p for p in path.split("/") if p]
    if len(parts) >= 2 and parts[0] == "api":
        api_version, rest = parts[1], parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        api_version, rest = f"{parts[1]}/{parts[2]}", parts[3:]
    else:
        raise _ApiStatus(
            404, "NotFound", f"the server could not find the requested resource {path}"
        )
    namespace: str | None = None
    if len(rest) >= 3 and rest[0] == "namespaces":
        namespace, rest = rest[1], rest[2:]
    if not rest or len(rest) > 2:
        raise _ApiStatus(
            404, "NotFound", f"the server could not find the requested resource {path}"
        )
    return (api_version, rest[0]), namespace, rest[1] if len(rest) == 2 else None


def fast_backoff() -> Backoff:
    """A retry policy short enough for tests."""
    return Backoff(initial=0.005, maximum=0.02)


@contextlib.asynccontextmanager
async def running(coro: Coroutine[Any, Any, None]) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``coro`` as a task for the block's duration; cancel and await it afterwards."""
    task = asyncio.create_task(coro)
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
