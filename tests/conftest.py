"""Shared fixtures: a development PKI, KEDA-like stubs and a running Router on 127.0.0.1.

Everything is real: TLS with certificates from router.devtools.pki, servers on OS-chosen loopback
ports, the Router built from `metrics-router serve` flags through the real argument parser.
Nothing here is autouse; modules opt in (for example with
``pytestmark = pytest.mark.usefixtures("no_leftover_tasks")``).

- ``pki`` (session): a PKI for tenants a, b, c. Read-only: tests that rotate files copy them
  into their own tmp_path first (``copy_file``).
- ``start_router`` (function): ``await start_router({"a": ["tenant-a"], ...}, extra_args=[...])``
  starts one :class:`RecordingStub` per tenant and a Router routing to them; everything is
  stopped at teardown. Returns a :class:`RouterHarness`.
- ``no_leftover_tasks`` (function): fails a test that leaves asyncio tasks running.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import shutil
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp
import httptools
import pytest
import yaml
from aiohttp import web
from cryptography import x509
from kubernetes_asyncio.client import ApiClient
from multidict import CIMultiDict
from prometheus_client.parser import text_string_to_metric_families

from router.app import Router
from router.cli.serve_options import add_serve_arguments, serve_config_from_args
from router.cluster import client as kube
from router.devtools.keda_stub import KedaStub
from router.devtools.pki import Pki, generate_pki
from router.settings.serve import ServeConfig
from tests.fakeapi import FakeKube

PKI_TENANTS = ("a", "b", "c")
METRIC_PREFIX = "/apis/external.metrics.k8s.io/v1beta1/namespaces"
DEFAULT_TENANTS: dict[str, list[str]] = {
    "a": ["tenant-a", "tenant-a--dev"],
    "b": ["tenant-b"],
    "c": ["tenant-c"],
}
# The routes file example of DESIGN.md (and README.md).
DESIGN_ROUTES = """
tenants:
  a:
    namespaces: [tenant-a, tenant-a--dev]
    upstream: https://127.0.0.1:7001
    serverName: keda-operator-metrics-apiserver.tenant-a--sys.svc
  b:
    namespaces: [tenant-b]
    upstream: https://127.0.0.1:7002
"""
# What the aggregator sends for an HPA request (several groups, extras with encoded keys).
HPA_IDENTITY: tuple[tuple[str, str], ...] = (
    ("X-Remote-User", "system:serviceaccount:kube-system:horizontal-pod-autoscaler"),
    ("X-Remote-Uid", "6b1c1e5e-2f4a-4c1e-9a53-0d7b5a0c9e11"),
    ("X-Remote-Group", "system:serviceaccounts"),
    ("X-Remote-Group", "system:serviceaccounts:kube-system"),
    ("X-Remote-Group", "system:authenticated"),
    ("X-Remote-Extra-Authentication.kubernetes.io%2fpod-name", "kube-controller-manager-0"),
    ("X-Remote-Extra-Acme.com%2Fproject", "blue"),
    ("X-Remote-Extra-Acme.com%2Fproject", "green"),
)

ClientCert = Literal["front-proxy", "none", "rogue", "other"] | tuple[Path, Path]


def metric_path(namespace: str, metric: str = "s0-prometheus") -> str:
    return f"{METRIC_PREFIX}/{namespace}/{metric}"


def copy_file(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    return dst


# --------------------------------------------------------------------------- PKI and TLS


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A development PKI shared by the session. Never modify its files."""
    return generate_pki(tmp_path_factory.mktemp("pki"), tenants=PKI_TENANTS)


