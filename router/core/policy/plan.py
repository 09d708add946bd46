"""Desired vs actual owned objects -> what to apply and delete; stable YAML output."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import yaml

from router.core.policy.model import OWNER_LABEL, OWNER_VALUE, Manifest, ObjectKey, Plan

# --------------------------------------------------------------------------- plan


def is_owned(obj: Mapping[str, Any]) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return bool(labels.get(OWNER_LABEL) == OWNER_VALUE)


def key_of(obj: Mapping[str, Any]) -> ObjectKey:
    meta = obj.get("metadata") or {}
    return ObjectKey(
        str(obj.get("apiVersion", "")),
        str(obj.get("kind", "")),
        str(meta.get("namespace") or ""),
        str(meta.get("name", "")),
    )


def _contains(actual: Any, desired: Any) -> bool:
    """Whether ``actual`` holds every field of ``desired`` (lists compared whole)."""
    if isinstance(desired, Mapping):
        return isinstance(actual, Mapping) and all(
            k in actual and _contains(actual[k], v) for k, v in desired.items()
        )
    if isinstance(desired, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(desired)
            and all(_contains(a, d) for a, d in zip(actual, desired, strict=True))
        )
    return bool(actual == desired)


def plan(desired: Iterable[Manifest], actual: Iterable[Mapping[str, Any]]) -> Plan:
    """Apply what is missing or differs; delete owned objects nobody wants.

    An actual object without the ownership label is never deleted, whatever the caller listed.
    An object is re-applied when any desired field differs (a hand edit is reverted), and left
    alone when the cluster already holds every desired field (fields others own are ignored).
    """
    want = {m.key: m for m in desired}
    have = {key_of(o): o for o in actual}
    apply = tuple(
        want[k] for k in sorted(want) if k not in have or not _contains(have[k], want[k].body)
    )
    delete = tuple(k for k in sorted(have) if k not in want and is_owned(have[k]))
    return Plan(apply=apply, delete=delete)


def to_yaml(body: Mapping[str, Any]) -> str:
    """Stable YAML for one object (keys in the order rendered, which is deterministic)."""
    return yaml.safe_dump(
        _plain(body), sort_keys=False, default_flow_style=False, allow_unicode=True, width=1 << 16
    )


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
