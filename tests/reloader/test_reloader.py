"""The namespace reloader with real child processes (tests/reloader/reloader_child.py).

Children report what they see (WATCH_NAMESPACE, signals) as JSON lines to a TCP listener in the
test; the reloader reports what it does through its event hook. Tests wait on those, never on
fixed sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from kubernetes_asyncio.client import ApiClient
from prometheus_client import CollectorRegistry

from router.cli import main as cli
from router.cli.reloader import config_from_args, parse_duration
from router.cli.reloader import main as reloader_main
from router.cluster.client import api_client
from router.cluster.retry import Backoff
from router.metrics import ReloaderMetrics
from router.reloader.decide import REASONS, CrashBackoff, exit_status, watch_namespace_value
from router.reloader.health import start_health_server
from router.reloader.shell import Reloader
from router.reloader.source import NamespaceSource
from router.settings import ReloaderSettings, TenancySettings
from tests.fakeapi import FakeKube
from tests.paths import REPO_ROOT

pytestmark = pytest.mark.usefixtures("no_leftover_tasks")

CHILD = str(Path(__file__).with_name("reloader_child.py"))
TIMEOUT = 10.0


class Inbox:
    """Items arriving in any order; ``wait`` takes the first one matching, waiting if needed."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.taken: list[dict[str, Any]] = []
        self._changed = asyncio.Event()

    def put(self, item: dict[str, Any]) -> None:
        self.items.append(item)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def wait(
        self, predicate: Callable[[dict[str, Any]], bool], within: float = TIMEOUT
    ) -> dict[str, Any]:
        async def find() -> dict[str, Any]:
            while True:
                changed = self._changed
                for item in self.items:
                    if predicate(item):
                        self.items.remove(item)
                        self.taken.append(item)
                        return item
                await changed.wait()

        return await asyncio.wait_for(find(), within)


class Reports(Inbox):
    """The TCP listener children report to."""

    def __init__(self) -> None:
        super().__init__()
        self.address = ""
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.address = f"127.0.0.1:{port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.add(writer)
        try:
            async for line in reader:
                self.put(json.loads(line))
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    async def start_of(self, watch: str | None) -> dict[str, Any]:
        return await self.wait(lambda r: r["event"] == "start" and r["watch"] == watch)

    async def signal_of(self, pid: int) -> int:
        report = await self.wait(lambda r: r["event"] == "signal" and r["pid"] == pid)
        return int(report["signal"])


class Events(Inbox):
    """The reloader's event hook, with the loop time of each event."""

    def __call__(self, kind: str, details: Mapping[str, Any]) -> None:
        self.put({"kind": kind, "at": asyncio.get_running_loop().time(), **details})

    async def of(self, kind: str, **match: Any) -> dict[str, Any]:
        return await self.wait(
            lambda e: e["kind"] == kind and all(e.get(k) == v for k, v in match.items())
        )

    def count(self, kind: str) -> int:
        return sum(1 for e in self.items + self.taken if e["kind"] == kind)


@pytest.fixture
async def reports() -> AsyncIterator[Reports]:
    r = Reports()
    await r.start()
    yield r
    await r.close()


def child_command(reports: Reports, *extra: str) -> tuple[str, ...]:
    return (sys.executable, CHILD, "--report", reports.address, *extra)


def fast_settings(reports: Reports, *extra: str) -> ReloaderSettings:
    return ReloaderSettings(
        command=child_command(reports, *extra),
        debounce=0.05,
        grace_period=5.0,
        backoff_initial=0.05,
        backoff_max=0.2,
        backoff_reset=30.0,
    )


class Harness:
    def __init__(self, settings: ReloaderSettings) -> None:
        self.registry = CollectorRegistry()
        self.events = Events()
        self.reloader = Reloader(
            settings, ReloaderMetrics(self.registry, REASONS), on_event=self.events
        )
        self.task: asyncio.Task[int] = asyncio.create_task(self.reloader.run())

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        return self.registry.get_sample_value(name, labels or {})

    async def stop(self, signum: int = signal.SIGTERM) -> int:
        self.reloader.stop(signum)
        return await asyncio.wait_for(self.task, TIMEOUT)

    async def close(self) -> None:
        if not self.task.done():
            self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