def client_ssl_context(
    pki: Pki, cert: ClientCert = "front-proxy", *, alpn: Sequence[str] | None = None
) -> ssl.SSLContext:
    """A client context trusting the router's serving CA, presenting the chosen certificate."""
    ctx = ssl.create_default_context(cafile=str(pki.router_serving_ca))
    if alpn is not None:
        ctx.set_alpn_protocols(list(alpn))
    pair: tuple[Path, Path] | None
    if cert == "front-proxy":
        pair = (pki.front_proxy_client_cert, pki.front_proxy_client_key)
    elif cert == "rogue":
        pair = (pki.rogue_client_cert, pki.rogue_client_key)
    elif cert == "other":
        pair = (pki.other_client_cert, pki.other_client_key)
    elif cert == "none":
        pair = None
    else:
        pair = cert
    if pair is not None:
        ctx.load_cert_chain(pair[0], pair[1])
    return ctx


# --------------------------------------------------------------------------- raw HTTP/1.1


class NoResponseError(ConnectionError):
    """The connection ended before a complete response arrived."""


@dataclass
class Reply:
    status: int
    raw_headers: list[tuple[str, str]]
    body: bytes

    @property
    def headers(self) -> CIMultiDict[str]:
        return CIMultiDict(self.raw_headers)

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "")

    def json(self) -> Any:
        return json.loads(self.body)


class _ResponseParser:
    """Parses responses on one connection; complete ones queue up in ``replies`` (pipelining).

    After a response to HEAD (which ends with its headers) or a 101, the connection is not
    parsed any further.
    """

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.headers: list[tuple[str, str]] = []
        self.body: list[bytes] = []
        self.replies: collections.deque[Reply] = collections.deque()
        self.head = False  # the response awaited answers a HEAD request
        self.finished = False  # nothing more can be parsed on this connection

    def feed(self, data: bytes) -> None:
        if self.finished:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            # llhttp pauses after a 101 answer: report it as it is (what follows is not
            # HTTP/1.1 any more); anything else is a broken response.
            if self.finished or self.parser.get_status_code() != 101:
                raise
            self._complete()
            self.finished = True

    def on_message_begin(self) -> None:
        self.headers = []
        self.body = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        if self.head:
            self._complete()
            self.finished = True

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        if not self.finished:
            self._complete()

    def _complete(self) -> None:
        self.replies.append(Reply(self.parser.get_status_code(), self.headers, b"".join(self.body)))


