"""TenantNetworks -> every policy object of one kind, validated and sorted (pure)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from router.core.names import is_dns1123_label
from router.core.policy.cilium import to_cilium
from router.core.policy.intents import classify
from router.core.policy.metadata import subnet_of
from router.core.policy.model import (
    KIND_NETWORKPOLICY,
    KINDS,
    EventSources,
    Manifest,
    ManifestError,
    ObjectKey,
    PolicySettings,
    Rendering,
    TenantNetwork,
    tenant_slug,
)
from router.core.policy.networkpolicy import to_networkpolicy

# --------------------------------------------------------------------------- rendering


def validate_inputs(tenants: Sequence[TenantNetwork], settings: PolicySettings, kind: str) -> None:
    """Refuse inputs whose policies would cross tenants or be invalid (ManifestError)."""
    errors: list[str] = []
    if kind not in KINDS:
        errors.append(f"unknown policy kind {kind!r} (want {', '.join(KINDS)})")
    if kind == KIND_NETWORKPOLICY and not settings.apiserver_cidrs:
        errors.append(
            "the kube-apiserver's addresses are unknown: set kubeAPIServer.cidrs in the policy "
            "config (from a cluster they are read from the default/kubernetes EndpointSlices)"
        )
    slugs: dict[str, str] = {}
    owner: dict[str, str] = {}
    for t in tenants:
        slug = tenant_slug(t.name)
        if slug in slugs:
            errors.append(f"tenants {slugs[slug]!r} and {t.name!r} map to the same name {slug!r}")
        slugs[slug] = t.name
        for ns in t.namespaces:
            if not is_dns1123_label(ns):
                errors.append(f"tenant {t.name!r}: {ns!r} is not a namespace name")
            if ns in owner:
                errors.append(f"namespace {ns!r} belongs to tenants {owner[ns]!r} and {t.name!r}")
            owner[ns] = t.name
        if t.keda_namespace not in t.namespaces:
            errors.append(f"tenant {t.name!r}: KEDA namespace {t.keda_namespace!r} not listed")
        if settings.router_namespace in t.namespaces:
            errors.append(f"tenant {t.name!r} claims the router's namespace")
    if errors:
        raise ManifestError(errors)


def render(tenants: Sequence[TenantNetwork], settings: PolicySettings, kind: str) -> Rendering:
    """Every policy object for ``tenants`` and the router, sorted by key (ManifestError)."""
    ordered = sorted(tenants, key=lambda t: t.name)
    validate_inputs(ordered, settings, kind)
    warnings: list[str] = []
    usable = []
    for t in ordered:
        sources, problems = _usable_sources(t, settings, kind)
        warnings.extend(problems)
        usable.append(replace(t, event_sources=sources))
    translate = to_networkpolicy if kind == KIND_NETWORKPOLICY else to_cilium
    manifests = sorted((translate(i, settings) for i in classify(usable, settings)), key=_key)
    return Rendering(tuple(manifests), tuple(warnings))


def _key(m: Manifest) -> ObjectKey:
    return m.key


def _usable_sources(
    t: TenantNetwork, settings: PolicySettings, kind: str
) -> tuple[EventSources, list[str]]:
    problems: list[str] = []
    fqdns = t.event_sources.fqdns
    if fqdns and kind == KIND_NETWORKPOLICY:
        problems.append(
            f"tenant {t.name!r}: egress FQDNs {', '.join(fqdns)} need the cilium kind; "
            "NetworkPolicy has no DNS names (use egress CIDRs)"
        )
        fqdns = ()
    cidrs = []
    for c in t.event_sources.cidrs:
        inside = [k for k in settings.cluster_cidrs if subnet_of(c, k)]
        if inside:
            problems.append(
                f"tenant {t.name!r}: egress CIDR {c} lies inside the cluster network "
                f"{inside[0]}; dropped (event sources are outside the cluster)"
            )
            continue
        cidrs.append(c)
    return replace(t.event_sources, cidrs=tuple(cidrs), fqdns=fqdns), problems
