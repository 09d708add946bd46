"""The doctor's I/O: read the cluster, probe TLS endpoints, scrape the router -> a Snapshot.

Every failure to read or connect is recorded in the snapshot (never raised), so the checks can
say what went wrong and what to do. This is the one module of the doctor that imports the
cluster adapters (router.kube, router.tenancy, router.manifests, router.policy_sync).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import socket
import ssl
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import aiohttp
from cryptography import x509
from cryptography.x509.oid import NameOID
from kubernetes_asyncio.client import ApiClient

from router import kube, tlsfiles
from router.config import TenancySettings
from router.doctor.checks import DOCTOR_GROUP, DOCTOR_USER, GROUP
from router.doctor.snapshot import (
    CertInfo,
    Cluster,
    Endpoints,
    FailureKind,
    Obj,
    Policies,
    PolicyObject,
    RequestHeader,
    RouterState,
    ServingProbe,
    Tenancy,
    TrustProbe,
    UpstreamService,
)
from router.manifests import (
    CILIUM_API,
    KIND_CILIUM,
    KIND_NETWORKPOLICY,
    NETWORKPOLICY_API,
    OWNER_SELECTOR,
    ManifestError,
    PolicyConfig,
    parse_policy_config,
    render,
    tenant_networks,
)
from router.policy_sync import discover_apiserver_cidrs, list_all, namespace_meta
from router.routes import RouteTable, Upstream
from router.tenancy import NamespaceInfo, ServiceInfo, resolve, tenant_of

DISCOVERY_PATH = f"/apis/{GROUP}/v1beta1"
MAX_BODY = 1 << 20
MAX_SERVING_PROBES = 3

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
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _join(host: str, port: int) -> str:
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
        await _handshake(_join(host, port), tls.tls12, server_name, within)
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
    dial = address or _join(upstream.host, upstream.port)
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


async def _proxy_get(api: ApiClient, path: str, within: float) -> tuple[int, bytes]:
    response = await api.call_api(
        path,
        "GET",
        header_params={"Accept": "*/*"},
        auth_settings=["BearerToken"],
        _preload_content=False,
        _request_timeout=aiohttp.ClientTimeout(total=within),
    )
    async with response:
        return int(response.status), await response.read()


async def read_router_via_api(
    api: ApiClient, namespace: str, service: str, within: float, port: str = "metrics"
) -> RouterState:
    """The router's metrics endpoint through the kube-apiserver's services proxy (for a
    workstation, where the pods' network is not reachable; needs RBAC get services/proxy)."""
    base = f"/api/v1/namespaces/{namespace}/services/http:{service}:{port}/proxy"
    url = f"services proxy {namespace}/{service}:{port}"
    try:
        status, body = await _proxy_get(api, base + "/metrics", within)
        if status != 200:
            return RouterState(url, error=f"GET /metrics: HTTP {status}: {_status_message(body)}")
        routes: Obj | None = None
        rstatus, rbody = await _proxy_get(api, base + "/routes", within)
        if rstatus == 200:
            with contextlib.suppress(ValueError):
                routes = json.loads(rbody)
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        return RouterState(url, error=f"{type(exc).__name__}: {exc}")
    return RouterState(url, metrics_text=body.decode("utf-8", "replace"), routes=routes)


def _status_message(body: bytes) -> str:
    try:
        doc = json.loads(body)
        return str(doc.get("message") or doc.get("reason") or "")
    except (ValueError, AttributeError):
        return body[:200].decode("utf-8", "replace")


# --------------------------------------------------------------------------- the cluster


def load_policy_config(path: Path | None) -> PolicyConfig:
    """The `--policy-config` file (as `serve` and `render` read it); ValueError listing every
    problem."""
    if path is None:
        return PolicyConfig()
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"--policy-config: {exc}") from exc
    try:
        return parse_policy_config(text)
    except ManifestError as exc:
        raise ValueError("; ".join(f"--policy-config {path}: {e}" for e in exc.errors)) from exc


@dataclass(frozen=True, slots=True)
class ClusterInputs:
    """What doctor was told about the installation (from its flags)."""

    tenancy: TenancySettings
    apiservice_name: str
    router_namespace: str
    router_service: str
    requestheader: RequestHeader
    policy_kind: str  # auto | networkpolicy | cilium | none
    policy_config: PolicyConfig = field(default_factory=PolicyConfig)


async def _get(api: ApiClient, path: str) -> Any:
    try:
        return await kube.request(api, "GET", path)
    except kube.KubeNotFound:
        return None


def endpoints_of(slices: Iterable[Obj], port_name: str | None) -> Endpoints:
    """Ready and not-ready ``address:port`` of a Service port (by name; None = any)."""
    ready: list[str] = []
    not_ready: list[str] = []
    for s in slices:
        ports = [
            p.get("port")
            for p in s.get("ports") or ()
            if port_name is None or (p.get("name") or None) == port_name
        ]
        for ep in s.get("endpoints") or ():
            is_ready = (ep.get("conditions") or {}).get("ready") is not False
            for addr in ep.get("addresses") or ():
                for port in ports:
                    if isinstance(port, int):
                        (ready if is_ready else not_ready).append(_join(str(addr), port))
    return Endpoints(tuple(sorted(set(ready))), tuple(sorted(set(not_ready))))


