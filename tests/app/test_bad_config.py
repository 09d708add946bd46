"""Issue 11: every bad input is refused with a clear one-line message, at start (exit 1, no
traceback) and on reload (logged, counted, and the last good state stays in force)."""

from __future__ import annotations

import datetime as dt
import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from router.devtools.pki import (
    LOOPBACK_IPS,
    ROUTER_CLIENT_CN,
    ROUTER_SERVING_DNS,
    CertAndKey,
    Pki,
    issue_cert,
    make_ca,
)
from tests.conftest import (
    RouterHarness,
    StartRouter,
    copy_file,
    metric_path,
    routes_yaml,
)

pytestmark = pytest.mark.usefixtures("no_leftover_tasks")

RELOADS = "metrics_router_reloads_total"
LAST_OK = "metrics_router_last_reload_successful"
NOW = dt.datetime.now(dt.UTC)
DAY = dt.timedelta(days=1)
EXPIRED = {"not_before": NOW - 30 * DAY, "not_after": NOW - DAY}
NOT_YET_VALID = {"not_before": NOW + DAY, "not_after": NOW + 30 * DAY}

DUPLICATE_TENANT = """\
tenants:
  a:
    namespaces: [tenant-a]
    upstream: https://127.0.0.1:1
  b:
    namespaces: [tenant-b]
    upstream: https://127.0.0.1:2
  a:
    namespaces: [tenant-a--dev]
    upstream: https://127.0.0.1:3
"""


def serving(pki: Pki, **kwargs: object) -> CertAndKey:
    ca = pki.load_pair(pki.router_serving_ca, pki.router_serving_ca_key)
    kwargs.setdefault("server", True)
    return issue_cert(
        ca,
        "metrics-router.metrics-router.svc",
        dns_names=ROUTER_SERVING_DNS,
        ip_addresses=LOOPBACK_IPS,
        **kwargs,  # type: ignore[arg-type]
    )


def proxy_client(pki: Pki, **kwargs: object) -> CertAndKey:
    ca = pki.load_pair(pki.router_client_ca, pki.router_client_ca_key)
    kwargs.setdefault("client", True)
    return issue_cert(ca, ROUTER_CLIENT_CN, **kwargs)  # type: ignore[arg-type]


# Each case: flag pair it replaces, what to write, the message expected.
Writer = Callable[[Pki, Path, Path], None]


def _pair(make: Callable[[Pki], CertAndKey]) -> Writer:
    def write(pki: Pki, cert: Path, key: Path) -> None:
        make(pki).write(cert, key)

    return write


def _cert_only(data: Callable[[Pki], bytes]) -> Writer:
    def write(pki: Pki, cert: Path, key: Path) -> None:
        cert.write_bytes(data(pki))

    return write


SERVING = ("--tls-cert-file", "--tls-private-key-file")
CLIENT = ("--proxy-client-cert-file", "--proxy-client-key-file")
REQUESTHEADER_CA = ("--requestheader-client-ca-file", None)
UPSTREAM_CA = ("--upstream-ca-file", None)

CASES: dict[str, tuple[tuple[str, str | None], Writer, str]] = {
    "expired serving certificate": (
        SERVING, _pair(lambda p: serving(p, **EXPIRED)),
        "serving certificate: CN=metrics-router.metrics-router.svc expired at ",
    ),
    "not-yet-valid serving certificate": (
        SERVING, _pair(lambda p: serving(p, **NOT_YET_VALID)),
        "serving certificate: CN=metrics-router.metrics-router.svc is not valid before ",
    ),
    "client certificate as serving certificate": (
        SERVING, _pair(lambda p: serving(p, server=False, client=True)),
        "lacks the extended key usage serverAuth (has clientAuth)",
    ),
    "serving key of another certificate": (
        SERVING,
        lambda p, cert, key: (serving(p).write(cert, key), key.write_bytes(serving(p).key_pem())),  # type: ignore[func-returns-value]
        "serving certificate: certificate and key do not load as a pair: the key does not belong",
    ),
    "empty serving certificate": (
        SERVING, _cert_only(lambda p: b""), "serving certificate: the file is empty",
    ),
    "garbage serving certificate": (
        SERVING, _cert_only(lambda p: b"garbage\n"), "serving certificate: no PEM certificate",
    ),
    "expired proxy client certificate": (
        CLIENT, _pair(lambda p: proxy_client(p, **EXPIRED)),
        "proxy client certificate: CN=metrics-router expired at ",
    ),
    "serving certificate as proxy client certificate": (
        CLIENT, _pair(lambda p: proxy_client(p, client=False, server=True)),
        "proxy client certificate: CN=metrics-router lacks the extended key usage clientAuth",
    ),
    "leaf as requestheader CA": (
        REQUESTHEADER_CA, _cert_only(lambda p: p.front_proxy_client_cert.read_bytes()),
        "requestheader client CA: CN=front-proxy-client is not a CA certificate",
    ),
    "expired requestheader CA": (
        REQUESTHEADER_CA, _cert_only(lambda p: make_ca("old CA", **EXPIRED).cert_pem()),  # type: ignore[arg-type]
        "requestheader client CA: no CA in the bundle is valid now: CN=old CA expired at",
    ),
    "empty requestheader CA": (
        REQUESTHEADER_CA, _cert_only(lambda p: b""), "requestheader client CA: the file is empty",
    ),
    "leaf as upstream CA": (
        UPSTREAM_CA, _cert_only(lambda p: p.upstream_cert(p.tenants[0]).read_bytes()),
        "upstream CA: CN=",
    ),
}  # fmt: skip


