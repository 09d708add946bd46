"""router.reloader.decide: the reloader's decisions as a table (pure: no process, no clock).

Each row: a state, one event, the fields of the next state that matter, and the actions (as
short strings: ``start a,b reason``, ``signal N``, ``kill``, ``exit N``, ``note KIND``).
"""

from __future__ import annotations

import signal
from dataclasses import replace
from typing import Any

import pytest

from router.reloader.decide import (
    REASON_CRASH,
    REASON_NAMESPACES,
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
    decide,
    next_wake,
)
from router.settings import ReloaderSettings

SETTINGS = ReloaderSettings(
    command=("keda",),
    debounce=2.0,
    grace_period=30.0,
    backoff_initial=1.0,
    backoff_max=8.0,
    backoff_reset=60.0,
)
A = frozenset({"a"})
AB = frozenset({"a", "b"})
NONE: frozenset[str] = frozenset()

WAITING = State(SETTINGS)
RUNNING = State(SETTINGS, phase="running", desired=A, current=A, child_pid=7, started_at=100.0)
PENDING = replace(RUNNING, desired=AB, pending_since=100.0)
TERMINATING = replace(
    RUNNING, phase="restarting", current=AB, desired=AB, terminating=True,
    restart_reason=REASON_NAMESPACES, kill_at=132.0,
)  # fmt: skip
BACKOFF = State(
    SETTINGS, phase="backoff", desired=A, current=A, backoff_until=105.0, crash_attempts=1,
    restart_reason=REASON_CRASH, last_status=1,
)  # fmt: skip
HELD = State(SETTINGS, phase="held", desired=NONE, current=NONE, held=True, last_status=0)
STOPPING = replace(RUNNING, phase="stopping", stopping=signal.SIGTERM, child_at_stop=True,
                   kill_at=130.0)  # fmt: skip


def show(action: Action) -> str:
    if isinstance(action, Start):
        return f"start {','.join(sorted(action.namespaces))} {action.reason}"
    if isinstance(action, Signal):
        return f"signal {action.signum}"
    if isinstance(action, Kill):
        return "kill"
    if isinstance(action, Exit):
        return f"exit {action.status}"
    assert isinstance(action, Note)
    return f"note {action.kind}"


