"""The doctor's network probes: TLS handshakes and requests to the tenants and the router.

Each probe returns what it found as snapshot data (never raises for a network failure), so the
checks can say what went wrong. A refused client certificate is told apart from an unreachable
or misconfigured peer: the peer's TLS alert when it sends one, else (TLS 1.3 judges the client
certificate after the handshake) a second handshake limited to TLS 1.2.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace

import aiohttp
from cryptography import x509
from cryptography.x509.oid import NameOID

from router import tls as tlsfiles
from router.core.option_values import parse_host_port
from router.core.routes import RouteTable, Upstream
from router.core.status import GROUP
from router.doctor.checks import DOCTOR_GROUP, DOCTOR_USER
from router.doctor.snapshot import (
    CertInfo,
    Endpoints,
    FailureKind,
    Obj,
    RouterState,
    ServingProbe,
    TrustProbe,
    UpstreamService,
)

DISCOVERY_PATH = f"/apis/{GROUP}/v1beta1"
MAX_BODY = 1 << 20


# Alerts a TLS server sends when it refuses the client's certificate.
_CLIENT_CERT_ALERTS = (
    "ALERT_UNKNOWN_CA",
    "ALERT_BAD_CERTIFICATE",
    "ALERT_CERTIFICATE_REQUIRED",
    "ALERT_CERTIFICATE_UNKNOWN",
    "ALERT_HANDSHAKE_FAILURE",
    "ALERT_ACCESS_DENIED",
    "ALERT_UNSUPPORTED_CERTIFICATE",
)


@dataclass(frozen=True, slots=True)
class Network:
    """How probes treat the network: ``direct`` (a failed connection is a fault), ``try`` (a
    failed connection means "not reachable from here"), ``none`` (no probes)."""

    mode: str = "direct"
    timeout: float = 5.0


NOT_REACHABLE = (
    "not reachable from here (run doctor in the router's pod: kubectl -n metrics-router exec "
    "deploy/metrics-router -- metrics-router doctor --args-from-pid 1)"
)


# --------------------------------------------------------------------------- certificates


def _cn(name: x509.Name) -> str:
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[-1].value) if attrs else ""


def cert_info(cert: x509.Certificate) -> CertInfo:
    dns: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()
    with contextlib.suppress(x509.ExtensionNotFound):
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = tuple(san.get_values_for_type(x509.DNSName))
        ips = tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
    return CertInfo(
        subject_cn=_cn(cert.subject),
        issuer_cn=_cn(cert.issuer),
        not_before=cert.not_valid_before_utc.timestamp(),
        not_after=cert.not_valid_after_utc.timestamp(),
        dns_names=dns,
        ip_addresses=ips,
    )


def first_cn(pem: bytes) -> str:
    """CN of the first certificate of a PEM file ('' when unreadable)."""
    try:
        return _cn(x509.load_pem_x509_certificates(pem)[0].subject)
    except (ValueError, IndexError):
        return ""


# --------------------------------------------------------------------------- TLS probes


def _classify(exc: BaseException) -> tuple[FailureKind, str]:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "server-cert", f"certificate verify failed: {exc.verify_message or exc}"
    if isinstance(exc, ssl.SSLError):
        reason = str(exc.reason or "")
        if any(alert in reason for alert in _CLIENT_CERT_ALERTS):
            return "client-cert-refused", f"TLS alert {reason}"
        return "tls", f"{reason or type(exc).__name__}: {exc}"
    if isinstance(exc, TimeoutError):
        return "unreachable", "timed out"
    if isinstance(exc, socket.gaierror):
        return "unreachable", f"name not resolved: {exc.strerror}"
    if isinstance(exc, OSError):
        return "unreachable", exc.strerror or type(exc).__name__
    return "protocol", f"{type(exc).__name__}: {exc}"


def split_address(address: str) -> tuple[str, int]:
    """(host, port) of a HOST:PORT or [IPv6]:PORT the doctor joined (the one HOST:PORT parser)."""
    parsed = parse_host_port(address)
    if parsed is None:
        raise ValueError(f"no address in {address!r}")
    return parsed


def join_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass
class _Answer:
    status: int
    body: bytes


def _parse_http(raw: bytes) -> _Answer:
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise ValueError("no complete HTTP response head")
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        headers[k.strip().lower()] = v.strip()
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        body = _dechunk(body)
    return _Answer(int(parts[1]), body)


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return bytes(out)


@dataclass(frozen=True, slots=True)
class ClientTLS:
    """The router's client certificate as TLS contexts: ``default``, and ``tls12`` (at most
    TLS 1.2, where a server judges the client certificate inside the handshake; in TLS 1.3 it
    does so after the client has finished, so a refusal shows up only as a closed connection
    or an alert on the first read)."""

    default: ssl.SSLContext
    tls12: ssl.SSLContext


def client_tls(cert: bytes, key: bytes, ca: bytes | None) -> ClientTLS:
    """Raises tlsfiles.TLSFileError for files that make no context."""
    tls12 = tlsfiles.client_context(cert, key, ca)
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    return ClientTLS(tlsfiles.client_context(cert, key, ca), tls12)


async def _refuses_client_cert(
    host: str, port: int, tls: ClientTLS, server_name: str, within: float
) -> str | None:
    """Why a TLS 1.2 handshake with the router's certificate fails (None: it succeeds)."""
    try:
        await _handshake(join_address(host, port), tls.tls12, server_name, within)
    except ssl.SSLCertVerificationError:
        return None  # our side refused; not the question asked here
    except (OSError, TimeoutError, ssl.SSLError) as exc:
        return _classify(exc)[1] if isinstance(exc, ssl.SSLError) else type(exc).__name__
    return None


