"""A tenant upstream that behaves like KEDA's metrics server, for tests, the demo and the bench.

Like KEDA's metrics server started with ``--requestheader-client-ca-file`` and
``--requestheader-allowed-names``, it serves TLS, requires a client certificate from the
configured CA, answers 401 when the peer's CN is not allowed (empty list = any) or when
X-Remote-User is missing, and reads the caller's identity from X-Remote-User, X-Remote-Uid,
X-Remote-Group (every line) and X-Remote-Extra-<percent-encoded key>.

It answers ``GET /apis/external.metrics.k8s.io/v1beta1/namespaces/{ns}/{metric}`` with an
ExternalMetricValueList and reports what it saw in ``X-Stub-*`` response headers. Every request
is recorded as a :class:`SeenRequest` in ``stub.seen``; ``await stub.wait_for_requests(n)``
waits for them without sleeping. ``stub.behaviour`` (:class:`StubBehaviour`) switches faults at
run time: delay, hang, fail_status, drop, content_type/body override.

Standalone: ``python -m router.devtools.keda_stub --tenant tenant-a --cert F --key F
--client-ca F --port N``
prints ``listening on https://HOST:PORT`` once it accepts connections.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import logging
import re
import signal
import ssl
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote, unquote

from aiohttp import web

from router import logs
from router.core.option_values import parse_duration

logger = logging.getLogger(__name__)

# The stub stands in for another server (KEDA's metrics apiserver), so it names the API group
# itself rather than importing the router's router.core.status: it must not change if ours does.
GROUP = "external.metrics.k8s.io"
VERSION = "v1beta1"
GROUP_VERSION = f"{GROUP}/{VERSION}"
_METRIC_PATH = re.compile(
    r"^/apis/external\.metrics\.k8s\.io/v1beta1/namespaces/(?P<ns>[^/]+)/(?P<metric>[^/]+)/?$"
)
_DISCOVERY_PATH = "/apis/external.metrics.k8s.io/v1beta1"
_EXTRA_PREFIX = "x-remote-extra-"

_REASONS: dict[int, str] = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}

# Printable ASCII except '%', so header values stay readable and unambiguous.
_HEADER_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


@dataclass(frozen=True)
class SeenRequest:
    """One request as the stub received it."""

    method: str
    raw_path: str  # path and query string exactly as received
    headers: tuple[tuple[str, str], ...]  # raw header lines in order
    user: str | None
    uid: str | None
    groups: tuple[str, ...]
    extras: tuple[tuple[str, tuple[str, ...]], ...]  # (decoded lowercase key, values), sorted
    peer_cn: str | None

    def header(self, name: str) -> list[str]:
        """Every value of header name (case-insensitive), in order."""
        low = name.lower()
        return [v for k, v in self.headers if k.lower() == low]

    @property
    def extras_dict(self) -> dict[str, tuple[str, ...]]:
        return dict(self.extras)


@dataclass
class StubBehaviour:
    """What the stub does with the next requests; mutate ``stub.behaviour`` at run time."""

    value: str = "42"
    delay: float = 0.0  # seconds before answering
    hang: bool = False  # never answer until the stub stops
    fail_status: int | None = None  # answer a Status body with this code
    fail_message: str = "injected failure"
    drop: bool = False  # close the connection without a response
    content_type: str | None = None  # with body: answer these bytes instead of the list
    body: bytes | None = None


def status_body(code: int, message: str, reason: str | None = None) -> dict[str, Any]:
    """A Kubernetes Status (v1) failure body."""
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason if reason is not None else _REASONS.get(code, ""),
        "code": code,
    }


def _status_response(code: int, message: str, headers: dict[str, str]) -> web.Response:
    return web.Response(
        status=code,
        body=json.dumps(status_body(code, message)).encode(),
        content_type="application/json",
        headers=headers,
    )


def parse_simple_selector(selector: str) -> dict[str, str]:
    """Labels of an equality-only selector ("a=b,c==d"); {} if it uses anything else."""
    labels: dict[str, str] = {}
    for term in (t.strip() for t in selector.split(",")):
        if not term:
            continue
        if "!=" in term:
            return {}
        key, sep, value = term.partition("==") if "==" in term else term.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or any(c in key + value for c in "()! "):
            return {}
        labels[key] = value
    return labels


def external_metric_value_list(metric: str, labels: dict[str, str], value: str) -> dict[str, Any]:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "kind": "ExternalMetricValueList",
        "apiVersion": GROUP_VERSION,
        "metadata": {},
        "items": [{"metricName": metric, "metricLabels": labels, "timestamp": now, "value": value}],
    }


def _api_resource_list() -> dict[str, Any]:
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": GROUP_VERSION,
        "resources": [
            {
                "name": "externalmetrics",
                "singularName": "",
                "namespaced": True,
                "kind": "ExternalMetricValueList",
                "verbs": ["get"],
            }
        ],
    }


def _peer_cn(request: web.Request) -> str | None:
    transport = request.transport
    if transport is None:
        return None
    cert = transport.get_extra_info("peercert")
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def _identity(
    headers: Sequence[tuple[str, str]],
) -> tuple[str | None, str | None, tuple[str, ...], tuple[tuple[str, tuple[str, ...]], ...]]:
    user: str | None = None
    uid: str | None = None
    groups: list[str] = []
    extras: dict[str, list[str]] = {}
    for name, value in headers:
        low = name.lower()
        if low == "x-remote-user" and user is None:
            user = value
        elif low == "x-remote-uid" and uid is None:
            uid = value
        elif low == "x-remote-group":
            groups.append(value)
        elif low.startswith(_EXTRA_PREFIX) and len(low) > len(_EXTRA_PREFIX):
            extras.setdefault(unquote(low[len(_EXTRA_PREFIX) :]), []).append(value)
    return user, uid, tuple(groups), tuple(sorted((k, tuple(v)) for k, v in extras.items()))


def _hv(value: str) -> str:
    return quote(value, safe=_HEADER_SAFE)


class KedaStub:
    """A KEDA-like external metrics server on 127.0.0.1 over mTLS. See the module docstring."""

    def __init__(
        self,
        *,
        tenant: str,
        cert_file: Path | str,
        key_file: Path | str,
        client_ca_file: Path | str | None,
        allowed_names: Sequence[str] = ("metrics-router",),
        value: str = "42",
    ) -> None:
        self.tenant = tenant
        self.cert_file = Path(cert_file)
        self.key_file = Path(key_file)
        self.client_ca_file = Path(client_ca_file) if client_ca_file is not None else None
        self.allowed_names = tuple(allowed_names)
        self.behaviour = StubBehaviour(value=value)
        self.seen: list[SeenRequest] = []
        self.port: int | None = None
        self.host: str | None = None
        self._changed = asyncio.Event()
        self._stopping = asyncio.Event()
        self._runner: web.AppRunner | None = None

    # ------------------------------------------------------------------ lifecycle

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert_file, self.key_file)
        if self.client_ca_file is not None:
            ctx.load_verify_locations(cafile=self.client_ca_file)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Start serving; returns the bound port (OS-chosen when port is 0)."""
        if self._runner is not None:
            raise RuntimeError("KedaStub already started")
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        self._stopping.clear()
        try:
            site = web.TCPSite(runner, host, port, ssl_context=self.ssl_context())
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        self.host = host
        logger.info("keda stub started", extra=logs.fields(tenant=self.tenant, url=self.url))
        return self.port

    @property
    def url(self) -> str:
        if self.port is None or self.host is None:
            raise RuntimeError("KedaStub not started")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"

    async def stop(self) -> None:
        """Stop serving; hung requests are released (their connections dropped) first."""
        self._stopping.set()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
            logger.info("keda stub stopped", extra=logs.fields(tenant=self.tenant))

    async def __aenter__(self) -> KedaStub:
        if self._runner is None:
            await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # ------------------------------------------------------------------ observation

    async def wait_for_requests(
        self,
        n: int,
        timeout: float = 5.0,  # noqa: ASYNC109 - a deadline is this helper's point
    ) -> list[SeenRequest]:
        """Wait until at least n requests were seen; returns a copy of stub.seen."""

        async def _wait() -> None:
            while len(self.seen) < n:
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(_wait(), timeout)
        return list(self.seen)

    def clear_seen(self) -> None:
        self.seen.clear()

    # ------------------------------------------------------------------ request handling

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw_headers = tuple(
            (k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers
        )
        user, uid, groups, extras = _identity(raw_headers)
        peer_cn = _peer_cn(request)
        seen = SeenRequest(
            method=request.method,
            raw_path=request.raw_path,
            headers=raw_headers,
            user=user,
            uid=uid,
            groups=groups,
            extras=extras,
            peer_cn=peer_cn,
        )
        self.seen.append(seen)
        self._changed.set()
        headers = {"X-Stub-Tenant": _hv(self.tenant)}
        if peer_cn is not None:
            headers["X-Stub-Peer-CN"] = _hv(peer_cn)

        # Authentication, as KEDA's requestheader authenticator does it.
        if self.allowed_names and peer_cn not in self.allowed_names:
            return _status_response(
                401, f"client certificate CN {peer_cn!r} is not an allowed name", headers
            )
        if not user:
            return _status_response(401, "Unauthorized: no X-Remote-User header", headers)
        headers["X-Stub-Seen-User"] = _hv(user)
        if uid is not None:
            headers["X-Stub-Seen-Uid"] = _hv(uid)
        if groups:
            headers["X-Stub-Seen-Groups"] = ",".join(_hv(g) for g in groups)
        for key, values in extras:
            headers[f"X-Stub-Seen-Extra-{quote(key, safe='')}"] = ",".join(_hv(v) for v in values)

        b = self.behaviour
        if b.hang:
            await self._stopping.wait()
            return self._drop(request)
        if b.delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), b.delay)
        if b.drop:
            return self._drop(request)
        if b.fail_status is not None:
            return _status_response(b.fail_status, b.fail_message, headers)

        if request.method != "GET":
            return _status_response(405, f"method {request.method} is not allowed", headers)
        if request.path.rstrip("/") == _DISCOVERY_PATH:
            return web.json_response(_api_resource_list(), headers=headers)
        match = _METRIC_PATH.match(request.path)
        if match is None:
            return _status_response(404, f"the server could not find {request.path}", headers)
        if b.body is not None:
            return web.Response(
                body=b.body,
                headers={**headers, "Content-Type": b.content_type or "application/json"},
            )
        labels = parse_simple_selector(request.query.get("labelSelector", ""))
        doc = external_metric_value_list(match["metric"], labels, b.value)
        return web.json_response(doc, headers=headers)

    @staticmethod
    def _drop(request: web.Request) -> web.StreamResponse:
        if request.transport is not None:
            request.transport.abort()
        return web.Response(status=500)


