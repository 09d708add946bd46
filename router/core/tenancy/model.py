"""What tenancy reads (namespaces, Services) and what it answers (conflicts, a resolution)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from router.core.option_values import parse_duration
from router.core.routes import RouteTable

# On a tenant's metrics Service: overrides --serve-stale-for for that tenant ("30s", "0").
SERVE_STALE_ANNOTATION = "metrics-router.io/serve-stale-for"

EMPTY: Mapping[str, str] = MappingProxyType({})


def labels_of(obj: Mapping[str, Any]) -> Mapping[str, str]:
    """``metadata.labels`` of a raw API object (shared, not copied), or an empty mapping."""
    meta = obj.get("metadata") or {}
    labels = meta.get("labels")
    return labels if isinstance(labels, Mapping) else EMPTY


def _stale_seconds(value: Any) -> float | None:
    """The annotation's duration; None when absent or invalid (the default applies then)."""
    try:
        return parse_duration(value) if isinstance(value, str) else None
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class NamespaceInfo:
    """A namespace: its name and labels (treat ``labels`` as read-only)."""

    name: str
    labels: Mapping[str, str] = field(default_factory=lambda: EMPTY)

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> NamespaceInfo:
        """From a raw Namespace JSON dict. The labels mapping is shared, not copied."""
        return cls(name=str(obj["metadata"]["name"]), labels=labels_of(obj))


@dataclass(frozen=True, slots=True)
class ServiceInfo:
    """A Service: where it is, its labels, and its ports as ``(name or None, port)``."""

    namespace: str
    name: str
    labels: Mapping[str, str] = field(default_factory=lambda: EMPTY)
    ports: tuple[tuple[str | None, int], ...] = ()
    # seconds from the metrics-router.io/serve-stale-for annotation (None: absent or invalid)
    serve_stale_for: float | None = None

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> ServiceInfo:
        """From a raw Service JSON dict; ports without a numeric ``port`` are skipped."""
        meta = obj["metadata"]
        spec = obj.get("spec") or {}
        ports: list[tuple[str | None, int]] = []
        for p in spec.get("ports") or ():
            number = p.get("port")
            if isinstance(number, int) and not isinstance(number, bool):
                name = p.get("name")
                ports.append((str(name) if name else None, number))
        stale_for = (meta.get("annotations") or {}).get(SERVE_STALE_ANNOTATION)
        return cls(
            namespace=str(meta.get("namespace", "")),
            name=str(meta["name"]),
            labels=labels_of(obj),
            ports=tuple(ports),
            serve_stale_for=_stale_seconds(stale_for),
        )

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def port(self) -> int | None:
        """The port to use: named ``https``, else 443 if present, else the first; None if none."""
        if not self.ports:
            return None
        for name, number in self.ports:
            if name == "https":
                return number
        for _, number in self.ports:
            if number == 443:
                return number
        return self.ports[0][1]


@dataclass(frozen=True, slots=True)
class Conflict:
    """A claim that lost. ``chosen`` won over every entry of ``rejected``."""

    kind: Literal["namespace", "service"]
    subject: str  # the namespace (kind namespace) or the tenant (kind service)
    chosen: str
    rejected: tuple[str, ...]
    message: str


@dataclass(frozen=True, slots=True)
class Resolution:
    table: RouteTable
    tenants: Mapping[str, tuple[str, ...]]  # tenant -> sorted namespaces (routed or not)
    conflicts: tuple[Conflict, ...] = ()
    unrouted: Mapping[str, str] = field(
        default_factory=lambda: EMPTY
    )  # tenant -> reason it has no route


# A strategy's answer for one namespace: the tenant, and the claims that lost (if any).
Claim = tuple[str, Conflict | None]
