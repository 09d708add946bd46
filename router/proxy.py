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
The secure port is served by router.http.server.ProxyServer, and upstreams are reached with
router.http.client.UpstreamClient: the HTTP layer owns framing, deadlines and limits; this
module owns the decisions.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from router import logs
from router.core import paths, stale, status
from router.core.live_routes import LiveRoutes
from router.core.routes import Upstream
from router.http.client import UpstreamClient, UpstreamError, UpstreamResponse
from router.http.server import RateLimitedLog, Reply, status_reply
from router.metrics import ProxyMetrics
from router.settings.serve import RequestHeaderSettings, StaleSettings

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("router.access")

# Never forwarded upstream, whatever the caller sends.
_HOP_BY_HOP = frozenset(
    b"connection keep-alive proxy-connection proxy-authenticate proxy-authorization te trailer "
    b"transfer-encoding upgrade http2-settings".split()
)
_REQUEST_DROP = _HOP_BY_HOP | frozenset(b"host content-length expect authorization cookie".split())
# Content-Length and Date are the router's own: exactly one of each is sent. Audit-Id is the
# aggregator's: kube-apiserver sets its own on the answer, so a relayed one would appear twice.
_RESPONSE_DROP = _HOP_BY_HOP | frozenset([b"content-length", b"date", b"audit-id"])
# Identity arrives upstream only as what the router copied from a verified peer: any header
# in the upstream's own requestheader namespace is dropped first.
_UPSTREAM_IDENTITY_PREFIX = b"x-remote-"
_IMPERSONATE_PREFIX = b"impersonate-"

# What a Status body says about an upstream failure: what failed, for which tenant, and never
# the library's text, a path, the upstream's URL or TLS details (those go to the log).
_STATUS_ERROR_KIND: dict[str, tuple[Callable[[str], status.StatusError], str]] = {
    "unreachable": (status.service_unavailable, "is unreachable"),
    "timeout": (status.gateway_timeout, "did not answer in time"),
    "tls": (status.bad_gateway, "could not be reached over a trusted TLS connection"),
    "protocol": (status.bad_gateway, "sent an invalid answer"),
    "response-too-large": (status.bad_gateway, "sent an answer larger than the router allows"),
}

_TLS_CAUSE_TEXT = {
    "client-certificate-rejected": "refused the router's client certificate",
    "expired-certificate": "presented a certificate the router does not trust (expired)",
    "unknown-ca": "presented a certificate the router does not trust (unknown authority)",
    "hostname-mismatch": "presented a certificate for another name",
}

# At most one upstream-error log line per tenant per this many seconds (unless the error's
# kind or cause changes).
ERROR_LOG_PERIOD = 10.0

# Classifications of request paths remembered (paths.classify is pure): at most this many paths,
# of at most this many characters each (about 1 MiB at most).
_TARGET_CACHE_SIZE = 4096
_TARGET_CACHE_PATH_MAX = 256

_TEXT_TYPE = b"Content-Type: text/plain; charset=utf-8\r\n"

# A client certificate with several CNs: kube-apiserver judges by the last, so the router
# refuses it rather than risk judging by another one.
MULTIPLE_COMMON_NAMES = "\x00multiple"


@dataclass(slots=True, eq=False)
class IdentityHeaders:
    """Lower-case header names (bytes) that carry the caller's identity, and their canonical
    upstream names (the defaults KEDA's metrics server reads).

    Not frozen: ``name_actions`` is a cache filled as header names are seen (one per Proxy, so
    one per identity-header configuration); the name sets are never reassigned."""

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
    if b"_" in lname and _name_action(lname.replace(b"_", b"-"), ids)[0] != _KEEP:
        # Looks like an identity (or dropped) header to nginx and CGI-style servers, which
        # read "_" as "-": never forwarded.
        return _DROP, None, 0
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
            or (b"_" in lname and _name_action(lname.replace(b"_", b"-"), ids)[0] != _KEEP)
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
    """CN of a certificate dict from SSLObject.getpeercert(), "" without a CN, None if empty,
    MULTIPLE_COMMON_NAMES with more than one."""
    if not cert or not isinstance(cert, dict):
        return None
    names = [
        str(value) for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"
    ]
    if len(names) > 1:
        return MULTIPLE_COMMON_NAMES
    return names[0] if names else ""


