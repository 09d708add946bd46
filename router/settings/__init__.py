"""Frozen settings dataclasses shared by the layers (no argparse: the CLI builds these).

``TenancySettings`` says how a namespace finds its tenant (the strategies, tried in order)
and how a tenant finds its upstream. The command line (router.cli.tenancy_options) builds it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

# One naming convention everywhere: a tenant is named after its root namespace (`tenant-a`),
# its sub-namespaces are `tenant-a--<x>` and its KEDA runs in `tenant-a--sys`, as the hnc
# strategy names tenants. `certs init`, the demo, the README and deploy/ follow it.
DEFAULT_TENANT_PATTERN = r"^(?P<tenant>tenant-[a-z0-9]+)(--.+)?$"
DEFAULT_UPSTREAM_SERVICE_SELECTOR = "app.kubernetes.io/name=keda-operator-metrics-apiserver"
STRATEGIES = ("hnc", "label", "pattern")


@dataclass(frozen=True, slots=True)
class TenancySettings:
    """Namespace -> tenant resolution (first matching strategy wins) and tenant -> upstream."""

    strategies: tuple[str, ...] = STRATEGIES
    tenant_root_label: tuple[str, str] = ("tenancy.metrics-router.io/root", "true")
    tenant_label: str | None = None
    tenant_pattern: str = DEFAULT_TENANT_PATTERN
    namespace_selector: str | None = None
    upstream_service_selector: str = DEFAULT_UPSTREAM_SERVICE_SELECTOR
    upstream_template: str | None = None


@dataclass(frozen=True, slots=True)
class LeaderElectionSettings:
    enabled: bool = True
    namespace: str = "metrics-router"
    lease_name: str = "metrics-router"
    identity: str = ""  # default: $POD_NAME or the host name, plus a random suffix
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0


@dataclass(frozen=True, slots=True)
class ReloaderSettings:
    """The namespace reloader: the child COMMAND and its timing."""

    command: tuple[str, ...]
    env_name: str = "WATCH_NAMESPACE"
    debounce: float = 2.0
    grace_period: float = 30.0
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    # A child that stayed up this long resets the backoff to backoff_initial.
    backoff_reset: float = 120.0
    # Base environment of the child; None = the reloader's own environment at start time.
    environment: Mapping[str, str] | None = field(default=None)