async def _slices(api: ApiClient, namespace: str, service: str) -> list[dict[str, Any]]:
    path = kube.resource_path(
        "endpointslices", api_version="discovery.k8s.io/v1", namespace=namespace
    )
    return await list_all(api, path, [("labelSelector", f"kubernetes.io/service-name={service}")])


def _service_port_name(service: Obj | None, port: int) -> str | None:
    for p in ((service or {}).get("spec") or {}).get("ports") or ():
        if p.get("port") == port:
            return p.get("name") or None
    return None


def untenanted_reason(ns: NamespaceInfo, settings: TenancySettings) -> str:
    """Why no strategy gave ``ns`` a tenant (the strategies in order)."""
    parts = []
    for s in settings.strategies:
        if s == "hnc":
            key, value = settings.tenant_root_label
            parts.append(f"hnc: no ancestor labelled {key}={value}")
        elif s == "label":
            if settings.tenant_label:
                parts.append(f"label: no {settings.tenant_label} label")
        elif s == "pattern":
            parts.append(f"pattern: the name does not match {settings.tenant_pattern}")
    return "; ".join(parts) or "no strategy"


async def read_cluster(
    api: ApiClient, inputs: ClusterInputs, network: Network
) -> tuple[Cluster, RouteTable]:
    """Everything the cluster checks need; read errors are recorded in ``Cluster.errors``."""
    errors: dict[str, str] = {}
    apiservices: list[Obj] = []
    try:
        body = await kube.request(
            api, "GET", kube.resource_path("apiservices", api_version="apiregistration.k8s.io/v1")
        )
        apiservices = [
            a
            for a in (body or {}).get("items") or ()
            if (a.get("spec") or {}).get("group") == GROUP
        ]
    except kube.KubeUnreachable:
        raise  # nothing else will answer either: the caller reports the API unreachable
    except kube.KubeError as exc:
        errors["apiservices"] = str(exc)
    ns, name = inputs.router_namespace, inputs.router_service
    ours = next((a for a in apiservices if a["metadata"]["name"] == inputs.apiservice_name), None)
    router_service: Obj | None = None
    router_eps: Endpoints | None = None
    serving: list[ServingProbe] = []
    serving_skipped: str | None = None
    try:
        router_service = await _get(api, kube.resource_path("services", namespace=ns, name=name))
        if router_service is not None:
            port = int(((ours or {}).get("spec") or {}).get("service", {}).get("port") or 443)
            router_eps = endpoints_of(
                await _slices(api, ns, name), _service_port_name(router_service, port)
            )
    except kube.KubeError as exc:
        errors["router-service"] = str(exc)
    if network.mode == "none":
        serving_skipped = "--network none"
    elif ours is None:
        serving_skipped = f"no APIService {inputs.apiservice_name} to take the caBundle from"
    elif router_eps is not None:
        ca = _ca_bundle(ours)
        for address in router_eps.ready[:MAX_SERVING_PROBES]:
            got = await probe_serving(address, f"{name}.{ns}.svc", ca, network)
            if isinstance(got, str):
                serving_skipped = got
                serving = []
                break
            serving.append(got)
    configmap: Obj | None = None
    try:
        configmap = await _get(
            api,
            kube.resource_path(
                "configmaps", namespace="kube-system", name="extension-apiserver-authentication"
            ),
        )
    except kube.KubeError as exc:
        errors["configmap"] = str(exc)

    tenancy, table, services, raw_ns = await _read_tenancy(api, inputs.tenancy, errors)
    endpoints: dict[str, Endpoints] = {}
    upstreams: dict[str, UpstreamService] = {}
    for tenant in table.tenants:
        up = tenant.upstream
        svc = next((s for s in services if f"{s.name}.{s.namespace}.svc" == up.tls_name), None)
        if svc is None:
            upstreams[tenant.name] = UpstreamService("", "", up.url, up.tls_name)
            continue
        port_name = next((n for n, p in svc.ports if p == up.port), None)
        try:
            eps = endpoints_of(await _slices(api, svc.namespace, svc.name), port_name)
        except kube.KubeError as exc:
            errors.setdefault("endpoints", str(exc))
            eps = Endpoints()
        endpoints[svc.key] = eps
        ports = tuple(sorted({split_address(a)[1] for a in eps.ready + eps.not_ready}))
        upstreams[tenant.name] = UpstreamService(
            svc.namespace, svc.name, up.url, up.tls_name, ports
        )
    tenancy = replace(tenancy, upstreams=MappingProxyType(upstreams))

    policies: list[Policies] = []
    if inputs.policy_kind != "none" and "tenancy" not in errors:
        try:
            policies = await _read_policies(api, inputs, table, tenancy, raw_ns)
        except kube.KubeError as exc:
            errors["policies"] = str(exc)
    deployments: list[dict[str, Any]] = []
    try:
        deployments = await list_all(
            api,
            kube.resource_path("deployments", api_version="apps/v1"),
            [
                (
                    "labelSelector",
                    "app.kubernetes.io/name in (keda-operator,keda-operator-metrics-apiserver)",
                )
            ],
        )
    except kube.KubeError as exc:
        errors["deployments"] = str(exc)
    cluster = Cluster(
        apiservice_name=inputs.apiservice_name,
        router_namespace=ns,
        router_service_name=name,
        apiservices=tuple(apiservices),
        router_service=router_service,
        router_endpoints=router_eps,
        serving=tuple(serving),
        serving_skipped=serving_skipped,
        auth_configmap=configmap,
        requestheader=inputs.requestheader,
        tenancy=tenancy,
        endpoints=MappingProxyType(endpoints),
        policies=tuple(policies),
        policy_kind=inputs.policy_kind,
        deployments=tuple(deployments),
        errors=MappingProxyType(errors),
    )
    return cluster, table


