"""The namespace reloader: run a tenant's KEDA operator with an up-to-date WATCH_NAMESPACE.

KEDA reads WATCH_NAMESPACE once and controller-runtime cannot widen a manager's namespace
cache after start, while tenants create and delete namespaces freely. The reloader is a small
process manager that runs as the operator container's entrypoint: it starts COMMAND as a child
with ``WATCH_NAMESPACE=<sorted,comma,separated>`` and the child's stdin/stdout/stderr inherited
(output passes through unchanged), restarts it when the tenant's namespace set changes,
forwards SIGTERM/SIGINT and exits with the child's status (128+N when the child died on
signal N; 0 when no child was running).

This module is the thin shell: every decision is ``router.reloader.decide.decide`` (pure,
table-tested); the shell turns calls, timers and the child's exit into events and carries out
the actions (start, signal, kill, exit, log and report). The child runs in its own process
group, so a terminal's Ctrl-C reaches it once (forwarded), not twice (controller-runtime exits
hard on a second signal).

``Reloader`` is fed namespace sets through ``update()`` by any source and knows nothing about
Kubernetes; ``router.reloader.source.NamespaceSource`` is the Kubernetes one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from router import logs
from router.metrics import ReloaderMetrics
from router.reloader.decide import (
    Action,
    Event,
    Exit,
    Exited,
    Kill,
    Namespaces,
    Note,
    Signal,
    Start,
    Started,
    StartFailed,
    State,
    Stop,
    Tick,
    crash_policy,
    decide,
    exit_status,
    next_wake,
    watch_namespace_value,
)
from router.settings import ReloaderSettings

logger = logging.getLogger(__name__)

# Observer of what the reloader does: (kind, details). Kinds: start, exit, signal, sigkill,
# hold, pending, cancelled, backoff, stopping, exec-failed. For logs-as-events in tests and
# embedding.
EventHook = Callable[[str, Mapping[str, Any]], None]


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
        crash_policy(settings.backoff_initial, settings.backoff_max)  # refuses a zero delay
        self.settings = settings
        self.metrics = metrics
        self._on_event = on_event
        self._state = State(settings)
        self._wake = asyncio.Event()
        self._proc: asyncio.subprocess.Process | None = None
        self._exit_task: asyncio.Task[int] | None = None

    # -- inputs -----------------------------------------------------------------------------

    def update(self, namespaces: Iterable[str]) -> None:
        """The source's current view of the tenant's namespaces (the whole set)."""
        new = frozenset(namespaces)
        self.metrics.namespaces.set(len(new))
        self._decide(Namespaces(new, asyncio.get_running_loop().time()))
        self._wake.set()

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Forward ``signum`` to the child and shut down once it has exited."""
        self._decide(Stop(signum, asyncio.get_running_loop().time()))
        self._wake.set()

    # -- observation ------------------------------------------------------------------------

    @property
    def state(self) -> str:
        """waiting (no namespace set yet), running, held, backoff, restarting, stopping."""
        return self._state.phase

    @property
    def child_pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def status(self) -> dict[str, Any]:
        return {
            "state": self._state.phase,
            "childPid": self.child_pid,
            "namespaces": sorted(self._state.current or ()),
            "pending": self._state.pending_since is not None,
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
            todo = self._decide(Tick(loop.time()))
            started = False
            while todo:
                action = todo.pop(0)
                if isinstance(action, Exit):
                    return action.status
                if isinstance(action, Start):
                    todo += await self._start(action)
                    started = True
            if started:
                continue  # look again at once: a stop may have come during the spawn
            wake_at = next_wake(self._state)
            await self._wait(None if wake_at is None else max(0.0, wake_at - loop.time()))
            exit_task = self._exit_task
            if exit_task is not None and exit_task.done():
                status = exit_status(exit_task.result())
                self._proc = self._exit_task = None
                for action in self._decide(Exited(status, loop.time())):
                    if isinstance(action, Exit):
                        return action.status

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

    # -- carrying out actions ---------------------------------------------------------------

    def _decide(self, event: Event) -> list[Action]:
        """Feed one event; carry out the immediate actions, return Start and Exit for the loop."""
        self._state, actions = decide(self._state, event)
        later: list[Action] = []
        for action in actions:
            if isinstance(action, Note):
                self._note(action)
            elif isinstance(action, Signal):
                self._signal_child(action.signum)
            elif isinstance(action, Kill):
                if self._proc is not None:
                    with contextlib.suppress(ProcessLookupError):
                        self._proc.kill()
            else:
                later.append(action)
        return later

    async def _start(self, action: Start) -> list[Action]:
        env = dict(os.environ if self.settings.environment is None else self.settings.environment)
        env[self.settings.env_name] = watch_namespace_value(action.namespaces)
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.settings.command, env=env, process_group=0
            )
        except OSError as exc:
            code = 127 if isinstance(exc, FileNotFoundError) else 126
            return self._decide(StartFailed(code, str(exc)))
        self._proc = proc
        self._exit_task = asyncio.ensure_future(proc.wait())
        return self._decide(Started(proc.pid, asyncio.get_running_loop().time()))

    def _note(self, note: Note) -> None:
        if note.kind == "start":
            self.metrics.child_up.set(1)
            reason = note.details.get("reason")
            if reason is not None:
                self.metrics.restarts.labels(reason).inc()
        elif note.kind == "exit":
            self.metrics.child_up.set(0)
        if note.message is not None:
            logger.log(note.level, "%s", note.message)
        if note.kind is not None:
            self._emit(note.kind, **note.details)

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
            logger.info(
                "signal sent",
                extra=logs.fields(pid=proc.pid, signal=signal.Signals(signum).name),
            )
            self._emit("signal", pid=proc.pid, signal=signum)

    def _emit(self, kind: str, **details: Any) -> None:
        if self._on_event is not None:
            self._on_event(kind, details)
