"""The `serve` settings: the proxy's identity headers, stale answers and the whole ServeConfig.

Frozen dataclasses only; router.cli.serve_options builds them from the command line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from router.settings import TenancySettings
from router.settings.limits import Limits

DEFAULT_USERNAME_HEADERS = ("X-Remote-User",)
DEFAULT_UID_HEADERS = ("X-Remote-Uid",)
DEFAULT_GROUP_HEADERS = ("X-Remote-Group",)
DEFAULT_EXTRA_PREFIXES = ("X-Remote-Extra-",)
DEFAULT_STALE_MAX_ENTRIES_PER_TENANT = 1000
DEFAULT_STALE_MAX_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class RequestHeaderSettings:
    """How the aggregator's identity is authenticated and which headers carry it.

    Mirrors kube-apiserver's --requestheader-* flags and the keys of the
    kube-system/extension-apiserver-authentication ConfigMap.
    """

    client_ca_file: Path | None = None
    client_ca_pem: bytes | None = None  # set when the CA comes from the ConfigMap
    allowed_names: tuple[str, ...] = ()
    username_headers: tuple[str, ...] = DEFAULT_USERNAME_HEADERS
    uid_headers: tuple[str, ...] = DEFAULT_UID_HEADERS
    group_headers: tuple[str, ...] = DEFAULT_GROUP_HEADERS
    extra_headers_prefixes: tuple[str, ...] = DEFAULT_EXTRA_PREFIXES


@dataclass(frozen=True, slots=True)
class StaleSettings:
    """Last-known-good answers while a tenant's metrics server fails (router/core/stale.py).

    ``serve_stale_for`` is the default for every tenant (0 = off); a tenant's routes-file entry
    or its metrics Service annotation overrides it. The caps bound the memory held."""

    serve_stale_for: float = 0.0
    max_entries_per_tenant: int = DEFAULT_STALE_MAX_ENTRIES_PER_TENANT
    max_bytes: int = DEFAULT_STALE_MAX_BYTES


@dataclass(frozen=True, slots=True)
class ServeConfig:
    secure_port: int
    bind_address: str
    tls_cert_file: Path
    tls_private_key_file: Path
    requestheader: RequestHeaderSettings
    # True when any --requestheader-* flag was given: then the ConfigMap is not consulted.
    requestheader_from_flags: bool
    proxy_client_cert_file: Path
    proxy_client_key_file: Path
    upstream_ca_file: Path | None
    upstream_timeout: float
    upstream_connect_timeout: float
    routes_file: Path | None
    kubeconfig: Path | None
    default_upstream: str | None
    default_upstream_server_name: str | None
    metrics_bind_address: str | None  # None = disabled ("0")
    max_inflight_per_tenant: int
    max_idle_connections_per_upstream: int
    shutdown_grace_period: float
    file_check_interval: float
    workers: int
    log_format: str
    log_level: str
    tenancy: TenancySettings = field(default_factory=TenancySettings)
    stale: StaleSettings = field(default_factory=StaleSettings)
    # SIGTERM: /readyz fails at once, the listener keeps serving this long, then drains.
    shutdown_delay_duration: float = 0.0
    # A certificate expiring within this time logs a warning and sets a metric.
    certificate_expiry_warning: float = 7 * 24 * 3600.0
    limits: Limits = field(default_factory=Limits)
