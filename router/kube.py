"""Kubernetes adapter: client, raw JSON requests, list+watch informers, one retry policy.

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
``Backoff(initial=0.5, maximum=30.0, factor=2.0, jitter=0.5)``
    The one retry policy: capped exponential with jitter, Retry-After honoured.
    ``next(retry_after=None) -> float``, ``reset()``, ``async sleep(retry_after=None)``.
``Informer(api, resource, *, namespace=None, api_version="v1", label_selector=None,
field_selector=None, backoff=None, page_size=500, on_restart=None)``
    list+watch of one resource. ``cache`` (read-only ``Mapping[str, dict]`` of raw objects keyed
    ``"ns/name"``, or ``"name"`` when cluster-scoped; ``metadata.managedFields`` stripped),
    ``synced`` (``asyncio.Event``, set after the first complete list), ``resource_version``,
    ``restarts`` (watch/list failures so far; ``on_restart(reason)`` is called with
    ``"gone"`` or ``"error"`` on each), ``last_sync`` (Unix time of the last sign that the cache
    is current: a completed list, a watch (re)connected, an event or a bookmark; None before),
    ``async run(on_change)``: runs until cancelled.

Informer behaviour (kopf's shape: an endless outer loop around a finite inner watch)
    initial list (paged with ``limit``/``continue``) -> watch from the list's resourceVersion
    with ``allowWatchBookmarks`` -> on a normal end of the stream (server timeout) watch again
    from the last resourceVersion seen -> on 410 Gone (an ERROR event with code 410 or an HTTP
    410) relist -> on any other failure log, back off, and watch again (relisting if needed).
    The cache is replaced only by a complete successful list and changed only by events; an
    API outage never clears it, so routes stay in force. ``on_change()`` is called (with no
    arguments, synchronously) after every completed list and every ADDED/MODIFIED/DELETED
    event; callers coalesce. An exception raised by ``on_change`` ends ``run`` (a bug, not an
    API failure).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import aiohttp
from kubernetes_asyncio.client import ApiClient, Configuration

logger = logging.getLogger(__name__)

USER_AGENT = "metrics-router"
APPLY_PATCH = "application/apply-patch+yaml"
MERGE_PATCH = "application/merge-patch+json"
DEFAULT_TIMEOUT = (10.0, 60.0)  # (connect, read) seconds

__all__ = [
    "APPLY_PATCH",
    "MERGE_PATCH",
    "Backoff",
    "Informer",
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


def _api_error(status: int, body: Any, retry_after: float | None = None) -> KubeApiError:
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
    from router import kubeconfig as kubeconfig_loader

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


async def _open(
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


async def _raise_for_status(response: aiohttp.ClientResponse) -> None:
    if response.status < 400:
        return
    raw = await response.read()
    try:
        body = json.loads(raw)
    except ValueError:
        body = {"message": raw[:200].decode("utf-8", "replace")}
    raise _api_error(response.status, body, _retry_after(response.headers.get("Retry-After")))


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
    response = await _open(api, method, path, query, body, content_type, request_timeout)
    try:
        async with response:
            await _raise_for_status(response)
            raw = await response.read()
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise KubeUnreachable(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise KubeApiError(response.status, "BadResponse", f"not JSON: {exc}") from exc


# --------------------------------------------------------------------------- retry policy


@dataclass
class Backoff:
    """Capped exponential backoff with jitter: the one retry policy of the project.

    The n-th delay (from 0) is ``min(maximum, initial * factor**n)`` reduced by up to ``jitter``
    (a fraction) at random; a Retry-After from the server raises it (still capped).
    """

    initial: float = 0.5
    maximum: float = 30.0
    factor: float = 2.0
    jitter: float = 0.5
    attempts: int = 0
    rng: Callable[[], float] = field(default=random.random, repr=False)

    def next(self, retry_after: float | None = None) -> float:
        base = min(self.maximum, self.initial * self.factor ** min(self.attempts, 64))
        self.attempts += 1
        delay = base * (1.0 - self.jitter * self.rng())
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.maximum))
        return delay

    def reset(self) -> None:
        self.attempts = 0

    async def sleep(self, retry_after: float | None = None) -> float:
        delay = self.next(retry_after)
        await asyncio.sleep(delay)
        return delay


# --------------------------------------------------------------------------- informer


class _CallbackFailed(Exception):
    """on_change raised: a bug in the caller, not an API failure; not retried."""


def _strip(obj: dict[str, Any]) -> dict[str, Any]:
    meta = obj.get("metadata")
    if isinstance(meta, dict):
        meta.pop("managedFields", None)
    return obj


class Informer:
    """list+watch of one resource into a cache of raw dicts. See the module docstring."""

    def __init__(
        self,
        api: ApiClient,
        resource: str,
        *,
        namespace: str | None = None,
        api_version: str = "v1",
        label_selector: str | None = None,
        field_selector: str | None = None,
        backoff: Backoff | None = None,
        page_size: int = 500,
        watch_timeout: tuple[int, int] = (300, 600),
        request_timeout: tuple[float, float] = DEFAULT_TIMEOUT,
        on_restart: Callable[[str], None] | None = None,
    ) -> None:
        self.api = api
        self.resource = resource
        self.namespace = namespace
        self.api_version = api_version
        self.label_selector = label_selector
        self.field_selector = field_selector
        self.backoff = backoff if backoff is not None else Backoff()
        self.page_size = page_size
        self.watch_timeout = watch_timeout
        self.request_timeout = request_timeout
        self.on_restart = on_restart
        self._store: dict[str, dict[str, Any]] = {}
        self.cache: Mapping[str, dict[str, Any]] = MappingProxyType(self._store)
        self.synced = asyncio.Event()
        self.resource_version: str | None = None
        self.restarts = 0
        self.last_sync: float | None = None
        self._gone_streak = 0
        self._path = resource_path(resource, api_version=api_version, namespace=namespace)

    def __repr__(self) -> str:
        return f"Informer({self._path}, labelSelector={self.label_selector!r})"

    def _selectors(self) -> list[tuple[str, str]]:
        query = []
        if self.label_selector:
            query.append(("labelSelector", self.label_selector))
        if self.field_selector:
            query.append(("fieldSelector", self.field_selector))
        return query

    async def run(self, on_change: Callable[[], None]) -> None:
        """List, then watch, until cancelled. Never returns normally."""
        while True:
            try:
                if self.resource_version is None:
                    await self._list(on_change)
                await self._watch(on_change)
            except _CallbackFailed as exc:
                raise exc.__cause__ or exc from None
            except KubeGone as exc:
                self._restarted("gone")
                self.resource_version = None
                logger.info(
                    "watch expired; relisting resource=%s reason=%r", self.resource, exc.message
                )
                # Relist at once; only 410s with no event in between (a loop) back off.
                self._gone_streak += 1
                if self._gone_streak > 1:
                    await self.backoff.sleep()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._restarted("error")
                delay = self.backoff.next(getattr(exc, "retry_after", None))
                known = isinstance(exc, KubeError | aiohttp.ClientError | OSError | TimeoutError)
                logger.warning(
                    "list/watch failed; will retry resource=%s attempt=%d delay=%.2fs error=%s",
                    self.resource,
                    self.backoff.attempts,
                    delay,
                    f"{type(exc).__name__}: {exc}",
                    exc_info=not known,
                )
                await asyncio.sleep(delay)

    def _restarted(self, reason: str) -> None:
        self.restarts += 1
        if self.on_restart is not None:
            self.on_restart(reason)

    @staticmethod
    def _notify(on_change: Callable[[], None]) -> None:
        try:
            on_change()
        except Exception as exc:
            raise _CallbackFailed() from exc

    async def _list(self, on_change: Callable[[], None]) -> None:
        fresh: dict[str, dict[str, Any]] = {}
        query = self._selectors()
        if self.page_size > 0:
            query.append(("limit", str(self.page_size)))
        cont: str | None = None
        version = ""
        while True:
            page_query = [*query, ("continue", cont)] if cont else query
            body = await request(
                self.api, "GET", self._path, query=page_query, request_timeout=self.request_timeout
            )
            if not isinstance(body, dict):
                raise KubeApiError(200, "BadResponse", "list answer is not an object")
            for item in body.get("items") or ():
                if self.namespace is not None and not item.get("metadata", {}).get("namespace"):
                    item["metadata"]["namespace"] = self.namespace
                fresh[object_key(item)] = _strip(item)
            meta = body.get("metadata") or {}
            version = str(meta.get("resourceVersion") or version)
            cont = meta.get("continue") or None
            if not cont:
                break
        # Swap in one synchronous step: readers see the old cache or the new one.
        self._store.clear()
        self._store.update(fresh)
        self.resource_version = version or None
        self.last_sync = time.time()
        self.backoff.reset()
        first = not self.synced.is_set()
        self.synced.set()
        logger.log(
            logging.INFO if first else logging.DEBUG,
            "listed resource=%s objects=%d resourceVersion=%s",
            self.resource,
            len(fresh),
            version,
        )
        self._notify(on_change)

    async def _watch(self, on_change: Callable[[], None]) -> None:
        """One watch request; returns when the server ends the stream normally."""
        lo, hi = self.watch_timeout
        timeout_seconds = random.randint(lo, hi) if hi > lo else lo
        query = [
            *self._selectors(),
            ("watch", "true"),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", str(timeout_seconds)),
        ]
        if self.resource_version:
            query.append(("resourceVersion", self.resource_version))
        connect, _ = self.request_timeout
        response = await _open(
            self.api, "GET", self._path, query, None, None, (connect, timeout_seconds + 30.0)
        )
        async with response:
            await _raise_for_status(response)
            self.backoff.reset()
            self.last_sync = time.time()
            async for line in response.content:
                if line.strip():
                    self._event(json.loads(line), on_change)

    def _event(self, event: Mapping[str, Any], on_change: Callable[[], None]) -> None:
        kind = event.get("type")
        obj = event.get("object")
        if not isinstance(obj, dict):
            raise KubeApiError(200, "BadResponse", f"watch event without object: {kind}")
        if kind == "ERROR":
            code = obj.get("code")
            raise _api_error(code if isinstance(code, int) else 500, obj)
        version = (obj.get("metadata") or {}).get("resourceVersion")
        self.last_sync = time.time()
        self._gone_streak = 0
        if kind == "BOOKMARK":
            if version:
                self.resource_version = str(version)
            return
        if self.namespace is not None and not obj.get("metadata", {}).get("namespace"):
            obj["metadata"]["namespace"] = self.namespace
        key = object_key(obj)
        if kind in ("ADDED", "MODIFIED"):
            self._store[key] = _strip(obj)
        elif kind == "DELETED":
            self._store.pop(key, None)
        else:
            logger.debug("ignoring watch event type=%s resource=%s", kind, self.resource)
            return
        if version:
            self.resource_version = str(version)
        self._notify(on_change)
