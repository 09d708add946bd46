"""Upstream connections: a lean HTTP/1.1 keep-alive pool per upstream over mTLS.

Each request is written as bytes to a pooled connection and the response parsed with httptools
(no high-level client machinery on the hot path). Library errors are mapped once, here, to the
few kinds the proxy answers differently:

- ``unreachable``: connection refused, DNS failure, reset, or connect timeout -> 503
- ``timeout``: no complete response within the request timeout -> 504
- ``tls``: the upstream's certificate or handshake failed -> 502
- ``protocol``: a broken or missing HTTP response -> 502

A request on a reused idle connection that the upstream had already closed is retried once on
a fresh connection (GET is idempotent, and nothing of the response was seen).
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


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection; at most one request in flight (no pipelining)."""

    __slots__ = (
        "_body",
        "_headers",
        "_headers_done",
        "_parser",
        "_waiter",
        "closed",
        "keep_alive",
        "reused",
        "saw_bytes",
        "transport",
    )

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[UpstreamResponse] | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._headers_done = False
        self.closed = False
        self.keep_alive = False
        self.reused = False
        self.saw_bytes = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.saw_bytes = True
        if self._waiter is None:
            # Bytes while idle: the upstream broke protocol; never reuse this connection.
            self._fail(UpstreamError("protocol", "upstream sent data without a request"))
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamError("protocol", "upstream answered with a protocol upgrade"))
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError("protocol", f"upstream sent a malformed response: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            if self._headers_done and self._ends_at_eof():
                # A response without Content-Length or chunking ends at EOF (RFC 9112 6.3).
                self.on_message_complete()
                return
            if exc is not None and isinstance(exc, ssl.SSLError):
                waiter.set_exception(UpstreamError("tls", f"upstream TLS error: {exc}"))
            else:
                detail = f": {exc}" if exc else ""
                waiter.set_exception(
                    UpstreamError("protocol", f"upstream closed the connection{detail}")
                )

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
        waiter = self._waiter
        self.keep_alive = not self.closed and self._parser.should_keep_alive()
        if waiter is not None and not waiter.done():
            waiter.set_result(
                UpstreamResponse(
                    self._parser.get_status_code(), self._headers, b"".join(self._body)
                )
            )

    # use
    def send(self, data: bytes) -> asyncio.Future[UpstreamResponse]:
        assert self.transport is not None
        self._waiter = asyncio.get_running_loop().create_future()
        self._headers = []
        self._body = []
        self._headers_done = False
        self.saw_bytes = False
        self.keep_alive = False
        self.transport.write(data)
        return self._waiter

    def done(self) -> None:
        """The request finished; the connection may go back to the pool."""
        self._waiter = None

    def _fail(self, error: UpstreamError) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class _Pool:
    __slots__ = ("idle", "upstream")

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.idle: collections.deque[_Connection] = collections.deque()


class UpstreamClient:
    """Sends requests to upstreams over pooled mTLS keep-alive connections.

    ``ssl_context`` is a getter so that rotated client certificates and CA bundles apply to
    new connections without touching established ones.
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
        self._closed = False

    async def request(self, upstream: Upstream, head: bytes) -> UpstreamResponse:
        """Send a complete request (request line and headers, no body) and read the answer."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        pool = self._pools.get(upstream)
        if pool is None:
            pool = self._pools[upstream] = _Pool(upstream)
        for _attempt in range(2):
            conn = self._take_idle(pool)
            if conn is None:
                conn = await self._connect(upstream, deadline)
            remaining = deadline - loop.time()
            fut = conn.send(head)
            try:
                if remaining <= 0:
                    raise TimeoutError
                async with asyncio.timeout(remaining):
                    response = await fut
            except TimeoutError:
                conn.close()
                raise UpstreamError(
                    "timeout", f"upstream {upstream.url} did not answer within {self._timeout:g}s"
                ) from None
            except UpstreamError as exc:
                conn.close()
                if conn.reused and not conn.saw_bytes and exc.kind == "protocol":
                    continue  # stale keep-alive connection: retry once on a fresh one
                raise
            except BaseException:
                conn.close()
                raise
            conn.done()
            if conn.keep_alive and not conn.closed and not self._closed:
                self._put_idle(pool, conn)
            else:
                conn.close()
            return response
        raise UpstreamError("protocol", f"upstream {upstream.url} closed the connection twice")

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

    async def _connect(self, upstream: Upstream, deadline: float) -> _Connection:
        loop = asyncio.get_running_loop()
        timeout = min(self._connect_timeout, max(deadline - loop.time(), 0.001))
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    _Connection,
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
        """Close pools of upstreams no longer in the route table."""
        for upstream in [u for u in self._pools if u not in keep]:
            pool = self._pools.pop(upstream)
            while pool.idle:
                pool.idle.pop().close()

    def idle_connections(self) -> int:
        return sum(len(p.idle) for p in self._pools.values())

    async def close(self) -> None:
        self._closed = True
        self.forget(set())