# ------------------------------------------------------------------------------- the answer

_status_reply = status_reply


@dataclass(slots=True)
class Exchange:
    """A request on its way to a tenant's upstream (steps 4 and 5 of the request path)."""

    tenant: str
    namespace: str
    upstream: Upstream
    head: bytes  # request line and headers, as written upstream
    started: float = 0.0
    stale_key: stale.Key | None = None  # set when the tenant has stale answers on


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
        stale_settings: StaleSettings | None = None,
        access_log: bool = False,
    ) -> None:
        self._access_log = access_log
        self._routes = routes
        self._client = client
        self._identity = identity
        self._metrics = metrics
        self._max_inflight = max_inflight_per_tenant
        self._ready = ready
        self._inflight: dict[str, int] = {}
        self._host_lines: dict[Upstream, bytes] = {}
        self._targets: dict[str, paths.Target] = {}  # path -> its classification
        self._gauges: dict[str, Any] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._resumed_peer_ok = resumed_peer_ok
        # During a tenant's outage every request fails: one line per tenant when its
        # (kind, cause) changes, else at most one per 10 s with the count suppressed.
        self._error_log = RateLimitedLog(ERROR_LOG_PERIOD, logger)
        # Last good answers per caller (router/core/stale.py), following the routes in force.
        self.stale = stale.StaleCache(stale_settings or StaleSettings())
        self._clock: Callable[[], float] = time.monotonic  # ages of remembered answers
        stale_default = self.stale.settings.serve_stale_for
        self.stale.configure(stale.durations(routes.table, stale_default))
        routes.on_swap(lambda table: self.stale.configure(stale.durations(table, stale_default)))
        routes.stale_view = self.stale.view

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
        target: paths.Target | status.StatusError | None = self._targets.get(path)
        if target is None:
            target = paths.classify(path)
            # The aggregator asks for the same few metric paths again and again: remember
            # their (immutable) classification; short paths only, and a bounded number.
            if (
                not isinstance(target, status.StatusError)
                and len(path) <= _TARGET_CACHE_PATH_MAX
                and len(self._targets) < _TARGET_CACHE_SIZE
            ):
                self._targets[path] = target
        if not isinstance(target, status.StatusError) and target.kind is paths.Kind.HEALTH:
            return self._health(path, method)
        # Authenticate before anything else, as kube-apiserver does: a caller without a valid
        # certificate learns nothing about which paths or methods exist.
        ids = self._identity()
        if cn is None:
            return self._unauthorized("no-certificate", "a client certificate is required")
        if cn == MULTIPLE_COMMON_NAMES:
            return self._unauthorized(
                "multiple-common-names", "a client certificate with several common names"
            )
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
        stale_key = self.stale.key_for(tenant, forwarded.headers, raw_path)
        if self._inflight.get(tenant, 0) >= self._max_inflight:
            self._metrics.upstream_errors.labels(tenant, "overloaded").inc()
            if (answer := self._stale_answer(tenant, stale_key, "overloaded", None)) is not None:
                return answer
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
        return Exchange(tenant, target.namespace, upstream, head, stale_key=stale_key)

    def forward(self, ex: Exchange, reply_to: Callable[[Reply], None]) -> None:
        """Steps 4-5: send the exchange upstream with the router's client certificate; the
        relayed answer, or the Status an upstream failure maps to, goes to ``reply_to``."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        tenant = ex.tenant
        self._inflight[tenant] = self._inflight.get(tenant, 0) + 1
        gauge = self._gauges.get(tenant, False)
        if gauge is False:
            inflight = self._inflight
            gauge = self._gauges[tenant] = self._metrics.track_inflight(
                tenant, lambda: inflight.get(tenant, 0)
            )
        if gauge is not None:  # None: the gauge reads self._inflight when scraped
            gauge.inc()
        ex.started = loop.time()

        def done(result: UpstreamResponse | UpstreamError) -> None:
            self._inflight[tenant] -= 1
            if gauge is not None:
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
            if result.cause:
                self._metrics.upstream_tls_errors.labels(tenant, result.cause).inc()
            self._routes.record_error(tenant, result.kind, result.message)
            self._error_log(
                tenant, time.monotonic(), "upstream error", state=(result.kind, result.cause),
                fields={
                    "tenant": tenant, "namespace": ex.namespace, "upstream": ex.upstream.url,
                    "kind": result.kind, "cause": result.cause or "-", "error": result.message,
                },
            )  # fmt: skip
            reason = stale.reason_for_error(result.kind)
            reply = self._stale_answer(tenant, ex.stale_key, reason, seconds)
            if reply is None:
                make, what = _STATUS_ERROR_KIND[result.kind]
                if result.kind == "timeout":
                    what = f"did not answer within {self._client.timeout:g}s"
                elif result.cause:
                    what = _TLS_CAUSE_TEXT.get(result.cause, what)
                err = make(f"tenant {tenant!r} metrics server {what}")
                self._metrics.observe(tenant, err.code, seconds)
                reply = status_reply(err)
        else:
            reply = None
            if ex.stale_key is not None:
                if result.status == 200:
                    self.stale.remember(tenant, ex.stale_key, result, self._clock())
                else:
                    reason = stale.reason_for_status(result.status)
                    reply = self._stale_answer(tenant, ex.stale_key, reason, seconds)
            if reply is None:
                self._metrics.observe(tenant, result.status, seconds)
                reply = Reply(result.status, response_header_block(result.headers), result.body)
        if self._access_log:
            return Reply(
                reply.status, reply.headers, reply.body, tenant, ex.namespace, ex.upstream.url
            )
        return reply

    def log_access(
        self,
        method: str,
        target: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        reply: Reply,
        seconds: float,
        peer: Any,
    ) -> None:
        """One access-log line per request, with kube-apiserver's httplog fields (the server
        calls this only when --access-log is on)."""
        user_names = self._identity().user
        user = agent = audit = ""
        for name, value in headers:
            lname = name.lower()
            if lname in user_names and not user:
                user = value.decode("latin-1")
            elif lname == b"user-agent":
                agent = value.decode("latin-1")
            elif lname == b"audit-id":
                audit = value.decode("latin-1")
        uri = target.decode("utf-8", "replace")
        metric = uri.partition("?")[0].rsplit("/", 1)[-1] if reply.namespace else ""
        src = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else ""
        # kube-apiserver's httplog fields, each its own key in JSON logs (logs.fields).
        access_logger.info(
            "HTTP",
            extra=logs.fields(
                verb=method, URI=uri[:2048], latency=f"{seconds * 1000:.3f}ms",
                userAgent=agent[:256], **{"audit-ID": audit[:128]}, srcIP=src,
                resp=reply.status, user=user[:256], tenant=reply.tenant,
                namespace=reply.namespace, metric=metric, upstream=reply.upstream,
            ),
        )  # fmt: skip

    def _stale_answer(
        self, tenant: str, key: stale.Key | None, reason: str | None, seconds: float | None
    ) -> Reply | None:
        """The caller's own last good answer instead of a failure, when there is one."""
        found = self.stale.answer(tenant, key, reason, self._clock(), time.time())
        if found is None:
            return None
        self._metrics.observe_stale(tenant, found.reason, found.age)
        self._metrics.observe(tenant, 200, seconds)
        return Reply(200, found.headers, found.body)

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