async def probe_trust(
    tenant: str,
    upstream: Upstream,
    tls: ClientTLS,
    network: Network,
    address: str | None = None,
) -> TrustProbe:
    """Handshake with the router's client certificate, then GET discovery as the doctor."""
    dial = address or join_address(upstream.host, upstream.port)
    base = TrustProbe(
        tenant=tenant, upstream=upstream.url, server_name=upstream.tls_name, address=dial
    )
    if network.mode == "none":
        return replace(base, skipped="--network none")
    host, port = split_address(dial)
    writer: asyncio.StreamWriter | None = None
    handshake_ok = False
    version: str | None = None
    peer: CertInfo | None = None
    chunks: list[bytes] = []
    try:
        reader, connected = await asyncio.wait_for(
            asyncio.open_connection(
                host, port, ssl=tls.default, server_hostname=upstream.tls_name, limit=MAX_BODY
            ),
            network.timeout,
        )
        writer = connected
        handshake_ok = True
        obj = connected.get_extra_info("ssl_object")
        version = obj.version() if obj is not None else None
        der = obj.getpeercert(binary_form=True) if obj is not None else None
        if der:
            peer = cert_info(x509.load_der_x509_certificate(der))
        request = (
            f"GET {DISCOVERY_PATH} HTTP/1.1\r\nHost: {upstream.tls_name}\r\n"
            f"Accept: application/json\r\nX-Remote-User: {DOCTOR_USER}\r\n"
            f"X-Remote-Group: {DOCTOR_GROUP}\r\nUser-Agent: metrics-router-doctor\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        connected.write(request)
        await connected.drain()
        while sum(map(len, chunks)) < MAX_BODY:
            raw = await asyncio.wait_for(reader.read(MAX_BODY), network.timeout)
            if not raw:
                break
            chunks.append(raw)
        error: BaseException | None = None
    except (OSError, TimeoutError, ssl.SSLError) as exc:
        error = exc
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)
    data = b"".join(chunks)
    if handshake_ok and not data and version == "TLSv1.3":
        # Closed (or reset) with no answer after a TLS 1.3 handshake: did the server refuse
        # the router's certificate after the handshake? A TLS 1.2 handshake tells for sure.
        refused = await _refuses_client_cert(host, port, tls, upstream.tls_name, network.timeout)
        if refused is not None:
            return replace(
                base,
                failure="client-cert-refused",
                message="a TLS 1.3 connection was closed without an answer, and a TLS 1.2 "
                f"handshake with the same certificate fails ({refused})",
                peer=peer,
            )
    if error is not None:
        kind, message = _classify(error)
        if kind == "unreachable" and network.mode == "try" and not handshake_ok:
            return replace(base, skipped=NOT_REACHABLE)
        if handshake_ok and kind != "client-cert-refused":
            kind = "protocol"  # connected, then the answer broke
        return replace(
            base,
            handshake_ok=handshake_ok and kind != "client-cert-refused",
            failure=kind,
            message=message,
            peer=peer,
        )
    try:
        answer = _parse_http(data)
    except ValueError as exc:
        return replace(base, handshake_ok=True, failure="protocol", message=str(exc), peer=peer)
    reason, message = "", ""
    with contextlib.suppress(ValueError, AttributeError):
        doc = json.loads(answer.body)
        if isinstance(doc, dict) and doc.get("kind") == "Status":
            reason = str(doc.get("reason") or "")
            message = str(doc.get("message") or "")
    return replace(
        base,
        handshake_ok=True,
        status=answer.status,
        status_reason=reason,
        status_message=message,
        peer=peer,
    )


