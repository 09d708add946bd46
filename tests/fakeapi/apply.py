"""Patches and server-side apply: RFC 7386 merge patch, and field ownership per manager.

Pure: objects and ownership maps in, a merged object and new ownership out (or an ApiStatus
409 on a conflict). The store creates or replaces the result.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from tests.fakeapi.errors import ApiStatus

Path = tuple[str, ...]
Owners = dict[Path, str]  # leaf path -> the field manager that owns it

_MISSING = object()
_IDENTITY_PATHS = {("apiVersion",), ("kind",), ("metadata", "name"), ("metadata", "namespace")}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            result.pop(k, None)
        else:
            result[k] = merge_patch(result.get(k), v)
    return result


def _leaves(obj: Any, prefix: Path = ()) -> dict[Path, Any]:
    """Leaf paths of an applied configuration (lists are atomic leaves)."""
    if isinstance(obj, dict) and obj:
        out: dict[Path, Any] = {}
        for k, v in obj.items():
            out.update(_leaves(v, (*prefix, str(k))))
        return out
    return {prefix: obj}


def _get_path(obj: Any, path: Path) -> Any:
    cur = obj
    for p in path:
        if not isinstance(cur, dict) or p not in cur:
            return _MISSING
        cur = cur[p]
    return cur


def _remove_path(obj: dict[str, Any], path: Path) -> None:
    parents = [obj]
    cur: Any = obj
    for p in path[:-1]:
        cur = cur.get(p) if isinstance(cur, dict) else None
        if not isinstance(cur, dict):
            return
        parents.append(cur)
    cur.pop(path[-1], None)
    # prune emptied maps
    for i in range(len(path) - 1, 0, -1):
        if parents[i] == {}:
            parents[i - 1].pop(path[i - 1], None)


def apply_config(
    api_version: str,
    key: tuple[str, str],
    old: Mapping[str, Any] | None,
    owners: Mapping[Path, str],
    config: Mapping[str, Any],
    manager: str,
    *,
    force: bool,
) -> tuple[dict[str, Any], Owners]:
    """Server-side apply of ``config`` by ``manager`` onto ``old`` (None: a new object).

    A leaf another manager owns with a different value is a conflict (409) unless ``force``;
    fields this manager applied before and no longer applies are removed. Returns the merged
    object (``metadata.managedFields`` listing the managers, no resourceVersion) and the new
    ownership map.
    """
    owners = dict(owners)
    leaves = {p: v for p, v in _leaves(config).items() if p not in _IDENTITY_PATHS}
    conflicts = []
    if old is not None:
        for path, value in leaves.items():
            holder = owners.get(path)
            if holder is not None and holder != manager and _get_path(old, path) != value:
                conflicts.append((path, holder))
    if conflicts and not force:
        msg = "; ".join(f'conflict with "{h}": .{".".join(p)}' for p, h in conflicts)
        raise ApiStatus(409, "Conflict", f"Apply failed with {len(conflicts)} conflict: {msg}")
    base = copy.deepcopy(dict(old)) if old is not None else {}
    # fields this manager applied before and no longer applies, owned by nobody else
    for path, holder in list(owners.items()):
        if holder == manager and path not in leaves:
            del owners[path]
            if old is not None:
                _remove_path(base, path)
    merged = merge_patch(base, config)
    for path in leaves:
        owners[path] = manager
    meta = merged.setdefault("metadata", {})
    meta["name"], meta["namespace"] = key[1], key[0] or None
    if not key[0]:
        meta.pop("namespace", None)
    managers = sorted(set(owners.values()))
    meta["managedFields"] = [
        {"manager": m, "operation": "Apply", "apiVersion": api_version} for m in managers
    ]
    merged["metadata"].pop("resourceVersion", None)
    return merged, owners
