"""`metrics-router serve` as a process: start-up errors, serving, SIGTERM."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import sys
from pathlib import Path

import pytest

from router.devtools.keda_stub import KedaStub
from router.devtools.pki import Pki
from tests.cli.process import (
    Running,
    assert_clean_failure,
    base_args,
    read_until,
    run_cli,
    running_router,
    with_flag,
)
from tests.conftest import (
    HPA_IDENTITY,
    RawConnection,
    client_ssl_context,
    copy_file,
    metric_path,
    routes_yaml,
)

pytestmark = pytest.mark.usefixtures("no_leftover_tasks")


@pytest.fixture
def routes_file(tmp_path: Path) -> Path:
    path = tmp_path / "routes.yaml"
    path.write_text(routes_yaml({"a": (["tenant-a"], "https://127.0.0.1:1", None)}))
    return path


# --------------------------------------------------------------------------- start-up errors


def test_missing_files_are_reported_together(pki: Pki, routes_file: Path, tmp_path: Path) -> None:
    args = with_flag(base_args(pki, routes_file), "--tls-cert-file", str(tmp_path / "nope.crt"))
    args = with_flag(args, "--proxy-client-key-file", str(tmp_path / "nope.key"))
    proc = run_cli(args)
    assert_clean_failure(
        proc,
        f"--tls-cert-file: {tmp_path / 'nope.crt'} is not a readable file",
        f"--proxy-client-key-file: {tmp_path / 'nope.key'} is not a readable file",
        code=2,
    )


def test_no_flags_at_all_names_every_required_flag() -> None:
    proc = run_cli(["serve", "--metrics-bind-address", "0"])
    assert_clean_failure(
        proc,
        "--tls-cert-file is required",
        "--tls-private-key-file is required",
        "--proxy-client-cert-file is required",
        "--proxy-client-key-file is required",
        code=2,
    )


@pytest.mark.parametrize(
    ("flag", "content", "fragment"),
    [
        ("--tls-cert-file", b"garbage\n", "serving"),
        ("--tls-private-key-file", b"garbage\n", "serving"),
        ("--requestheader-client-ca-file", b"garbage\n", "requestheader client CA"),
        ("--proxy-client-cert-file", b"garbage\n", "proxy client certificate"),
        ("--upstream-ca-file", b"garbage\n", "upstream CA"),
        ("--routes-file", b"tenants: [broken", "--routes-file"),
        ("--routes-file", b"tenants:\n  a: {namespaces: [x], upstream: 'http://h'}\n", "https://"),
    ],
)
def test_bad_file_at_start_up_is_a_clear_error(
    pki: Pki, routes_file: Path, tmp_path: Path, flag: str, content: bytes, fragment: str
) -> None:
    bad = tmp_path / "bad-file"
    bad.write_bytes(content)
    proc = run_cli(with_flag(base_args(pki, routes_file), flag, str(bad)))
    assert_clean_failure(proc, "cannot start", fragment)


def test_serving_certificate_with_the_wrong_key_is_refused(pki: Pki, routes_file: Path) -> None:
    args = with_flag(
        base_args(pki, routes_file), "--tls-private-key-file", str(pki.front_proxy_client_key)
    )
    assert_clean_failure(run_cli(args), "cannot start", "do not load as a pair")


def test_port_in_use_is_a_clear_error(pki: Pki, routes_file: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        args = with_flag(base_args(pki, routes_file), "--secure-port", str(port))
        assert_clean_failure(run_cli(args), "cannot start", f"127.0.0.1:{port}")


def test_invalid_flag_values_are_reported(pki: Pki, routes_file: Path) -> None:
    args = [
        *base_args(pki, routes_file),
        "--upstream-timeout", "0",
        "--max-inflight-per-tenant", "0",
        "--metrics-bind-address", "nonsense",
    ]  # fmt: skip
    assert_clean_failure(
        run_cli(args),
        "--upstream-timeout: must be > 0",
        "--max-inflight-per-tenant: must be >= 1",
        "--metrics-bind-address: invalid address 'nonsense': want HOST:PORT",
        code=2,
    )


def test_console_script_is_installed(pki: Pki, routes_file: Path, tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("metrics-router")
    if not script.exists():
        pytest.skip("console script not installed next to the interpreter")
    args = with_flag(base_args(pki, routes_file), "--tls-cert-file", str(tmp_path / "x"))
    assert_clean_failure(run_cli(args, cmd=[str(script)]), "--tls-cert-file", code=2)


# --------------------------------------------------------------------------- running


async def _drain(running: Running) -> str:
    assert running.proc.stderr is not None
    rest = await asyncio.wait_for(running.proc.stderr.read(), 30)
    return "".join(running.log) + rest.decode(errors="replace")


async def test_serves_and_exits_0_on_sigterm(pki: Pki, tmp_path: Path, stub: KedaStub) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(routes_yaml({"a": (["tenant-a"], stub.url, None)}))
    async with running_router(base_args(pki, routes)) as r:
        conn = await RawConnection.open(r.port, client_ssl_context(pki))
        try:
            reply = await conn.request(metric_path("tenant-a"), HPA_IDENTITY)
        finally:
            await conn.close()
        assert reply.status == 200
        assert stub.seen[0].peer_cn == "metrics-router"
        r.proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(r.proc.wait(), 30)
        log = await _drain(r)
    assert code == 0, log
    assert "Traceback" not in log


async def test_sigterm_lets_the_request_in_flight_finish(
    pki: Pki, tmp_path: Path, stub: KedaStub
) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(routes_yaml({"a": (["tenant-a"], stub.url, None)}))
    stub.behaviour.delay = 0.5
    async with running_router(base_args(pki, routes)) as r:
        conn = await RawConnection.open(r.port, client_ssl_context(pki))
        try:
            in_flight = asyncio.create_task(conn.request(metric_path("tenant-a"), HPA_IDENTITY))
            await stub.wait_for_requests(1, timeout=10)
            r.proc.send_signal(signal.SIGTERM)
            reply = await in_flight
        finally:
            await conn.close()
        assert reply.status == 200
        code = await asyncio.wait_for(r.proc.wait(), 30)
        log = await _drain(r)
    assert code == 0, log


async def test_reloads_a_rotated_routes_file_while_running(
    pki: Pki, tmp_path: Path, stub: KedaStub
) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(routes_yaml({"a": (["tenant-a"], stub.url, None)}))
    cert = copy_file(pki.router_serving_cert, tmp_path / "tls.crt")
    args = with_flag(base_args(pki, routes), "--tls-cert-file", str(cert))
    args += ["--file-check-interval", "0.05"]
    async with running_router(args) as r:
        routes.write_text(routes_yaml({"a": (["tenant-a", "tenant-a--new"], stub.url, None)}))
        await asyncio.wait_for(read_until(r.proc, r.log, re.compile("routes reloaded")), 30)
        conn = await RawConnection.open(r.port, client_ssl_context(pki))
        try:
            reply = await conn.request(metric_path("tenant-a--new"), HPA_IDENTITY)
        finally:
            await conn.close()
        assert reply.status == 200
        r.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(r.proc.wait(), 30) == 0