def _ca_bundle(apiservice: Obj) -> bytes | None:
    raw = (apiservice.get("spec") or {}).get("caBundle")
    if not raw:
        return None
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        return b"not base64"


async def _read_tenancy(
    api: ApiClient, settings: TenancySettings, errors: dict[str, str]
) -> tuple[Tenancy, RouteTable, list[ServiceInfo], list[dict[str, Any]]]:
    try:
        ns_query = (
            [("labelSelector", settings.namespace_selector)] if settings.namespace_selector else []
        )
        raw_ns = await list_all(api, kube.resource_path("namespaces"), ns_query)
        services: list[ServiceInfo] = []
        if settings.upstream_template is None:
            raw_svc = await list_all(
                api,
                kube.resource_path("services"),
                [("labelSelector", settings.upstream_service_selector)],
            )
            services = [ServiceInfo.from_object(s) for s in raw_svc]
    except kube.KubeError as exc:
        errors["tenancy"] = f"listing namespaces and Services: {exc}"
        return Tenancy(selector=settings.namespace_selector), RouteTable(), [], []
    infos = [NamespaceInfo.from_object(n) for n in raw_ns]
    resolution = resolve(infos, services, settings)
    by_name = {i.name: i for i in infos}
    untenanted = {
        i.name: untenanted_reason(i, settings)
        for i in infos
        if tenant_of(i, by_name, settings) is None
    }
    tenancy = Tenancy(
        tenants=resolution.tenants,
        unrouted=resolution.unrouted,
        conflicts=tuple(c.message for c in resolution.conflicts),
        untenanted=MappingProxyType(untenanted),
        selector=settings.namespace_selector,
        template=settings.upstream_template,
    )
    return tenancy, resolution.table, services, raw_ns


def _policy_key(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    where = f"{meta['namespace']}/" if meta.get("namespace") else ""
    return f"{obj.get('kind')}/{where}{meta.get('name')}"


async def _read_policies(
    api: ApiClient,
    inputs: ClusterInputs,
    table: RouteTable,
    tenancy: Tenancy,
    raw_ns: Sequence[Obj],
) -> list[Policies]:
    kinds = (
        (KIND_NETWORKPOLICY, KIND_CILIUM) if inputs.policy_kind == "auto" else (inputs.policy_kind,)
    )
    metas = {m.name: m for m in map(namespace_meta, raw_ns)}
    out: list[Policies] = []
    config = inputs.policy_config
    for kind in kinds:
        api_version = NETWORKPOLICY_API[0] if kind == KIND_NETWORKPOLICY else CILIUM_API[0]
        resource = (
            "networkpolicies"
            if kind == KIND_NETWORKPOLICY
            else ("ciliumclusterwidenetworkpolicies")
        )
        try:
            actual = await list_all(
                api,
                kube.resource_path(resource, api_version=api_version),
                [("labelSelector", OWNER_SELECTOR)],
            )
        except kube.KubeNotFound:
            out.append(Policies(kind, MappingProxyType({}), (), available=False))
            continue
        settings = config.settings
        if inputs.policy_kind == "auto" and not actual:
            out.append(Policies(kind, MappingProxyType({}), ()))
            continue
        render_error = None
        wanted: tuple[PolicyObject, ...] = ()
        try:
            if kind == KIND_NETWORKPOLICY and not settings.apiserver_cidrs:
                settings = replace(settings, apiserver_cidrs=await discover_apiserver_cidrs(api))
            networks, _warnings = tenant_networks(table, config, metas, tenancy.tenants)
            rendering = render(networks, settings, kind)
            wanted = tuple(
                PolicyObject(_policy_key(m.body), m.body, m.tenant) for m in rendering.manifests
            )
        except ManifestError as exc:
            render_error = "; ".join(exc.errors)
        except kube.KubeError as exc:
            render_error = f"the kube-apiserver's addresses: {exc}"
        out.append(
            Policies(
                kind,
                MappingProxyType({_policy_key(o): o for o in actual}),
                wanted,
                render_error=render_error,
                metrics_server_port=settings.metrics_server_port,
            )
        )
    return out


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
