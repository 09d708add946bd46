"""The secure port's parsing decisions against h11's, on inputs hypothesis generates.

h11 is a sans-I/O HTTP/1.1 state machine that refuses what RFC 9112 refuses. A running router
(real TLS on 127.0.0.1, in a thread with its own event loop) receives each generated request;
tenant a's stub answers what is forwarded. The properties:

- what h11 refuses, the router never forwards (smuggling and framing tricks die at the door);
- what h11 accepts as one complete HTTP/1.1 or HTTP/1.0 request, the router forwards too (it is
  not stricter than the RFC), with three deliberate exceptions the RFC allows either way:
  lines ending in a bare LF (RFC 9112 §2.2), obs-fold continuation lines (§5.2) and repeated
  identical Content-Length fields (§6.3), which h11 tolerates and the router refuses (400), as
  llhttp's strict mode does (the aggregator sends none of them); h11 lets control characters
  (0x01-0x08, 0x0b-0x1f, 0x7f) through in a field value, which the router refuses; and a head with
  both Transfer-Encoding and Content-Length, which h11 frames by the former and the router
  refuses outright (RFC 9112 §6.1 allows either; refusing closes the smuggling door);
- any other HTTP version is refused (505 or 400), whatever h11 thinks of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h11
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from router.app import Router
from router.devtools.pki import Pki
from tests.conftest import (
    HPA_IDENTITY,
    client_ssl_context,
    make_stub,
    metric_path,
    routes_yaml,
    serve_args,
    serve_config,
)


@dataclass
class ThreadedRouter:
    port: int
    ctx: ssl.SSLContext


@pytest.fixture(scope="module")
def router(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedRouter]:
    """A router and tenant a's stub on an event loop of their own, in a thread."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop = asyncio.Event()
    holder: dict[str, object] = {}

    async def main() -> None:
        stub = make_stub(pki, "a")
        await stub.start()
        routes = Path(tmp_path_factory.mktemp("oracle")) / "routes.yaml"
        routes.write_text(routes_yaml({"a": (["tenant-a"], stub.url, None)}))
        config = serve_config(serve_args(pki, routes, ["--read-timeout", "2s"]))
        r = Router(config)
        try:
            await r.start()
            holder["port"] = r.port
            ready.set()
            await stop.wait()
        finally:
            await r.stop()
            await stub.stop()
            ready.set()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(30)
    try:
        yield ThreadedRouter(int(holder["port"]), client_ssl_context(pki))  # type: ignore[call-overload]
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)
        loop.close()


def exchange(router: ThreadedRouter, data: bytes) -> int | None:
    """The status of the router's first answer (None: closed without one)."""
    received = b""
    with (
        socket.create_connection(("127.0.0.1", router.port), timeout=5) as raw,
        router.ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s,
    ):
        # The router may answer and close before it has read everything (a refusal): the
        # send or the read then fails, and what arrived is what counts.
        with contextlib.suppress(OSError, ValueError):
            s.sendall(data)
        with contextlib.suppress(OSError, ValueError):
            while b"\r\n" not in received and (chunk := s.recv(65536)):
                received += chunk
    if not received.startswith(b"HTTP/1.1 "):
        return None
    return int(received[9:12])


