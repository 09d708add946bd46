"""The secure port: a lean, strict and bounded HTTP/1.1 server on asyncio protocols.

httptools parses; the peer certificate is read once per connection; there is no task or future
per request, and each answer is written as one buffer. What to answer is the request path's
business (:class:`Handler`, implemented by router.proxy.Proxy); this module owns the
connection: TLS, framing, deadlines, flow control and limits (router/settings/limits.py).

A connection, phase by phase (each phase has one deadline, checked by one sweeper task):

1. accepted as plain TCP; over ``max_connections`` it is closed at once, before TLS, and
   counted; otherwise the TLS handshake runs (``tls_handshake_timeout``). A failed handshake is
   counted by reason and logged with the peer address, at most once per reason per 10 s;
2. request head within ``read_header_timeout``; only HTTP/1.0 and HTTP/1.1 are spoken (others:
   505, then close); header bytes are capped by ``max_header_bytes``;
3. request body (read and discarded: the router forwards GETs) within ``read_timeout``;
   trailer fields are dropped, never merged into the headers;
4. answers in order, one per request, always; while the client does not read them
   (``pause_writing``) no further request is read or begun, and an answer that stays unread
   for ``write_timeout`` aborts the connection;
5. keep-alive idle for at most ``idle_timeout``.

A connection without a verified client certificate gets one answer (health, or 401) right
after its request head and is then closed: its deadline stays the one its head had, so it
never outlives the handshake and head deadlines. A request with ``Expect: 100-continue`` gets
its final answer at once, without 100 Continue (RFC 9110 §10.1.1; any other expectation: 417),
and the connection is closed after it, as after an upgrade request (CONNECT, ``Upgrade``):
nothing after them is read. Deadlines use a clock the sweeper advances (no clock read per
request), so they are as precise as the sweep interval (a quarter of the shortest timeout, at
most 1 s).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import email.utils
import http
import logging
import math
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import httptools
from mypy_extensions import mypyc_attr

from router import logs
from router.core import status
from router.http import tls_errors
from router.metrics import ProxyMetrics
from router.settings.limits import (
    MAX_HEADER_LINE,
    MAX_PIPELINED,
    MAX_REQUEST_BODY_BYTES,
    MAX_REQUEST_LINE,
    Limits,
)

logger = logging.getLogger(__name__)

_JSON_TYPE = b"Content-Type: application/json\r\n"


@dataclass(slots=True)
class Reply:
    """An answer: status, header lines (CRLF-terminated, no Content-Length/Connection/Date),
    body, and what the access log says about where it came from. Treated as immutable (not
    frozen: a frozen dataclass costs an object.__setattr__ per field, once per request)."""

    status: int
    headers: bytes
    body: bytes
    tenant: str = ""
    namespace: str = ""
    upstream: str = ""


def status_reply(err: status.StatusError) -> Reply:
    extra = b"".join(
        k.encode("latin-1") + b": " + v.encode("latin-1") + b"\r\n" for k, v in err.headers
    )
    return Reply(err.code, _JSON_TYPE + extra, err.body())


class Handler(Protocol):
    """What the server needs from the request path (router.proxy.Proxy)."""

    def peer_name(self, sslobj: ssl.SSLObject | None) -> str | None: ...

    def begin(
        self, method: str, raw_path: str, raw_headers: Sequence[tuple[bytes, bytes]], cn: str | None
    ) -> Reply | Any: ...

    def forward(self, ex: Any, reply_to: Callable[[Reply], None]) -> None: ...

    def count_refusal(self, code: int) -> None: ...


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


class RateLimitedLog:
    """At most one log line per key per period; the next line says how many were suppressed.

    With ``state`` (for example an upstream error's kind and cause), a key whose state changed
    logs at once, whatever the period: a new kind of failure is never hidden behind an old one.
    """

    def __init__(self, period: float = 10.0, log: logging.Logger | None = None) -> None:
        self._period = period
        self._log = log or logger
        self._last: dict[str, float] = {}
        self._state: dict[str, object] = {}
        self._suppressed: dict[str, int] = collections.Counter()

    def __call__(
        self,
        key: str,
        now: float,
        msg: str,
        *args: object,
        state: object = None,
        fields: Mapping[str, object] | None = None,
    ) -> None:
        """``fields``: the line's structured fields (``logs.fields``), each its own JSON key."""
        last = self._last.get(key)
        if (
            last is not None
            and now - last < self._period
            and (state is None or self._state.get(key) == state)
        ):
            self._suppressed[key] += 1
            return
        self._last[key] = now
        if state is not None:
            self._state[key] = state
        suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            msg += " (%d similar suppressed)"
            args = (*args, suppressed)
        self._log.warning(msg, *args, extra=logs.fields(**fields) if fields else None)


_RateLimitedLog = RateLimitedLog


@dataclass(slots=True)
class _Request:
    method: str
    target: bytes
    headers: list[tuple[bytes, bytes]]
    keep_alive: bool
    http10: bool
    error: Reply | None = None
    started: float = 0.0


_INF = math.inf
_OWN_PARSER_ERRORS = frozenset({"request headers too large", "request target too long"})
_CONTENT_LENGTH, _CHUNKED, _OTHER_CODING = 1, 2, 4
# Header names the server acts on (expect, content-length, transfer-encoding), by length and
# first byte: one cheap test per header before any lower().
_WATCHED_LENGTHS = frozenset({6, 14, 17})
_WATCHED_FIRST = b"EeCcTt"


@mypyc_attr(native_class=False)  # a list subclass: a plain Python class when compiled
class _Discard(list[tuple[bytes, bytes]]):
    """Where trailer fields go: nowhere."""

    def append(self, item: tuple[bytes, bytes]) -> None:
        pass


_TRAILERS = _Discard()


class _StopParsingError(Exception):
    """Raised from a parser callback: nothing more of this connection is parsed."""


class _ServerConnection(asyncio.Protocol):
    """One client connection of the secure port: parse requests, answer them in order.

    Driven by callbacks, with no task per request: a request that completes in
    ``data_received`` is begun at once; when it must go upstream, the upstream connection's
    answer calls back here, the answer is written, and the next pipelined request begins.
    """

    __slots__ = (
        "_body_bytes",
        "_busy",
        "_cn",
        "_early",
        "_expect",
        "_failed",
        "_framing",
        "_handshaking",
        "_header_bytes",
        "_headers",
        "_hello",
        "_http10",
        "_in_body",
        "_in_head",
        "_limits",
        "_loop",
        "_max_header_bytes",
        "_parser",
        "_pending",
        "_raw",
        "_read_paused_by_queue",
        "_read_paused_by_writes",
        "_read_timeout",
        "_reading_paused",
        "_request_headers",
        "_server",
        "_transport",
        "_url",
        "_write_paused",
        "deadline",
        "peer",
        "phase",
        "write_deadline",
    )

    def __init__(self, server: ProxyServer, loop: asyncio.AbstractEventLoop) -> None:
        self._server = server
        self._loop = loop
        self._limits = server.limits
        self._raw: asyncio.Transport | None = None  # TCP, until TLS is up
        self._transport: asyncio.Transport | None = None  # TLS
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._request_headers: list[tuple[bytes, bytes]] = []
        self._max_header_bytes = server.limits.max_header_bytes
        self._read_timeout = server.limits.read_timeout
        self._header_bytes = 0
        self._body_bytes = 0
        self._http10 = False
        self._framing = 0  # _CONTENT_LENGTH | _CHUNKED | _OTHER_CODING seen in the head
        self._expect: bytes | None = None
        self._in_head = False  # between the start of a request and the end of its headers
        self._in_body = False  # between the end of a request's headers and its end
        self._pending: collections.deque[_Request] = collections.deque()
        self._busy = False  # a request of this connection is upstream
        self._read_paused_by_queue = False  # MAX_PIPELINED requests wait for their answers
        self._read_paused_by_writes = False  # the client does not read its answers
        self._reading_paused = False
        self._write_paused = False
        self._cn: str | None = None
        self._early: list[bytes] | None = []  # data the TLS layer delivered before tls_ready
        # uvloop starts reading after connection_made whatever it asked: the ClientHello can
        # reach this protocol before start_tls takes the transport over. Kept, then fed to TLS.
        self._hello = b""
        self._handshaking = False
        self._failed = False  # nothing more is read from this connection
        self.peer: Any = None
        self.phase = "handshake"
        self.deadline = _INF  # of the current read phase (handshake, head, body, idle)
        self.write_deadline = _INF  # of an answer the client does not read

    # ---- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        raw: asyncio.Transport = transport  # type: ignore[assignment]  # uvloop's differs
        server = self._server
        if len(server.connections) >= self._limits.max_connections:
            server.metrics.connections_refused.labels("max-connections").inc()
            raw.abort()
            return
        self._raw = raw
        self.peer = raw.get_extra_info("peername")
        raw.pause_reading()  # start_tls resumes it once the TLS layer is in place (asyncio)
        server.connections.add(self)
        self.deadline = self._loop.time() + self._limits.tls_handshake_timeout
        server.handshake(self, raw)

    def tls_ready(self, transport: asyncio.Transport) -> None:
        """The handshake succeeded: HTTP starts, the first head within read_header_timeout."""
        self._raw = None
        self._transport = transport
        # Read once per connection: the peer certificate cannot change on a TLS connection.
        self._cn = self._server.handler.peer_name(transport.get_extra_info("ssl_object"))
        self.phase = "head"
        self.deadline = self._loop.time() + self._limits.read_header_timeout
        early, self._early = self._early, None
        for data in early or ():
            self.data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._raw = None
        self._pending.clear()
        self._server.forget(self)

    def data_received(self, data: bytes) -> None:
        if not self._handshaking:
            self._hello += data
            if len(self._hello) > 65536:
                self.abort()
            return
        if self._early is not None:
            # The TLS layer delivers what arrived with the handshake's end before start_tls
            # returns (at most one read): kept for tls_ready, bounded like a request head.
            self._early.append(data)
            if sum(map(len, self._early)) > self._limits.max_header_bytes + MAX_REQUEST_LINE:
                self.abort()
            return
        if self._failed:
            return
        if self._in_head:
            # A header line without its end is buffered by the parser: bound it here.
            self._header_bytes += len(data)
            if self._header_bytes > self._limits.max_header_bytes + MAX_REQUEST_LINE:
                self._refuse_request(431, "request headers too large")
                return
        elif self._in_body:
            # The body is discarded, but a trailer line is buffered by the parser: bound both.
            self._body_bytes += len(data)
            if self._body_bytes > MAX_REQUEST_BODY_BYTES:
                self._refuse_request(413, "request body too large")
                return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # The upgrade request (or CONNECT) was queued with Connection: close in
            # on_message_complete; nothing after it is read.
            self._failed = True
            self._stop_reading_for_good()
        except httptools.HttpParserError as exc:
            if not self._failed:
                # The parser's own words go to the log, never into the Status.
                detail = str(exc)
                logger.debug("malformed request from %s: %s", self.peer, detail)
                if detail not in _OWN_PARSER_ERRORS:
                    detail = "the request is not valid HTTP/1.1"
                self._refuse_request(400, f"malformed HTTP request: {detail}")

    def pause_writing(self) -> None:
        """The client does not read: read nothing more, begin nothing more, until it does."""
        self._write_paused = True
        self.write_deadline = self._loop.time() + self._limits.write_timeout
        self._read_paused_by_writes = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self.write_deadline = _INF
        self._read_paused_by_writes = False
        self._update_reading()
        if self._pending and not self._busy:
            self._next()

    # ---- httptools callbacks

    def on_message_begin(self) -> None:
        if self._failed:
            raise _StopParsingError
        self._url = b""
        self._headers = []
        self._header_bytes = 0
        self._expect = None
        self._framing = 0
        self._in_head = True
        if self._cn is not None:
            # A peer without a verified certificate keeps the deadline of its first head.
            self.phase = "head"
            self.deadline = self._server.now + self._limits.read_header_timeout

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > MAX_REQUEST_LINE:
            raise httptools.HttpParserError("request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        # After the head, self._headers is _TRAILERS: trailer fields are never merged into
        # the headers and never forwarded.
        self._headers.append((name, value))
        size = len(name) + len(value) + 4
        self._header_bytes += size
        if size > MAX_HEADER_LINE or self._header_bytes > self._max_header_bytes:
            raise httptools.HttpParserError("request headers too large")
        if len(name) in _WATCHED_LENGTHS and name[0] in _WATCHED_FIRST:
            self._watch(name.lower(), value)

    def _watch(self, lname: bytes, value: bytes) -> None:
        """The few request headers the server itself acts on (one cheap test per header)."""
        if lname == b"expect":
            self._expect = value
        elif lname == b"content-length":
            self._framing |= _CONTENT_LENGTH
        elif lname == b"transfer-encoding":
            # Only "chunked" is spoken (as Go's net/http and h11): any other coding is 501.
            chunked = value.strip().lower() == b"chunked"
            self._framing |= _CHUNKED if chunked else _OTHER_CODING

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._request_headers, self._headers = self._headers, _TRAILERS
        version = self._parser.get_http_version()
        self._http10 = version == "1.0"
        if version != "1.1" and not self._http10:
            self._answer_at_head(
                status_reply(
                    status.StatusError(
                        505,
                        "BadRequest",
                        f"HTTP version {version[:8]} is not supported (HTTP/1.1 or HTTP/1.0)",
                    )
                )
            )
        elif self._framing and self._framing != _CHUNKED and self._framing != _CONTENT_LENGTH:
            # Both Content-Length and Transfer-Encoding (a smuggling attempt: RFC 9112 §6.1),
            # or a transfer coding other than chunked.
            code, message = (
                (501, "unsupported Transfer-Encoding")
                if self._framing & _OTHER_CODING
                else (400, "both Content-Length and Transfer-Encoding")
            )
            reason = "BadRequest" if code == 400 else "NotImplemented"
            self._answer_at_head(status_reply(status.StatusError(code, reason, message)))
        elif self._cn is None:
            # Unverified: one answer (health or 401) now, then close; the body is never read.
            self._answer_at_head(None)
        elif self._expect is not None:
            if self._expect.strip().lower() != b"100-continue":
                err = status.StatusError(417, "BadRequest", "unsupported Expect header")
                self._answer_at_head(status_reply(err))
            else:
                # RFC 9110 §10.1.1: a final answer instead of 100 Continue; the body is never
                # read, so the connection closes after it.
                self._answer_at_head(None)
        if self._failed:
            raise _StopParsingError  # the answer is queued: parse nothing after this head
        # The body phase (ended at once by on_message_complete when there is no body).
        self._in_body = True
        self._body_bytes = 0
        self.phase = "body"
        self.deadline = self._server.now + self._read_timeout

    def on_message_complete(self) -> None:
        if self._failed:
            return
        self._in_body = False
        self.deadline = _INF
        parser = self._parser
        upgrade = parser.should_upgrade()
        request = _Request(
            method=parser.get_method().decode("latin-1"),
            target=self._url,
            headers=self._request_headers,
            keep_alive=parser.should_keep_alive() and not upgrade,
            http10=self._http10,
        )
        if self._server.access_log is not None:
            request.started = self._loop.time()
        if upgrade:
            # Upgrade or CONNECT: answered as plain HTTP/1.1 (exactly once), then closed.
            self._failed = True
            self._stop_reading_for_good()
        self._enqueue(request)

    # ---- answering, in order

    def _answer_at_head(self, error: Reply | None) -> None:
        """Queue the request whose head just ended, to be answered and the connection closed;
        read nothing more."""
        parser = self._parser
        request = _Request(
            method=parser.get_method().decode("latin-1"),
            target=self._url,
            headers=self._request_headers,
            keep_alive=False,
            http10=self._http10,
            error=error,
        )
        if error is not None:
            self._server.handler.count_refusal(error.status)
        if self._server.access_log is not None:
            request.started = self._loop.time()
        if self._cn is not None:
            self.deadline = _INF  # a verified peer's request may go upstream
        self._failed = True
        self._stop_reading_for_good()
        self._enqueue(request)

    def _enqueue(self, request: _Request) -> None:
        self._pending.append(request)
        if len(self._pending) >= MAX_PIPELINED:
            self._read_paused_by_queue = True
            self._update_reading()
        if not self._busy:
            self._next()

    def _refuse_request(self, code: int, message: str) -> None:
        self._failed = True
        self._in_head = self._in_body = False
        self._stop_reading_for_good()
        reason = {413: "RequestEntityTooLarge", 431: "BadRequest"}.get(code, "BadRequest")
        err = status.StatusError(code, reason, message)
        self._server.handler.count_refusal(err.code)
        self._enqueue(_Request("GET", b"", [], False, False, status_reply(err)))

    def _next(self) -> None:
        """Begin pending requests until one has to wait for its upstream, or the client stops
        reading its answers."""
        handler, pending = self._server.handler, self._pending
        while pending and not self._busy and not self._write_paused and self._transport:
            request = pending[0]
            if request.error is not None:
                self._answer(request.error)
                continue
            target = request.target.decode("utf-8", "surrogateescape")
            outcome = handler.begin(request.method, target, request.headers, self._cn)
            if isinstance(outcome, Reply):
                self._answer(outcome)
            else:
                self._busy = True
                handler.forward(outcome, self._answer_forwarded)
        if not pending and not self._busy and not self._failed and self._transport is not None:
            self.phase = "idle"
            self.deadline = self._server.now + self._limits.idle_timeout

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
        server = self._server
        keep_alive = request.keep_alive and not server.closing
        if keep_alive:
            connection = b"Connection: keep-alive\r\n" if request.http10 else b""
        else:
            connection = b"Connection: close\r\n"
        transport.write(
            b"".join(
                (
                    _status_line(reply.status),
                    reply.headers,
                    server.date.line(),
                    b"Content-Length: %d\r\n" % len(reply.body),
                    connection,
                    b"\r\n",
                    b"" if request.method == "HEAD" else reply.body,
                )
            )
        )
        if server.access_log is not None:
            server.access_log(request.method, request.target, request.headers, reply,
                              self._loop.time() - request.started, self.peer)  # fmt: skip
        if not keep_alive:
            self._pending.clear()
            self._transport = None
            transport.close()
            if self._write_paused or transport.get_write_buffer_size():
                # close() waits for the buffer to drain: the write deadline still applies.
                self.phase = "write"
                self.write_deadline = min(
                    self.write_deadline, self._loop.time() + self._limits.write_timeout
                )
                self._raw = transport  # aborted by the sweeper if the client never reads
        elif self._read_paused_by_queue and len(self._pending) < MAX_PIPELINED // 2:
            self._read_paused_by_queue = False
            self._update_reading()

    def _update_reading(self) -> None:
        """Reading runs only while neither back-pressure nor the queue pauses it, and never
        again once the connection failed (an answer never resumes what back-pressure paused)."""
        transport = self._transport
        if transport is None:
            return
        want_paused = self._read_paused_by_writes or self._read_paused_by_queue or self._failed
        if want_paused != self._reading_paused:
            self._reading_paused = want_paused
            with contextlib.suppress(RuntimeError):
                if want_paused:
                    transport.pause_reading()
                else:
                    transport.resume_reading()

    def _stop_reading_for_good(self) -> None:
        self._update_reading()

    # ---- the sweeper's view

    @property
    def busy(self) -> bool:
        return self._busy or bool(self._pending)

    @property
    def reading_paused(self) -> bool:
        return self._reading_paused

    def expire(self, now: float) -> None:
        """A deadline passed: close an idle connection, abort any other."""
        phase = "write" if self.write_deadline <= now else self.phase
        self._server.metrics.connection_timeouts.labels(phase).inc()
        logger.debug("closing connection from %s: %s deadline passed", self.peer, phase)
        self.deadline = self.write_deadline = _INF
        if phase == "idle":
            self.close()
        else:
            self.abort()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        elif self._raw is not None:
            self._raw.abort()

    def abort(self) -> None:
        for transport in (self._transport, self._raw):
            if transport is not None:
                transport.abort()


def _feed(raw: asyncio.Transport, data: bytes) -> None:
    """Hand bytes read before start_tls to the TLS protocol that now owns the transport."""
    if raw.is_closing():
        return
    protocol: Any = raw.get_protocol()
    if hasattr(protocol, "buffer_updated"):
        view = memoryview(data)
        while view:
            buf = protocol.get_buffer(len(view))
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            protocol.buffer_updated(n)
            view = view[n:]
    else:
        protocol.data_received(data)


AccessLog = Callable[[str, bytes, Sequence[tuple[bytes, bytes]], Reply, float, Any], None]


class ProxyServer:
    """The secure port: HTTP/1.1 with keep-alive and pipelining, bounded by :class:`Limits`,
    requests answered by a :class:`Handler`."""

    def __init__(
        self,
        handler: Handler,
        metrics: ProxyMetrics,
        *,
        limits: Limits | None = None,
        access_log: AccessLog | None = None,
    ) -> None:
        self.handler = handler
        self.metrics = metrics
        self.limits = limits or Limits()
        self.access_log = access_log
        self.connections: set[_ServerConnection] = set()
        # A coarse clock for the connections' deadlines, advanced by the sweeper: no clock
        # read per request (deadlines are as precise as the sweep interval anyway).
        self.now = 0.0
        self.closing = False
        self.date = _DateHeader()
        self.port = 0
        self._ssl_context: ssl.SSLContext | None = None
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._handshakes: set[asyncio.Task[None]] = set()
        self._all_gone = asyncio.Event()
        self._handshake_log = _RateLimitedLog(10.0)

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
        self._ssl_context = ssl_context
        # Plain TCP: the connection cap applies before TLS, and the handshake's failures are
        # seen here (start_tls) rather than swallowed by the transport.
        self._server = await loop.create_server(
            lambda: _ServerConnection(self, loop),
            host or None,
            port,
            reuse_port=reuse_port or None,
            backlog=backlog,
        )
        server: Any = self._server  # uvloop's .sockets is a list, typeshed's a tuple
        self.port = int(server.sockets[0].getsockname()[1])
        self.now = loop.time()
        self._sweeper = asyncio.create_task(self._sweep(), name="connection-deadlines")

    def handshake(self, conn: _ServerConnection, raw: asyncio.Transport) -> None:
        task = asyncio.get_running_loop().create_task(self._handshake(conn, raw))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, conn: _ServerConnection, raw: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        assert self._ssl_context is not None
        started = loop.time()
        conn._handshaking = True
        if conn._hello:
            # After start_tls has given the transport to its TLS protocol and connected it.
            loop.call_soon(loop.call_soon, _feed, raw, conn._hello)
            conn._hello = b""
        try:
            tls = await loop.start_tls(
                raw,
                conn,
                self._ssl_context,
                server_side=True,
                ssl_handshake_timeout=self.limits.tls_handshake_timeout,
            )
        except asyncio.CancelledError:
            raw.abort()
            self.forget(conn)
            raise
        except Exception as exc:  # any failure ends this connection, never the server
            raw.abort()
            self.forget(conn)
            if loop.time() - started >= 0.9 * self.limits.tls_handshake_timeout and not isinstance(
                exc, ssl.SSLError
            ):
                exc = TimeoutError("TLS handshake timed out")  # asyncio aborts with its own
            self._handshake_failed(exc, conn.peer)
            return
        if tls is None or tls.is_closing():
            self.forget(conn)
            return
        conn.tls_ready(tls)

    def _handshake_failed(self, exc: BaseException, peer: Any) -> None:
        reason = tls_errors.handshake_failure_reason(exc)
        self.metrics.tls_handshake_failures.labels(reason).inc()
        address = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "?"
        if reason == "eof":
            # A TCP health check (connect, close) looks like this: counted, logged at debug.
            logger.debug("TLS handshake ended by the peer", extra=logs.fields(peer=address))
            return
        self._handshake_log(
            reason,
            time.monotonic(),
            "TLS handshake failed",
            fields={
                "peer": address,
                "reason": reason,
                "detail": tls_errors.handshake_failure_detail(exc),
            },
        )

    def forget(self, conn: _ServerConnection) -> None:
        self.connections.discard(conn)
        if not self.connections:
            self._all_gone.set()

    async def _sweep(self) -> None:
        """Enforce every connection's deadline (one task for all connections)."""
        loop = asyncio.get_running_loop()
        limits = self.limits
        shortest = min(
            limits.tls_handshake_timeout,
            limits.read_header_timeout,
            limits.read_timeout,
            limits.write_timeout,
            limits.idle_timeout,
        )
        interval = max(min(shortest / 4, 1.0), 0.02)
        while True:
            await asyncio.sleep(interval)
            now = self.now = loop.time()
            for conn in [c for c in self.connections if c.deadline < now or c.write_deadline < now]:
                conn.expire(now)

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
        for task in list(self._handshakes):
            task.cancel()
        if self._handshakes:
            await asyncio.gather(*self._handshakes, return_exceptions=True)
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
