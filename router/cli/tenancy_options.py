"""The tenancy flags: how a namespace finds its tenant and a tenant its upstream. `serve`,
`reloader`, `render` and `doctor` share them; they become a TenancySettings.

Pure: argparse and the standard library only.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from router.cli.options import csv
from router.settings import (
    DEFAULT_TENANT_PATTERN,
    DEFAULT_UPSTREAM_SERVICE_SELECTOR,
    STRATEGIES,
    TenancySettings,
)

DEFAULT_UPSTREAM_TEMPLATE_EXAMPLE = "https://keda-operator-metrics-apiserver.{tenant}--sys.svc:443"
DEFAULT_TENANT_ROOT_LABEL = "tenancy.metrics-router.io/root=true"


def add_tenancy_arguments(parser: argparse.ArgumentParser) -> None:
    """Tenancy flags shared by `serve` and `reloader`."""
    g = parser.add_argument_group("tenancy (routes from the cluster)")
    g.add_argument(
        "--kubeconfig",
        type=Path,
        help="kubeconfig file; default as kubectl: $KUBECONFIG, in-cluster, ~/.kube/config",
    )
    g.add_argument(
        "--namespace-selector",
        help="label selector limiting the namespaces considered (e.g. 'tenancy.io/managed=true')",
    )
    g.add_argument(
        "--tenant-strategies",
        default=",".join(STRATEGIES),
        help="comma list of namespace->tenant strategies tried in order: hnc, label, pattern",
    )
    g.add_argument(
        "--tenant-root-label",
        default=DEFAULT_TENANT_ROOT_LABEL,
        help="hnc strategy: KEY=VALUE label marking a tenant root namespace",
    )
    g.add_argument(
        "--tenant-label", help="label strategy: namespace label KEY whose value names the tenant"
    )
    g.add_argument(
        "--tenant-pattern",
        default=DEFAULT_TENANT_PATTERN,
        help="pattern strategy: regular expression on the namespace name with a 'tenant' group; "
        "the default names a tenant after its root namespace, as hnc does (tenant-a, "
        "tenant-a--dev -> tenant-a)",
    )
    g.add_argument(
        "--upstream-service-selector",
        default=DEFAULT_UPSTREAM_SERVICE_SELECTOR,
        help="label selector of each tenant's KEDA metrics apiserver Service",
    )
    g.add_argument(
        "--upstream-template",
        help="tenant upstream URL template instead of Service discovery, e.g. "
        f"'{DEFAULT_UPSTREAM_TEMPLATE_EXAMPLE}'",
    )


def tenancy_from_args(args: argparse.Namespace, errors: list[str]) -> TenancySettings:
    strategies = csv(args.tenant_strategies)
    for s in strategies:
        if s not in STRATEGIES:
            errors.append(
                f"--tenant-strategies: unknown strategy {s!r} (want {', '.join(STRATEGIES)})"
            )
    if not strategies:
        errors.append("--tenant-strategies: at least one strategy is required")
    if (
        "label" in strategies
        and not args.tenant_label
        and args.tenant_strategies != ",".join(STRATEGIES)
    ):
        errors.append("--tenant-strategies includes 'label' but --tenant-label is not set")
    key, sep, value = str(args.tenant_root_label).partition("=")
    if not sep or not key:
        errors.append(f"--tenant-root-label: want KEY=VALUE, got {args.tenant_root_label!r}")
    try:
        compiled = re.compile(args.tenant_pattern)
        if "tenant" not in compiled.groupindex:
            errors.append("--tenant-pattern: the expression needs a named group 'tenant'")
    except re.error as exc:
        errors.append(f"--tenant-pattern: invalid regular expression: {exc}")
    template = args.upstream_template
    if template is not None:
        if "{tenant}" not in template:
            errors.append("--upstream-template: must contain '{tenant}'")
        if not template.startswith("https://"):
            errors.append("--upstream-template: must be an https:// URL")
    return TenancySettings(
        strategies=strategies,
        tenant_root_label=(key, value),
        tenant_label=args.tenant_label,
        tenant_pattern=args.tenant_pattern,
        namespace_selector=args.namespace_selector,
        upstream_service_selector=args.upstream_service_selector,
        upstream_template=template,
    )