async def _handshake(
    address: str, context: ssl.SSLContext, server_name: str, within: float
) -> bytes | None:
    host, port = split_address(address)
    _reader, writer = await asyncio.wait_for(
        asyncio.open_connection(host, port, ssl=context, server_hostname=server_name), within
    )
    try:
        obj = writer.get_extra_info("ssl_object")
        return obj.getpeercert(binary_form=True) if obj is not None else None
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 1.0)


async def probe_serving(
    address: str, server_name: str, ca_bundle: bytes | None, network: Network
) -> ServingProbe | str:
    """The serving certificate at ``address``, verified against ``ca_bundle`` as the
    aggregator verifies it; a string when the address is not reachable from here."""
    anything = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anything.check_hostname = False
    anything.verify_mode = ssl.CERT_NONE
    try:
        der = await _handshake(address, anything, server_name, network.timeout)
    except (OSError, TimeoutError, ssl.SSLError) as exc:
        kind, message = _classify(exc)
        if kind == "unreachable" and network.mode == "try":
            return NOT_REACHABLE
        return ServingProbe(address, server_name, None, error=message)
    leaf = cert_info(x509.load_der_x509_certificate(der)) if der else None
    if not ca_bundle:
        return ServingProbe(address, server_name, leaf, ca_error="the APIService has no caBundle")
    try:
        verify = ssl.create_default_context(cadata=ca_bundle.decode("ascii"))
    except (ssl.SSLError, ValueError, UnicodeDecodeError) as exc:
        return ServingProbe(address, server_name, leaf, ca_error=f"caBundle is not PEM: {exc}")
    try:
        await _handshake(address, verify, server_name, network.timeout)
    except (OSError, TimeoutError, ssl.SSLError) as exc:
        return ServingProbe(address, server_name, leaf, ca_error=_classify(exc)[1])
    return ServingProbe(address, server_name, leaf)


# --------------------------------------------------------------------------- the router


async def read_router(url: str, within: float) -> RouterState:
    base = url.rstrip("/")
    try:
        limits = aiohttp.ClientTimeout(total=within)
        async with aiohttp.ClientSession(timeout=limits) as http:
            async with http.get(base + "/metrics") as resp:
                if resp.status != 200:
                    return RouterState(base, error=f"GET /metrics: HTTP {resp.status}")
                text = await resp.text()
            routes: Obj | None = None
            async with http.get(base + "/routes") as resp:
                if resp.status == 200:
                    with contextlib.suppress(ValueError, aiohttp.ContentTypeError):
                        routes = await resp.json()
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        return RouterState(base, error=f"{type(exc).__name__}: {exc}")
    return RouterState(base, metrics_text=text, routes=routes)


# --------------------------------------------------------------------------- tenants' probes


async def probe_tenants(
    table: RouteTable,
    tls: ClientTLS,
    network: Network,
    endpoints: Mapping[str, Endpoints] | None = None,
    upstreams: Mapping[str, UpstreamService] | None = None,
) -> tuple[TrustProbe, ...]:
    """One TrustProbe per tenant, concurrently. In cluster mode a tenant's Service is dialled
    at its first ready endpoint (the pod), verified against the Service's DNS name."""

    async def one(name: str, upstream: Upstream) -> TrustProbe:
        address = None
        up = (upstreams or {}).get(name)
        if up is not None and up.namespace:
            eps = (endpoints or {}).get(f"{up.namespace}/{up.name}")
            if eps is None or not eps.ready:
                return TrustProbe(
                    name, upstream.url, upstream.tls_name, "-", skipped="no ready endpoint (see 4)"
                )
            address = eps.ready[0]
        return await probe_trust(name, upstream, tls, network, address)

    return tuple(await asyncio.gather(*(one(t.name, t.upstream) for t in table.tenants)))


def now() -> float:
    return time.time()
