"""list+watch of one resource into a cache of raw dicts (kopf's shape).

Public API
----------
``Informer(api, resource, *, namespace=None, api_version="v1", label_selector=None,
field_selector=None, backoff=None, page_size=500, on_restart=None)``
    list+watch of one resource. ``cache`` (read-only ``Mapping[str, dict]`` of raw objects keyed
    ``"ns/name"``, or ``"name"`` when cluster-scoped; ``metadata.managedFields`` stripped),
    ``synced`` (``asyncio.Event``, set after the first complete list), ``resource_version``,
    ``restarts`` (watch/list failures so far; ``on_restart(reason)`` is called with
    ``"gone"`` or ``"error"`` on each), ``last_sync`` (Unix time of the last sign that the cache
    is current: a completed list, a watch (re)connected, an event or a bookmark; None before),
    ``async run(on_change)``: runs until cancelled.

Behaviour (an endless outer loop around a finite inner watch)
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
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import aiohttp
from kubernetes_asyncio.client import ApiClient

from router import logs
from router.cluster.client import (
    DEFAULT_TIMEOUT,
    KubeApiError,
    KubeError,
    KubeGone,
    api_error,
    object_key,
    open_response,
    raise_for_status,
    request,
    resource_path,
)
from router.cluster.retry import Backoff

logger = logging.getLogger(__name__)


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
                    "watch expired; relisting",
                    extra=logs.fields(resource=self.resource, reason=exc.message),
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
                    "list/watch failed; will retry",
                    extra=logs.fields(
                        resource=self.resource,
                        attempt=self.backoff.attempts,
                        delay=round(delay, 2),
                        error=f"{type(exc).__name__}: {exc}",
                    ),
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
            "listed",
            extra=logs.fields(resource=self.resource, objects=len(fresh), resourceVersion=version),
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
        response = await open_response(
            self.api, "GET", self._path, query, None, None, (connect, timeout_seconds + 30.0)
        )
        async with response:
            await raise_for_status(response)
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
            raise api_error(code if isinstance(code, int) else 500, obj)
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
            logger.debug(
                "ignoring watch event", extra=logs.fields(type=kind, resource=self.resource)
            )
            return
        if version:
            self.resource_version = str(version)
        self._notify(on_change)
