"""The namespace reloader: run a tenant's KEDA operator with an up-to-date WATCH_NAMESPACE.

KEDA reads WATCH_NAMESPACE once and controller-runtime cannot widen a manager's namespace
cache after start, while tenants create and delete namespaces freely. The reloader is a small
process manager that runs as the operator container's entrypoint:

- it starts COMMAND as a child with ``WATCH_NAMESPACE=<sorted,comma,separated>`` and the child's
  stdin/stdout/stderr inherited (output passes through unchanged);
- when the tenant's namespace set changes, it waits for the debounce window (which starts at the
  first change; every change inside it is folded into one restart, and a set that returns to the
  running one before it ends restarts nothing), sends SIGTERM, waits up to the grace period,
  sends SIGKILL, and starts the child again with the new value;
- it never starts the child with an empty value (KEDA would watch every namespace): an empty set
  holds the child stopped until a namespace appears (state ``held``, logged, child_up 0);
- a child that exits on its own is restarted after a capped exponential backoff that is reset
  once a child stayed up for a while, so a crash loop never becomes a busy loop;
- SIGTERM/SIGINT are forwarded to the child and the reloader exits with the child's exit
  status (128+N when the child died on signal N; 0 when no child was running).

The child runs in its own process group, so a terminal's Ctrl-C reaches it once (forwarded),
not twice (controller-runtime exits hard on a second signal).

``Reloader`` is fed namespace sets through ``update()`` by any source and knows nothing about
Kubernetes. ``NamespaceSource`` is the Kubernetes one: the shared ``cluster.informer.Informer``
(list+watch, relist on 410, backoff, cache kept through API outages, so an outage leaves the child
running with the last known set) and the shared ``router.tenancy`` resolution:

- ``--tenant T``: every namespace is watched (only ``--namespace-selector``, when also given,
  narrows the watch) and membership is recomputed from the whole cache on each change, so a
  namespace whose tenant label, name pattern or HNC root changes leaves the set;
- ``--namespace-selector`` alone: the watch is label-selected. The API server sends DELETED for
  an object that stops matching a label-selected watch (and ADDED when it starts to), and a relist
  returns only matching objects, so a namespace that loses the label leaves the cache and the set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from kubernetes_asyncio.client import ApiClient
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)

from router.cluster.informer import Informer
from router.cluster.retry import Backoff
from router.config import TenancySettings
from router.core.tenancy import NamespaceInfo, tenant_of

logger = logging.getLogger(__name__)

REASON_NAMESPACES = "namespaces"
REASON_CRASH = "crash"
REASONS = (REASON_NAMESPACES, REASON_CRASH)

# Observer of what the reloader does: (kind, details). Kinds: start, exit, signal, sigkill,
# hold, pending, cancelled, backoff, stopping. For logs-as-events in tests and embedding.
EventHook = Callable[[str, Mapping[str, Any]], None]


def watch_namespace_value(namespaces: Iterable[str]) -> str:
    """The WATCH_NAMESPACE value: sorted, comma-separated, no duplicates."""
    return ",".join(sorted(set(namespaces)))


def exit_status(returncode: int) -> int:
    """A shell-style exit status: the code itself, or 128+N for a death by signal N."""
    return returncode if returncode >= 0 else 128 - returncode


@dataclass(frozen=True, slots=True)
class ReloaderSettings:
    command: tuple[str, ...]
    env_name: str = "WATCH_NAMESPACE"
    debounce: float = 2.0
    grace_period: float = 30.0
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    # A child that stayed up this long resets the backoff to backoff_initial.
    backoff_reset: float = 120.0
    # Base environment of the child; None = the reloader's own environment at start time.
    environment: Mapping[str, str] | None = field(default=None)


class CrashBackoff:
    """Capped exponential delays between restarts of a crashing child (pure)."""

    def __init__(self, initial: float, maximum: float, reset_after: float) -> None:
        if initial <= 0:
            raise ValueError("initial backoff must be > 0")
        self.initial = initial
        self.maximum = max(maximum, initial)
        self.reset_after = reset_after
        self._next = initial

    def delay(self, uptime: float) -> float:
        """The wait before the next start, given how long the child that just exited ran."""
        if uptime >= self.reset_after:
            self._next = self.initial
        delay = self._next
        self._next = min(self._next * 2, self.maximum)
        return delay


class ReloaderMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.restarts = Counter(
            "metrics_router_reloader_restarts_total",
            "Restarts of the child by reason: namespaces (the set changed), crash (it exited "
            "on its own).",
            ["reason"],
            registry=registry,
        )
        self.namespaces = Gauge(
            "metrics_router_reloader_namespaces",
            "Namespaces currently selected for WATCH_NAMESPACE (0 holds the child stopped).",
            registry=registry,
        )
        self.child_up = Gauge(
            "metrics_router_reloader_child_up", "1 while the child process runs.", registry=registry
        )
        for reason in REASONS:
            self.restarts.labels(reason)


class Reloader:
    """Keeps one child process running with the namespace set given to ``update()``."""

    def __init__(
        self,
        settings: ReloaderSettings,
        metrics: ReloaderMetrics,
        on_event: EventHook | None = None,
    ) -> None:
        if not settings.command:
            raise ValueError("a command is required")
        self.settings = settings
        self.metrics = metrics
        self._on_event = on_event
        self._backoff = CrashBackoff(
            settings.backoff_initial, settings.backoff_max, settings.backoff_reset
        )
        self._wake = asyncio.Event()
        self._desired: frozenset[str] | None = None  # latest set from the source
        self._current: frozenset[str] | None = None  # set the child runs (or is held) with
        self._pending_since: float | None = None  # start of the debounce window
        self._proc: asyncio.subprocess.Process | None = None
        self._exit_task: asyncio.Task[int] | None = None
        self._started_at = 0.0
        self._backoff_until: float | None = None
        self._restart_reason: str | None = None
        self._stopping: int | None = None
        self._child_at_stop = False
        self._last_status: int | None = None
        self._held = False
        self._state = "waiting"

    # -- inputs -----------------------------------------------------------------------------

    def update(self, namespaces: Iterable[str]) -> None:
        """The source's current view of the tenant's namespaces (the whole set)."""
        new = frozenset(namespaces)
        if new == self._desired:
            return  # label churn that does not change membership
        self._desired = new
        self.metrics.namespaces.set(len(new))
        if self._current is not None:
            if new == self._current:
                if self._pending_since is not None:
                    self._pending_since = None
                    logger.info("namespace change cancelled namespaces=%s", _fmt(new))
                    self._emit("cancelled", namespaces=new)
            elif self._pending_since is None:
                self._pending_since = asyncio.get_running_loop().time()
                logger.info(
                    "namespace change pending namespaces=%s restart_in=%.3gs",
                    _fmt(new),
                    self.settings.debounce,
                )
                self._emit("pending", namespaces=new)
        self._wake.set()

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Forward ``signum`` to the child and shut down once it has exited."""
        if self._stopping is None:
            self._stopping = signum
            self._child_at_stop = self._proc is not None
            logger.info("stopping signal=%s", signal.Signals(signum).name)
            self._emit("stopping", signal=signum)
        self._signal_child(signum)
        self._wake.set()

    # -- observation ------------------------------------------------------------------------

    @property
    def state(self) -> str:
        """waiting (no namespace set yet), running, held, backoff, restarting, stopping."""
        return self._state

    @property
    def child_pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def status(self) -> dict[str, Any]:
        return {
            "state": self._state,
            "childPid": self.child_pid,
            "namespaces": sorted(self._current or ()),
            "pending": self._pending_since is not None,
        }

    # -- the loop ---------------------------------------------------------------------------

    async def run(self) -> int:
        """Run until ``stop()``; return the exit status to exit with."""
        try:
            return await self._loop()
        finally:
            await self._kill_leftover()

    async def _loop(self) -> int:
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            if self._stopping is not None:
                return await self._shutdown()
            now = loop.time()
            timeout: float | None = None
            if self._current is None and self._desired is not None:
                self._current = self._desired  # the first view starts the child at once
            if self._pending_since is not None:
                due = self._pending_since + self.settings.debounce
                if now >= due:
                    self._pending_since = None
                    self._current = self._desired
                    if self._proc is not None:
                        self._restart_reason = REASON_NAMESPACES
                        self._state = "restarting"
                        await self._terminate(self._proc)
                        continue
                    if self._restart_reason is None and self._last_status is not None:
                        self._restart_reason = REASON_NAMESPACES
                else:
                    timeout = due - now
            if self._proc is None and self._current is not None:
                if self._backoff_until is not None and now < self._backoff_until:
                    self._state = "backoff"
                    timeout = _min(timeout, self._backoff_until - now)
                else:
                    self._backoff_until = None
                    if self._restart_reason == REASON_CRASH and self._pending_since is not None:
                        # The child is down anyway: start it with the freshest set.
                        assert self._desired is not None
                        self._current = self._desired
                        self._pending_since = None
                    if not self._current:
                        self._hold()
                    elif self._pending_since is None:
                        status = await self._start(self._current)
                        if status is not None:
                            return status
                        continue
            await self._wait(timeout)

    def _hold(self) -> None:
        self._state = "held"
        if not self._held:
            self._held = True
            logger.warning(
                "no namespaces selected: holding the child stopped (an empty %s would "
                "watch every namespace)",
                self.settings.env_name,
            )
            self._emit("hold")

    async def _wait(self, wake_in: float | None) -> None:
        """Until update()/stop(), the child's exit, or ``wake_in`` seconds."""
        wake = asyncio.ensure_future(self._wake.wait())
        waiters: set[asyncio.Future[Any]] = {wake}
        if self._exit_task is not None:
            waiters.add(self._exit_task)
        try:
            await asyncio.wait(waiters, timeout=wake_in, return_when=asyncio.FIRST_COMPLETED)
        finally:
            wake.cancel()  # not awaited: that could swallow a cancellation of run() itself
        if self._exit_task is not None and self._exit_task.done() and self._stopping is None:
            self._on_crash()

    async def _start(self, namespaces: frozenset[str]) -> int | None:
        """Start the child; return an exit status only when COMMAND cannot be executed."""
        value = watch_namespace_value(namespaces)
        env = dict(os.environ if self.settings.environment is None else self.settings.environment)
        env[self.settings.env_name] = value
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.settings.command, env=env, process_group=0
            )
        except OSError as exc:
            code = 127 if isinstance(exc, FileNotFoundError) else 126
            logger.error(
                "cannot execute command=%s error=%s exit_code=%d",
                self.settings.command[0],
                exc,
                code,
            )
            self._emit("exec-failed", error=str(exc), code=code)
            return code
        loop = asyncio.get_running_loop()
        self._proc = proc
        self._exit_task = asyncio.ensure_future(proc.wait())
        self._started_at = loop.time()
        self._held = False
        self._state = "running"
        self.metrics.child_up.set(1)
        if self._restart_reason is not None:
            self.metrics.restarts.labels(self._restart_reason).inc()
        reason, self._restart_reason = self._restart_reason, None
        logger.info(
            "child started pid=%d %s=%s restart_reason=%s",
            proc.pid,
            self.settings.env_name,
            value,
            reason or "none",
        )
        self._emit("start", pid=proc.pid, namespaces=namespaces, reason=reason)
        if self._stopping is not None:  # a signal arrived while the child was being spawned
            self._signal_child(self._stopping)
        return None

    def _child_exited(self) -> tuple[asyncio.subprocess.Process, int]:
        proc = self._proc
        assert proc is not None
        assert proc.returncode is not None
        self._proc = None
        self._exit_task = None
        self.metrics.child_up.set(0)
        status = exit_status(proc.returncode)
        self._last_status = status
        return proc, status

    def _on_crash(self) -> None:
        now = asyncio.get_running_loop().time()
        uptime = now - self._started_at
        proc, status = self._child_exited()
        delay = self._backoff.delay(uptime)
        self._backoff_until = now + delay
        self._restart_reason = REASON_CRASH
        self._state = "backoff"
        logger.warning(
            "child exited on its own pid=%d exit_code=%d uptime=%.3gs restart_in=%.3gs",
            proc.pid,
            status,
            uptime,
            delay,
        )
        self._emit("exit", pid=proc.pid, status=status, expected=False)
        self._emit("backoff", delay=delay)

    async def _terminate(self, proc: asyncio.subprocess.Process) -> int:
        """SIGTERM, up to the grace period, then SIGKILL; returns the exit status."""
        exit_task = self._exit_task
        assert exit_task is not None
        if proc.returncode is None:
            self._signal_child(signal.SIGTERM)
        await self._wait_or_kill(proc, exit_task)
        _, status = self._child_exited()
        logger.info("child stopped pid=%d exit_code=%d", proc.pid, status)
        self._emit("exit", pid=proc.pid, status=status, expected=True)
        return status

    async def _wait_or_kill(
        self, proc: asyncio.subprocess.Process, exit_task: asyncio.Task[int]
    ) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(exit_task), self.settings.grace_period)
        except TimeoutError:
            logger.warning(
                "child did not exit within the grace period pid=%d grace_period=%.3gs: SIGKILL",
                proc.pid,
                self.settings.grace_period,
            )
            self._emit("sigkill", pid=proc.pid)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await exit_task

    async def _shutdown(self) -> int:
        self._state = "stopping"
        proc = self._proc
        if proc is None:
            status = (
                self._last_status if self._child_at_stop and self._last_status is not None else 0
            )
            logger.info("exiting exit_code=%d (no child running)", status)
            return status
        assert self._exit_task is not None
        await self._wait_or_kill(proc, self._exit_task)
        _, status = self._child_exited()
        logger.info("child exited pid=%d exit_code=%d; exiting with it", proc.pid, status)
        self._emit("exit", pid=proc.pid, status=status, expected=True)
        return status

    async def _kill_leftover(self) -> None:
        """On cancellation or error: never leave the child behind."""
        proc, exit_task = self._proc, self._exit_task
        if proc is None or exit_task is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(asyncio.CancelledError):
            await exit_task
        self._proc = self._exit_task = None
        self.metrics.child_up.set(0)

    def _signal_child(self, signum: int) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)
            logger.info("signal sent pid=%d signal=%s", proc.pid, signal.Signals(signum).name)
            self._emit("signal", pid=proc.pid, signal=signum)

    def _emit(self, kind: str, **details: Any) -> None:
        if self._on_event is not None:
            self._on_event(kind, details)


