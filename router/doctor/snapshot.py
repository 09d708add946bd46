"""What `metrics-router doctor` read: the cluster snapshot and the probes' results (pure data).

Frozen dataclasses only; Kubernetes objects are kept as the raw JSON dicts the API returned
(treat them as read-only). ``router.doctor.gather`` fills a :class:`Snapshot`;
``router.doctor.checks`` judges it without any I/O, so every check is tested with a table of
snapshots.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

Obj = Mapping[str, Any]

_EMPTY: Mapping[str, Any] = MappingProxyType({})

# Why a TLS probe failed, from the doctor's side of the connection.
FailureKind = Literal[
    "unreachable",  # no TCP connection (refused, no route, DNS, timeout)
    "server-cert",  # we refused the peer's serving certificate
    "client-cert-refused",  # the peer refused the router's client certificate (TLS alert)
    "tls",  # any other TLS failure
    "protocol",  # no valid HTTP answer
]


@dataclass(frozen=True, slots=True)
class CertInfo:
    """The parts of a certificate the checks show."""

    subject_cn: str
    issuer_cn: str
    not_before: float  # Unix time
    not_after: float
    dns_names: tuple[str, ...] = ()
    ip_addresses: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ServingProbe:
    """The router's serving certificate as the aggregator sees it at one endpoint.

    ``leaf`` comes from a handshake that verifies nothing; ``ca_error`` is the result of a second
    handshake verifying the chain against the APIService's caBundle with server name
    ``server_name``, as the aggregator does (None = verified).
    """

    address: str  # host:port dialled
    server_name: str
    leaf: CertInfo | None
    error: str | None = None  # the first handshake failed: why
    ca_error: str | None = None


@dataclass(frozen=True, slots=True)
class TrustProbe:
    """One tenant's trust chain, tested for real: handshake with the router's client
    certificate, then a discovery GET carrying the doctor's read-only identity."""

    tenant: str
    upstream: str  # https URL
    server_name: str
    address: str  # host:port dialled
    skipped: str | None = None  # set when not probed: why
    handshake_ok: bool = False
    failure: FailureKind | None = None
    message: str = ""
    status: int | None = None  # HTTP status of the discovery GET
    status_reason: str = ""  # the Status body's reason, when the answer is a Status
    status_message: str = ""
    peer: CertInfo | None = None


@dataclass(frozen=True, slots=True)
class Endpoints:
    """A Service's endpoints: ready and not-ready ``address:port`` entries."""

    ready: tuple[str, ...] = ()
    not_ready: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class UpstreamService:
    """The Service a tenant's route points at (from cluster discovery)."""

    namespace: str
    name: str
    url: str
    server_name: str
    ports: tuple[int, ...] = ()  # endpoint (target) ports seen on its EndpointSlices


@dataclass(frozen=True, slots=True)
class Tenancy:
    """How the namespaces resolve to tenants, as `serve` would resolve them now."""

    tenants: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: _EMPTY)
    upstreams: Mapping[str, UpstreamService] = field(default_factory=lambda: _EMPTY)
    unrouted: Mapping[str, str] = field(default_factory=lambda: _EMPTY)  # tenant -> why
    conflicts: tuple[str, ...] = ()  # one message each
    untenanted: Mapping[str, str] = field(default_factory=lambda: _EMPTY)  # namespace -> why
    selector: str | None = None  # --namespace-selector
    template: str | None = None  # --upstream-template (no Services then)


@dataclass(frozen=True, slots=True)
class PolicyObject:
    """A rendered policy object: ``key`` such as ``NetworkPolicy/tenant-a--sys/name``."""

    key: str
    body: Obj
    tenant: str | None


@dataclass(frozen=True, slots=True)
class Policies:
    """Owned policies of one kind in the cluster and what the router would render now."""

    kind: str  # "networkpolicy" | "cilium"
    actual: Mapping[str, Obj]  # key -> object (owned ones: carrying the ownership label)
    wanted: tuple[PolicyObject, ...]
    available: bool = True  # False: the API has no such resource (CRD not installed)
    render_error: str | None = None
    metrics_server_port: int = 6443  # the port the policies let the router reach


@dataclass(frozen=True, slots=True)
class RequestHeader:
    """The requestheader settings doctor was given (the flags `serve` runs with)."""

    from_flags: bool = False
    client_ca_pem: bytes | None = None
    allowed_names: tuple[str, ...] = ()
    username_headers: tuple[str, ...] = ("X-Remote-User",)
    group_headers: tuple[str, ...] = ("X-Remote-Group",)
    extra_headers_prefixes: tuple[str, ...] = ("X-Remote-Extra-",)


@dataclass(frozen=True, slots=True)
class Cluster:
    """Everything read from the Kubernetes API (cluster mode)."""

    apiservice_name: str
    router_namespace: str
    router_service_name: str
    apiservices: tuple[Obj, ...] = ()  # every APIService of the group
    router_service: Obj | None = None
    router_endpoints: Endpoints | None = None
    serving: tuple[ServingProbe, ...] = ()
    serving_skipped: str | None = None  # why the serving certificate was not probed
    auth_configmap: Obj | None = None
    requestheader: RequestHeader = field(default_factory=RequestHeader)
    tenancy: Tenancy = field(default_factory=Tenancy)
    endpoints: Mapping[str, Endpoints] = field(default_factory=lambda: _EMPTY)  # "ns/name"
    policies: tuple[Policies, ...] = ()
    policy_kind: str = "auto"  # auto | networkpolicy | cilium | none
    deployments: tuple[Obj, ...] = ()  # KEDA Deployments in the tenants' namespaces
    errors: Mapping[str, str] = field(default_factory=lambda: _EMPTY)  # what -> read error


@dataclass(frozen=True, slots=True)
class RoutesFile:
    path: str
    tenants: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: _EMPTY)
    error: str | None = None


@dataclass(frozen=True, slots=True)
class RouterState:
    """The router's metrics endpoint: ``/metrics`` text and ``/routes`` JSON."""

    url: str
    metrics_text: str | None = None
    routes: Obj | None = None
    error: str | None = None  # the endpoint could not be read
    skipped: str | None = None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything the checks judge. ``cluster`` is None in routes-file mode (``routes_file``
    set) or when the API could not be reached (``cluster_error``)."""

    now: float
    router_cn: str = "metrics-router"  # CN of the router's client certificate
    cluster: Cluster | None = None
    cluster_error: str | None = None
    routes_file: RoutesFile | None = None
    trust: tuple[TrustProbe, ...] = ()
    trust_skipped: str | None = None
    router: RouterState | None = None
    expiry_warning: float = 7 * 86400.0  # certificates closer than this to expiry fail
    recent_error_window: float = 600.0  # upstream errors younger than this fail
