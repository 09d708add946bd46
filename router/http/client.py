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

import httptools

from router.routes import Upstream

logger = logging.getLogger(__name__)


class UpstreamError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


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
        "_client",
        "_headers",
        "_headers_done",
        "_loop",
        "_parser",
        "_timer",
        "callback",
        "closed",
        "deadline",
        "head",
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
        self._timer: asyncio.TimerHandle | None = None
        self.callback: Callback | None = None  # set while a request is in flight
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
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamError("protocol", "upstream answered with a protocol upgrade"))
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError("protocol", f"upstream sent a malformed response: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.callback is None:
            return
        if self._headers_done and self._ends_at_eof():
            # A response without Content-Length or chunking ends at EOF (RFC 9112 6.3).
            self.on_message_complete()
        elif exc is not None and isinstance(exc, ssl.SSLError):
            self._complete(UpstreamError("tls", f"upstream TLS error: {exc}"))
        else:
            detail = f": {exc}" if exc else ""
            self._complete(UpstreamError("protocol", f"upstream closed the connection{detail}"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._headers_done = True

    def _ends_at_eof(self) -> bool:
        names = {name.lower() for name, _ in self._headers}
        return b"content-length" not in names and b"transfer-encoding" not in names

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self.callback is None:
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
            return
        self.keep_alive = not self.closed and self._parser.should_keep_alive()
        self._complete(UpstreamResponse(code, self._headers, b"".join(self._body)))

    # use
    def begin(self, head: bytes, deadline: float, callback: Callback) -> None:
        assert self.transport is not None
        self.callback = callback
        self.head = head
        self.deadline = deadline
        self._headers = []
        self._body = []
        self._headers_done = False
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
    ) -> None:
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
        deadline = loop.time() + self._timeout
        pool = self._pools.get(upstream)
        if pool is None:
            pool = self._pools[upstream] = _Pool(upstream)
        conn = self._take_idle(pool)
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

    def _take_idle(self, pool: _Pool) -> _Connection | None:
        idle = pool.idle
        while idle:
            conn = idle.pop()  # most recently used first: warmest, least likely stale
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                conn.reused = True
                return conn
        return None

    def _put_idle(self, pool: _Pool, conn: _Connection) -> None:
        if len(pool.idle) >= self._max_idle:
            conn.close()
        else:
            pool.idle.append(conn)

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
            raise UpstreamError(
                "tls", f"upstream {upstream.url} certificate not trusted: {exc.verify_message}"
            ) from exc
        except ssl.SSLError as exc:
            raise UpstreamError(
                "tls", f"TLS handshake with upstream {upstream.url} failed: {exc}"
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