TABLE: list[tuple[str, State, Event, dict[str, Any], list[str]]] = [
    # -- the first view ------------------------------------------------------------------
    ("nothing known yet: wait", WAITING, Tick(0.0), {"phase": "waiting"}, []),
    ("first set is remembered", WAITING, Namespaces(A, 0.0), {"desired": A, "current": None}, []),
    ("first set starts at once", replace(WAITING, desired=A), Tick(0.0),
     {"current": A, "starting": True}, ["start a None"]),
    ("first set empty: hold, once", replace(WAITING, desired=NONE), Tick(0.0),
     {"phase": "held", "held": True}, ["note hold"]),
    ("held again: no second note", HELD, Tick(5.0), {"phase": "held"}, []),
    ("started", replace(WAITING, desired=A, current=A, starting=True), Started(7, 1.0),
     {"phase": "running", "child_pid": 7, "started_at": 1.0, "starting": False},
     ["note start"]),
    ("command missing", replace(WAITING, desired=A, current=A, starting=True),
     StartFailed(127, "not found"), {"starting": False}, ["note exec-failed", "exit 127"]),
    # -- namespace changes ---------------------------------------------------------------
    ("same set again: nothing", RUNNING, Namespaces(A, 1.0), {"pending_since": None}, []),
    ("change opens the debounce window", RUNNING, Namespaces(AB, 101.0),
     {"desired": AB, "pending_since": 101.0}, ["note pending"]),
    ("second change inside the window folds in", PENDING, Namespaces(NONE, 101.0),
     {"desired": NONE, "pending_since": 100.0}, []),
    ("back to the running set cancels", PENDING, Namespaces(A, 101.0),
     {"pending_since": None}, ["note cancelled"]),
    ("window still open", PENDING, Tick(101.9), {"phase": "running"}, []),
    ("window over: SIGTERM for the restart", PENDING, Tick(102.0),
     {"phase": "restarting", "terminating": True, "current": AB, "kill_at": 132.0,
      "restart_reason": REASON_NAMESPACES}, [f"signal {signal.SIGTERM}"]),
    ("restart: the child exits", TERMINATING, Exited(0, 110.0),
     {"terminating": False, "child_pid": None, "last_status": 0}, ["note exit"]),
    ("restart: start with the new set at once",
     replace(TERMINATING, terminating=False, child_pid=None, kill_at=None), Tick(110.0),
     {"starting": True}, ["start a,b namespaces"]),
    ("restart: grace period over", TERMINATING, Tick(132.0), {"kill_at": None},
     ["note sigkill", "kill"]),
    ("restart: nothing before the grace period ends", TERMINATING, Tick(131.0), {}, []),
    ("held, a namespace appears: start after the window", replace(HELD, desired=A,
     pending_since=10.0), Tick(12.0), {"starting": True, "restart_reason": REASON_NAMESPACES},
     ["start a namespaces"]),
    # -- crashes -------------------------------------------------------------------------
    ("crash: back off by the one retry policy", RUNNING, Exited(1, 100.5),
     {"phase": "backoff", "backoff_until": 101.5, "crash_attempts": 1,
      "restart_reason": REASON_CRASH, "last_status": 1}, ["note exit", "note backoff"]),
    ("second crash doubles", replace(RUNNING, crash_attempts=1), Exited(1, 100.5),
     {"backoff_until": 102.5, "crash_attempts": 2}, ["note exit", "note backoff"]),
    ("capped", replace(RUNNING, crash_attempts=9), Exited(1, 100.5),
     {"backoff_until": 108.5}, ["note exit", "note backoff"]),
    ("a long run resets the backoff", replace(RUNNING, crash_attempts=5), Exited(1, 160.0),
     {"backoff_until": 161.0, "crash_attempts": 1}, ["note exit", "note backoff"]),
    ("backing off", BACKOFF, Tick(104.0), {"phase": "backoff"}, []),
    ("backoff over: start again", BACKOFF, Tick(105.0),
     {"starting": True, "backoff_until": None}, ["start a crash"]),
    ("a change waiting after a crash starts at once with it",
     replace(BACKOFF, desired=AB, pending_since=104.5), Tick(105.0),
     {"current": AB, "pending_since": None}, ["start a,b crash"]),
    # -- stopping ------------------------------------------------------------------------
    ("stop forwards the signal and starts the grace period", RUNNING, Stop(signal.SIGINT, 200.0),
     {"phase": "stopping", "stopping": signal.SIGINT, "child_at_stop": True, "kill_at": 230.0},
     ["note stopping", f"signal {signal.SIGINT}"]),
    ("a second stop only forwards", STOPPING, Stop(signal.SIGINT, 201.0),
     {"stopping": signal.SIGTERM}, [f"signal {signal.SIGINT}"]),
    ("stopping: exit with the child's status", STOPPING, Exited(143, 120.0),
     {"child_pid": None}, ["note exit", "exit 143"]),
    ("stopping: SIGKILL after the grace period", STOPPING, Tick(130.0), {"kill_at": None},
     ["note sigkill", "kill"]),
    ("stop without a child: exit 0", replace(WAITING, stopping=signal.SIGTERM), Tick(1.0), {},
     ["note None", "exit 0"]),
    ("stop while backing off: the crashed child's status",
     replace(BACKOFF, stopping=signal.SIGTERM, child_at_stop=True), Tick(104.0), {},
     ["note None", "exit 1"]),
    ("a stop during the spawn reaches the child once it exists",
     replace(WAITING, desired=A, current=A, starting=True, stopping=signal.SIGTERM),
     Started(9, 3.0), {"child_pid": 9, "kill_at": 33.0, "phase": "stopping"},
     ["note start", f"signal {signal.SIGTERM}"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("state", "event", "expected", "actions"),
    [row[1:] for row in TABLE],
    ids=[row[0] for row in TABLE],
)
def test_decide(state: State, event: Event, expected: dict[str, Any], actions: list[str]) -> None:
    after, done = decide(state, event)
    assert {k: getattr(after, k) for k in expected} == expected
    assert [show(a) for a in done] == actions


def test_every_tick_without_news_is_quiet() -> None:
    """Deciding again with nothing new changes nothing (the shell never busy-loops)."""
    for state in (WAITING, RUNNING, PENDING, TERMINATING, BACKOFF, HELD, STOPPING):
        once, _ = decide(state, Tick(100.0))
        twice, actions = decide(once, Tick(100.0))
        assert twice == once
        assert actions == ()


@pytest.mark.parametrize(
    ("state", "wake"),
    [
        (WAITING, None),
        (RUNNING, None),
        (PENDING, 102.0),
        (TERMINATING, 132.0),
        (BACKOFF, 105.0),
        (replace(BACKOFF, desired=AB, pending_since=104.5), 105.0),
        (STOPPING, 130.0),
        (HELD, None),
    ],
)
def test_next_wake(state: State, wake: float | None) -> None:
    assert next_wake(state) == wake


def test_notes_carry_the_log_lines_operators_know() -> None:
    _, actions = decide(replace(WAITING, desired=A, current=A, starting=True), Started(7, 1.0))
    note = actions[0]
    assert isinstance(note, Note)
    assert note.message == "child started pid=7 WATCH_NAMESPACE=a restart_reason=none"
    assert note.details == {"pid": 7, "namespaces": A, "reason": None}
