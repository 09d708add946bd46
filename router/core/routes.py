"""Route table: namespace -> tenant -> upstream (pure, immutable).

A RouteTable is built once (from a routes file or from the cluster's tenancy) and swapped
whole in the proxy, so a request sees either the old table or the new one, never a mix.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

import yaml

from router.core.errors import ConfigError
from router.core.names import is_dns1123_label, is_dns1123_subdomain
from router.core.option_values import parse_duration

# libyaml's loader when PyYAML was built with it: the pure-Python one takes most of the load
# time of a 10,000-namespace routes file.
_BaseSafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class DuplicateKeyError(yaml.MarkedYAMLError):
    """A mapping names the same key twice (YAML 1.2 forbids it; PyYAML keeps the last)."""


class _SafeLoader(_BaseSafeLoader):  # type: ignore[misc, valid-type]
    """The safe loader, refusing duplicate keys: a tenant written twice would otherwise
    silently replace the first, and that tenant's namespaces would get 404."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _value in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if first is not None:
                raise DuplicateKeyError(
                    None,
                    None,
                    f"duplicate key {key!r} (first given on line {first.start_mark.line + 1}; "
                    "YAML keeps only the last, so the first would be lost)",
                    key_node.start_mark,
                )
            seen[key] = key_node
        mapping: dict[Any, Any] = super().construct_mapping(node, deep=deep)
        return mapping


class RoutesError(ConfigError, ValueError):
    """A routes document or tenant set that cannot be turned into a RouteTable."""


@dataclass(frozen=True, slots=True)
class Upstream:
    """An upstream KEDA metrics server: https URL and the TLS name its certificate carries."""

    url: str
    host: str
    port: int
    server_name: str | None = None

    @classmethod
    def parse(cls, url: str, server_name: str | None = None) -> Upstream:
        """Validate an https://HOST[:PORT] URL; raise RoutesError otherwise."""
        try:
            parts = urlsplit(url)
            port = parts.port or 443
        except ValueError as exc:
            raise RoutesError([f"upstream {url!r}: {exc}"]) from exc
        errors = []
        if parts.scheme != "https":
            errors.append(f"upstream {url!r}: must be an https:// URL")
        host = parts.hostname or ""
        if not host:
            errors.append(f"upstream {url!r}: has no host")
        if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
            errors.append(f"upstream {url!r}: must be https://HOST[:PORT] with no path or query")
        if server_name is not None and not is_dns1123_subdomain(server_name):
            errors.append(f"serverName {server_name!r}: not a valid DNS name")
        if errors:
            raise RoutesError(errors)
        return cls(
            url=f"https://{_host_for_url(host)}:{port}",
            host=host,
            port=port,
            server_name=server_name,
        )

    @property
    def tls_name(self) -> str:
        """The name the upstream certificate is verified against."""
        return self.server_name or self.host


def _host_for_url(host: str) -> str:
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]"
    except ValueError:
        pass
    return host


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    namespaces: tuple[str, ...]
    upstream: Upstream
    serve_stale_for: float | None = None  # seconds; None = the --serve-stale-for default


@dataclass(frozen=True, slots=True)
class Route:
    tenant: str
    upstream: Upstream


DEFAULT_TENANT = "(default)"


@dataclass(frozen=True)
class RouteTable:
    """Immutable namespace -> Route map plus the tenants it came from."""

    tenants: tuple[Tenant, ...] = ()
    default: Route | None = None
    by_namespace: Mapping[str, Route] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def from_tenants(cls, tenants: Iterable[Tenant], default: Upstream | None = None) -> RouteTable:
        """Build a table; a namespace claimed by two tenants is an error (RoutesError)."""
        ordered = tuple(sorted(tenants, key=lambda t: t.name))
        by_ns: dict[str, Route] = {}
        owner: dict[str, str] = {}
        errors = []
        for tenant in ordered:
            route = Route(tenant=tenant.name, upstream=tenant.upstream)
            for ns in tenant.namespaces:
                if ns in owner and owner[ns] != tenant.name:
                    errors.append(
                        f"namespace {ns!r} is claimed by tenants {owner[ns]!r} and {tenant.name!r}"
                    )
                    continue
                owner[ns] = tenant.name
                by_ns[ns] = route
        if errors:
            raise RoutesError(errors)
        default_route = Route(DEFAULT_TENANT, default) if default is not None else None
        return cls(tenants=ordered, default=default_route, by_namespace=MappingProxyType(by_ns))

    def lookup(self, namespace: str) -> Route | None:
        return self.by_namespace.get(namespace, self.default)

    @property
    def namespace_count(self) -> int:
        return len(self.by_namespace)

    def tenant(self, name: str) -> Tenant | None:
        for t in self.tenants:
            if t.name == name:
                return t
        return None

    def upstreams(self) -> set[Upstream]:
        ups = {t.upstream for t in self.tenants}
        if self.default is not None:
            ups.add(self.default.upstream)
        return ups