def _write_case(pki: Pki, tmp_path: Path, case: str) -> list[str]:
    """Files for a case; returns the flags that point the router at them."""
    (flag, key_flag), write, _ = CASES[case]
    cert, key = tmp_path / "bad.crt", tmp_path / "bad.key"
    write(pki, cert, key)
    if key_flag and not key.exists():  # only the certificate is bad: its real key
        copy_file(pki.router_serving_key if key_flag in SERVING else pki.router_client_key, key)
    return [flag, str(cert)] + ([key_flag, str(key)] if key_flag else [])


# --------------------------------------------------------------------------- at start


def _serve(pki: Pki, routes_file: Path, extra: list[str]) -> subprocess.CompletedProcess[str]:
    args = [
        sys.executable, "-m", "router", "serve",
        "--secure-port", "0", "--bind-address", "127.0.0.1",
        *pki.serve_flags(), "--upstream-ca-file", str(pki.upstream_ca),
        "--routes-file", str(routes_file), "--metrics-bind-address", "0", *extra,
    ]  # fmt: skip
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


def _assert_one_line_failure(proc: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines  # the error alone: no "stopped" before it, no dump after
    assert "cannot start: " in lines[0]
    assert fragment in lines[0], (fragment, lines[0])


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_certificate_file_at_start(pki: Pki, tmp_path: Path, case: str) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(routes_yaml({"a": (["tenant-a"], "https://127.0.0.1:1", None)}))
    proc = _serve(pki, routes, _write_case(pki, tmp_path, case))
    _assert_one_line_failure(proc, CASES[case][2])


def test_duplicate_tenant_in_routes_file_at_start(pki: Pki, tmp_path: Path) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(DUPLICATE_TENANT)
    proc = _serve(pki, routes, [])
    _assert_one_line_failure(
        proc, f"--routes-file {routes}: line 8: duplicate key 'a' (first given on line 2"
    )


# --------------------------------------------------------------------------- on reload


async def _serving_ok(h: RouterHarness) -> None:
    assert (await h.request(metric_path("tenant-a"))).status == 200
    assert (await h.request(metric_path("tenant-b"))).headers["X-Stub-Tenant"] == "b"


@pytest.mark.parametrize("case", sorted(CASES))
async def test_bad_certificate_file_on_reload_keeps_the_last_good(
    start_router: StartRouter,
    pki: Pki,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    case: str,
) -> None:
    # Start on good copies of the files the case will damage.
    (flag, key_flag), _, fragment = CASES[case]
    originals = {
        "--tls-cert-file": pki.router_serving_cert,
        "--tls-private-key-file": pki.router_serving_key,
        "--proxy-client-cert-file": pki.router_client_cert,
        "--proxy-client-key-file": pki.router_client_key,
        "--requestheader-client-ca-file": pki.requestheader_ca,
        "--upstream-ca-file": pki.upstream_ca,
    }
    cert, key = tmp_path / "bad.crt", tmp_path / "bad.key"
    copy_file(originals[flag], cert)
    extra = [flag, str(cert)]
    if key_flag:
        copy_file(originals[key_flag], key)
        extra += [key_flag, str(key)]
    h = await start_router({"a": ["tenant-a"], "b": ["tenant-b"]}, extra_args=extra)
    await _serving_ok(h)
    source = "proxy-client" if flag in CLIENT or flag in UPSTREAM_CA else "serving"

    caplog.clear()
    _write_case(pki, tmp_path, case)
    with caplog.at_level(logging.INFO, logger="router"):
        h.router.check_files()
        h.router.check_files()  # the same bad file: neither logged nor counted again
    refused = [r for r in caplog.records if "refused, keeping the last good" in r.getMessage()]
    assert len(refused) == 1
    assert fragment in refused[0].fields["error"]  # type: ignore[attr-defined]
    assert await h.sample(RELOADS, {"source": source, "result": "failure"}) == 1
    assert await h.sample(LAST_OK, {"source": source}) == 0
    await _serving_ok(h)  # the last good certificates are still in force


async def test_duplicate_tenant_on_reload_keeps_the_last_table(
    start_router: StartRouter, caplog: pytest.LogCaptureFixture
) -> None:
    h = await start_router({"a": ["tenant-a"], "b": ["tenant-b"]})
    h.routes_file.write_text(DUPLICATE_TENANT)
    with caplog.at_level(logging.INFO, logger="router"):
        h.router.check_files()
    (record,) = [r for r in caplog.records if "routes file refused" in r.getMessage()]
    assert record.fields["error"].startswith("line 8: duplicate key 'a' (first given on line 2")  # type: ignore[attr-defined]
    await _serving_ok(h)


async def test_missing_routes_file_is_logged_once_not_every_check(
    start_router: StartRouter, caplog: pytest.LogCaptureFixture
) -> None:
    h = await start_router({"a": ["tenant-a"], "b": ["tenant-b"]})
    good = h.routes_file.read_text()
    h.routes_file.unlink()
    with caplog.at_level(logging.INFO, logger="router"):
        for _ in range(5):
            h.router.check_files()
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert [r.getMessage() for r in errors] == [
            "routes file unreadable, keeping the last good table"
        ]
        assert errors[0].fields["error"] == "No such file or directory"  # type: ignore[attr-defined]
        await _serving_ok(h)
        assert await h.sample(LAST_OK, {"source": "routes"}) == 0
        h.routes_file.write_text(good)
        h.router.check_files()
        assert "routes file readable again" in caplog.text
    assert await h.sample(RELOADS, {"source": "routes", "result": "failure"}) == 1
    assert await h.sample(LAST_OK, {"source": "routes"}) == 1


# --------------------------------------------------------------------------- near expiry


async def test_certificate_close_to_expiry_warns_and_sets_a_metric(
    start_router: StartRouter, pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cert, key = tmp_path / "serving.crt", tmp_path / "serving.key"
    soon = serving(pki, not_after=NOW + 2 * DAY)
    soon.write(cert, key)
    with caplog.at_level(logging.WARNING, logger="router"):
        h = await start_router(
            {"a": ["tenant-a"], "b": ["tenant-b"]},
            extra_args=["--tls-cert-file", str(cert), "--tls-private-key-file", str(key),
                        "--certificate-expiry-warning", "72h"],
        )  # fmt: skip
    (warning,) = [r for r in caplog.records if r.getMessage() == "certificate expires soon"]
    assert warning.fields["certificate"] == "serving"  # type: ignore[attr-defined]
    expiring = "metrics_router_certificate_expiring_soon"
    assert await h.sample(expiring, {"certificate": "serving"}) == 1
    assert await h.sample(expiring, {"certificate": "proxy-client"}) == 0
    # A renewed certificate clears it.
    serving(pki, days=30).write(cert, key)
    h.router.check_files()
    assert await h.sample(expiring, {"certificate": "serving"}) == 0
    await _serving_ok(h)


async def test_leaf_as_requestheader_ca_from_the_configmap_is_refused(
    start_router: StartRouter, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    from router.settings.serve import RequestHeaderSettings

    h = await start_router({"a": ["tenant-a"], "b": ["tenant-b"]})
    leaf = RequestHeaderSettings(client_ca_pem=pki.front_proxy_client_cert.read_bytes())
    with caplog.at_level(logging.INFO, logger="router"):
        h.router.set_requestheader(leaf)
    (record,) = [r for r in caplog.records if "requestheader settings refused" in r.getMessage()]
    assert "CN=front-proxy-client is not a CA certificate" in record.fields["error"]  # type: ignore[attr-defined]
    assert await h.sample(RELOADS, {"source": "requestheader", "result": "failure"}) == 1
    assert await h.sample(LAST_OK, {"source": "requestheader"}) == 0
    await _serving_ok(h)
