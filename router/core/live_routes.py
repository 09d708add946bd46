"""The route table in force, swapped whole, and what dashboards see of it at /routes.

The proxy reads ``live.table`` once per request: a request sees the old table or the new one,
never a mix. ``swap`` also keeps, per tenant, since when its route has been as it is, and the
proxy records each tenant's last upstream error here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from router.core.option_values import format_duration
from router.core.routes import RouteTable, Tenant
from router.core.stale import TenantView


@dataclass(frozen=True, slots=True)
class UpstreamErrorRecord:
    at: float
    kind: str
    message: str


class LiveRoutes:
    def __init__(self, table: RouteTable | None = None, *, clock: Callable[[], float] = time.time):
        self._clock = clock
        self.table = table or RouteTable()
        self.source = "none"
        self.updated_at = clock()
        self._since: dict[str, tuple[Tenant, float]] = {
            t.name: (t, self.updated_at) for t in self.table.tenants
        }
        self.last_error: dict[str, UpstreamErrorRecord] = {}
        self._listeners: list[Callable[[RouteTable], None]] = []
        # tenant -> its stale answers (set by the proxy that serves them)
        self.stale_view: Callable[[str], TenantView] | None = None

    def on_swap(self, listener: Callable[[RouteTable], None]) -> None:
        self._listeners.append(listener)

    def swap(self, table: RouteTable, source: str) -> None:
        now = self._clock()
        since: dict[str, tuple[Tenant, float]] = {}
        for tenant in table.tenants:
            old = self._since.get(tenant.name)
            since[tenant.name] = old if old is not None and old[0] == tenant else (tenant, now)
        self._since = since
        self.last_error = {k: v for k, v in self.last_error.items() if k in since}
        self.table = table
        self.source = source
        self.updated_at = now
        for listener in self._listeners:
            listener(table)

    def record_error(self, tenant: str, kind: str, message: str) -> None:
        self.last_error[tenant] = UpstreamErrorRecord(self._clock(), kind, message)

    def _stale_snapshot(self, tenant: str) -> dict[str, Any]:
        if self.stale_view is None:
            return {}
        return {"staleAnswers": _stale_json(self.stale_view(tenant))}

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready view: tenants, namespaces, upstream, since when, last upstream error."""
        tenants = []
        for tenant in self.table.tenants:
            err = self.last_error.get(tenant.name)
            tenants.append(
                {
                    "tenant": tenant.name,
                    "namespaces": list(tenant.namespaces),
                    "upstream": tenant.upstream.url,
                    "serverName": tenant.upstream.tls_name,
                    "since": _rfc3339(self._since[tenant.name][1]),
                    "lastUpstreamError": None
                    if err is None
                    else {"at": _rfc3339(err.at), "kind": err.kind, "message": err.message},
                    **self._stale_snapshot(tenant.name),
                }
            )
        default = self.table.default
        return {
            "source": self.source,
            "updatedAt": _rfc3339(self.updated_at),
            "namespaces": self.table.namespace_count,
            "tenants": tenants,
            "default": None if default is None else default.upstream.url,
        }


def _stale_json(view: TenantView) -> dict[str, Any]:
    return {
        "enabled": view.serve_stale_for > 0,
        "serveStaleFor": format_duration(view.serve_stale_for),
        "entries": view.entries,
        "lastServed": None if view.last_served is None else _rfc3339(view.last_served),
    }


def _rfc3339(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
