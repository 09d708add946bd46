"""The request path, top to bottom.

1. classify the path (discovery and health are answered here, malformed paths are 400s);
2. authenticate the peer: a client certificate verified against the requestheader CA, with a
   CN among the allowed names; identity headers are trusted only from such a peer;
3. route: namespace -> tenant -> upstream (one dict lookup in the live table);
4. forward with the router's own client certificate, identity headers copied byte for byte
   and in order, hop-by-hop and credential headers dropped;
5. relay status, headers and body unchanged, or map an upstream failure to a Status.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web
from multidict import CIMultiDict

from router import paths, status
from router.config import RequestHeaderSettings
from router.live_routes import LiveRoutes
from router.metrics import ProxyMetrics
from router.routes import Upstream
from router.upstream import UpstreamClient, UpstreamError

logger = logging.getLogger(__name__)

# Never forwarded upstream, whatever the caller sends.
_HOP_BY_HOP = frozenset(
    b"connection keep-alive proxy-connection proxy-authenticate proxy-authorization te trailer "
    b"transfer-encoding upgrade http2-settings".split()
)
_REQUEST_DROP = _HOP_BY_HOP | frozenset(b"host content-length expect authorization cookie".split())
_RESPONSE_DROP = _HOP_BY_HOP | frozenset([b"content-length"])
# Identity arrives upstream only as what the router copied from a verified peer: any header
# in the upstream's own requestheader namespace is dropped first.
_UPSTREAM_IDENTITY_PREFIX = b"x-remote-"
_IMPERSONATE_PREFIX = b"impersonate-"

_STATUS_ERROR_KIND = {
    "unreachable": status.service_unavailable,
    "timeout": status.gateway_timeout,
    "tls": status.bad_gateway,
    "protocol": status.bad_gateway,
}


@dataclass(frozen=True, slots=True)
class IdentityHeaders:
    """Lower-case header names (bytes) that carry the caller's identity, and their canonical
    upstream names (the defaults KEDA's metrics server reads)."""

    user: frozenset[bytes]
    uid: frozenset[bytes]
    group: frozenset[bytes]
    extra_prefixes: tuple[bytes, ...]
    allowed_names: frozenset[str]

    @classmethod
    def from_settings(cls, s: RequestHeaderSettings) -> IdentityHeaders:
        def low(names: tuple[str, ...]) -> frozenset[bytes]:
            return frozenset(n.lower().encode("latin-1") for n in names)

        return cls(
            user=low(s.username_headers),
            uid=low(s.uid_headers),
            group=low(s.group_headers),
            extra_prefixes=tuple(p.lower().encode("latin-1") for p in s.extra_headers_prefixes),
            allowed_names=frozenset(s.allowed_names),
        )


@dataclass(frozen=True, slots=True)
class Forwarded:
    """The header block sent upstream, and whether it carries a user."""

    headers: bytes
    has_user: bool


def forward_headers(raw: tuple[tuple[bytes, bytes], ...], ids: IdentityHeaders) -> Forwarded:
    """Pure: the request headers to send upstream, as a CRLF-terminated header block.

    Identity lines (user, uid, every group line, every extra line) keep their order, name bytes
    and value bytes; when the router's requestheader names differ from KEDA's defaults they are
    renamed to X-Remote-User / -Uid / -Group / -Extra-<same suffix>. Everything named in
    Connection, hop-by-hop headers, credentials, Impersonate-* and unverified X-Remote-* lines
    are dropped.
    """
    connection_named: set[bytes] = set()
    for name, value in raw:
        if name.lower() == b"connection":
            connection_named.update(t.strip().lower() for t in value.split(b","))
    out: list[bytes] = []
    has_user = False
    for name, value in raw:
        lname = name.lower()
        if lname in ids.user:
            if value:
                has_user = True
            out.append(_line(name if lname == b"x-remote-user" else b"X-Remote-User", value))
        elif lname in ids.uid:
            out.append(_line(name if lname == b"x-remote-uid" else b"X-Remote-Uid", value))
        elif lname in ids.group:
            out.append(_line(name if lname == b"x-remote-group" else b"X-Remote-Group", value))
        elif (prefix := _extra_prefix(lname, ids.extra_prefixes)) is not None:
            if prefix == b"x-remote-extra-":
                out.append(_line(name, value))
            else:
                out.append(_line(b"X-Remote-Extra-" + name[len(prefix) :], value))
        elif (
            lname in _REQUEST_DROP
            or lname in connection_named
            or lname.startswith(_UPSTREAM_IDENTITY_PREFIX)
            or lname.startswith(_IMPERSONATE_PREFIX)
        ):
            continue
        else:
            out.append(_line(name, value))
    return Forwarded(b"".join(out), has_user)


def _line(name: bytes, value: bytes) -> bytes:
    return name + b": " + value + b"\r\n"


def _extra_prefix(lname: bytes, prefixes: tuple[bytes, ...]) -> bytes | None:
    for prefix in prefixes:
        if lname.startswith(prefix) and len(lname) > len(prefix):
            return prefix
    return None


def response_headers(raw: list[tuple[bytes, bytes]]) -> CIMultiDict[str]:
    """Pure: upstream response headers to relay (hop-by-hop and Content-Length dropped)."""
    connection_named: set[bytes] = set()
    for name, value in raw:
        if name.lower() == b"connection":
            connection_named.update(t.strip().lower() for t in value.split(b","))
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in raw:
        lname = name.lower()
        if lname in _RESPONSE_DROP or lname in connection_named:
            continue
        out.add(name.decode("latin-1"), value.decode("latin-1"))
    return out


def peer_common_name(request: web.BaseRequest) -> str | None:
    """CN of a client certificate verified during the handshake, or None without one."""
    transport = request.transport
    if transport is None:
        return None
    sslobj = transport.get_extra_info("ssl_object")
    if sslobj is None:
        return None
    cert = sslobj.getpeercert()
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return ""


def _status_response(err: status.StatusError) -> web.Response:
    resp = web.Response(status=err.code, body=err.body(), content_type="application/json")
    for k, v in err.headers:
        resp.headers[k] = v
    return resp


class Proxy:
    """The aiohttp low-level handler for the secure port."""

    def __init__(
        self,
        *,
        routes: LiveRoutes,
        client: UpstreamClient,
        identity: Callable[[], IdentityHeaders],
        metrics: ProxyMetrics,
        max_inflight_per_tenant: int,
        ready: Callable[[], bool],
    ) -> None:
        self._routes = routes
        self._client = client
        self._identity = identity
        self._metrics = metrics
        self._max_inflight = max_inflight_per_tenant
        self._ready = ready
        self._inflight: dict[str, int] = {}
        self._host_lines: dict[Upstream, bytes] = {}

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        try:
            return await self._handle(request)
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:  # the router never answers 500: a bug is logged and reported as 502
            logger.exception("unexpected error proxying %s", request.raw_path[:200])
            self._metrics.observe("", 502, None)
            return _status_response(status.bad_gateway("the router failed to handle the request"))

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        raw_path = request.raw_path
        path, _, _query = raw_path.partition("?")
        target = paths.classify(path)
        if isinstance(target, status.StatusError):
            return self._refuse(target)
        kind = target.kind
        if kind is paths.Kind.HEALTH:
            return self._health(path, request.method)
        if request.method != "GET":
            return self._refuse(status.method_not_allowed(request.method))

        ids = self._identity()
        cn = peer_common_name(request)
        if cn is None:
            return self._unauthorized("no-certificate", "a client certificate is required")
        if ids.allowed_names and cn not in ids.allowed_names:
            return self._unauthorized(
                "name-not-allowed", f"client certificate common name {cn!r} is not allowed"
            )
        if kind is not paths.Kind.METRIC:
            return self._discovery(kind, request.headers.get("Accept", ""))

        forwarded = forward_headers(request.raw_headers, ids)
        if not forwarded.has_user:
            return self._unauthorized("no-user", "the request carries no user identity header")

        route = self._routes.table.lookup(target.namespace)
        if route is None:
            return self._refuse(
                status.not_found(
                    f'namespace "{target.namespace}" is not served by any tenant\'s metrics server'
                )
            )
        tenant = route.tenant
        inflight = self._inflight.get(tenant, 0)
        if inflight >= self._max_inflight:
            self._metrics.upstream_errors.labels(tenant, "overloaded").inc()
            err = status.too_many_requests(tenant)
            self._metrics.observe(tenant, err.code, None)
            return _status_response(err)

        upstream = route.upstream
        host = self._host_lines.get(upstream)
        if host is None:
            host = self._host_lines[upstream] = (
                f"Host: {upstream.tls_name}:{upstream.port}\r\n".encode("idna")
            )
        head = b"".join(
            (
                b"GET ",
                raw_path.encode("utf-8", "surrogateescape"),
                b" HTTP/1.1\r\n",
                host,
                forwarded.headers,
                b"\r\n",
            )
        )
        loop = asyncio.get_running_loop()
        started = loop.time()
        self._inflight[tenant] = inflight + 1
        gauge = self._metrics.inflight.labels(tenant)
        gauge.inc()
        try:
            response = await self._client.request(upstream, head)
        except UpstreamError as exc:
            self._metrics.upstream_errors.labels(tenant, exc.kind).inc()
            self._routes.record_error(tenant, exc.kind, exc.message)
            logger.warning(
                "upstream error tenant=%s namespace=%s kind=%s error=%r",
                tenant, target.namespace, exc.kind, exc.message,
            )  # fmt: skip
            err = _STATUS_ERROR_KIND[exc.kind](f"tenant {tenant!r} metrics server: {exc.message}")
            self._metrics.observe(tenant, err.code, loop.time() - started)
            return _status_response(err)
        finally:
            self._inflight[tenant] -= 1
            gauge.dec()
        self._metrics.observe(tenant, response.status, loop.time() - started)
        return web.Response(
            status=response.status,
            body=response.body,
            headers=response_headers(response.headers),
        )

    def _refuse(self, err: status.StatusError) -> web.Response:
        self._metrics.observe("", err.code, None)
        return _status_response(err)

    def _unauthorized(self, reason: str, message: str) -> web.Response:
        self._metrics.unauthorized.labels(reason).inc()
        return self._refuse(status.unauthorized(message))

    def _health(self, path: str, method: str) -> web.Response:
        if method not in ("GET", "HEAD"):
            return self._refuse(status.method_not_allowed(method))
        if path == "/readyz" and not self._ready():
            return web.Response(status=503, text="not ready: routes not synced or shutting down\n")
        return web.Response(text="ok\n")

    def _discovery(self, kind: paths.Kind, accept: str) -> web.Response:
        if kind is paths.Kind.APIS:
            body, ctype = status.negotiate_apis(accept)
        elif kind is paths.Kind.GROUP:
            body, ctype = status.API_GROUP, status.JSON
        elif kind is paths.Kind.GROUP_VERSION:
            body, ctype = status.API_RESOURCE_LIST, status.JSON
        else:
            # OpenAPI: kube-aggregator skips a 404 quietly; HPA clients never need the spec.
            return self._refuse(status.not_found("the router serves no OpenAPI document"))
        self._metrics.observe("", 200, None)
        resp = web.Response(status=200, body=body)
        resp.headers["Content-Type"] = ctype
        return resp