# ---------------------------------------------------------------------- standalone process


async def serve_forever(stub: KedaStub, host: str = "127.0.0.1", port: int = 0) -> None:
    """Run stub until SIGINT/SIGTERM; prints ``listening on URL`` once it accepts."""
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    try:
        await stub.start(host, port)
        print(f"listening on {stub.url}", flush=True)
        await done.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await stub.stop()


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m router.devtools.keda_stub",
        description="A stand-in for a tenant's KEDA metrics server (mTLS, X-Remote-* identity).",
    )
    parser.add_argument("--tenant", required=True)
    parser.add_argument("--cert", required=True, type=Path, help="serving certificate (PEM)")
    parser.add_argument("--key", required=True, type=Path, help="serving key (PEM)")
    parser.add_argument("--client-ca", required=True, type=Path, help="CA for client certs")
    parser.add_argument(
        "--allowed-names",
        default="metrics-router",
        help="comma-separated allowed client CNs; empty = any (default: %(default)s)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port (default 0: the OS picks one)")
    parser.add_argument("--value", default="42", help="metric value to answer (default 42)")
    parser.add_argument(
        "--delay",
        type=_duration,
        default=0.0,
        help="time before each answer, as 500ms, 2s or plain seconds (default 0)",
    )
    args = parser.parse_args(argv)
    for flag, path in (("--cert", args.cert), ("--key", args.key), ("--client-ca", args.client_ca)):
        if not path.is_file():
            parser.error(f"{flag}: {path} is not a readable file")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    stub = KedaStub(
        tenant=args.tenant,
        cert_file=args.cert,
        key_file=args.key,
        client_ca_file=args.client_ca,
        allowed_names=[n.strip() for n in args.allowed_names.split(",") if n.strip()],
        value=args.value,
    )
    stub.behaviour.delay = args.delay
    try:
        asyncio.run(serve_forever(stub, args.host, args.port))
    except (OSError, ssl.SSLError) as exc:
        print(f"keda stub: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