def build_request(
    target: str,
    headers: Sequence[tuple[str, str]] = (),
    *,
    method: str = "GET",
    host: str | None = "127.0.0.1",
) -> bytes:
    """Exactly these request bytes: request line, Host (unless None), headers in order."""
    lines = [f"{method} {target} HTTP/1.1"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines.extend(f"{k}: {v}" for k, v in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class RawConnection:
    """One TLS connection speaking HTTP/1.1 by hand: exact bytes out, parsed responses in."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._parser = _ResponseParser()

    @classmethod
    async def open(
        cls, port: int, ctx: ssl.SSLContext, *, host: str = "127.0.0.1", within: float = 5.0
    ) -> RawConnection:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ctx, ssl_handshake_timeout=within), within
        )
        return cls(reader, writer)

    @property
    def ssl_object(self) -> ssl.SSLObject:
        obj = self.writer.get_extra_info("ssl_object")
        assert obj is not None
        return obj  # type: ignore[no-any-return]

    def peer_serial(self) -> int:
        der = self.ssl_object.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number

    async def send(self, data: bytes, *, within: float = 10.0) -> Reply:
        """Write data (one request, or several pipelined) and read the next response."""
        self.writer.write(data)
        await self.writer.drain()
        if data.startswith(b"HEAD "):
            self._parser.head = True
        return await self.read_reply(within=within)

    async def read_reply(self, *, within: float = 10.0) -> Reply:
        """The next response on this connection (NoResponseError if it closes first)."""
        parser = self._parser

        async def read() -> Reply:
            while not parser.replies:
                chunk = await self.reader.read(65536)
                if not chunk:
                    raise NoResponseError("connection closed before a complete response")
                parser.feed(chunk)
            return parser.replies.popleft()

        return await asyncio.wait_for(read(), within)

    async def closed_by_peer(self, *, within: float = 5.0) -> bool:
        """True when the server closes the connection (EOF) within the time given."""
        try:
            while await asyncio.wait_for(self.reader.read(65536), within):
                pass
        except TimeoutError:
            return False
        except (ConnectionError, ssl.SSLError):
            return True
        return True

    async def request(
        self,
        target: str,
        headers: Sequence[tuple[str, str]] = (),
        *,
        method: str = "GET",
        within: float = 10.0,
    ) -> Reply:
        return await self.send(build_request(target, headers, method=method), within=within)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError, TimeoutError):
            await asyncio.wait_for(self.writer.wait_closed(), 5.0)


async def wait_until(predicate: Callable[[], bool], *, within: float = 5.0) -> None:
    """Poll a condition that has no event to wait on (a gauge, say); TimeoutError after within."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():
        if loop.time() > deadline:
            raise TimeoutError(f"condition not met within {within}s")
        await asyncio.sleep(0.01)


# --------------------------------------------------------------------------- stubs


class RecordingStub(KedaStub):
    """A KedaStub that also records the client port of every request (one per connection)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.peer_ports: list[int] = []

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.transport is not None:
            peer = request.transport.get_extra_info("peername")
            if peer:
                self.peer_ports.append(int(peer[1]))
        return await super()._handle(request)

    @property
    def connections(self) -> int:
        return len(set(self.peer_ports))


def make_stub(pki: Pki, tenant: str, **kwargs: Any) -> RecordingStub:
    """A stub for tenant with an upstream-CA serving certificate (SAN 127.0.0.1)."""
    cert_tenant = tenant if tenant in pki.tenants else pki.tenants[0]
    kwargs.setdefault("cert_file", pki.upstream_cert(cert_tenant))
    kwargs.setdefault("key_file", pki.upstream_key(cert_tenant))
    kwargs.setdefault("client_ca_file", pki.router_client_ca)
    return RecordingStub(tenant=tenant, **kwargs)


# --------------------------------------------------------------------------- the router


def routes_yaml(routes: Mapping[str, tuple[Sequence[str], str, str | None]]) -> str:
    """tenant -> (namespaces, upstream URL, serverName or None) as a routes file."""
    doc: dict[str, Any] = {"tenants": {}}
    for tenant, (namespaces, url, server_name) in routes.items():
        spec: dict[str, Any] = {"namespaces": list(namespaces), "upstream": url}
        if server_name is not None:
            spec["serverName"] = server_name
        doc["tenants"][tenant] = spec
    return yaml.safe_dump(doc, sort_keys=False)


def serve_args(pki: Pki, routes_file: Path, extra_args: Sequence[str] = ()) -> list[str]:
    """`metrics-router serve` flags for a test router; later flags override earlier ones."""
    return [
        "--secure-port", "0",
        "--bind-address", "127.0.0.1",
        *pki.serve_flags(),
        "--routes-file", str(routes_file),
        "--metrics-bind-address", "127.0.0.1:0",
        "--file-check-interval", "3600",  # tests call router.check_files() themselves
        "--shutdown-grace-period", "5",
        *extra_args,
    ]  # fmt: skip


def parse_serve_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="metrics-router serve")
    add_serve_arguments(parser)
    return parser.parse_args(list(argv))


def serve_config(argv: Sequence[str]) -> ServeConfig:
    """The Router's configuration from `metrics-router serve` flags, through the real parser."""
    return serve_config_from_args(parse_serve_args(argv))


async def started_router(config: ServeConfig) -> Router:
    """A started Router (stopped again when it fails half-way through starting)."""
    router = Router(config)
    try:
        await router.start()
    except BaseException:
        await router.stop()
        raise
    return router


@dataclass
class RouterHarness:
    router: Router
    stubs: dict[str, RecordingStub]
    routes_file: Path
    pki: Pki
    tmp_path: Path
    sessions: list[aiohttp.ClientSession] = field(default_factory=list)
    connections: list[RawConnection] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.router.port

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.router.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.router.metrics_port}"

    def seen_total(self) -> int:
        return sum(len(s.seen) for s in self.stubs.values())

    async def connect(self, cert: ClientCert = "front-proxy") -> RawConnection:
        conn = await RawConnection.open(self.port, client_ssl_context(self.pki, cert))
        self.connections.append(conn)
        return conn

    async def request(
        self,
        target: str,
        headers: Sequence[tuple[str, str]] = HPA_IDENTITY,
        *,
        cert: ClientCert = "front-proxy",
        method: str = "GET",
        within: float = 10.0,
    ) -> Reply:
        """One request on a new connection; the connection is closed afterwards."""
        conn = await RawConnection.open(self.port, client_ssl_context(self.pki, cert))
        try:
            return await conn.request(target, headers, method=method, within=within)
        finally:
            await conn.close()

    async def direct(
        self, tenant: str, target: str, headers: Sequence[tuple[str, str]] = HPA_IDENTITY
    ) -> Reply:
        """The same request straight to a tenant's stub, as the router would send it."""
        ctx = ssl.create_default_context(cafile=str(self.pki.upstream_ca))
        ctx.load_cert_chain(self.pki.router_client_cert, self.pki.router_client_key)
        stub = self.stubs[tenant]
        assert stub.port is not None
        conn = await RawConnection.open(stub.port, ctx)
        try:
            return await conn.request(target, headers)
        finally:
            await conn.close()

    async def metrics_text(self) -> str:
        async with (
            aiohttp.ClientSession() as session,
            session.get(self.metrics_url + "/metrics") as resp,
        ):
            assert resp.status == 200
            return await resp.text()

    async def sample(self, name: str, labels: Mapping[str, str] | None = None) -> float | None:
        """The value of one sample scraped from /metrics (None when absent)."""
        want = dict(labels or {})
        for family in text_string_to_metric_families(await self.metrics_text()):
            for s in family.samples:
                if s.name == name and s.labels == want:
                    return float(s.value)
        return None

    def write_routes(self, routes: Mapping[str, tuple[Sequence[str], str, str | None]]) -> None:
        self.routes_file.write_text(routes_yaml(routes))

    def routes_for(
        self, tenants: Mapping[str, Sequence[str]]
    ) -> dict[str, tuple[Sequence[str], str, str | None]]:
        """Routes to this harness' stubs for tenant -> namespaces."""
        return {t: (ns, self.stubs[t].url, None) for t, ns in tenants.items()}


StartRouter = Callable[..., Awaitable[RouterHarness]]


@pytest.fixture
async def start_router(pki: Pki, tmp_path: Path) -> AsyncIterator[StartRouter]:
    """Factory: ``await start_router(tenants, extra_args=..., routes=..., stub_kwargs=...)``.

    ``tenants`` maps tenant -> namespaces (default: a, b, c); a stub is started per tenant.
    ``routes`` (tenant -> (namespaces, url, serverName)) overrides the routes written, for
    upstreams that are not the harness' stubs. Everything is stopped at teardown: stubs first
    (releasing hung requests), then the router.
    """
    harnesses: list[RouterHarness] = []
    started: list[KedaStub] = []

    async def factory(
        tenants: Mapping[str, Sequence[str]] | None = None,
        *,
        extra_args: Sequence[str] = (),
        routes: Mapping[str, tuple[Sequence[str], str, str | None]] | None = None,
        stub_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> RouterHarness:
        tenants = DEFAULT_TENANTS if tenants is None else tenants
        stubs: dict[str, RecordingStub] = {}
        for tenant in tenants:
            stub = make_stub(pki, tenant, **dict((stub_kwargs or {}).get(tenant, {})))
            await stub.start()
            started.append(stub)
            stubs[tenant] = stub
        directory = tmp_path / f"router-{len(harnesses)}"
        directory.mkdir()
        routes_file = directory / "routes.yaml"
        if routes is None:
            routes = {t: (ns, stubs[t].url, None) for t, ns in tenants.items()}
        routes_file.write_text(routes_yaml(routes))
        router = await started_router(serve_config(serve_args(pki, routes_file, extra_args)))
        harness = RouterHarness(router, stubs, routes_file, pki, directory)
        harnesses.append(harness)
        return harness

    yield factory

    for stub in started:
        await stub.stop()
    for h in harnesses:
        for session in h.sessions:
            await session.close()
        for conn in h.connections:
            await conn.close()
        await h.router.stop()


# --------------------------------------------------------------------------- raw upstreams

UpstreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class RawUpstream:
    url: str
    heads: list[bytes]  # every request head received, as bytes


def answering(answer: bytes) -> UpstreamHandler:
    """A raw upstream handler that writes ``answer`` whole, then closes the connection."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(answer)
        await writer.drain()

    return handler


@contextlib.asynccontextmanager
async def raw_tls_upstream(pki: Pki, handler: UpstreamHandler) -> AsyncIterator[RawUpstream]:
    """A TLS server with tenant a's upstream certificate whose handler writes raw bytes.

    The handler runs after a request head was read (recorded in ``heads``).
    """
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pki.upstream_cert(pki.tenants[0]), pki.upstream_key(pki.tenants[0]))
    writers: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        try:
            upstream.heads.append(await reader.readuntil(b"\r\n\r\n"))
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()

    upstream = RawUpstream("", [])
    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=ctx, limit=1 << 22)
    upstream.url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        yield upstream
    finally:
        server.close()
        for w in writers:
            w.close()
        await server.wait_closed()


async def start_with_upstream(start_router: StartRouter, url: str) -> RouterHarness:
    """A router where tenant a (namespace tenant-a) goes to url and tenant b to a stub."""
    h = await start_router({"b": ["tenant-b"]})
    h.write_routes({"a": (["tenant-a"], url, None), "b": (["tenant-b"], h.stubs["b"].url, None)})
    h.router.check_files()
    return h


@pytest.fixture
async def stub(pki: Pki) -> AsyncIterator[KedaStub]:
    """Tenant a's KedaStub, started (for suites that run `metrics-router serve` as a process)."""
    s = make_stub(pki, "a")
    async with s:
        yield s


# --------------------------------------------------------------------------- hygiene


@pytest.fixture
async def no_leftover_tasks() -> AsyncIterator[None]:
    """Fail the test if asyncio tasks it started are still running after its teardown.

    Request this fixture first (``pytest.mark.usefixtures``) so that its teardown runs after
    the other fixtures have stopped their servers.
    """
    before = set(asyncio.all_tasks())
    yield
    current = asyncio.current_task()
    left = {t for t in asyncio.all_tasks() if t not in before and t is not current and not t.done()}
    if not left:
        return
    _, pending = await asyncio.wait(left, timeout=1.0)
    if pending:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        names = sorted(repr(t.get_coro()) for t in pending)
        pytest.fail(f"test left {len(pending)} asyncio task(s) running: {names}")


# --------------------------------------------------------------------------- fake Kubernetes API


@pytest.fixture
async def fake(tmp_path: Path) -> AsyncIterator[FakeKube]:
    """A fake Kubernetes API server on 127.0.0.1 (real HTTP, TLS, bearer token)."""
    async with FakeKube(tmp_path) as f:
        yield f


@pytest.fixture
async def api(fake: FakeKube) -> AsyncIterator[ApiClient]:
    """The real kubernetes-asyncio client, configured from the fake's kubeconfig."""
    client = await kube.api_client(fake.kubeconfig)
    try:
        yield client
    finally:
        await client.close()
