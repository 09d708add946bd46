"""HNC trees: the one home for tenant roots and subtrees (routing, policies and the reloader).

HNC labels every namespace ``<ancestor>.tree.hnc.x-k8s.io/depth: "<n>"`` for itself (``0``) and
each ancestor (``n`` = distance). A *tenant root* is a namespace that carries the configured
tenant-root label (``TenancySettings.tenant_root_label``, KEY=VALUE).

The rule (DESIGN.md: "the tenant is the ancestor that is a tenant root"): the tenant root of a
namespace is its TOPMOST ancestor (itself included) that is a tenant root. Nested roots lose to
the topmost one and are reported as a conflict. The ``hnc`` strategy names the tenant after that
root; the NetworkPolicy renderer selects a tenant's namespaces by that root's subtree
(``subtree_root``, ``selection``); nothing else decides what an HNC root is.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

from router.core.tenancy.model import Claim, Conflict, NamespaceInfo
from router.settings import TenancySettings

HNC_DEPTH_SUFFIX = ".tree.hnc.x-k8s.io/depth"

Labels = Mapping[str, str]


def depth_label(namespace: str) -> str:
    """The label HNC puts on every namespace of ``namespace``'s subtree."""
    return f"{namespace}{HNC_DEPTH_SUFFIX}"


Known = Mapping[str, NamespaceInfo] | Mapping[str, Labels]


def tenant_roots(
    labels: Labels, known: Known, root_label: tuple[str, str]
) -> list[tuple[int, str]]:
    """The ancestors of a namespace with these labels (itself included) that are tenant roots,
    as (depth, name), topmost first (largest depth; equal depths, from malformed labels, by
    name). ``known``: the namespaces the caller knows, name -> NamespaceInfo or labels; only
    those can be recognised as roots."""
    key, value = root_label
    roots: list[tuple[int, str]] = []
    for label, text in labels.items():
        if not label.endswith(HNC_DEPTH_SUFFIX):
            continue
        ancestor = label[: -len(HNC_DEPTH_SUFFIX)]
        theirs = known.get(ancestor)
        if isinstance(theirs, NamespaceInfo):
            theirs = theirs.labels
        if theirs is None or theirs.get(key) != value:
            continue
        try:
            roots.append((int(text), ancestor))
        except (TypeError, ValueError):
            continue
    if len(roots) > 1:
        roots.sort(key=lambda r: (-r[0], r[1]))
    return roots


def claim(
    ns: NamespaceInfo, namespaces_by_name: Mapping[str, NamespaceInfo], settings: TenancySettings
) -> Claim | None:
    """The ``hnc`` strategy: the topmost tenant root above ``ns`` names the tenant.

    Only namespaces the caller knows can be recognised as roots, so a ``--namespace-selector``
    must not hide the roots.
    """
    roots = tenant_roots(ns.labels, namespaces_by_name, settings.tenant_root_label)
    if not roots:
        return None
    chosen = roots[0][1]
    if len(roots) == 1:
        return chosen, None
    rejected = tuple(name for _, name in roots[1:])
    return chosen, Conflict(
        kind="namespace",
        subject=ns.name,
        chosen=chosen,
        rejected=rejected,
        message=f"namespace {ns.name!r} is below several tenant roots "
        f"({', '.join([chosen, *rejected])}); the topmost, {chosen!r}, wins",
    )


# --------------------------------------------------------------------------- subtrees


def subtree_root(
    namespaces: Iterable[str], labels: Mapping[str, Labels], root_label: tuple[str, str]
) -> str | None:
    """A tenant's HNC root: the tenant root (by the rule above) of the most of the tenant's
    namespaces that is itself one of them; ties by name. None when no namespace of the tenant
    is below a tenant root of its own (it is then selected by name)."""
    ours = set(namespaces)
    counts: Counter[str] = Counter()
    for ns in ours:
        roots = tenant_roots(labels.get(ns) or {}, labels, root_label)
        if roots and roots[0][1] in ours:
            counts[roots[0][1]] += 1
    if not counts:
        return None
    return min(counts, key=lambda r: (-counts[r], r))


def selection(
    tenant: str,
    namespaces: Sequence[str],
    labels: Mapping[str, Labels],
    owner: Mapping[str, str],
    root_label: tuple[str, str],
) -> tuple[str | None, tuple[str, ...], tuple[str, ...]]:
    """How to select a tenant's namespaces by HNC labels: (root, excluded subtrees, namespaces
    to add by name), or (None, (), ()) to select them all by name.

    ``labels``: every known namespace's labels; ``owner``: namespace -> tenant. The root's
    subtree, minus the subtrees of foreign namespaces inside it, plus our namespaces outside it.
    Falls back to names when a foreign namespace cannot be cut out without cutting ours.
    """

    def in_tree(ns: str, root: str) -> bool:
        return depth_label(root) in (labels.get(ns) or {})

    root = subtree_root(namespaces, labels, root_label)
    if root is None:
        return None, (), ()
    ours = set(namespaces)
    subtree = [ns for ns in labels if in_tree(ns, root)]
    exclude: set[str] = set()
    for ns in sorted(subtree):
        if owner.get(ns, tenant) == tenant:
            continue
        # The topmost ancestor of the foreign namespace, below the root, whose subtree holds
        # none of our namespaces: cutting it out removes the foreign namespace only.
        candidates = [
            a
            for a in labels
            if a != root and in_tree(ns, a) and in_tree(a, root)
            and not any(in_tree(o, a) for o in ours)
        ]  # fmt: skip
        if not candidates:
            return None, (), ()
        depths = labels.get(ns) or {}
        exclude.add(max(candidates, key=lambda a: (int(depths.get(depth_label(a), "0")), a)))
    extra = tuple(
        ns for ns in namespaces if not in_tree(ns, root) or any(in_tree(ns, x) for x in exclude)
    )
    # Drop excluded subtrees nested inside other excluded subtrees (redundant).
    minimal = tuple(
        sorted(x for x in exclude if not any(y != x and in_tree(x, y) for y in exclude))
    )
    return root, minimal, extra