def parse_routes_file(text: str, default: Upstream | None = None) -> RouteTable:
    """Parse the YAML routes file format of DESIGN.md; RoutesError lists every problem.

    ```yaml
    tenants:
      a:
        namespaces: [tenant-a, tenant-a--dev]
        upstream: https://127.0.0.1:7001
        serverName: keda-operator-metrics-apiserver.tenant-a--sys.svc   # optional
        serveStaleFor: 30s   # optional: overrides --serve-stale-for for this tenant
    ```
    """
    try:
        doc = yaml.load(text, Loader=_SafeLoader)  # a safe loader (CSafeLoader or SafeLoader)
    except DuplicateKeyError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark is not None else 0
        raise RoutesError([f"line {line}: {exc.problem}"]) from exc
    except yaml.YAMLError as exc:
        raise RoutesError([f"not valid YAML: {' '.join(str(exc).split())}"]) from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("tenants"), dict):
        raise RoutesError(["want a mapping with a 'tenants' mapping at the top"])
    unknown = set(doc) - {"tenants", "default"}
    errors = [f"unknown top-level key {k!r}" for k in sorted(map(str, unknown))]
    tenants: list[Tenant] = []
    for name, spec in doc["tenants"].items():
        tenant, tenant_errors = _parse_tenant(name, spec)
        errors.extend(tenant_errors)
        if tenant is not None:
            tenants.append(tenant)
    if doc.get("default") is not None:
        spec = doc["default"]
        if not isinstance(spec, dict) or not isinstance(spec.get("upstream"), str):
            errors.append("default: want a mapping with 'upstream' (and optional 'serverName')")
        else:
            try:
                default = Upstream.parse(spec["upstream"], _opt_str(spec.get("serverName")))
            except RoutesError as exc:
                errors.extend(f"default: {e}" for e in exc.errors)
    if errors:
        raise RoutesError(errors)
    return RouteTable.from_tenants(tenants, default=default)


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _parse_tenant(name: Any, spec: Any) -> tuple[Tenant | None, list[str]]:
    where = f"tenants.{name}"
    errors: list[str] = []
    if not isinstance(name, str) or not is_dns1123_label(name):
        errors.append(f"{where}: tenant name must be a DNS-1123 label")
    if not isinstance(spec, dict):
        return None, [*errors, f"{where}: want a mapping with 'namespaces' and 'upstream'"]
    unknown = set(spec) - {"namespaces", "upstream", "serverName", "serveStaleFor"}
    errors.extend(f"{where}: unknown key {k!r}" for k in sorted(map(str, unknown)))
    namespaces = spec.get("namespaces")
    if not isinstance(namespaces, list) or not namespaces:
        errors.append(f"{where}.namespaces: want a non-empty list of namespace names")
        namespaces = []
    for ns in namespaces:
        if not isinstance(ns, str) or not is_dns1123_label(ns):
            errors.append(f"{where}.namespaces: {ns!r} is not a valid namespace name")
    if len(set(map(str, namespaces))) != len(namespaces):
        errors.append(f"{where}.namespaces: lists a namespace twice")
    upstream: Upstream | None = None
    url = spec.get("upstream")
    server_name = spec.get("serverName")
    if not isinstance(url, str):
        errors.append(f"{where}.upstream: want an https:// URL")
    elif server_name is not None and not isinstance(server_name, str):
        errors.append(f"{where}.serverName: want a DNS name")
    else:
        try:
            upstream = Upstream.parse(url, server_name)
        except RoutesError as exc:
            errors.extend(f"{where}: {e}" for e in exc.errors)
    stale_for = spec.get("serveStaleFor")
    if stale_for is not None:
        try:
            if isinstance(stale_for, bool) or not isinstance(stale_for, str | int | float):
                raise ValueError("want a duration such as 30s")
            stale_for = parse_duration(str(stale_for))
        except ValueError as exc:
            errors.append(f"{where}.serveStaleFor: {exc}")
    if errors or upstream is None:
        return None, errors
    return Tenant(name, tuple(namespaces), upstream, stale_for), []
