"""The reloader's decisions (pure): ``decide(state, event) -> (state, actions)``.

A purely computational module: no clock, no process, no asyncio. ``State`` is immutable; the
shell (``router.reloader.shell``) feeds it events (a new namespace set, a stop request, the
child started, the child exited, a timer tick) and carries out the actions it returns (start
the child, signal it, kill it, exit, note what happened). ``next_wake(state)`` says when the
shell must tick again if nothing else happens.

The rules
---------
- The first namespace set starts the child at once. A later change waits for the debounce
  window (it starts at the first change; every change inside it is folded into one restart,
  and a set that returns to the running one before it ends restarts nothing).
- A restart is SIGTERM, up to the grace period, then SIGKILL, then a start with the new set.
- An empty set holds the child stopped (KEDA would watch every namespace with an empty value).
- A child that exits on its own is restarted after the crash backoff: the project's one retry
  policy (``router.cluster.retry.BackoffPolicy``, doubling, no jitter), reset once a child
  stayed up ``backoff_reset`` seconds. A change that arrived meanwhile is started at once.
- A stop request forwards its signal to the child (every time it is asked), waits for the
  child up to the grace period (then SIGKILL) and exits with the child's status (0 when no
  child was running).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from router.cluster.retry import BackoffPolicy
from router.settings import ReloaderSettings

REASON_NAMESPACES = "namespaces"
REASON_CRASH = "crash"
REASONS = (REASON_NAMESPACES, REASON_CRASH)

_NO_DETAILS: Mapping[str, Any] = MappingProxyType({})


def watch_namespace_value(namespaces: Iterable[str]) -> str:
    """The WATCH_NAMESPACE value: sorted, comma-separated, no duplicates."""
    return ",".join(sorted(set(namespaces)))


def exit_status(returncode: int) -> int:
    """A shell-style exit status: the code itself, or 128+N for a death by signal N."""
    return returncode if returncode >= 0 else 128 - returncode


def _fmt(namespaces: Iterable[str]) -> str:
    return watch_namespace_value(namespaces) or "<none>"


# --------------------------------------------------------------------------- crash backoff


def crash_policy(initial: float, maximum: float) -> BackoffPolicy:
    """The retry policy for a crashing child: doubling from ``initial``, capped, no jitter."""
    if initial <= 0:
        raise ValueError("initial backoff must be > 0")
    return BackoffPolicy(initial=initial, maximum=max(maximum, initial), factor=2.0, jitter=0.0)


def crash_delay(
    policy: BackoffPolicy, attempts: int, uptime: float, reset_after: float
) -> tuple[float, int]:
    """(delay before the next start, attempts after it) for a child that ran ``uptime``."""
    if uptime >= reset_after:
        attempts = 0
    return policy.delay(attempts), attempts + 1


class CrashBackoff:
    """``crash_delay`` with its attempt count kept: ``delay(uptime)`` for each exit."""

    def __init__(self, initial: float, maximum: float, reset_after: float) -> None:
        self.policy = crash_policy(initial, maximum)
        self.reset_after = reset_after
        self.attempts = 0

    def delay(self, uptime: float) -> float:
        delay, self.attempts = crash_delay(self.policy, self.attempts, uptime, self.reset_after)
        return delay


# --------------------------------------------------------------------------- state


@dataclass(frozen=True, slots=True)
class State:
    """Everything the reloader knows. ``phase``: waiting (no namespace set yet), running,
    held, backoff, restarting, stopping."""

    settings: ReloaderSettings
    phase: str = "waiting"
    desired: frozenset[str] | None = None  # latest set from the source
    current: frozenset[str] | None = None  # set the child runs (or is held) with
    pending_since: float | None = None  # start of the debounce window
    starting: bool = False  # a Start is being carried out
    child_pid: int | None = None  # the running child
    started_at: float = 0.0
    backoff_until: float | None = None
    crash_attempts: int = 0
    restart_reason: str | None = None  # why the next start happens
    stopping: int | None = None  # the signal of the stop request
    child_at_stop: bool = False
    last_status: int | None = None
    held: bool = False
    terminating: bool = False  # SIGTERM sent for a restart; waiting for the exit
    kill_at: float | None = None  # SIGKILL when the child is still there then

    @property
    def crash(self) -> BackoffPolicy:
        s = self.settings
        return crash_policy(s.backoff_initial, s.backoff_max)


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Namespaces:
    """The source's current view of the tenant's namespaces (the whole set)."""

    namespaces: frozenset[str]
    now: float


@dataclass(frozen=True, slots=True)
class Stop:
    signum: int
    now: float


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed (a timer fired, or the shell looks again after carrying out actions)."""

    now: float


