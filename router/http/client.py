"""Upstream connections: a lean HTTP/1.1 keep-alive pool per upstream over mTLS.

Each request is written as bytes to a pooled connection and the response parsed with httptools.
The hot path has no high-level client machinery: no task and no future per request (the
result goes to a callback from the connection's protocol), the deadline is one timer handle.
A task exists only while a new connection is being opened. Library errors are mapped once,
here, to the few kinds the proxy answers differently:

- ``unreachable``: connection refused, DNS failure, reset, or connect timeout -> 503
- ``timeout``: no complete response within the request timeout -> 504
- ``tls``: the upstream's certificate or handshake failed -> 502
- ``protocol``: a broken or missing HTTP response -> 502
- ``response-too-large``: response headers or body over the configured limits -> 502

TLS failures also carry a ``cause`` (router/http/tls_errors.py). An error's ``message`` is for
the log (it may name the URL and the library's text); the proxy never puts it in a response.

A response is bounded by :class:`Limits` (``max_response_header_bytes``,
``max_response_bytes``; trailers are dropped, never merged). A connection goes back to the pool
only when its response ended exactly at the end of the bytes received and keep-alive holds: a
surplus byte, or bytes while idle, close it. Idle pooled connections are closed after
``upstream_idle_conn_timeout``.

A request on a reused idle connection that the upstream had already closed is retried once on
a fresh connection (GET is idempotent, and nothing of the response was seen). Interim 1xx
answers are skipped; a 101 (protocol switch) is a protocol error.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import httptools

from router.core.routes import Upstream
from router.http import tls_errors
from router.settings.limits import Limits

logger = logging.getLogger(__name__)


class UpstreamError(Exception):
    """An upstream failure: ``kind`` (the metric label), ``cause`` (TLS failures: why), and a
    ``message`` for the log only."""

    def __init__(self, kind: str, message: str, cause: str = "") -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.cause = cause


def _tls_error(message: str, exc: BaseException) -> UpstreamError:
    return UpstreamError("tls", message, tls_errors.upstream_tls_cause(exc))


class _TooLargeError(Exception):
    """Raised from a parser callback to stop parsing a response over a limit."""


@dataclass(frozen=True, slots=True)
class UpstreamResponse:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


Result = UpstreamResponse | UpstreamError
Callback = Callable[[Result], None]


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection; at most one request in flight (no pipelining).

    ``begin`` writes a request and arms its deadline; exactly one result (a response or an
    UpstreamError) is then handed to the client's ``_finished``.
    """

    __slots__ = (
        "_body",
        "_body_bytes",
        "_client",
        "_done",
        "_header_bytes",
        "_headers",
        "_headers_done",
        "_limits",
        "_loop",
        "_max_body_bytes",
        "_max_header_bytes",
        "_parser",
        "_surplus",
        "_timer",
        "_too_large",
        "callback",
        "closed",
        "deadline",
        "head",
        "idle_since",
        "keep_alive",
        "pool",
        "reused",
        "saw_bytes",
        "transport",
    )

    def __init__(self, client: UpstreamClient, pool: _Pool, loop: asyncio.AbstractEventLoop):
        self._client = client
        self._loop = loop
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._headers_done = False
        self._limits = client.limits
        self._max_header_bytes = client.limits.max_response_header_bytes
        self._max_body_bytes = client.limits.max_response_bytes
        self._header_bytes = 0
        self._body_bytes = 0
        self._done = False  # the final response ended (within the bytes fed so far)
        self._surplus = False  # bytes followed the end of the response
        self._too_large: str | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.callback: Callback | None = None  # set while a request is in flight
        self.idle_since = 0.0
        self.head = b""
        self.deadline = 0.0
        self.closed = False
        self.keep_alive = False
        self.reused = False
        self.saw_bytes = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.saw_bytes = True
        if self.callback is None:
            # Bytes while idle: the upstream broke protocol; never reuse this connection.
            self.close()
            return
        if not self._headers_done:
            # A header line without its end is buffered by the parser: bound it here.
            self._header_bytes += len(data)
            if self._header_bytes > self._max_header_bytes:
                self._fail_too_large("response headers")
                return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamError("protocol", "upstream answered with a protocol upgrade"))
            return
        except httptools.HttpParserError as exc:
            if self._too_large is not None:
                self._fail_too_large(self._too_large)
                return
            if not self._done:
                self._fail(UpstreamError("protocol", f"upstream sent a malformed response: {exc}"))
                return
            self._surplus = True  # garbage after a complete response
        if self._done and self.callback is not None:
            # The final response ended: reusable only when it ended exactly at the end of the
            # bytes received (no surplus) and keep-alive holds.
            self.keep_alive = self.keep_alive and not self.closed and not self._surplus
            self._complete(
                UpstreamResponse(
                    self._parser.get_status_code(), self._headers, b"".join(self._body)
                )
            )

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.callback is None:
            return
        if self._headers_done and self._ends_at_eof():
            # A response without Content-Length or chunking ends at EOF (RFC 9112 6.3).
            self._done = True
            self._finish()
        elif exc is not None and isinstance(exc, ssl.SSLError):
            # In TLS 1.3 an upstream refusing the router's client certificate says so (an
            # alert) on the first read, after the handshake.
            self._complete(_tls_error(f"upstream TLS error: {exc}", exc))
        elif not self.reused and not self.saw_bytes:
            # A fresh connection closed before any answer: with TLS 1.3 this is how an upstream
            # that refuses the router's client certificate looks when its alert is lost.
            self._complete(self._client.closed_fresh_error(exc))
        else:
            detail = f": {exc}" if exc else ""
            self._complete(UpstreamError("protocol", f"upstream closed the connection{detail}"))

    # httptools callbacks
    def on_message_begin(self) -> None:
        if self._done:
            self._surplus = True  # a second response: bytes the request did not ask for

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._headers_done:
            return  # a trailer field: never merged into the headers, never relayed
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._headers_done = True

    def _ends_at_eof(self) -> bool:
        names = {name.lower() for name, _ in self._headers}
        return b"content-length" not in names and b"transfer-encoding" not in names

    def on_body(self, body: bytes) -> None:
        if self._done:
            return
        self._body_bytes += len(body)
        if self._body_bytes > self._max_body_bytes:
            self._too_large = "response body"
            raise _TooLargeError
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self.callback is None or self._done:
            return
        code = self._parser.get_status_code()
        if code < 200:
            if code == 101:
                self._fail(UpstreamError("protocol", "upstream switched protocols (101)"))
                return
            # An interim answer (100 Continue, 103 Early Hints): the final one follows.
            self._headers = []
            self._body = []
            self._headers_done = False
            self._header_bytes = 0
            return
        self._done = True
        self.keep_alive = self._parser.should_keep_alive()  # read now: the parser moves on

    def _finish(self) -> None:
        """The final response ended: hand it over (the connection is reusable only when it
        ended exactly at the end of the bytes received)."""
        if self.callback is None:
            return
        self.keep_alive = self.keep_alive and not self.closed and not self._surplus
        code = self._parser.get_status_code()
        self._complete(UpstreamResponse(code, self._headers, b"".join(self._body)))

    def _fail_too_large(self, what: str) -> None:
        limit = (
            self._limits.max_response_header_bytes
            if what == "response headers"
            else self._limits.max_response_bytes
        )
        self._fail(
            UpstreamError("response-too-large", f"upstream {what} exceed the limit ({limit} bytes)")
        )

    # use
    def begin(self, head: bytes, deadline: float, callback: Callback) -> None:
        assert self.transport is not None
        self.callback = callback
        self.head = head
        self.deadline = deadline
        self._headers = []
        self._body = []
        self._headers_done = False
        self._header_bytes = 0
        self._body_bytes = 0
        self._done = False
        self._surplus = False
        self._too_large = None
        self.saw_bytes = False
        self.keep_alive = False
        self._timer = self._loop.call_at(deadline, self._expire)
        self.transport.write(head)

    def _expire(self) -> None:
        self._timer = None
        self._complete(self._client.timeout_error(self.pool.upstream))

    def _complete(self, result: Result) -> None:
        if self.callback is None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._client._finished(self, result)

    def _fail(self, error: UpstreamError) -> None:
        self.close()
        self._complete(error)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class _Pool:
    __slots__ = ("idle", "retired", "upstream")

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.idle: collections.deque[_Connection] = collections.deque()
        self.retired = False  # the upstream left the route table: connections are not kept