@pytest.fixture
async def harness() -> AsyncIterator[Callable[[ReloaderSettings], Harness]]:
    made: list[Harness] = []

    def make(settings: ReloaderSettings) -> Harness:
        h = Harness(settings)
        made.append(h)
        return h

    yield make
    for h in made:
        await h.close()


# -- pure parts --------------------------------------------------------------------------------


def test_watch_namespace_value_is_sorted_and_deduplicated() -> None:
    assert watch_namespace_value(["tenant-b", "tenant-a", "tenant-b"]) == "tenant-a,tenant-b"
    assert watch_namespace_value([]) == ""


@pytest.mark.parametrize(("returncode", "status"), [(0, 0), (3, 3), (-15, 143), (-9, 137)])
def test_exit_status_follows_the_shell_convention(returncode: int, status: int) -> None:
    assert exit_status(returncode) == status


def test_crash_backoff_doubles_caps_and_resets_after_a_long_run() -> None:
    backoff = CrashBackoff(initial=1.0, maximum=8.0, reset_after=60.0)
    assert [backoff.delay(uptime=0.1) for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert backoff.delay(uptime=60.0) == 1.0
    assert backoff.delay(uptime=59.0) == 2.0


def test_crash_backoff_refuses_a_zero_delay() -> None:
    with pytest.raises(ValueError, match="> 0"):
        CrashBackoff(initial=0.0, maximum=1.0, reset_after=1.0)


# -- the process manager with a real child -----------------------------------------------------


async def test_child_gets_sorted_watch_namespace_in_its_own_process_group(
    reports: Reports, harness: Callable[[ReloaderSettings], Harness]
) -> None:
    h = harness(fast_settings(reports))
    h.reloader.update({"tenant-b", "tenant-a"})
    started = await reports.start_of("tenant-a,tenant-b")
    assert started["pgid"] == started["pid"]
    assert h.reloader.child_pid == started["pid"]
    assert h.metric("metrics_router_reloader_child_up") == 1
    assert h.metric("metrics_router_reloader_namespaces") == 2
    assert await h.stop() == 0
    assert await reports.signal_of(started["pid"]) == signal.SIGTERM
    assert h.metric("metrics_router_reloader_child_up") == 0


async def test_namespace_added_and_removed_restarts_child(
    reports: Reports, harness: Callable[[ReloaderSettings], Harness]
) -> None:
    h = harness(fast_settings(reports))
    h.reloader.update({"tenant-a"})
    first = await reports.start_of("tenant-a")

    h.reloader.update({"tenant-a", "tenant-a--dev"})
    assert await reports.signal_of(first["pid"]) == signal.SIGTERM
    second = await reports.start_of("tenant-a,tenant-a--dev")

    h.reloader.update({"tenant-a--dev"})
    assert await reports.signal_of(second["pid"]) == signal.SIGTERM
    await reports.start_of("tenant-a--dev")
    assert h.metric("metrics_router_reloader_restarts_total", {"reason": "namespaces"}) == 2
    assert h.metric("metrics_router_reloader_restarts_total", {"reason": "crash"}) == 0
    assert h.metric("metrics_router_reloader_namespaces") == 1
    assert await h.stop() == 0


async def test_same_set_again_is_not_a_change(
    reports: Reports, harness: Callable[[ReloaderSettings], Harness]
) -> None:
    h = harness(replace(fast_settings(reports), debounce=0.0))
    h.reloader.update({"tenant-a", "tenant-b"})
    await reports.start_of("tenant-a,tenant-b")
    h.reloader.update(["tenant-b", "tenant-a"])  # e.g. an unrelated label changed
    h.reloader.update({"tenant-c"})
    await reports.start_of("tenant-c")
    assert h.events.count("pending") == 1
    assert h.metric("metrics_router_reloader_restarts_total", {"reason": "namespaces"}) == 1
    await h.stop()


async def test_changes_inside_the_debounce_window_give_one_restart(
    reports: Reports, harness: Callable[[ReloaderSettings], Harness]
) -> None:
    h = harness(replace(fast_settings(reports), debounce=0.3))
    h.reloader.update({"a"})
    await reports.start_of("a")
    h.reloader.update({"a", "b"})
    pending = await h.events.of("pending")
    h.reloader.update({"a", "b", "c"})
    await asyncio.sleep(0)  # let the loop run between changes: still inside the window
    h.reloader.update({"a", "c"})
    restarted = await reports.start_of("a,c")
    started = await h.events.of("start", pid=restarted["pid"])
    assert started["at"] - pending["at"] >= 0.3
    assert await h.stop() == 0
    assert h.events.count("start") == 2
    assert h.metric("metrics_router_reloader_restarts_total", {"reason": "namespaces"}) == 1


async def test_change_undone_inside_the_window_restarts_nothing(
    reports: Reports, harness: Callable[[ReloaderSettings], Harness]
) -> None:
    h = harness(replace(fast_settings(reports), debounce=0.3))
    h.reloader.update({"a"})
    first = await reports.start_of("a")
    h.reloader.update({"a", "b"})
    await h.events.of("pending")
    h.reloader.update({"a"})
    await h.events.of("cancelled")
    assert h.reloader.status() == {
        "state": "running",
        "childPid": first["pid"],
        "namespaces": ["a"],
        "pending": False,
    }
    # A later change still restarts exactly once, and the first child ran until then.
    h.reloader.update({"c"})
    await reports.start_of("c")
    assert await reports.signal_of(first["pid"]) == signal.SIGTERM
    assert h.events.count("start") == 2
    assert h.metric("metrics_router_reloader_restarts_total", {"reason": "namespaces"}) == 1
    await h.stop()


async def test_child_ignoring_sigterm_is_killed_after_the_grace_period(
    reports: Reports, harness: Callable[[ReloaderSettings], Harness]
) -> None:
    settings = replace(fast_settings(reports, "--on-signal", "ignore"), grace_period=0.3)
    h = harness(settings)
    h.reloader.update({"a"})
    first = await reports.start_of("a")
    h.reloader.update({"b"})
    assert await reports.signal_of(first["pid"]) == signal.SIGTERM
    sent = await h.events.of("signal", pid=first["pid"])
    killed = await h.events.of("sigkill", pid=first["pid"])
    assert killed["at"] - sent["at"] >= 0.3
    exited = await h.events.of("exit", pid=first["pid"])
    assert exited["status"] == 128 + signal.SIGKILL
    await reports.start_of("b")
    # The same on shutdown: the status passed on is that of the SIGKILLed child.
    assert await h.stop() == 128 + signal.SIGKILL


async def test_crash_loop_backs_off_exponentially_with_a_cap(
    reports: Reports, harness: Callable[[ReloaderSettings], Harness]
) -> None:
    h = harness(fast_settings(reports, "--exit", "3"))  # backoff 0.05 doubling, capped at 0.2
    h.reloader.update({"a"})
    delays = []
    exits = []
    for _ in range(5):
        exits.append(await h.events.of("exit"))
        delays.append((await h.events.of("backoff"))["delay"])
    assert delays == [0.05, 0.1, 0.2, 0.2, 0.2]
    assert {e["status"] for e in exits} == {3}
    assert not any(e["expected"] for e in exits)
    starts = [await h.events.of("start") for _ in range(5)]
    # Each restart waited at least the backoff announced after the previous exit.
    for exited, delay, restarted in zip(exits[:-1], delays, starts[1:], strict=False):
        assert restarted["at"] - exited["at"] >= delay
        assert restarted["reason"] == "crash"
    crash_restarts = h.metric("metrics_router_reloader_restarts_total", {"reason": "crash"})
    assert crash_restarts is not None
    assert crash_restarts >= 4
    await h.stop()


@pytest.mark.parametrize(
    ("mode", "signum", "status"),
    [
        (("--on-signal", "exit", "--signal-exit-code", "7"), signal.SIGTERM, 7),
        (("--on-signal", "default"), signal.SIGTERM, 128 + signal.SIGTERM),
        (("--on-signal", "default"), signal.SIGINT, 128 + signal.SIGINT),
    ],
)
async def test_signals_are_forwarded_and_the_exit_status_passed_on(
    reports: Reports,
    harness: Callable[[ReloaderSettings], Harness],
    mode: tuple[str, ...],
    signum: int,
    status: int,
) -> None:
    h = harness(fast_settings(reports, *mode))
    h.reloader.update({"a"})
    started = await reports.start_of("a")
    assert await h.stop(signum) == status
    assert await reports.signal_of(started["pid"]) == signum
    assert h.events.count("start") == 1  # no restart after a forwarded signal


async def test_empty_set_holds_the_child_stopped(
    reports: Reports, harness: Callable[[ReloaderSettings], Harness]
) -> None:
    h = harness(fast_settings(reports))
    h.reloader.update(set())
    await h.events.of("hold")
    assert h.reloader.state == "held"
    assert h.metric("metrics_router_reloader_child_up") == 0
    assert h.metric("metrics_router_reloader_namespaces") == 0
    assert h.events.count("start") == 0

    h.reloader.update({"a"})
    first = await reports.start_of("a")
    h.reloader.update(set())
    assert await reports.signal_of(first["pid"]) == signal.SIGTERM
    await h.events.of("hold")
    assert h.reloader.state == "held"
    assert h.reloader.child_pid is None
    assert h.metric("metrics_router_reloader_child_up") == 0

    h.reloader.update({"b"})
    await reports.start_of("b")
    assert [e["namespaces"] for e in h.events.taken + h.events.items if e["kind"] == "start"] == [
        frozenset({"a"}),
        frozenset({"b"}),
    ]
    starts = [r for r in reports.taken + reports.items if r["event"] == "start"]
    assert [r["watch"] for r in starts] == ["a", "b"]
    assert h.metric("metrics_router_reloader_restarts_total", {"reason": "namespaces"}) == 1
    # Stopped while held: nothing to wait for, exit 0.
    h.reloader.update(set())
    await h.events.of("hold")
    assert await h.stop() == 0


async def test_command_that_cannot_run_exits_127(
    harness: Callable[[ReloaderSettings], Harness], tmp_path: Path
) -> None:
    h = harness(ReloaderSettings(command=(str(tmp_path / "no-such-operator"),)))
    h.reloader.update({"a"})
    assert await asyncio.wait_for(h.task, TIMEOUT) == 127
    await h.events.of("exec-failed")


async def test_cancelling_the_reloader_kills_the_child(
    reports: Reports, harness: Callable[[ReloaderSettings], Harness]
) -> None:
    h = harness(fast_settings(reports, "--on-signal", "ignore"))
    h.reloader.update({"a"})
    started = await reports.start_of("a")
    await h.close()
    with pytest.raises(ProcessLookupError):
        os.kill(started["pid"], 0)


async def test_health_and_metrics_port(
    reports: Reports, harness: Callable[[ReloaderSettings], Harness]
) -> None:
    h = harness(fast_settings(reports))
    runner, port = await start_health_server(h.reloader, h.registry, "127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
                assert resp.status == 200
                assert (await resp.json())["state"] == "waiting"
            h.reloader.update({"tenant-a"})
            started = await reports.start_of("tenant-a")
            async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
                assert await resp.json() == {
                    "state": "running",
                    "childPid": started["pid"],
                    "namespaces": ["tenant-a"],
                    "pending": False,
                }
            async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"].startswith("text/plain")
                text = await resp.text()
        assert "metrics_router_reloader_child_up 1.0" in text
        assert "metrics_router_reloader_namespaces 1.0" in text
        assert 'metrics_router_reloader_restarts_total{reason="crash"} 0.0' in text
        assert 'metrics_router_reloader_restarts_total{reason="namespaces"} 0.0' in text
    finally:
        await runner.cleanup()
    await h.stop()


# -- command line ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("2s", 2.0), ("500ms", 0.5), ("1m", 60.0), ("1m30s", 90.0), ("1.5", 1.5), ("0", 0.0),
     ("250us", 0.00025), ("1h", 3600.0)],
)  # fmt: skip
def test_durations_accept_go_style_and_plain_seconds(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "-1", "2x", "s", "1m-2s", "nan", "inf", "1.5.5s"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


def test_bad_flags_are_all_reported_without_a_traceback(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code = cli.main(
        [
            "reloader",
            "--debounce", "soon",
            "--grace-period", "-3",
            "--restart-backoff", "0",
            "--env-name", "WATCH-NAMESPACE",
            "--health-bind-address", "localhost",
            "--kubeconfig", str(tmp_path / "missing"),
            "--tenant-pattern", "^(?P<t>x)$",
            "--",
        ]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    for fragment in (
        "--debounce: invalid duration 'soon'",
        "--grace-period: invalid duration '-3'",
        "--restart-backoff: must be > 0",
        "--env-name: 'WATCH-NAMESPACE'",
        "--health-bind-address: invalid address 'localhost': want HOST:PORT",
        "--kubeconfig:",
        "--tenant-pattern: the expression needs a named group 'tenant'",
        "one of --tenant or --namespace-selector is required",
        "a COMMAND to run is required",
    ):
        assert fragment in err


def test_unknown_command_is_refused_before_anything_starts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = cli.main(["reloader", "--tenant", "a", "--", "no-such-keda-operator-binary"])
    assert code == 2
    assert "'no-such-keda-operator-binary' not found in PATH" in capsys.readouterr().err


def test_flags_become_settings() -> None:
    parser = cli.build_parser(["reloader"])
    args = parser.parse_args(
        ["reloader", "--tenant", "a", "--tenant-pattern", "^t-(?P<tenant>[a-z]+)$",
         "--debounce", "500ms", "--grace-period", "1m", "--health-bind-address", "127.0.0.1:0",
         "--", sys.executable, "-c", "pass", "--leader-elect"]
    )  # fmt: skip
    config, errors = config_from_args(args)
    assert errors == []
    assert config is not None
    assert config.tenant == "a"
    assert config.tenancy.tenant_pattern == "^t-(?P<tenant>[a-z]+)$"
    assert config.settings.command == (sys.executable, "-c", "pass", "--leader-elect")
    assert config.settings.debounce == 0.5
    assert config.settings.grace_period == 60.0
    assert config.settings.env_name == "WATCH_NAMESPACE"
    assert (config.health_host, config.health_port) == ("127.0.0.1", 0)


# -- with the (fake) Kubernetes API ------------------------------------------------------------


class Cluster:
    """A FakeKube plus namespace sources feeding reloaders, all stopped at teardown."""

    def __init__(self, fake: FakeKube) -> None:
        self.fake = fake
        self.updates = Inbox()  # every set the source published, with the informer's version
        self.restarts = Inbox()  # informer list/watch failures
        self._apis: list[ApiClient] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def source(
        self, reloader: Reloader, *, tenant: str | None, tenancy: TenancySettings
    ) -> NamespaceSource:
        api = await api_client(self.fake.kubeconfig)
        self._apis.append(api)
        source: NamespaceSource

        def sink(namespaces: frozenset[str]) -> None:
            reloader.update(namespaces)
            version = int(source.informer.resource_version or 0)
            self.updates.put({"namespaces": namespaces, "version": version})

        source = NamespaceSource(
            api,
            sink,
            tenant=tenant,
            tenancy=tenancy,
            backoff=Backoff(initial=0.01, maximum=0.05),
            on_restart=lambda reason: self.restarts.put({"reason": reason}),
        )
        self._tasks.append(asyncio.create_task(source.run()))
        return source

    async def seen(self) -> dict[str, Any]:
        """The first published set that includes every change made to the fake so far."""
        version = self.fake.resource_version
        return await self.updates.wait(lambda u: u["version"] >= version)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for api in self._apis:
            await api.close()


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with FakeKube(tmp_path) as fake:
        c = Cluster(fake)
        yield c
        await c.close()


async def test_tenant_namespaces_added_and_removed(
    reports: Reports, harness: Callable[[ReloaderSettings], Harness], cluster: Cluster
) -> None:
    for name in ("tenant-a", "tenant-b", "kube-system"):
        cluster.fake.add_namespace(name)
    h = harness(fast_settings(reports))
    await cluster.source(h.reloader, tenant="tenant-a", tenancy=TenancySettings())
    first = await reports.start_of("tenant-a")

    cluster.fake.add_namespace("tenant-a--dev")
    assert await reports.signal_of(first["pid"]) == signal.SIGTERM
    second = await reports.start_of("tenant-a,tenant-a--dev")

    cluster.fake.add_namespace("tenant-b--dev")  # another tenant's: no restart
    assert (await cluster.seen())["namespaces"] == {"tenant-a", "tenant-a--dev"}
    assert h.reloader.child_pid == second["pid"]

    cluster.fake.delete("namespaces", "tenant-a")
    assert await reports.signal_of(second["pid"]) == signal.SIGTERM
    await reports.start_of("tenant-a--dev")
    assert h.events.count("pending") == 2
    assert h.metric("metrics_router_reloader_restarts_total", {"reason": "namespaces"}) == 2
    assert await h.stop() == 0


async def test_namespace_moving_to_another_tenant_leaves_the_set(
    reports: Reports, harness: Callable[[ReloaderSettings], Harness], cluster: Cluster
) -> None:
    key = "tenancy.metrics-router.io/tenant"
    cluster.fake.add_namespace("shop", {key: "a"})
    cluster.fake.add_namespace("shop-dev", {key: "a"})
    cluster.fake.add_namespace("blog", {key: "b"})
    h = harness(fast_settings(reports))
    tenancy = TenancySettings(strategies=("label",), tenant_label=key)
    await cluster.source(h.reloader, tenant="a", tenancy=tenancy)
    first = await reports.start_of("shop,shop-dev")

    # Label churn that keeps the membership: seen by the source, no restart.
    cluster.fake.set_labels("namespaces", "shop", {key: "a", "team": "blue"})
    assert (await cluster.seen())["namespaces"] == {"shop", "shop-dev"}
    assert h.events.count("pending") == 0

    cluster.fake.set_labels("namespaces", "shop-dev", {key: "b"})
    assert await reports.signal_of(first["pid"]) == signal.SIGTERM
    await reports.start_of("shop")
    assert await h.stop() == 0


async def test_namespace_losing_the_selecting_label_leaves_the_set(
    reports: Reports, harness: Callable[[ReloaderSettings], Harness], cluster: Cluster
) -> None:
    selected = {"keda.sh/watch": "tenant-x"}
    cluster.fake.add_namespace("alpha", selected)
    cluster.fake.add_namespace("beta", selected)
    cluster.fake.add_namespace("gamma")
    h = harness(fast_settings(reports))
    tenancy = TenancySettings(namespace_selector="keda.sh/watch=tenant-x")
    await cluster.source(h.reloader, tenant=None, tenancy=tenancy)
    first = await reports.start_of("alpha,beta")

    cluster.fake.set_labels("namespaces", "beta", {})
    assert await reports.signal_of(first["pid"]) == signal.SIGTERM
    second = await reports.start_of("alpha")

    cluster.fake.set_labels("namespaces", "gamma", selected)
    assert await reports.signal_of(second["pid"]) == signal.SIGTERM
    await reports.start_of("alpha,gamma")
    assert await h.stop() == 0


async def test_api_outage_keeps_the_child_running_with_the_last_set(
    reports: Reports, harness: Callable[[ReloaderSettings], Harness], cluster: Cluster
) -> None:
    cluster.fake.add_namespace("tenant-a")
    h = harness(fast_settings(reports))
    await cluster.source(h.reloader, tenant="tenant-a", tenancy=TenancySettings())
    first = await reports.start_of("tenant-a")

    await cluster.fake.outage()
    for _ in range(3):  # the watch broke and reconnecting failed at least twice
        await cluster.restarts.wait(lambda r: r["reason"] == "error")
    assert h.reloader.state == "running"
    assert h.reloader.child_pid == first["pid"]
    os.kill(first["pid"], 0)  # still alive
    assert h.metric("metrics_router_reloader_child_up") == 1
    assert h.metric("metrics_router_reloader_namespaces") == 1
    assert h.events.count("signal") == 0
    assert h.events.count("start") == 1

    # A namespace created during the outage is picked up once the API is back.
    cluster.fake.add_namespace("tenant-a--new")
    await cluster.fake.recover()
    assert await reports.signal_of(first["pid"]) == signal.SIGTERM
    await reports.start_of("tenant-a,tenant-a--new")
    assert await h.stop() == 0


async def test_command_line_end_to_end(reports: Reports, cluster: Cluster) -> None:
    """The real `metrics-router reloader` process: pass-through, restart, signal, exit code."""
    cluster.fake.add_namespace("tenant-a")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "router", "reloader",
        "--kubeconfig", str(cluster.fake.kubeconfig),
        "--tenant", "tenant-a",
        "--debounce", "100ms",
        "--grace-period", "5s",
        "--health-bind-address", "0",
        "--",
        *child_command(reports, "--signal-exit-code", "7"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    assert proc.stderr is not None
    try:
        first = await reports.start_of("tenant-a")
        line = await asyncio.wait_for(proc.stdout.readline(), TIMEOUT)
        assert line == b"reloader-child watch=tenant-a\n"  # the child's stdout passes through
        assert first["pgid"] != os.getpgid(proc.pid)

        cluster.fake.add_namespace("tenant-a--dev")
        assert await reports.signal_of(first["pid"]) == signal.SIGTERM
        second = await reports.start_of("tenant-a,tenant-a--dev")
        line = await asyncio.wait_for(proc.stdout.readline(), TIMEOUT)
        assert line == b"reloader-child watch=tenant-a,tenant-a--dev\n"

        proc.send_signal(signal.SIGTERM)
        assert await reports.signal_of(second["pid"]) == signal.SIGTERM
        assert await asyncio.wait_for(proc.wait(), TIMEOUT) == 7
        log = (await proc.stderr.read()).decode()
        assert "child started" in log
        assert "Traceback" not in log
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_the_deploy_overlay_command_line_is_valid() -> None:
    """The flags deploy/ gives the reloader in the per-tenant KEDA overlay parse and validate."""
    overlay = REPO_ROOT / "deploy/keda/tenants/tenant-a/kustomization.yaml"
    doc = yaml.safe_load(overlay.read_text())
    patch = yaml.safe_load(doc["patches"][0]["patch"])
    command = next(op["value"] for op in patch if op["path"].endswith("/command"))
    assert command[:2] == ["metrics-router", "reloader"]
    args = cli.build_parser(command[1:]).parse_args([*command[1:], "--leader-elect"])
    config, errors = config_from_args(args)
    assert errors == []
    assert config is not None
    assert config.tenant == "tenant-a"
    assert config.settings.command == ("/keda", "--leader-elect")
    assert (config.settings.debounce, config.settings.grace_period) == (2.0, 30.0)


async def test_unusable_kubeconfig_exits_1_without_starting_the_child(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("this: [is not a kubeconfig")
    args = cli.build_parser(["reloader"]).parse_args(
        ["reloader", "--kubeconfig", str(kubeconfig), "--tenant", "a",
         "--health-bind-address", "0", "--", sys.executable, "-c", "raise SystemExit(9)"]
    )  # fmt: skip
    config, errors = config_from_args(args)
    assert config is not None, errors
    assert await reloader_main(config) == 1
