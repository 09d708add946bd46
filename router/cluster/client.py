"""Kubernetes API client: loading it, raw JSON requests, errors mapped once.

The retry policy is in ``router.cluster.retry``, list+watch in ``router.cluster.informer``.

The real kubernetes-asyncio client does transport, authentication (kubeconfig, in-cluster token
refresh) and TLS; this module never deserialises into its model classes. Every call goes through
``ApiClient.call_api(..., _preload_content=False)`` and the body is parsed with ``json`` into
plain dicts, so 10,000 namespaces sync in milliseconds of CPU, not seconds.

Public API
----------
``async api_client(kubeconfig: Path | None) -> ApiClient``
    From a kubeconfig file, else the in-cluster service account. Close it with ``await
    client.close()``. Raises ``KubeConfigError``.
``resource_path(resource, *, api_version="v1", namespace=None, name=None) -> str``
    ``/api/v1/...`` for the core group, ``/apis/<group>/<version>/...`` otherwise.
``async request(api, method, path, *, query=(), body=None, content_type=None, request_timeout=...)``
    One request, JSON in and out (``body`` is a dict; for server-side apply pass
    ``content_type=APPLY_PATCH`` and ``fieldManager``/``force`` in ``query``). Errors mapped
    once, most specific first: ``KubeGone`` (410), ``KubeConflict`` (409), ``KubeNotFound``
    (404), ``KubeApiError`` (any other HTTP error, with the Status reason/message and any
    Retry-After), ``KubeUnreachable`` (connection, TLS, timeout). All are ``KubeError``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
from kubernetes_asyncio.client import ApiClient, Configuration

logger = logging.getLogger(__name__)

USER_AGENT = "metrics-router"
APPLY_PATCH = "application/apply-patch+yaml"
DEFAULT_TIMEOUT = (10.0, 60.0)  # (connect, read) seconds

__all__ = [
    "APPLY_PATCH",
    "KubeApiError",
    "KubeConfigError",
    "KubeConflict",
    "KubeError",
    "KubeGone",
    "KubeNotFound",
    "KubeUnreachable",
    "api_client",
    "object_key",
    "request",
    "resource_path",
]


# --------------------------------------------------------------------------- errors


class KubeError(Exception):
    """Any failure talking to the Kubernetes API."""

    status: int | None = None
    retry_after: float | None = None


class KubeConfigError(KubeError):
    """No usable kubeconfig / in-cluster configuration."""


class KubeUnreachable(KubeError):
    """Connection refused or reset, TLS failure, timeout: the API did not answer."""


class KubeApiError(KubeError):
    """The API answered with an HTTP error (its Status reason and message attached)."""

    def __init__(
        self, status: int, reason: str, message: str, retry_after: float | None = None
    ) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message
        self.retry_after = retry_after


class KubeGone(KubeApiError):
    """410: the resourceVersion (or continue token) is too old; relist."""


class KubeConflict(KubeApiError):
    """409: resourceVersion conflict, or an apply conflict without force."""


class KubeNotFound(KubeApiError):
    """404."""


def api_error(status: int, body: Any, retry_after: float | None = None) -> KubeApiError:
    reason, message = "", ""
    if isinstance(body, Mapping):
        reason = str(body.get("reason") or "")
        message = str(body.get("message") or "")
    cls = {410: KubeGone, 409: KubeConflict, 404: KubeNotFound}.get(status, KubeApiError)
    return cls(status, reason or "Unknown", message or f"HTTP {status}", retry_after)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


# --------------------------------------------------------------------------- client


async def api_client(kubeconfig: Path | None) -> ApiClient:
    """An ApiClient from the kubeconfig file, $KUBECONFIG, in-cluster, or ~/.kube/config."""
    from router.cluster import kubeconfig as kubeconfig_loader

    configuration = Configuration()
    try:  # --kubeconfig, $KUBECONFIG, in-cluster, ~/.kube/config: as kubectl finds it
        await kubeconfig_loader.load(configuration, kubeconfig)
    except kubeconfig_loader.LoadError as exc:
        raise KubeConfigError(str(exc)) from exc
    client = ApiClient(configuration=configuration)
    client.user_agent = USER_AGENT
    return client


def resource_path(
    resource: str,
    *,
    api_version: str = "v1",
    namespace: str | None = None,
    name: str | None = None,
) -> str:
    """REST path of a collection or an object; ``api_version`` is ``v1`` or ``group/version``."""
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    if namespace is not None:
        base += f"/namespaces/{namespace}"
    base += f"/{resource}"
    if name is not None:
        base += f"/{name}"
    return base


def object_key(obj: Mapping[str, Any]) -> str:
    """Cache key: ``"ns/name"``, or ``"name"`` for a cluster-scoped object."""
    meta = obj["metadata"]
    ns = meta.get("namespace")
    return f"{ns}/{meta['name']}" if ns else str(meta["name"])


Query = Iterable[tuple[str, str]]


async def open_response(
    api: ApiClient,
    method: str,
    path: str,
    query: Query,
    body: Any,
    content_type: str | None,
    limits: tuple[float, float],
) -> aiohttp.ClientResponse:
    headers = {"Accept": "application/json"}
    if content_type is not None:
        headers["Content-Type"] = content_type
    try:
        response: aiohttp.ClientResponse = await api.call_api(
            path,
            method,
            query_params=list(query),
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
            _preload_content=False,
            _request_timeout=aiohttp.ClientTimeout(
                connect=limits[0], sock_connect=limits[0], sock_read=limits[1]
            ),
        )
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise KubeUnreachable(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
    return response


async def raise_for_status(response: aiohttp.ClientResponse) -> None:
    if response.status < 400:
        return
    raw = await response.read()
    try:
        body = json.loads(raw)
    except ValueError:
        body = {"message": raw[:200].decode("utf-8", "replace")}
    raise api_error(response.status, body, _retry_after(response.headers.get("Retry-After")))


async def request(
    api: ApiClient,
    method: str,
    path: str,
    *,
    query: Query = (),
    body: Any = None,
    content_type: str | None = None,
    request_timeout: tuple[float, float] = DEFAULT_TIMEOUT,
) -> Any:
    """One JSON request; the parsed response body, or a KubeError."""
    response = await open_response(api, method, path, query, body, content_type, request_timeout)
    try:
        async with response:
            await raise_for_status(response)
            raw = await response.read()
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise KubeUnreachable(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise KubeApiError(response.status, "BadResponse", f"not JSON: {exc}") from exc