class UpstreamClient:
    """Sends requests to upstreams over pooled mTLS keep-alive connections.

    ``send`` is callback-based (the proxy's fast path: no task or future per request);
    ``request`` is the same as a coroutine. ``ssl_context`` is a getter so that rotated client
    certificates and CA bundles apply to new connections without touching established ones.
    """

    def __init__(
        self,
        ssl_context: Callable[[], ssl.SSLContext],
        *,
        timeout: float,
        connect_timeout: float,
        max_idle_per_upstream: int = 32,
        limits: Limits | None = None,
        own_certificate_expiry: Callable[[], datetime | None] | None = None,
    ) -> None:
        self.limits = limits or Limits()
        self._idle_timeout = self.limits.upstream_idle_conn_timeout
        self._own_expiry = own_certificate_expiry
        self._ssl_context = ssl_context
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._max_idle = max_idle_per_upstream
        self._pools: dict[Upstream, _Pool] = {}
        self._busy: set[_Connection] = set()
        self._connecting: set[asyncio.Task[None]] = set()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def send(self, upstream: Upstream, head: bytes, callback: Callback) -> None:
        """Send a complete request (request line and headers, no body); ``callback`` gets the
        response or an UpstreamError, exactly once, from the event loop."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        now = loop.time()
        deadline = now + self._timeout
        pool = self._pools.get(upstream)
        if pool is None:
            pool = self._pools[upstream] = _Pool(upstream)
        conn = self._take_idle(pool, now) if pool.idle else None
        if conn is None:
            self._connect_then_send(pool, head, deadline, callback)
        else:
            self._busy.add(conn)
            conn.begin(head, deadline, callback)

    async def request(self, upstream: Upstream, head: bytes) -> UpstreamResponse:
        """``send`` as a coroutine: the response, or UpstreamError raised."""
        fut: asyncio.Future[Result] = asyncio.get_running_loop().create_future()

        def done(result: Result) -> None:
            if not fut.done():
                fut.set_result(result)

        self.send(upstream, head, done)
        result = await fut
        if isinstance(result, UpstreamError):
            raise result
        return result

    @property
    def timeout(self) -> float:
        """Seconds an upstream request may take (--upstream-timeout)."""
        return self._timeout

    def closed_fresh_error(self, exc: Exception | None) -> UpstreamError:
        """The error for a fresh connection the upstream closed before answering: TLS, client
        certificate rejected, when the router's own client certificate has expired."""
        detail = f": {exc}" if exc else ""
        expiry = self._own_expiry() if self._own_expiry is not None else None
        if expiry is not None and expiry <= datetime.now(UTC):
            return UpstreamError(
                "tls",
                f"upstream closed a new connection before answering{detail}; the router's "
                f"client certificate expired at {expiry.isoformat()}",
                "client-certificate-rejected",
            )
        return UpstreamError(
            "protocol",
            f"upstream closed a new connection before answering{detail} (does it trust the "
            "router's client certificate?)",
        )

    def timeout_error(self, upstream: Upstream) -> UpstreamError:
        return UpstreamError(
            "timeout", f"upstream {upstream.url} did not answer within {self._timeout:g}s"
        )

    def _finished(self, conn: _Connection, result: Result) -> None:
        """A request on conn ended: pool or close the connection, retry once on a stale
        keep-alive connection, else hand the result over."""
        callback = conn.callback
        conn.callback = None
        self._busy.discard(conn)
        assert callback is not None
        pool = conn.pool
        if isinstance(result, UpstreamResponse):
            if conn.keep_alive and not conn.closed and not self._closed and not pool.retired:
                self._put_idle(pool, conn)
            else:
                conn.close()
            callback(result)
            return
        conn.close()
        if conn.reused and not conn.saw_bytes and result.kind == "protocol":
            # The upstream had closed this idle connection: retry once on a fresh one (GET is
            # idempotent and nothing of a response was seen).
            self._connect_then_send(pool, conn.head, conn.deadline, callback)
            return
        callback(result)

    def _connect_then_send(
        self, pool: _Pool, head: bytes, deadline: float, callback: Callback
    ) -> None:
        task = asyncio.get_running_loop().create_task(
            self._connect_and_begin(pool, head, deadline, callback)
        )
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)

    async def _connect_and_begin(
        self, pool: _Pool, head: bytes, deadline: float, callback: Callback
    ) -> None:
        try:
            conn = await self._connect(pool, deadline)
        except UpstreamError as exc:
            callback(exc)
            return
        except asyncio.CancelledError:
            callback(UpstreamError("unreachable", "the router is shutting down"))
            raise
        if conn.closed or self._closed:
            conn.close()
            callback(UpstreamError("unreachable", f"upstream {pool.upstream.url} closed"))
            return
        self._busy.add(conn)
        conn.begin(head, deadline, callback)

    def _take_idle(self, pool: _Pool, now: float) -> _Connection | None:
        idle = pool.idle
        oldest_ok = now - self._idle_timeout
        while idle:
            conn = idle.pop()  # most recently used first: warmest, least likely stale
            if conn.idle_since < oldest_ok:
                # Idle longer than upstream_idle_conn_timeout: this one and every older one.
                conn.close()
                while idle:
                    idle.pop().close()
                return None
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                conn.reused = True
                return conn
        return None

    def _put_idle(self, pool: _Pool, conn: _Connection) -> None:
        idle = pool.idle
        if len(idle) >= self._max_idle:
            conn.close()
            return
        assert self._loop is not None
        now = conn.idle_since = self._loop.time()
        idle.append(conn)
        if idle[0].idle_since < now - self._idle_timeout:
            # The oldest are on the left (connections are appended when they become idle).
            oldest_ok = now - self._idle_timeout
            while idle and idle[0].idle_since < oldest_ok:
                idle.popleft().close()

    async def _connect(self, pool: _Pool, deadline: float) -> _Connection:
        loop = asyncio.get_running_loop()
        upstream = pool.upstream
        timeout = min(self._connect_timeout, max(deadline - loop.time(), 0.001))
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self, pool, loop),
                    upstream.host,
                    upstream.port,
                    ssl=self._ssl_context(),
                    server_hostname=upstream.tls_name,
                    ssl_handshake_timeout=timeout,
                )
        except TimeoutError:
            raise UpstreamError(
                "unreachable", f"timed out connecting to upstream {upstream.url} ({timeout:g}s)"
            ) from None
        except ssl.SSLCertVerificationError as exc:
            raise _tls_error(
                f"upstream {upstream.url} certificate not trusted: {exc.verify_message}", exc
            ) from exc
        except ssl.SSLError as exc:
            raise _tls_error(
                f"TLS handshake with upstream {upstream.url} failed: {exc}", exc
            ) from exc
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise UpstreamError(
                "unreachable", f"upstream {upstream.url} unreachable: {reason}"
            ) from exc
        return conn

    def forget(self, keep: set[Upstream]) -> None:
        """Close pools of upstreams no longer in the route table (requests in flight finish
        on their connection, which is then closed instead of kept)."""
        for upstream in [u for u in self._pools if u not in keep]:
            pool = self._pools.pop(upstream)
            pool.retired = True
            while pool.idle:
                pool.idle.pop().close()

    async def close(self) -> None:
        """Close every connection; requests still in flight end with an error."""
        self._closed = True
        self.forget(set())
        for task in list(self._connecting):
            task.cancel()
        if self._connecting:
            await asyncio.gather(*self._connecting, return_exceptions=True)
        for conn in list(self._busy):
            conn.close()
