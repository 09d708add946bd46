"""The file watcher: certificates and the routes file re-read when they change on disk
(validate, then swap; keep the last good)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from router import logs, tls
from router.app.sources import RoutesFile
from router.metrics import (
    ExpiryWarnings,
    ProxyMetrics,
    ReloadState,
)

logger = logging.getLogger("router.app")  # the name operators filter on


class FileWatcher:
    """Re-reads the certificates (serving + requestheader CA, proxy client + upstream CA) and the
    routes file when they change on disk: validate, then swap; keep the last good. Exports the
    certificates' expiry at every pass (a certificate in force drifts into the warning window)."""

    def __init__(
        self,
        holders: Sequence[tls.ReloadingContext],
        routes_file: RoutesFile | None,
        *,
        interval: float,
        metrics: ProxyMetrics,
        reload_state: ReloadState,
        expiry_warnings: ExpiryWarnings,
    ) -> None:
        self._holders = tuple(holders)
        self._routes_file = routes_file
        self._interval = interval
        self._metrics = metrics
        self._reload_state = reload_state
        self._expiry_warnings = expiry_warnings
        self._errors = {h.name: logs.ChangeLogger(logger) for h in self._holders}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="watch-files")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            self.check()

    def check(self) -> None:
        """One pass: reload whatever changed on disk (validate first, keep the last good)."""
        if self._routes_file is not None:
            self._routes_file.load()
        for holder in self._holders:
            if not holder.changed():
                continue
            try:
                holder.reload()
            except tls.TLSFileError as exc:
                # The bad file is re-checked at every pass: log and count it when it changes.
                if self._errors[holder.name].report(
                    f"{holder.name} refused, keeping the last good",
                    source=holder.name,
                    error=str(exc),
                ):
                    self._metrics.reloads.labels(holder.name, "failure").inc()
                self._reload_state.set(holder.name, False)
                continue
            self._errors[holder.name].clear()
            self._metrics.reloads.labels(holder.name, "success").inc()
            self._reload_state.set(holder.name, True)
            logger.info("%s reloaded", holder.name, extra=logs.fields(source=holder.name))
        self.export_expiry()

    def export_expiry(self) -> None:
        for holder in self._holders:
            for name, when in holder.expiry.items():
                self._metrics.cert_expiry.labels(name).set(when.timestamp())
                self._expiry_warnings.check(name, when)
