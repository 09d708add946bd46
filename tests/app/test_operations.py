"""Issue 11, operations: roll-outs (shutdown delay, second signal), --workers and foreign
listeners, the start-up line, structured JSON logs, the command line's conventions, and the
Kubernetes client configuration found as kubectl finds it."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from router import logs
from router.cli import main as cli
from router.cluster import client as kube
from router.cluster import kubeconfig
from router.core.version import version
from router.devtools.keda_stub import KedaStub
from router.devtools.pki import Pki
from tests.cli.process import base_args, read_until, run_cli, running_router, with_flag
from tests.conftest import (
    HPA_IDENTITY,
    RawConnection,
    StartRouter,
    client_ssl_context,
    metric_path,
    routes_yaml,
)
from tests.fakeapi import FakeKube

pytestmark = pytest.mark.usefixtures("no_leftover_tasks")


async def _get(url: str) -> int:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status


# --------------------------------------------------------------------------- roll-outs


async def test_sigterm_fails_readyz_keeps_serving_for_the_delay_and_a_second_signal_exits(
    pki: Pki, tmp_path: Path, stub: KedaStub
) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(routes_yaml({"a": (["tenant-a"], stub.url, None)}))
    args = [*base_args(pki, routes), "--shutdown-delay-duration", "1m"]
    async with running_router(args) as r:
        ready = f"http://127.0.0.1:{r.metrics_port}/readyz"
        assert await _get(ready) == 200
        r.proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(read_until(r.proc, r.log, re.compile("shutting down")), 30)
        # The endpoint is being removed: not ready, on both ports ...
        assert await _get(ready) == 503
        conn = await RawConnection.open(r.port, client_ssl_context(pki))
        try:
            assert (await conn.request("/readyz", [])).status == 503
            # ... while new connections are still served during the delay.
            assert (await conn.request(metric_path("tenant-a"), HPA_IDENTITY)).status == 200
        finally:
            await conn.close()
        assert r.proc.returncode is None
        # The second signal does not wait for the delay.
        r.proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(r.proc.wait(), 10)
        assert r.proc.stderr is not None
        log = "".join(r.log) + (await r.proc.stderr.read()).decode()
    assert code == 1, log
    assert "second signal: exiting at once" in log
    assert "Traceback" not in log


async def test_metrics_port_says_not_ready_while_the_secure_port_drains_and_closes_last(
    start_router: StartRouter,
) -> None:
    """The drain order: /readyz fails at once; the metrics port stays up (answering 503) while
    the secure port lets a request in flight finish; it closes only after that."""
    h = await start_router({"a": ["tenant-a"]})
    stub = h.stubs["a"]
    stub.behaviour.hang = True  # the request stays in flight until the stub stops
    conn = await h.connect()
    in_flight = asyncio.create_task(conn.request(metric_path("tenant-a"), HPA_IDENTITY))
    await stub.wait_for_requests(1)
    stopping = asyncio.create_task(h.router.stop())
    assert await _get(h.metrics_url + "/readyz") == 503
    assert not stopping.done()  # still draining: the request is in flight
    await stub.stop()  # releases the hung request (its upstream connection dropped)
    assert (await in_flight).status == 502
    await asyncio.wait_for(stopping, 10)
    with pytest.raises(aiohttp.ClientConnectionError):
        await _get(h.metrics_url + "/readyz")


# --------------------------------------------------------------------------- --workers


def test_workers_refuse_a_port_another_process_holds(pki: Pki, tmp_path: Path) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(routes_yaml({"a": (["tenant-a"], "https://127.0.0.1:1", None)}))
    with socket.socket() as other:  # another router: SO_REUSEPORT, as --workers binds
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        args = with_flag([*base_args(pki, routes), "--workers", "2"], "--secure-port", str(port))
        proc = run_cli(args)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert (
        f"cannot start: 127.0.0.1:{port} is already in use by another process; --workers "
        "would share it with that process (SO_REUSEPORT)"
    ) in proc.stderr
    assert "supervising" not in proc.stderr  # no worker was started


async def test_workers_serve_a_free_port_and_stop_on_sigterm(
    pki: Pki, tmp_path: Path, stub: KedaStub
) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(routes_yaml({"a": (["tenant-a"], stub.url, None)}))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = with_flag([*base_args(pki, routes), "--workers", "2"], "--secure-port", str(port))
    async with running_router(args) as r:
        assert r.port == port
        conn = await RawConnection.open(port, client_ssl_context(pki))
        try:
            assert (await conn.request(metric_path("tenant-a"), HPA_IDENTITY)).status == 200
        finally:
            await conn.close()
        r.proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(r.proc.wait(), 30)
    assert code == 0, "".join(r.log)


async def test_workers_metrics_port_sums_the_requests_of_every_worker(
    pki: Pki, tmp_path: Path, stub: KedaStub
) -> None:
    """Worker 0's /metrics reads every worker's per-process files (prometheus_client's
    multiprocess mode): without PROMETHEUS_MULTIPROC_DIR set before the workers import it, the
    request counter would be missing there."""
    routes = tmp_path / "routes.yaml"
    routes.write_text(routes_yaml({"a": (["tenant-a"], stub.url, None)}))
    args = [*base_args(pki, routes), "--workers", "2"]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        args[args.index("--secure-port") + 1] = str(probe.getsockname()[1])
    async with running_router(args) as r:
        for _ in range(4):  # one connection each: the kernel spreads them over the workers
            conn = await RawConnection.open(r.port, client_ssl_context(pki))
            try:
                assert (await conn.request(metric_path("tenant-a"), HPA_IDENTITY)).status == 200
            finally:
                await conn.close()
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{r.metrics_port}/metrics") as resp,
        ):
            text = await resp.text()
        r.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(r.proc.wait(), 30) == 0
    counted = sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("metrics_router_requests_total{")
    )
    assert counted == 4


# --------------------------------------------------------------------------- logs


async def test_start_up_line_names_version_addresses_trust_and_routes(
    pki: Pki, tmp_path: Path, stub: KedaStub
) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(routes_yaml({"a": (["tenant-a"], stub.url, None)}))
    args = [*base_args(pki, routes), "--log-format", "json"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "router", *args, stderr=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stderr is not None
        line = await asyncio.wait_for(proc.stderr.readline(), 30)
        doc = json.loads(line)
        proc.send_signal(signal.SIGTERM)
        rest = await asyncio.wait_for(proc.stderr.read(), 30)
        assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert doc["msg"] == "serving"
    assert doc["version"] == version()
    assert doc["address"] == f"127.0.0.1:{doc['port']}"
    assert doc["metrics_address"] == "127.0.0.1:0"
    assert doc["requestheader_ca"] == f"file:{pki.requestheader_ca}"
    assert doc["allowed_names"] == "front-proxy-client"
    assert doc["routes"] == f"file:{routes}"
    assert (doc["tenants"], doc["namespaces"]) == (1, 1)
    # Every line is one JSON object; fields are keys, not text inside "msg".
    for text in rest.decode().splitlines():
        entry = json.loads(text)
        assert "=" not in entry["msg"], entry
    assert [json.loads(t)["msg"] for t in rest.decode().splitlines()][-1] == "stopped"


def _record(text: str, *args: object, **fields: object) -> logging.LogRecord:
    record = logging.LogRecord("router.app", logging.ERROR, __file__, 1, text, args, None)
    record.fields = fields
    return record


def test_json_and_text_formats_carry_the_same_fields() -> None:
    record = _record("routes file %s", "refused", file="/etc/r b.yaml", tenants=3, names=["a", "b"])
    doc = json.loads(logs.JsonFormatter().format(record))
    assert doc["msg"] == "routes file refused"
    assert (doc["file"], doc["tenants"], doc["names"]) == ("/etc/r b.yaml", 3, ["a", "b"])
    assert doc["level"] == "error"
    text = logs.TextFormatter().format(record)
    assert text.endswith('routes file refused file="/etc/r b.yaml" tenants=3 names=a,b')
    # A field named like a reserved key does not overwrite it.
    assert json.loads(logs.JsonFormatter().format(_record("x", msg="y")))["field.msg"] == "y"


def test_change_logger_logs_a_repeated_condition_once(caplog: pytest.LogCaptureFixture) -> None:
    changes = logs.ChangeLogger(logging.getLogger("router.test"))
    with caplog.at_level(logging.INFO, logger="router.test"):
        assert changes.report("file missing") is True
        assert changes.report("file missing") is False
        assert changes.report("file unreadable") is True
        changes.clear("file back")
        assert changes.report("file missing") is True
    assert [r.getMessage() for r in caplog.records] == [
        "file missing", "file unreadable", "file back", "file missing",
    ]  # fmt: skip


# --------------------------------------------------------------------------- command line


@pytest.mark.parametrize("argv", [["--version"], ["version"]])
def test_version(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's version action exits
        code = int(exc.code or 0)
    assert code == 0
    assert capsys.readouterr().out.strip() == f"metrics-router {version()}"


@pytest.mark.parametrize(
    ("argv", "usage"),
    [
        (["serve", "--bogus"], "usage: metrics-router serve [flags]"),
        (["reloader", "--bogus", "--", "x"], "usage: metrics-router reloader"),
        (["render", "--bogus"], "usage: metrics-router render"),
        (["certs", "init", "--dir", "d", "--bogus"], "usage: metrics-router certs init"),
        (["serve", "--upstream-timeout", "10x"], "usage: metrics-router serve [flags]"),
    ],
)
def test_usage_errors_exit_2_with_that_commands_usage(
    argv: list[str], usage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(usage)
    assert len(err.splitlines()) <= 4, err  # no fifty-line dump for one typo
    assert f"Run 'metrics-router {argv[0]}" in err


def test_durations_take_go_syntax_everywhere_and_help_shows_defaults() -> None:
    parser = cli.build_parser(["serve"])
    args = parser.parse_args(["serve", "--upstream-timeout", "1m30s", "--shutdown-grace-period",
                              "500ms", "--file-check-interval", "2"])  # fmt: skip
    assert (args.upstream_timeout, args.shutdown_grace_period, args.file_check_interval) == (
        90.0, 0.5, 2.0,
    )  # fmt: skip
    assert args.shutdown_delay_duration == 0.0
    text = subprocess.run(
        [sys.executable, "-m", "router", "serve", "--help"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    flat = " ".join(text.split())
    assert "(default: 10s)" in flat
    assert "(default: 168h)" in flat
    assert "(default: ^(?P<tenant>tenant-[a-z0-9]+)(--.+)?$)" in flat


# --------------------------------------------------------------------------- kubeconfig


def _exists(*paths: Path) -> object:
    return lambda p: p in paths


def test_kubeconfig_order_is_kubectls() -> None:
    home, env_file, flag = Path("/home/u"), Path("/k/env.yaml"), Path("/k/flag.yaml")
    sa = Path("/sa")
    cluster_env = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    everything = _exists(env_file, flag, sa / "token", home / ".kube" / "config")

    def choose(flag_value: Path | None, environ: dict[str, str], exists: object) -> str | None:
        choice, _ = kubeconfig.choose(
            flag_value,
            environ,
            home,
            is_file=exists,
            service_account_dir=sa,  # type: ignore[arg-type]
        )
        return choice.describe() if choice else None

    env = {"KUBECONFIG": str(env_file), **cluster_env}
    assert choose(flag, env, everything) == "--kubeconfig /k/flag.yaml"
    assert choose(None, env, everything) == "$KUBECONFIG /k/env.yaml"
    assert choose(None, cluster_env, everything) == "in-cluster service account"
    assert choose(None, {}, everything) == "~/.kube/config /home/u/.kube/config"
    assert choose(None, {}, _exists()) is None
    _, tried = kubeconfig.choose(None, {"KUBECONFIG": "/nope"}, home, is_file=_exists())
    assert tried == [
        "--kubeconfig (not given)",
        "$KUBECONFIG=/nope (no such file)",
        "in-cluster service account (KUBERNETES_SERVICE_HOST/PORT not set)",
        "/home/u/.kube/config (no such file)",
    ]


async def test_kubeconfig_env_and_home_reach_the_api(
    fake: FakeKube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.add_namespace("tenant-a")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(fake.kubeconfig))
    monkeypatch.setenv("HOME", str(tmp_path / "nohome"))
    for _ in range(2):
        client = await kube.api_client(None)
        try:
            listed = await kube.request(client, "GET", kube.resource_path("namespaces"))
        finally:
            await client.close()
        assert [n["metadata"]["name"] for n in listed["items"]] == ["tenant-a"]
        # Then from ~/.kube/config alone.
        monkeypatch.delenv("KUBECONFIG", raising=False)
        (tmp_path / "nohome" / ".kube").mkdir(parents=True, exist_ok=True)
        (tmp_path / "nohome" / ".kube" / "config").write_bytes(fake.kubeconfig.read_bytes())


async def test_no_kubeconfig_error_names_what_was_tried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(kube.KubeConfigError) as err:
        await kube.api_client(None)
    assert str(err.value) == (
        "no Kubernetes client configuration found; tried --kubeconfig (not given), "
        "$KUBECONFIG (not set), in-cluster service account (KUBERNETES_SERVICE_HOST/PORT not "
        f"set), {tmp_path}/.kube/config (no such file) (to run without a cluster, give "
        "--routes-file)"
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("this: [is not a kubeconfig")
    monkeypatch.setenv("KUBECONFIG", str(bad))
    with pytest.raises(kube.KubeConfigError, match=f"from \\$KUBECONFIG {bad}: "):
        await kube.api_client(None)


async def test_in_cluster_service_account_reaches_the_api(fake: FakeKube, tmp_path: Path) -> None:
    from kubernetes_asyncio.client import ApiClient, Configuration

    fake.add_namespace("tenant-a")
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    (sa / "token").write_text(fake.token)
    (sa / "ca.crt").write_bytes(fake.ca_pem)
    environ = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(fake.port)}
    configuration = Configuration()
    choice = await kubeconfig.load(
        configuration, None, environ=environ, home=tmp_path, service_account_dir=sa
    )
    assert choice.describe() == "in-cluster service account"
    client = ApiClient(configuration=configuration)
    try:
        listed = await kube.request(client, "GET", kube.resource_path("namespaces"))
    finally:
        await client.close()
    assert [n["metadata"]["name"] for n in listed["items"]] == ["tenant-a"]
