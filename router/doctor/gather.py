"""The doctor's cluster reads: everything the cluster checks judge, as a snapshot.

Every failure to read is recorded in ``Cluster.errors`` (never raised), except an API that does
not answer at all (``client.KubeUnreachable``), which the caller reports once. This is the one
module of the doctor that imports the cluster adapters (router.cluster, router.core.tenancy,
router.core.policy).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import aiohttp
from kubernetes_asyncio.client import ApiClient

from router.cluster import client as kube
from router.cluster.reads import (
    discover_apiserver_cidrs,
    list_all,
    list_tenancy_inputs,
    namespace_meta,
)
from router.core.policy import (
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
from router.core.routes import RouteTable
from router.core.status import GROUP
from router.core.tenancy import NamespaceInfo, ServiceInfo, resolve, tenant_of
from router.doctor.probes import Network, join_address, probe_serving, split_address
from router.doctor.snapshot import (
    Cluster,
    Endpoints,
    Obj,
    Policies,
    PolicyObject,
    RequestHeader,
    RouterState,
    ServingProbe,
    Tenancy,
    UpstreamService,
)
from router.settings import TenancySettings

MAX_SERVING_PROBES = 3


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
                        (ready if is_ready else not_ready).append(join_address(str(addr), port))
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
        raw_ns, services = await list_tenancy_inputs(api, settings)
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


@dataclass(frozen=True, slots=True)
class ClusterRead:
    """What :func:`read` got: the cluster (None with ``error`` when the API cannot be used),
    the routes as `serve` would resolve them, and the router's metrics when asked."""

    cluster: Cluster | None
    table: RouteTable = field(default_factory=RouteTable)
    router: RouterState | None = None
    error: str | None = None


async def read(
    kubeconfig: Path | None, inputs: ClusterInputs, network: Network, *, router_via_api: bool
) -> ClusterRead:
    """Connect (kubeconfig, else in-cluster), read the cluster, and with ``router_via_api``
    the router's metrics through the services proxy."""
    try:
        api = await kube.api_client(kubeconfig)
    except kube.KubeError as exc:
        return ClusterRead(None, error=str(exc))
    try:
        try:
            cluster, table = await read_cluster(api, inputs, network)
        except kube.KubeUnreachable as exc:
            return ClusterRead(None, error=str(exc))
        router = None
        if router_via_api:
            router = await read_router_via_api(
                api, inputs.router_namespace, inputs.router_service, network.timeout
            )
        return ClusterRead(cluster, table, router)
    finally:
        await api.close()
