"""Tenant -> upstream: a URL template, or a discovered KEDA metrics Service (pure, memoised)."""

from __future__ import annotations

from functools import lru_cache

from router.core.routes import RoutesError, Upstream
from router.core.tenancy.model import ServiceInfo


def service_upstream(svc: ServiceInfo) -> Upstream | str:
    """``https://<svc>.<ns>.svc:<port>`` (TLS name ``<svc>.<ns>.svc``), or why not."""
    port = svc.port()
    if port is None:
        return f"Service {svc.key} has no ports"
    return _service_url(svc.namespace, svc.name, port)


# Parsing and validating an upstream URL costs tens of microseconds; with 1,000 tenants that
# would dominate every recompute, so both builders are memoised (pure functions of their args).
@lru_cache(maxsize=16384)
def _service_url(namespace: str, name: str, port: int) -> Upstream | str:
    host = f"{name}.{namespace}.svc"
    try:
        return Upstream.parse(f"https://{host}:{port}", host)
    except RoutesError as exc:
        return f"Service {namespace}/{name}: {exc}"


@lru_cache(maxsize=16384)
def template_upstream(template: str, tenant: str) -> Upstream | str:
    """``template.format(tenant=T)`` as an upstream, or why not."""
    try:
        url = template.format(tenant=tenant)
    except (KeyError, IndexError, ValueError) as exc:
        return f"--upstream-template cannot be formatted: {exc!r}"
    try:
        return Upstream.parse(url)
    except RoutesError as exc:
        return f"--upstream-template gives {exc}"
