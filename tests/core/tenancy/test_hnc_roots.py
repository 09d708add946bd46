"""One rule for HNC roots, pinned against the two rules the code had before issue 12.

Before: ``tenancy.py`` named the tenant after the TOPMOST ancestor carrying the tenant-root
label (routing, the reloader); ``manifests.py`` took as the policy selector's root the
namespace of the tenant, labelled depth 0 by HNC, whose subtree held the MOST of the tenant's
namespaces (tenant-root label ignored).

Chosen (DESIGN.md: "the tenant is the ancestor that is a tenant root"): the first rule,
everywhere. ``router.core.tenancy.hnc`` holds it; a tenant's policies select the subtree of
the tenant root above most of its namespaces, when that root is one of the tenant's own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType

import pytest

from router.core.policy import NamespaceMeta, PolicyConfig, PolicySettings, tenant_networks
from router.core.tenancy import NamespaceInfo, resolve
from router.core.tenancy.hnc import depth_label, subtree_root
from router.settings import TenancySettings

ROOT_LABEL = ("tenancy.metrics-router.io/root", "true")
TENANT_LABEL = "tenancy.io/tenant"
SETTINGS = PolicySettings(apiserver_cidrs=("172.18.0.2/32",))
TEMPLATE = "https://keda.{tenant}--sys.svc"


def tree(
    parents: Mapping[str, str | None],
    roots: Sequence[str] = (),
    extra: Mapping[str, Mapping[str, str]] | None = None,
) -> dict[str, dict[str, str]]:
    """Labels of each namespace as HNC sets them (itself at 0, each ancestor at its distance)."""
    out: dict[str, dict[str, str]] = {}
    for name, parent in parents.items():
        labels = {depth_label(name): "0"}
        depth, cur = 1, parent
        while cur is not None:
            labels[depth_label(cur)] = str(depth)
            depth, cur = depth + 1, parents.get(cur)
        if name in roots:
            labels[ROOT_LABEL[0]] = ROOT_LABEL[1]
        labels.update((extra or {}).get(name, {}))
        out[name] = labels
    return out


def old_policy_root(
    namespaces: Sequence[str], labels: Mapping[str, Mapping[str, str]]
) -> str | None:
    """manifests.py before issue 12: the depth-0 namespace whose subtree holds the most."""

    def in_tree(ns: str, root: str) -> bool:
        return depth_label(root) in labels.get(ns, {})

    candidates = [r for r in namespaces if labels.get(r, {}).get(depth_label(r)) == "0"]
    if not candidates:
        return None
    return min(candidates, key=lambda r: (-sum(in_tree(ns, r) for ns in namespaces), r))


def routing_and_policy_roots(
    labels: Mapping[str, Mapping[str, str]], tenancy: TenancySettings
) -> tuple[dict[str, tuple[str, ...]], dict[str, str | None], dict[str, str | None]]:
    """(tenant -> namespaces, tenant -> policy root now, tenant -> policy root before)."""
    infos = [NamespaceInfo(n, MappingProxyType(dict(ls))) for n, ls in labels.items()]
    res = resolve(infos, [], tenancy)
    metas = {n: NamespaceMeta(n, MappingProxyType(dict(ls))) for n, ls in labels.items()}
    networks, _ = tenant_networks(
        res.table, PolicyConfig(settings=SETTINGS), metas, res.tenants, tenancy.tenant_root_label
    )
    now = {n.name: n.hnc_root for n in networks}
    before = {t: old_policy_root(nss, labels) for t, nss in res.tenants.items()}
    return dict(res.tenants), now, before


def test_talk_tree_both_rules_agree() -> None:
    """Each tenant is a labelled root with children: both rules pick the root itself."""
    labels = tree(
        {"tenant-a": None, "tenant-a--dev": "tenant-a", "tenant-a--sys": "tenant-a",
         "tenant-b": None, "tenant-b--sys": "tenant-b"},
        roots=("tenant-a", "tenant-b"),
    )  # fmt: skip
    tenancy = TenancySettings(strategies=("hnc",), upstream_template=TEMPLATE)
    tenants, now, before = routing_and_policy_roots(labels, tenancy)
    assert tenants == {
        "tenant-a": ("tenant-a", "tenant-a--dev", "tenant-a--sys"),
        "tenant-b": ("tenant-b", "tenant-b--sys"),
    }
    assert now == before == {"tenant-a": "tenant-a", "tenant-b": "tenant-b"}


def test_nested_roots_both_rules_agree_on_the_topmost() -> None:
    """A labelled root inside another: routing gives its namespaces to the topmost root, whose
    subtree then holds the most of the tenant, so the old policy rule agreed."""
    labels = tree({"org": None, "org-a": "org", "team": "org", "team-x": "team"},
                  roots=("org", "team"))  # fmt: skip
    tenancy = TenancySettings(strategies=("hnc",), upstream_template=TEMPLATE)
    tenants, now, before = routing_and_policy_roots(labels, tenancy)
    assert tenants == {"org": ("org", "org-a", "team", "team-x")}
    assert now == before == {"org": "org"}


def test_label_tenant_reaching_into_another_tree_differed() -> None:
    """Where the rules differed (1): tenant t1 (label strategy) owns its root t1 and a branch
    x, x-c inside t0's tree. The old rule anchored t1's selector at x, a namespace of t0's tree
    that is no tenant root (its subtree held two of t1's namespaces, t1's own one): a new
    namespace that t0's owners create below x would be admitted to t1's policies until the
    next render, although routing gives it to t0. The chosen rule anchors t1 at its own root
    t1 and adds x, x-c by name; t0 keeps its subtree minus x."""
    labels = tree(
        {"t0": None, "t0-c": "t0", "x": "t0", "x-c": "x", "t1": None},
        roots=("t0", "t1"),
        extra={"x": {TENANT_LABEL: "t1"}, "x-c": {TENANT_LABEL: "t1"}},
    )
    tenancy = TenancySettings(
        strategies=("label", "hnc"), tenant_label=TENANT_LABEL, upstream_template=TEMPLATE
    )
    tenants, now, before = routing_and_policy_roots(labels, tenancy)
    assert tenants == {"t0": ("t0", "t0-c"), "t1": ("t1", "x", "x-c")}
    assert before == {"t0": "t0", "t1": "x"}
    assert now == {"t0": "t0", "t1": "t1"}


def test_hnc_tree_without_tenant_root_labels_differed() -> None:
    """Where the rules differed (2): the pattern strategy over an HNC tree that carries no
    tenant-root label. The old rule still selected tenant-a's policies by the subtree of
    tenant-a (any HNC namespace qualified); the chosen rule recognises no tenant root, so the
    namespaces are selected by name, exactly those routing gives the tenant. The tenant-root
    label is the operator's statement that a subtree is one tenant; without it an HNC parent
    is only a namespace."""
    labels = tree({"tenant-a": None, "tenant-a--dev": "tenant-a", "tenant-a--sys": "tenant-a"})
    tenancy = TenancySettings(strategies=("pattern",), upstream_template=TEMPLATE)
    tenants, now, before = routing_and_policy_roots(labels, tenancy)
    assert tenants == {"tenant-a": ("tenant-a", "tenant-a--dev", "tenant-a--sys")}
    assert before == {"tenant-a": "tenant-a"}
    assert now == {"tenant-a": None}


@pytest.mark.parametrize(
    ("namespaces", "expected"),
    [
        (("t0", "t0-c"), "t0"),
        (("t1", "x", "x-c"), "t1"),  # x, x-c are below t0, not one of ours
        (("x", "x-c"), None),  # no tenant root of our own above any of them
        (("t0", "t1", "t1-c"), "t1"),  # the root of the most; ties would go by name
    ],
)
def test_subtree_root(namespaces: tuple[str, ...], expected: str | None) -> None:
    labels = tree(
        {"t0": None, "t0-c": "t0", "x": "t0", "x-c": "x", "t1": None, "t1-c": "t1"},
        roots=("t0", "t1"),
    )
    assert subtree_root(namespaces, labels, ROOT_LABEL) == expected