def _min(a: float | None, b: float) -> float:
    return b if a is None else min(a, b)


def _fmt(namespaces: Iterable[str]) -> str:
    return watch_namespace_value(namespaces) or "<none>"


# -- the Kubernetes namespace source ----------------------------------------------------------


def select_namespaces(
    objects: Iterable[Mapping[str, Any]], tenant: str | None, tenancy: TenancySettings
) -> frozenset[str]:
    """Names of the tenant's namespaces among raw Namespace objects (pure).

    With ``tenant`` None every object given is selected (the API's label selector chose them).
    """
    infos = [NamespaceInfo.from_object(obj) for obj in objects]
    if tenant is None:
        return frozenset(info.name for info in infos)
    by_name = {info.name: info for info in infos}
    return frozenset(info.name for info in infos if tenant_of(info, by_name, tenancy) == tenant)


class NamespaceSource:
    """Watches namespaces and feeds the tenant's set to ``sink`` (e.g. ``Reloader.update``).

    Informer events only mark the view dirty; one task recomputes the set, so a burst of events
    (or the initial list of 10,000 namespaces) costs one computation.
    """

    def __init__(
        self,
        api: ApiClient,
        sink: Callable[[frozenset[str]], None],
        *,
        tenant: str | None,
        tenancy: TenancySettings,
        backoff: Backoff | None = None,
        on_restart: Callable[[str], None] | None = None,
    ) -> None:
        if tenant is None and not tenancy.namespace_selector:
            raise ValueError("a tenant or a namespace selector is required")
        self.tenant = tenant
        self.tenancy = tenancy
        self.informer = Informer(
            api,
            "namespaces",
            label_selector=tenancy.namespace_selector,
            backoff=backoff,
            on_restart=on_restart,
        )
        self._sink = sink
        self._dirty = asyncio.Event()
        self.last: frozenset[str] | None = None

    async def run(self) -> None:
        """Until cancelled; an unexpected error (a bug, not an API outage) propagates."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self.informer.run(self._dirty.set))
            group.create_task(self._publish())

    async def _publish(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            selected = select_namespaces(self.informer.cache.values(), self.tenant, self.tenancy)
            if selected != self.last:
                logger.info(
                    "namespaces selected tenant=%s selector=%s namespaces=%s",
                    self.tenant or "-",
                    self.tenancy.namespace_selector or "-",
                    _fmt(selected),
                )
            self.last = selected
            self._sink(selected)


# -- health and metrics port -----------------------------------------------------------------

RELOADER_KEY = web.AppKey("reloader", Reloader)
REGISTRY_KEY = web.AppKey("registry", CollectorRegistry)


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response(request.app[RELOADER_KEY].status())


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[REGISTRY_KEY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def health_app(reloader: Reloader, registry: CollectorRegistry) -> web.Application:
    """/healthz (200 while the reloader loop serves, with its state) and /metrics."""
    app = web.Application()
    app[RELOADER_KEY] = reloader
    app[REGISTRY_KEY] = registry
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/metrics", _metrics)
    return app


async def start_health_server(
    reloader: Reloader, registry: CollectorRegistry, host: str, port: int
) -> tuple[web.AppRunner, int]:
    """Serve ``health_app`` on host:port (0 = OS-chosen); returns the runner and bound port."""
    runner = web.AppRunner(health_app(reloader, registry), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = port
    for address in runner.addresses:
        if isinstance(address, tuple):
            bound = int(address[1])
            break
    return runner, bound
