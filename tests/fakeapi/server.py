"""A fake Kubernetes API server for tests: real HTTP over real TLS on 127.0.0.1.

The package by job: ``selectors`` (label and field selectors), ``store`` (objects,
resourceVersions, watch events, 410 Gone, the synchronous test helpers), ``apply`` (merge
patch and server-side apply), ``errors`` (Status), ``waiting`` (``Signal``, ``running``,
``fast_backoff``) and this module: the HTTP server, its routes, TLS and the services proxy.

It speaks enough of the API protocol for the real kubernetes-asyncio client (through
``router.cluster.client.api_client(kubeconfig)``) to list, watch, get, create, update, patch,
apply and delete any resource at any group/version path, namespaced or cluster-scoped.

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
    ``async wait_request(predicate, within=2.0)``,
    ``async wait_changed(predicate, within=2.0)`` (re-checked after every request and watch
    change), ``proxy_forbidden`` (bool).
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
import json
import re
import ssl
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType

import aiohttp
import yaml
from aiohttp import web

from router.devtools.pki import CertAndKey, issue_cert, make_ca
from tests.fakeapi.apply import merge_patch
from tests.fakeapi.errors import ApiStatus, status_body
from tests.fakeapi.selectors import Filter
from tests.fakeapi.store import DROP, END, GVR, Store


class FakeKube(Store):
    """The store served over HTTPS on 127.0.0.1, with a kubeconfig for the real client."""

    def __init__(self, directory: Path, token: str = "fake-token") -> None:
        super().__init__()
        self.directory = Path(directory)
        self.token = token
        self.port = 0
        self.proxy_forbidden = False  # services/proxy answers 403, as without RBAC for it
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self._failures: list[tuple[int, float | None]] = []
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
        self._end_all(DROP)
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

    # ------------------------------------------------------------------ test helpers (HTTP)

    def fail_next(
        self, count: int = 1, status: int = 500, retry_after: float | None = None
    ) -> None:
        self._failures.extend([(status, retry_after)] * count)

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
                raise ApiStatus(401, "Unauthorized", "Unauthorized")
            if self._failures:
                status, retry_after = self._failures.pop(0)
                headers = {} if retry_after is None else {"Retry-After": str(int(retry_after))}
                raise ApiStatus(status, "InternalError", "injected failure", headers)
            if _PROXY_PATH.match(request.path):
                return await self._proxy(request)
            return await self._dispatch(request, query)
        except ApiStatus as exc:
            return web.json_response(
                status_body(exc.code, exc.reason, exc.message), status=exc.code,
                headers=exc.headers,
            )  # fmt: skip

    async def _proxy(self, request: web.BaseRequest) -> web.StreamResponse:
        """The services proxy: GET to the first ready endpoint of the Service's port."""
        if self.proxy_forbidden:
            raise ApiStatus(403, "Forbidden", 'cannot get resource "services/proxy"')
        match = _PROXY_PATH.match(request.path)
        assert match is not None
        namespace, ref, rest = match.group(1), match.group(2), match.group(3) or "/"
        parts = ref.split(":")
        scheme = parts.pop(0) if len(parts) == 3 else "http"
        name, port_ref = parts[0], parts[1] if len(parts) > 1 else ""
        svc = self.get("services", name, namespace)
        if svc is None:
            raise ApiStatus(404, "NotFound", f'services "{name}" not found')
        ports = svc["spec"].get("ports") or []
        port = (
            next((p for p in ports if port_ref in (p.get("name"), str(p["port"]))), None)
            if port_ref
            else (ports[0] if ports else None)
        )
        if port is None:
            raise ApiStatus(503, "ServiceUnavailable", f"no port {port_ref!r} on {name}")
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
            raise ApiStatus(
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
            flt = Filter.from_query(namespace, query)
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
                self._delete_matching(gvr, flt)
                return web.json_response(status_body(200, "", "") | {"status": "Success"})
            raise ApiStatus(405, "MethodNotAllowed", f"{method} not allowed on a collection")
        key = (namespace or "", name)
        if method == "GET":
            obj = self._store.get(gvr, {}).get(key)
            if obj is None:
                raise ApiStatus(404, "NotFound", f'{gvr[1]} "{name}" not found')
            return web.json_response(obj)
        if method == "DELETE":
            return web.json_response(self._delete(gvr, key))
        if method == "PUT":
            body = await request.json()
            body.setdefault("metadata", {})
            if body["metadata"].get("name") not in (None, name):
                raise ApiStatus(400, "BadRequest", "the name of the object does not match")
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
                    raise ApiStatus(
                        400, "BadRequest", "fieldManager is required for apply requests"
                    )
                config = yaml.safe_load(raw)
                if not isinstance(config, dict):
                    raise ApiStatus(400, "BadRequest", "apply body must be an object")
                force = query.get("force") in ("true", "1")
                return web.json_response(self._apply(gvr, key, config, manager, force))
            if ctype in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
                old = self._store.get(gvr, {}).get(key)
                if old is None:
                    raise ApiStatus(404, "NotFound", f'{gvr[1]} "{name}" not found')
                patched = merge_patch(old, json.loads(raw))
                patched["metadata"]["name"] = name
                given = (json.loads(raw).get("metadata") or {}).get("resourceVersion")
                if not given:
                    patched["metadata"].pop("resourceVersion", None)
                return web.json_response(self._replace(gvr, patched, check_rv=bool(given)))
            raise ApiStatus(415, "UnsupportedMediaType", f"unsupported patch type {ctype!r}")
        raise ApiStatus(405, "MethodNotAllowed", f"{method} not allowed")

    async def _watch(
        self, request: web.BaseRequest, gvr: GVR, flt: Filter, query: Mapping[str, str]
    ) -> web.StreamResponse:
        watcher = self._open_watch(gvr, flt, query)
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
                if item is END:
                    break
                if item is DROP:
                    if request.transport is not None:
                        request.transport.abort()
                    return response
                await response.write(json.dumps(item).encode() + b"\n")
            await response.write_eof()
        except (ConnectionError, RuntimeError):
            pass  # client went away
        finally:
            self._close_watch(watcher)
        return response


_PROXY_PATH = re.compile(r"^/api/v1/namespaces/([^/]+)/services/([^/]+)/proxy(/.*)?$")


def _parse_path(path: str) -> tuple[GVR, str | None, str | None]:
    parts = [p for p in path.split("/") if p]
    if len(parts) >= 2 and parts[0] == "api":
        api_version, rest = parts[1], parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        api_version, rest = f"{parts[1]}/{parts[2]}", parts[3:]
    else:
        raise ApiStatus(404, "NotFound", f"the server could not find the requested resource {path}")
    namespace: str | None = None
    if len(rest) >= 3 and rest[0] == "namespaces":
        namespace, rest = rest[1], rest[2:]
    if not rest or len(rest) > 2:
        raise ApiStatus(404, "NotFound", f"the server could not find the requested resource {path}")
    return (api_version, rest[0]), namespace, rest[1] if len(rest) == 2 else None
