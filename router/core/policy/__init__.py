"""Traffic boundaries: tenants -> NetworkPolicy / CiliumClusterwideNetworkPolicy objects (pure).

A purely computational package: no I/O, no clock, no Kubernetes client. The adapters
(`router.cli.render` writes files, `router.cluster.policy_loop` applies to a cluster) call it.
Modules: ``model`` (vocabulary and types), ``config`` (the policy config file and egress
annotations), ``networks`` (tenants -> TenantNetworks), ``intents`` (the paths, classified),
``networkpolicy`` and ``cilium`` (the two renderers, sharing ``metadata``), ``render`` (both,
validated), ``plan`` (desired vs actual, YAML).

The paths are classified first (talk: "classify the paths first; then choose the primitive"):

| subject (pods)                  | ingress from                | egress to                 |
| ------------------------------- | --------------------------- | ------------------------- |
| tenant KEDA metrics apiserver   | router pods (secure port)   | tenant egress (below)     |
| tenant KEDA operator            | its metrics apiserver (gRPC)| tenant egress (below)     |
| tenant KEDA admission webhooks  | kube-apiserver (webhook)    | DNS, kube-apiserver       |
| router (base policy)            | kube-apiserver (secure      | DNS, kube-apiserver       |
|                                 | port), scraper (metrics)    |                           |
| router (one policy per tenant)  | -                           | the tenant's metrics      |
|                                 |                             | apiserver (secure port)   |

"Tenant egress" = the tenant's own namespaces (any port), DNS (kube-dns, 53 UDP and TCP), the
kube-apiserver, and the tenant's configured event sources (CIDRs; FQDNs with Cilium only),
restricted to the tenant's event-source ports when any are configured. Nothing else is allowed,
so everything cross-tenant is denied for the pods these policies select.

Each tenant's namespaces are selected either by name (`kubernetes.io/metadata.name In [...]`)
or, when the tenant lies below a tenant root of its own (``router.core.tenancy.hnc``), by the HNC
label `<root>.tree.hnc.x-k8s.io/depth`
(operator Exists) minus the subtrees of nested tenants (DoesNotExist), so a new subnamespace is
covered without a re-render. Cilium selects namespace labels across namespaces only in the
clusterwide kind, hence `CiliumClusterwideNetworkPolicy`.

Every object carries `app.kubernetes.io/managed-by: metrics-router`; per-tenant objects also
carry `tenancy.metrics-router.io/tenant: <tenant>`; the router's base policy carries
`tenancy.metrics-router.io/component: router` instead (it belongs to no tenant). `plan()` only
ever deletes objects that carry the ownership label.
"""

from router.core.policy.config import (
    is_label_key,
    merge_event_sources,
    parse_cidr,
    parse_policy_config,
)
from router.core.policy.model import (
    ANNOTATION_EGRESS_CIDRS,
    ANNOTATION_EGRESS_FQDNS,
    ANNOTATION_EGRESS_PORTS,
    CILIUM_API,
    KIND_CILIUM,
    KIND_NETWORKPOLICY,
    KINDS,
    NETWORKPOLICY_API,
    OWNER_LABEL,
    OWNER_SELECTOR,
    OWNER_VALUE,
    TENANT_LABEL,
    EventSources,
    Manifest,
    ManifestError,
    NamespaceMeta,
    ObjectKey,
    PolicyConfig,
    PolicySettings,
    PortSpec,
    TenantNetwork,
    TenantOverrides,
    object_name,
    tenant_label_value,
    tenant_slug,
)
from router.core.policy.networks import keda_namespace_for, root_namespace_of, tenant_networks
from router.core.policy.plan import key_of, plan, to_yaml
from router.core.policy.render import render

__all__ = [
    "ANNOTATION_EGRESS_CIDRS",
    "ANNOTATION_EGRESS_FQDNS",
    "ANNOTATION_EGRESS_PORTS",
    "CILIUM_API",
    "KINDS",
    "KIND_CILIUM",
    "KIND_NETWORKPOLICY",
    "NETWORKPOLICY_API",
    "OWNER_LABEL",
    "OWNER_SELECTOR",
    "OWNER_VALUE",
    "TENANT_LABEL",
    "EventSources",
    "Manifest",
    "ManifestError",
    "NamespaceMeta",
    "ObjectKey",
    "PolicyConfig",
    "PolicySettings",
    "PortSpec",
    "TenantNetwork",
    "TenantOverrides",
    "is_label_key",
    "keda_namespace_for",
    "key_of",
    "merge_event_sources",
    "object_name",
    "parse_cidr",
    "parse_policy_config",
    "plan",
    "render",
    "root_namespace_of",
    "tenant_label_value",
    "tenant_networks",
    "tenant_slug",
    "to_yaml",
]
