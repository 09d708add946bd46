"""The request path, top to bottom.

1. classify the path (discovery and health are answered here, malformed paths are 400s);
2. authenticate the peer: a client certificate verified against the requestheader CA, with a
   CN among the allowed names; identity headers are trusted only from such a peer;
3. route: namespace -> tenant -> upstream (one dict lookup in the live table);
4. forward with the router's own client certificate, identity headers copied byte for byte
   and in order, hop-by-hop and credential headers dropped;
5. relay status, headers and body unchanged, or map an upstream failure to a Status.

:class:`Proxy` is that path, independent of the HTTP server in front of it: ``begin`` (steps
1-3), ``forward`` (steps 4-5, the answer to a callback), ``respond`` (both, as a coroutine).
The secure port is served by :class:`ProxyServer`, a lean HTTP/1.1 server on asyncio protocols
(httptools parser, peer certificate read once per connection, no task or future per request,
the answer written as one buffer). It exists because the profile said so: aiohttp's server
machinery cost more CPU per request than NGINX's whole request path (see bench/README.md).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import email.utils
import http
import logging
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httptools

from router import paths, status
from router.config import RequestHeaderSettings
from router.live_routes import LiveRoutes
from router.metrics import ProxyMetrics
from router.routes import Upstream
from router.http.client import UpstreamClient, UpstreamError, UpstreamResponse

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

_JSON_TYPE = b"Content-Type: application/json\r\n"
_TEXT_TYPE = b"Content-Type: text/plain; charset=utf-8\r\n"

# Limits of the secure port's HTTP/1.1 server. Header bytes as Go's net/http (what KEDA's
# metrics server accepts): a user in hundreds of groups sends hundreds of X-Remote-Group lines.
MAX_REQUEST_LINE = 8190
MAX_HEADER_LINE = 16384
MAX_HEADER_BYTES = 1 << 20
MAX_PIPELINED = 16
KEEPALIVE_TIMEOUT = 75.0


@dataclass(frozen=True, slots=True)
class IdentityHeaders:
    """Lower-case header names (bytes) that carry the caller's identity, and their canonical
    upstream names (the defaults KEDA's metrics server reads)."""

    user: frozenset[bytes]
    uid: frozenset[bytes]
    group: frozenset[bytes]
    extra_prefixes: tuple[bytes, ...]
    allowed_names: frozenset[str]
    # lower-case header name -> what forward_headers does with it (filled as names are seen)
    name_actions: dict[bytes, _Action] = field(
        default_factory=dict, compare=False, hash=False, repr=False
    )

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


# What forward_headers does with a header name: (kind, canonical name to write instead or None,
# length of a requestheader extra prefix to replace by X-Remote-Extra- or 0).
_Action = tuple[int, bytes | None, int]
_KEEP, _DROP, _CONNECTION, _USER, _IDENTITY = range(5)
_NAME_CACHE_SIZE = 4096


def _name_action(lname: bytes, ids: IdentityHeaders) -> _Action:
    if lname in ids.user:
        return _USER, None if lname == b"x-remote-user" else b"X-Remote-User", 0
    if lname in ids.uid:
        return _IDENTITY, None if lname == b"x-remote-uid" else b"X-Remote-Uid", 0
    if lname in ids.group:
        return _IDENTITY, None if lname == b"x-remote-group" else b"X-Remote-Group", 0
    prefix = _extra_prefix(lname, ids.extra_prefixes)
    if prefix is not None:
        return _IDENTITY, None, 0 if prefix == b"x-remote-extra-" else len(prefix)
    if lname == b"connection":
        return _CONNECTION, None, 0
    if (
        lname in _REQUEST_DROP
        or lname.startswith(_UPSTREAM_IDENTITY_PREFIX)
        or lname.startswith(_IMPERSONATE_PREFIX)
    ):
        return _DROP, None, 0
    return _KEEP, None, 0


def forward_headers(raw: Sequence[tuple[bytes, bytes]], ids: IdentityHeaders) -> Forwarded:
    """Pure: the request headers to send upstream, as a CRLF-terminated header block.

    Identity lines (user, uid, every group line, every extra line) keep their order, name bytes
    and value bytes; when the router's requestheader names differ from KEDA's defaults they are
    renamed to X-Remote-User / -Uid / -Group / -Extra-<same suffix>. Everything named in
    Connection, hop-by-hop headers, credentials, Impersonate-* and unverified X-Remote-* lines
    are dropped.

    One dict lookup per header (what to do with each name is remembered per requestheader
    settings); a Connection header naming other headers takes the step-by-step path.
    """
    actions = ids.name_actions
    out: list[bytes] = []
    has_user = False
    for name, value in raw:
        lname = name.lower()
        action = actions.get(lname)
        if action is None:
            action = _name_action(lname, ids)
            if len(actions) < _NAME_CACHE_SIZE:
                actions[lname] = action
        kind, canonical, cut = action
        if kind == _KEEP:
            out.append(name + b": " + value + b"\r\n")
        elif kind == _DROP:
            continue
        elif kind == _CONNECTION:
            for token in value.split(b","):
                if token.strip().lower() not in _REQUEST_DROP:
                    return _forward_headers_exact(raw, ids)
        else:
            if kind == _USER and value:
                has_user = True
            if canonical is None:
                canonical = b"X-Remote-Extra-" + name[cut:] if cut else name
            out.append(canonical + b": " + value + b"\r\n")
    return Forwarded(b"".join(out), has_user)


def _forward_headers_exact(raw: Sequence[tuple[bytes, bytes]], ids: IdentityHeaders) -> Forwarded:
    """forward_headers, step by step (the reference; used when Connection names headers)."""
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


def _relayed(raw: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    connection_named: set[bytes] = set()
    for name, value in raw:
        if name.lower() == b"connection":
            connection_named.update(t.strip().lower() for t in value.split(b","))
    return [
        (name, value)
        for name, value in raw
        if (lname := name.lower()) not in _RESPONSE_DROP and lname not in connection_named
    ]


def response_header_block(raw: Sequence[tuple[bytes, bytes]]) -> bytes:
    """Pure: upstream response headers to relay, as a CRLF-terminated block (hop-by-hop,
    anything named in Connection, and Content-Length dropped; order and bytes kept)."""
    out: list[bytes] = []
    for name, value in raw:
        lname = name.lower()
        if lname not in _RESPONSE_DROP:
            out.append(name + b": " + value + b"\r\n")
        elif lname == b"connection":
            for token in value.split(b","):
                if token.strip().lower() not in _RESPONSE_DROP:  # names another header
                    return b"".join(n + b": " + v + b"\r\n" for n, v in _relayed(raw))
    return b"".join(out)


def _cert_common_name(cert: object) -> str | None:
    """CN of a certificate dict from SSLObject.getpeercert(), "" without a CN, None if empty."""
    if not cert or not isinstance(cert, dict):
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return ""


# ------------------------------------------------------------------------------- the answer


@dataclass(frozen=True, slots=True)
class Reply:
    """An answer: status, header lines (CRLF-terminated, no Content-Length/Connection), body."""

    status: int
    headers: bytes
    body: bytes


def _status_reply(err: status.StatusError) -> Reply:
    extra = b"".join(_line(k.encode("latin-1"), v.encode("latin-1")) for k, v in err.headers)
    return Reply(err.code, _JSON_TYPE + extra, err.body())


@dataclass(slots=True)
class Exchange:
    """A request on its way to a tenant's upstream (steps 4 and 5 of the request path)."""

    tenant: str
    namespace: str
    upstream: Upstream
    head: bytes  # request line and headers, as written upstream
    started: float = 0.0


class Proxy:
    """The request path: what to answer to one request, whatever server received it.

    ``begin`` does steps 1-3 and either answers at once or returns an :class:`Exchange`;
    ``forward`` does steps 4-5 and hands the answer to a callback. ``respond`` is both as a
    coroutine. None of them raises: a bug is logged and answered 502.
    """

    def __init__(
        self,
        *,
        routes: LiveRoutes,
        client: UpstreamClient,
        identity: Callable[[], IdentityHeaders],
        metrics: ProxyMetrics,
        max_inflight_per_tenant: int,
        ready: Callable[[], bool],
        resumed_peer_ok: Callable[[bytes | None], bool] | None = None,
    ) -> None:
        self._routes = routes
        self._client = client
        self._identity = identity
        self._metrics = metrics
        self._max_inflight = max_inflight_per_tenant
        self._ready = ready
        self._inflight: dict[str, int] = {}
        self._host_lines: dict[Upstream, bytes] = {}
        self._gauges: dict[str, Any] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._resumed_peer_ok = resumed_peer_ok

    def peer_name(self, sslobj: ssl.SSLObject | None) -> str | None:
        """CN of the verified client certificate of a TLS connection, None without one.

        A resumed TLS session skipped certificate verification: its certificate counts only
        if ``resumed_peer_ok`` accepts it against the current requestheader CA.
        """
        if sslobj is None:
            return None
        cn = _cert_common_name(sslobj.getpeercert())
        if cn is not None and sslobj.session_reused:
            check = self._resumed_peer_ok
            if check is None or not check(sslobj.getpeercert(binary_form=True)):
                return None
        return cn

    async def respond(
        self,
        method: str,
        raw_path: str,
        raw_headers: Sequence[tuple[bytes, bytes]],
        cn: str | None,
    ) -> Reply:
        """The answer to one request. ``raw_path`` is the request target as received (with its
        query); ``cn`` the verified client certificate's common name (None without one)."""
        outcome = self.begin(method, raw_path, raw_headers, cn)
        if isinstance(outcome, Reply):
            return outcome
        answer: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self.forward(outcome, answer.set_result)
        return await answer

    def begin(
        self,
        method: str,
        raw_path: str,
        raw_headers: Sequence[tuple[bytes, bytes]],
        cn: str | None,
    ) -> Reply | Exchange:
        """Steps 1-3: an answer now (discovery, health, refusals), or an exchange to forward."""
        try:
            return self._begin(method, raw_path, raw_headers, cn)
        except Exception:  # the router never answers 500: a bug is logged and reported as 502
            logger.exception("unexpected error proxying %s", raw_path[:200])
            return self._bug()

    def _begin(
        self,
        method: str,
        raw_path: str,
        raw_headers: Sequence[tuple[bytes, bytes]],
        cn: str | None,
    ) -> Reply | Exchange:
        path, _, _query = raw_path.partition("?")
        target = paths.classify(path)
        if not isinstance(target, status.StatusError) and target.kind is paths.Kind.HEALTH:
            return self._health(path, method)
        # Authenticate before anything else, as kube-apiserver does: a caller without a valid
        # certificate learns nothing about which paths or methods exist.
        ids = self._identity()
        if cn is None:
            return self._unauthorized("no-certificate", "a client certificate is required")
        if ids.allowed_names and cn not in ids.allowed_names:
            return self._unauthorized(
                "name-not-allowed", f"client certificate common name {cn!r} is not allowed"
            )
        if isinstance(target, status.StatusError):
            return self._refuse(target)
        if method != "GET":
            return self._refuse(status.method_not_allowed(method))
        kind = target.kind
        if kind is not paths.Kind.METRIC:
            return self._discovery(kind, raw_headers)

        forwarded = forward_headers(raw_headers, ids)
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
        if self._inflight.get(tenant, 0) >= self._max_inflight:
            self._metrics.upstream_errors.labels(tenant, "overloaded").inc()
            err = status.too_many_requests(tenant)
            self._metrics.observe(tenant, err.code, None)
            return _status_reply(err)

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
        return Exchange(tenant, target.namespace, upstream, head)

    def forward(self, ex: Exchange, reply_to: Callable[[Reply], None]) -> None:
        """Steps 4-5: send the exchange upstream with the router's client certificate; the
        relayed answer, or the Status an upstream failure maps to, goes to ``reply_to``."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        tenant = ex.tenant
        self._inflight[tenant] = self._inflight.get(tenant, 0) + 1
        gauge = self._gauges.get(tenant)
        if gauge is None:
            gauge = self._gauges[tenant] = self._metrics.inflight.labels(tenant)
        gauge.inc()
        ex.started = loop.time()

        def done(result: UpstreamResponse | UpstreamError) -> None:
            self._inflight[tenant] -= 1
            gauge.dec()
            try:
                reply = self._relay(ex, result, loop.time() - ex.started)
            except Exception:
                logger.exception("unexpected error relaying the answer of tenant %s", tenant)
                reply = self._bug()
            reply_to(reply)

        self._client.send(ex.upstream, ex.head, done)

    def _relay(
        self, ex: Exchange, result: UpstreamResponse | UpstreamError, seconds: float
    ) -> Reply:
        tenant = ex.tenant
        if isinstance(result, UpstreamError):
            self._metrics.upstream_errors.labels(tenant, result.kind).inc()
            self._routes.record_error(tenant, result.kind, result.message)
            logger.warning(
                "upstream error tenant=%s namespace=%s kind=%s error=%r",
                tenant, ex.namespace, result.kind, result.message,
            )  # fmt: skip
            make = _STATUS_ERROR_KIND[result.kind]
            err = make(f"tenant {tenant!r} metrics server: {result.message}")
            self._metrics.observe(tenant, err.code, seconds)
            return _status_reply(err)
        self._metrics.observe(tenant, result.status, seconds)
        return Reply(result.status, response_header_block(result.headers), result.body)

    def _bug(self) -> Reply:
        self._metrics.observe("", 502, None)
        return _status_reply(status.bad_gateway("the router failed to handle the request"))

    def _refuse(self, err: status.StatusError) -> Reply:
        self._metrics.observe("", err.code, None)
        return _status_reply(err)

    def count_refusal(self, code: int) -> None:
        """Count an answer the server gave before the request path ran (a malformed request)."""
        self._metrics.observe("", code, None)

    def _unauthorized(self, reason: str, message: str) -> Reply:
        self._metrics.unauthorized.labels(reason).inc()
        return self._refuse(status.unauthorized(message))

    def _health(self, path: str, method: str) -> Reply:
        if method not in ("GET", "HEAD"):
            return self._refuse(status.method_not_allowed(method))
        if path == "/readyz" and not self._ready():
            return Reply(503, _TEXT_TYPE, b"not ready: routes not synced or shutting down\n")
        return Reply(200, _TEXT_TYPE, b"ok\n")

    def _discovery(self, kind: paths.Kind, raw_headers: Sequence[tuple[bytes, bytes]]) -> Reply:
        if kind is paths.Kind.APIS:
            accept = next(
                (v.decode("latin-1") for k, v in raw_headers if k.lower() == b"accept"), ""
            )
            body, ctype = status.negotiate_apis(accept)
        elif kind is paths.Kind.GROUP:
            body, ctype = status.API_GROUP, status.JSON
        elif kind is paths.Kind.GROUP_VERSION:
            body, ctype = status.API_RESOURCE_LIST, status.JSON
        else:
            # OpenAPI: kube-aggregator skips a 404 quietly; HPA clients never need the spec.
            return self._refuse(status.not_found("the router serves no OpenAPI document"))
        self._metrics.observe("", 200, None)
        return Reply(200, b"Content-Type: " + ctype.encode("latin-1") + b"\r\n", body)


# --------------------------------------------------------------------- the secure port server

_REASONS = {s.value: s.phrase.encode("latin-1") for s in http.HTTPStatus}
_STATUS_LINES: dict[int, bytes] = {}


def _status_line(code: int) -> bytes:
    line = _STATUS_LINES.get(code)
    if line is None:
        reason = _REASONS.get(code, b"Unknown")
        line = _STATUS_LINES[code] = b"HTTP/1.1 %d %s\r\n" % (code, reason)
    return line


class _DateHeader:
    """The Date header line, formatted at most once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._line = b""

    def line(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._line = b"Date: " + email.utils.formatdate(now, usegmt=True).encode() + b"\r\n"
        return self._line


@dataclass(slots=True)
class _Request:
    method: str
    target: bytes
    headers: list[tuple[bytes, bytes]]
    keep_alive: bool
    http10: bool
    error: Reply | None = None


class _ServerConnection(asyncio.Protocol):
    """One client connection of the secure port: parse requests, answer them in order.

    Driven by callbacks, with no task per request: a request that completes in
    ``data_received`` is begun at once; when it must go upstream, the upstream connection's
    answer calls back here, the answer is written, and the next pipelined request begins.
    """

    __slots__ = (
        "_busy",
        "_cn",
        "_failed",
        "_header_bytes",
        "_headers",
        "_in_head",
        "_loop",
        "_parser",
        "_paused",
        "_pending",
        "_server",
        "_transport",
        "_url",
        "head_since",
        "idle_since",
    )

    def __init__(self, server: ProxyServer, loop: asyncio.AbstractEventLoop) -> None:
        self._server = server
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        self._in_head = False  # between the start of a request and the end of its headers
        self._pending: collections.deque[_Request] = collections.deque()
        self._busy = False  # a request of this connection is upstream
        self._paused = False
        self._cn: str | None = None
        self._failed = False
        self.idle_since: float | None = None  # waiting for the next request since
        self.head_since = 0.0  # when the request being received started

    # ---- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        # Read once per connection: the peer certificate cannot change on a TLS connection.
        self._cn = self._server.proxy.peer_name(transport.get_extra_info("ssl_object"))
        self.idle_since = self._loop.time()
        self._server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._pending.clear()
        self._server.forget(self)

    def data_received(self, data: bytes) -> None:
        if self._failed:
            return
        if self._in_head:
            # A header line without its end is buffered by the parser: bound it here.
            self._header_bytes += len(data)
            if self._header_bytes > MAX_HEADER_BYTES + MAX_REQUEST_LINE:
                self._refuse_request("request headers too large")
                return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # An upgrade request is answered as plain HTTP/1.1, then the connection closes:
            # nothing after it is read.
            self._stop_reading()
            self._failed = True
            if self._pending:
                self._pending[-1].keep_alive = False
            else:
                self._refuse_request("protocol upgrades are not supported")
        except httptools.HttpParserError as exc:
            self._refuse_request(f"malformed HTTP request: {exc}")

    def pause_writing(self) -> None:  # the client does not read: stop reading its requests
        self._stop_reading()

    def resume_writing(self) -> None:
        self._resume_reading()

    # ---- httptools callbacks

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._header_bytes = 0
        self._in_head = True
        self.idle_since = None
        self.head_since = self._loop.time()

    def on_headers_complete(self) -> None:
        self._in_head = False

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > MAX_REQUEST_LINE:
            raise httptools.HttpParserError("request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        size = len(name) + len(value) + 4
        self._header_bytes += size
        if size > MAX_HEADER_LINE or self._header_bytes > MAX_HEADER_BYTES:
            raise httptools.HttpParserError("request headers too large")

    def on_message_complete(self) -> None:
        parser = self._parser
        request = _Request(
            method=parser.get_method().decode("latin-1"),
            target=self._url,
            headers=self._headers,
            keep_alive=parser.should_keep_alive(),
            http10=parser.get_http_version() == "1.0",
        )
        self._enqueue(request)

    # ---- answering, in order

    def _enqueue(self, request: _Request) -> None:
        self._pending.append(request)
        if len(self._pending) >= MAX_PIPELINED:
            self._stop_reading()
        if not self._busy:
            self._next()

    def _refuse_request(self, message: str) -> None:
        self._failed = True
        self._stop_reading()
        err = status.bad_request(message)
        self._server.proxy.count_refusal(err.code)
        self._enqueue(_Request("GET", b"", [], False, False, _status_reply(err)))

    def _next(self) -> None:
        """Begin pending requests until one has to wait for its upstream."""
        proxy, pending = self._server.proxy, self._pending
        while pending and not self._busy and self._transport is not None:
            request = pending[0]
            if request.error is not None:
                self._answer(request.error)
                continue
            target = request.target.decode("utf-8", "surrogateescape")
            outcome = proxy.begin(request.method, target, request.headers, self._cn)
            if isinstance(outcome, Reply):
                self._answer(outcome)
            else:
                self._busy = True
                proxy.forward(outcome, self._answer_forwarded)
        if not pending and not self._busy:
            self.idle_since = self._loop.time()

    def _answer_forwarded(self, reply: Reply) -> None:
        self._busy = False
        if self._transport is None or not self._pending:
            return  # the client went away meanwhile
        self._answer(reply)
        self._next()

    def _answer(self, reply: Reply) -> None:
        request = self._pending.popleft()
        transport = self._transport
        if transport is None:
            return
        keep_alive = request.keep_alive and not self._server.closing
        if keep_alive:
            connection = b"Connection: keep-alive\r\n" if request.http10 else b""
        else:
            connection = b"Connection: close\r\n"
        transport.write(
            b"".join(
                (
                    _status_line(reply.status),
                    reply.headers,
                    self._server.date.line(),
                    b"Content-Length: %d\r\n" % len(reply.body),
                    connection,
                    b"\r\n",
                    b"" if request.method == "HEAD" else reply.body,
                )
            )
        )
        if not keep_alive:
            self._pending.clear()
            self._transport = None
            transport.close()
        elif self._paused and len(self._pending) < MAX_PIPELINED // 2 and not self._failed:
            self._resume_reading()

    def _stop_reading(self) -> None:
        if not self._paused and self._transport is not None:
            self._paused = True
            with contextlib.suppress(RuntimeError):
                self._transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._paused and self._transport is not None:
            self._paused = False
            with contextlib.suppress(RuntimeError):
                self._transport.resume_reading()

    @property
    def busy(self) -> bool:
        return self._busy or bool(self._pending)

    @property
    def receiving_head(self) -> bool:
        return self._in_head

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


class ProxyServer:
    """The secure port: HTTP/1.1 with keep-alive and pipelining, requests answered by
    :class:`Proxy`. A connection idle for ``keepalive_timeout`` seconds is closed, and one
    whose request headers take longer than that to arrive is dropped."""

    def __init__(self, proxy: Proxy, *, keepalive_timeout: float = KEEPALIVE_TIMEOUT) -> None:
        self.proxy = proxy
        self.keepalive_timeout = keepalive_timeout
        self.connections: set[_ServerConnection] = set()
        self.closing = False
        self.date = _DateHeader()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._all_gone = asyncio.Event()

    async def start(
        self,
        host: str | None,
        port: int,
        ssl_context: ssl.SSLContext,
        *,
        reuse_port: bool = False,
        backlog: int = 1024,
    ) -> None:
        """Listen (raises OSError when the address cannot be bound)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _ServerConnection(self, loop),
            host or None,
            port,
            ssl=ssl_context,
            reuse_port=reuse_port or None,
            backlog=backlog,
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        self._sweeper = asyncio.create_task(self._sweep_idle(), name="close-idle-connections")

    def forget(self, conn: _ServerConnection) -> None:
        self.connections.discard(conn)
        if not self.connections:
            self._all_gone.set()

    async def _sweep_idle(self) -> None:
        loop = asyncio.get_running_loop()
        interval = max(min(self.keepalive_timeout / 4, 5.0), 0.05)
        while True:
            await asyncio.sleep(interval)
            expired = loop.time() - self.keepalive_timeout
            for conn in list(self.connections):
                if conn.idle_since is not None and conn.idle_since < expired:
                    conn.close()  # idle keep-alive connection
                elif conn.receiving_head and conn.head_since < expired:
                    conn.abort()  # request headers trickling in for too long

    async def stop(self, grace: float) -> None:
        """Stop accepting; close idle connections; let requests in flight finish within the
        grace period (their answer carries Connection: close); then abort what is left."""
        self.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            if not conn.busy:
                conn.close()
        if self.connections:
            self._all_gone.clear()
            if self.connections:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._all_gone.wait(), grace)
        for conn in list(self.connections):
            conn.abort()
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