def h11_verdict(data: bytes) -> str:
    """'ok' (one complete request), 'error' (h11 refuses), or 'incomplete'."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    try:
        while True:
            ev = conn.next_event()
            if ev is h11.NEED_DATA:
                return "incomplete"
            if isinstance(ev, h11.EndOfMessage):
                return "ok"
    except h11.RemoteProtocolError:
        return "error"


TOKEN = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-!#$%&'*+.^`|~",
    min_size=1,
    max_size=12,
)
ODD_NAME = st.sampled_from(
    ["X Remote", "X-Remote-User ", " X-Lead", "X:Colon", "X\tTab", "Caf\xe9", "X_Remote_User", ""]
)
VALUE = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20)
ODD_VALUE = st.sampled_from(["a\x00b", "a\x7fb", "a\rb", " lead", "trail ", "\xff\xfe", "a\x01"])
FRAMING = st.sampled_from(
    [
        [],
        [],
        [],
        [("Content-Length", "0")],
        [("Content-Length", "3")],
        [("Content-Length", "3"), ("Content-Length", "3")],
        [("Content-Length", "3"), ("Content-Length", "4")],
        [("Content-Length", "+3")],
        [("Content-Length", "3 ")],
        [("Content-Length", "0x3")],
        [("Transfer-Encoding", "chunked")],
        [("Transfer-Encoding", "chunked"), ("Content-Length", "3")],
        [("Transfer-Encoding", "gzip, chunked")],
        [("Transfer-Encoding", "chunked, gzip")],
        [("Transfer-Encoding", "identity")],
        [("Transfer-Encoding", " chunked")],
        [("Transfer-Encoding", "xchunked")],
    ]
)
VERSION = st.sampled_from(
    ["HTTP/1.1"] * 5 + ["HTTP/1.0", "HTTP/2.0", "HTTP/0.9", "HTTP/1.2", "http/1.1", "HTTP/1.1 "]
)
BODY = st.sampled_from(
    [
        b"",
        b"abc",
        b"3\r\nabc\r\n0\r\n\r\n",
        b"3\r\nabc\r\n0\r\nX-Remote-User: admin\r\n\r\n",
        b"zz\r\nabc\r\n0\r\n\r\n",
    ]
)
EOL = st.sampled_from(["\r\n"] * 7 + ["\n"])


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    eol = draw(EOL)
    version = draw(VERSION)
    extra = draw(
        st.lists(
            st.tuples(st.one_of(TOKEN, TOKEN, TOKEN, ODD_NAME), st.one_of(VALUE, VALUE, ODD_VALUE)),
            max_size=3,
        )
    )
    headers = [("Host", "router"), *HPA_IDENTITY, *extra, *draw(FRAMING), ("Connection", "close")]
    if draw(st.sampled_from([False, False, False, True])):
        headers = [*headers[:2], ("X-Folded", "a"), *headers[2:]]
        folded = True
    else:
        folded = False
    lines = [f"GET {metric_path('tenant-a')} {version}"]
    for name, value in headers:
        lines.append(f"{name}: {value}")
        if folded and name == "X-Folded":
            lines.append(" continued")  # obs-fold
    head = eol.join(lines) + eol + eol
    return head.encode("latin-1") + draw(BODY)


@pytest.mark.timeout(900)  # ORACLE_EXAMPLES=2000 for a longer search
@settings(
    max_examples=int(os.environ.get("ORACLE_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=requests())
def test_router_parsing_agrees_with_h11(router: ThreadedRouter, data: bytes) -> None:
    verdict = h11_verdict(data)
    request_line = data.split(b"\n", 1)[0]
    version_ok = request_line.endswith((b" HTTP/1.1\r", b" HTTP/1.0\r", b" HTTP/1.1", b" HTTP/1.0"))
    if verdict == "incomplete" and version_ok:
        event("h11: incomplete")
        return  # the router waits for more (its read deadline ends it): nothing to compare
    status = exchange(router, data)
    event(f"h11 {verdict}, router {status}")
    forwarded = status == 200
    head = data.split(b"\r\n\r\n", 1)[0]
    bare_lf = b"\n" in data.replace(b"\r\n", b"")
    obs_fold = b"\n " in head or b"\n\t" in head
    repeated_length = head.lower().count(b"\ncontent-length:") > 1
    control = any((b < 0x20 and b not in (9, 10, 13)) or b == 0x7F for b in head)
    lower = head.lower()
    both = b"\ncontent-length:" in lower and b"\ntransfer-encoding:" in lower
    if bare_lf or obs_fold or repeated_length or control or both:
        assert not forwarded, (data, status)
    elif not version_ok:
        assert not forwarded, (data, status)
        assert status in (400, 505, None), (data, status)
    elif verdict == "error":
        assert not forwarded, (data, status)
    elif verdict == "ok":
        assert forwarded, (data, status)