@dataclass(frozen=True, slots=True)
class Started:
    pid: int
    now: float


@dataclass(frozen=True, slots=True)
class StartFailed:
    """COMMAND could not be executed (127: not found, 126: not executable)."""

    code: int
    error: str


@dataclass(frozen=True, slots=True)
class Exited:
    status: int  # shell-style, see exit_status
    now: float


Event = Namespaces | Stop | Tick | Started | StartFailed | Exited


# --------------------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class Start:
    """Start COMMAND with WATCH_NAMESPACE = ``namespaces``; answer with Started/StartFailed."""

    namespaces: frozenset[str]
    reason: str | None


@dataclass(frozen=True, slots=True)
class Signal:
    """Send ``signum`` to the child if it is running."""

    signum: int


@dataclass(frozen=True, slots=True)
class Kill:
    """SIGKILL the child if it is running."""


@dataclass(frozen=True, slots=True)
class Exit:
    status: int


@dataclass(frozen=True, slots=True)
class Note:
    """Something to log (``message`` at ``level``; None: nothing) and report to observers as
    ``(kind, details)``. Kinds: start, exit, hold, pending, cancelled, backoff, stopping,
    sigkill, exec-failed."""

    kind: str | None  # None: a log line only
    details: Mapping[str, Any] = field(default_factory=lambda: _NO_DETAILS)
    level: int = logging.INFO
    message: str | None = None


Action = Start | Signal | Kill | Exit | Note
Decision = tuple[State, tuple[Action, ...]]


# --------------------------------------------------------------------------- decide


def decide(state: State, event: Event) -> Decision:
    """The next state and what to do, for one event."""
    if isinstance(event, Namespaces):
        return _namespaces(state, event.namespaces, event.now)
    if isinstance(event, Stop):
        return _stop(state, event.signum, event.now)
    if isinstance(event, Started):
        return _started(state, event.pid, event.now)
    if isinstance(event, StartFailed):
        return _start_failed(state, event.code, event.error)
    if isinstance(event, Exited):
        return _exited(state, event.status, event.now)
    return _tick(state, event.now)


def next_wake(state: State) -> float | None:
    """When to tick if no other event comes first (None: only events wake the shell)."""
    times: list[float] = []
    if state.kill_at is not None:
        times.append(state.kill_at)
    if state.stopping is None and not state.terminating:
        if state.pending_since is not None:
            times.append(state.pending_since + state.settings.debounce)
        if state.backoff_until is not None and state.child_pid is None:
            times.append(state.backoff_until)
    return min(times) if times else None


def _namespaces(s: State, new: frozenset[str], now: float) -> Decision:
    if new == s.desired:
        return s, ()  # label churn that does not change membership
    s = replace(s, desired=new)
    if s.current is None:
        return s, ()
    if new == s.current:
        if s.pending_since is None:
            return s, ()
        message = f"namespace change cancelled namespaces={_fmt(new)}"
        return replace(s, pending_since=None), (
            Note("cancelled", {"namespaces": new}, message=message),
        )
    if s.pending_since is not None:
        return s, ()
    message = (
        f"namespace change pending namespaces={_fmt(new)} restart_in={s.settings.debounce:.3g}s"
    )
    return replace(s, pending_since=now), (Note("pending", {"namespaces": new}, message=message),)


def _stop(s: State, signum: int, now: float) -> Decision:
    notes: tuple[Action, ...] = ()
    if s.stopping is None:
        running = s.child_pid is not None
        kill_at = s.kill_at
        if running:
            deadline = now + s.settings.grace_period
            kill_at = deadline if kill_at is None else min(kill_at, deadline)
        s = replace(s, stopping=signum, child_at_stop=running, phase="stopping", kill_at=kill_at)
        message = f"stopping signal={signal.Signals(signum).name}"
        notes = (Note("stopping", {"signal": signum}, message=message),)
    return s, (*notes, Signal(signum))


