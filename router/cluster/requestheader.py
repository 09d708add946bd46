"""The requestheader settings from kube-system/extension-apiserver-authentication.

Public API
----------
``RequestHeaderFollower(api, on_change, *, metrics, backoff=None)``
    Watches ``kube-system/extension-apiserver-authentication`` and calls
    ``on_change(RequestHeaderSettings)`` at the first sight and whenever the parsed settings
    change. A missing or unparsable ConfigMap is logged and the last good settings stay in
    force. ``got_first`` (``asyncio.Event``), ``settings`` (last good or None), ``async run()``.
``parse_auth_configmap(data: Mapping[str, str]) -> RequestHeaderSettings``
    Pure. Keys ``requestheader-client-ca-file`` (PEM text, required -> ``client_ca_pem``),
    ``requestheader-allowed-names``, ``requestheader-username-headers``,
    ``requestheader-uid-headers``, ``requestheader-group-headers``,
    ``requestheader-extra-headers-prefix`` (JSON arrays of strings). Missing or empty header
    lists take kube-apiserver's defaults; missing allowed names mean any name. Raises
    ``ValueError`` naming every problem.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping

from kubernetes_asyncio.client import ApiClient

from router import logs
from router.cluster.informer import Informer
from router.cluster.retry import Backoff
from router.metrics import ClusterMetrics
from router.settings.serve import (
    DEFAULT_EXTRA_PREFIXES,
    DEFAULT_GROUP_HEADERS,
    DEFAULT_UID_HEADERS,
    DEFAULT_USERNAME_HEADERS,
    RequestHeaderSettings,
)

logger = logging.getLogger(__name__)

AUTH_CONFIGMAP_NAMESPACE = "kube-system"
AUTH_CONFIGMAP_NAME = "extension-apiserver-authentication"

__all__ = [
    "AUTH_CONFIGMAP_NAME",
    "AUTH_CONFIGMAP_NAMESPACE",
    "RequestHeaderFollower",
    "parse_auth_configmap",
]


def _string_list(data: Mapping[str, str], key: str, errors: list[str]) -> tuple[str, ...] | None:
    raw = data.get(key)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = json.loads(raw)
    except ValueError as exc:
        errors.append(f"{key}: not a JSON array: {exc}")
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        errors.append(f"{key}: want a JSON array of strings")
        return None
    return tuple(value)


def parse_auth_configmap(data: Mapping[str, str]) -> RequestHeaderSettings:
    """RequestHeaderSettings from the extension-apiserver-authentication ConfigMap's data."""
    errors: list[str] = []
    ca = data.get("requestheader-client-ca-file")
    if not ca or "-----BEGIN CERTIFICATE-----" not in ca:
        errors.append(
            "requestheader-client-ca-file: missing or not PEM certificates (the cluster has no "
            "front-proxy CA configured)"
        )
    allowed = _string_list(data, "requestheader-allowed-names", errors)
    users = _string_list(data, "requestheader-username-headers", errors)
    uids = _string_list(data, "requestheader-uid-headers", errors)
    groups = _string_list(data, "requestheader-group-headers", errors)
    extras = _string_list(data, "requestheader-extra-headers-prefix", errors)
    if errors:
        raise ValueError("; ".join(errors))
    assert ca is not None
    return RequestHeaderSettings(
        client_ca_file=None,
        client_ca_pem=ca.encode(),
        allowed_names=allowed or (),
        username_headers=users or DEFAULT_USERNAME_HEADERS,
        uid_headers=uids or DEFAULT_UID_HEADERS,
        group_headers=groups or DEFAULT_GROUP_HEADERS,
        extra_headers_prefixes=extras or DEFAULT_EXTRA_PREFIXES,
    )


class RequestHeaderFollower:
    """Follows kube-system/extension-apiserver-authentication; on_change(settings) on change."""

    def __init__(
        self,
        api: ApiClient,
        on_change: Callable[[RequestHeaderSettings], None],
        *,
        metrics: ClusterMetrics,
        backoff: Backoff | None = None,
    ) -> None:
        self.on_change = on_change
        self.metrics = metrics
        self.informer = Informer(
            api,
            "configmaps",
            namespace=AUTH_CONFIGMAP_NAMESPACE,
            field_selector=f"metadata.name={AUTH_CONFIGMAP_NAME}",
            backoff=backoff,
        )
        self.got_first = asyncio.Event()
        self.settings: RequestHeaderSettings | None = None
        self._problem: str | None = None

    async def run(self) -> None:
        self.metrics.track(self.informer)
        try:
            await self.informer.run(self._changed)
        finally:
            self.metrics.untrack(self.informer)

    def _changed(self) -> None:
        obj = self.informer.cache.get(f"{AUTH_CONFIGMAP_NAMESPACE}/{AUTH_CONFIGMAP_NAME}")
        if obj is None:
            self._warn(f"ConfigMap {AUTH_CONFIGMAP_NAMESPACE}/{AUTH_CONFIGMAP_NAME} not found")
            return
        try:
            settings = parse_auth_configmap(obj.get("data") or {})
        except ValueError as exc:
            self._warn(f"ConfigMap {AUTH_CONFIGMAP_NAMESPACE}/{AUTH_CONFIGMAP_NAME}: {exc}")
            return
        self._problem = None
        if settings == self.settings:
            return
        self.settings = settings
        logger.info(
            "requestheader settings from ConfigMap",
            extra=logs.fields(
                allowed_names=",".join(settings.allowed_names) or "(any)",
                username_headers=",".join(settings.username_headers),
                group_headers=",".join(settings.group_headers),
                extra_headers_prefixes=",".join(settings.extra_headers_prefixes),
            ),
        )
        self.on_change(settings)
        self.got_first.set()

    def _warn(self, problem: str) -> None:
        if problem != self._problem:
            kept = "keeping the last good settings" if self.settings else "no settings yet"
            logger.error("requestheader settings unusable (%s): %s", kept, problem)
        self._problem = problem