def _started(s: State, pid: int, now: float) -> Decision:
    reason = s.restart_reason
    s = replace(
        s,
        starting=False,
        child_pid=pid,
        started_at=now,
        held=False,
        phase="running" if s.stopping is None else "stopping",
        restart_reason=None,
    )
    namespaces = s.current or frozenset()
    message = (
        f"child started pid={pid} {s.settings.env_name}={watch_namespace_value(namespaces)} "
        f"restart_reason={reason or 'none'}"
    )
    actions: tuple[Action, ...] = (
        Note("start", {"pid": pid, "namespaces": namespaces, "reason": reason}, message=message),
    )
    stopping = s.stopping
    if stopping is not None:  # a signal arrived while the child was being spawned
        s = replace(s, kill_at=now + s.settings.grace_period)
        actions = (*actions, Signal(stopping))
    return s, actions


def _start_failed(s: State, code: int, error: str) -> Decision:
    message = f"cannot execute command={s.settings.command[0]} error={error} exit_code={code}"
    note = Note("exec-failed", {"error": error, "code": code}, logging.ERROR, message)
    return replace(s, starting=False), (note, Exit(code))


def _exited(s: State, status: int, now: float) -> Decision:
    pid = s.child_pid
    s = replace(s, child_pid=None, last_status=status, kill_at=None)
    if s.stopping is not None:
        message = f"child exited pid={pid} exit_code={status}; exiting with it"
        note = Note("exit", {"pid": pid, "status": status, "expected": True}, message=message)
        return replace(s, terminating=False), (note, Exit(status))
    if s.terminating:
        message = f"child stopped pid={pid} exit_code={status}"
        note = Note("exit", {"pid": pid, "status": status, "expected": True}, message=message)
        return replace(s, terminating=False), (note,)
    uptime = now - s.started_at
    delay, attempts = crash_delay(s.crash, s.crash_attempts, uptime, s.settings.backoff_reset)
    s = replace(
        s,
        backoff_until=now + delay,
        crash_attempts=attempts,
        restart_reason=REASON_CRASH,
        phase="backoff",
    )
    message = (
        f"child exited on its own pid={pid} exit_code={status} uptime={uptime:.3g}s "
        f"restart_in={delay:.3g}s"
    )
    return s, (
        Note("exit", {"pid": pid, "status": status, "expected": False}, logging.WARNING, message),
        Note("backoff", {"delay": delay}),
    )


def _tick(s: State, now: float) -> Decision:
    if s.starting:
        return s, ()
    if s.kill_at is not None and now >= s.kill_at and s.child_pid is not None:
        message = (
            f"child did not exit within the grace period pid={s.child_pid} "
            f"grace_period={s.settings.grace_period:.3g}s: SIGKILL"
        )
        note = Note("sigkill", {"pid": s.child_pid}, logging.WARNING, message)
        return replace(s, kill_at=None), (note, Kill())
    if s.stopping is not None:
        if s.child_pid is not None:
            return s, ()  # waiting for the child to exit
        status = s.last_status if s.child_at_stop and s.last_status is not None else 0
        note = Note(None, message=f"exiting exit_code={status} (no child running)")
        return s, (note, Exit(status))
    if s.terminating:
        return s, ()
    if s.current is None and s.desired is not None:
        s = replace(s, current=s.desired)  # the first view starts the child at once
    if s.pending_since is not None and now >= s.pending_since + s.settings.debounce:
        s = replace(s, pending_since=None, current=s.desired)
        if s.child_pid is not None:
            s = replace(
                s,
                restart_reason=REASON_NAMESPACES,
                phase="restarting",
                terminating=True,
                kill_at=now + s.settings.grace_period,
            )
            return s, (Signal(signal.SIGTERM),)
        if s.restart_reason is None and s.last_status is not None:
            s = replace(s, restart_reason=REASON_NAMESPACES)
    if s.child_pid is not None or s.current is None:
        return s, ()
    if s.backoff_until is not None and now < s.backoff_until:
        return replace(s, phase="backoff"), ()
    s = replace(s, backoff_until=None)
    if s.restart_reason == REASON_CRASH and s.pending_since is not None:
        # The child is down anyway: start it with the freshest set.
        s = replace(s, current=s.desired, pending_since=None)
    if not s.current:
        return _hold(s)
    if s.pending_since is not None:
        return s, ()
    return replace(s, starting=True), (Start(s.current, s.restart_reason),)


def _hold(s: State) -> Decision:
    if s.held:
        return replace(s, phase="held"), ()
    message = (
        f"no namespaces selected: holding the child stopped (an empty {s.settings.env_name} "
        "would watch every namespace)"
    )
    return replace(s, phase="held", held=True), (
        Note("hold", level=logging.WARNING, message=message),
    )
