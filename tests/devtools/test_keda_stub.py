"""KedaStub over real TLS on 127.0.0.1 with certificates from router.devtools.pki."""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from router.devtools.keda_stub import KedaStub, main, parse_simple_selector
from router.devtools.pki import CertAndKey, Pki, generate_pki, issue_cert

METRIC_PATH = "/apis/external.metrics.k8s.io/v1beta1/namespaces/tenant-a/s0-prometheus"
IDENTITY = (
    ("X-Remote-User", "system:serviceaccount:kube-system:horizontal-pod-autoscaler"),
    ("X-Remote-Uid", "1234-abcd"),
    ("X-Remote-Group", "system:serviceaccounts"),
    ("X-Remote-Group", "system:authenticated"),
    ("X-Remote-Extra-Authentication.kubernetes.io%2fpod-name", "hpa-0"),
    ("X-Remote-Extra-Scopes", "one"),
    ("X-Remote-Extra-Scopes", "two"),
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return generate_pki(tmp_path_factory.mktemp("pki"), tenants=("a", "b"))


def client_context(pki: Pki, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.upstream_ca))
    if cert is not None and key is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


@pytest.fixture
async def stub(pki: Pki) -> AsyncIterator[KedaStub]:
    s = KedaStub(
        tenant="a",
        cert_file=pki.upstream_cert("a"),
        key_file=pki.upstream_key("a"),
        client_ca_file=pki.router_client_ca,
    )
    async with s:
        yield s


@pytest.fixture
async def session(pki: Pki) -> AsyncIterator[aiohttp.ClientSession]:
    ctx = client_context(pki, pki.router_client_cert, pki.router_client_key)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
        yield s


def identity_headers() -> list[tuple[str, str]]:
    return list(IDENTITY)


async def test_answers_external_metric_value_list_and_records_identity(
    stub: KedaStub, session: aiohttp.ClientSession
) -> None:
    # encoded=True: send the query exactly as written (yarl would normalise %2F to /).
    url = URL(
        f"{stub.url}{METRIC_PATH}?labelSelector=scaledobject.keda.sh%2Fname%3Dapp", encoded=True
    )
    async with session.get(url, headers=identity_headers()) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        doc = await resp.json()
        assert resp.headers["X-Stub-Tenant"] == "a"
        assert resp.headers["X-Stub-Seen-User"] == IDENTITY[0][1]
        assert resp.headers["X-Stub-Seen-Groups"] == "system:serviceaccounts,system:authenticated"
        assert resp.headers["X-Stub-Peer-CN"] == "metrics-router"
    assert doc["kind"] == "ExternalMetricValueList"
    assert doc["apiVersion"] == "external.metrics.k8s.io/v1beta1"
    assert doc["metadata"] == {}
    [item] = doc["items"]
    assert item["metricName"] == "s0-prometheus"
    assert item["metricLabels"] == {"scaledobject.keda.sh/name": "app"}
    assert item["value"] == "42"
    assert item["timestamp"].endswith("Z")

    [seen] = await stub.wait_for_requests(1, timeout=5)
    assert seen.method == "GET"
    assert seen.raw_path == f"{METRIC_PATH}?labelSelector=scaledobject.keda.sh%2Fname%3Dapp"
    assert seen.user == IDENTITY[0][1]
    assert seen.uid == "1234-abcd"
    assert seen.groups == ("system:serviceaccounts", "system:authenticated")
    assert seen.extras_dict == {
        "authentication.kubernetes.io/pod-name": ("hpa-0",),
        "scopes": ("one", "two"),
    }
    assert seen.peer_cn == "metrics-router"
    sent = [(k, v) for k, v in seen.headers if k.lower().startswith("x-remote-")]
    assert sent == list(IDENTITY)
    assert seen.header("x-remote-group") == ["system:serviceaccounts", "system:authenticated"]


async def test_value_switchable_and_discovery_and_unknown_path(
    stub: KedaStub, session: aiohttp.ClientSession
) -> None:
    stub.behaviour.value = "7500m"
    async with session.get(f"{stub.url}{METRIC_PATH}", headers=identity_headers()) as resp:
        doc = await resp.json()
    assert doc["items"][0]["value"] == "7500m"
    assert doc["items"][0]["metricLabels"] == {}

    disc = "/apis/external.metrics.k8s.io/v1beta1"
    async with session.get(f"{stub.url}{disc}", headers=identity_headers()) as resp:
        assert resp.status == 200
        doc = await resp.json()
    assert doc["kind"] == "APIResourceList"
    assert doc["resources"][0]["name"] == "externalmetrics"

    async with session.get(f"{stub.url}/apis/nope", headers=identity_headers()) as resp:
        assert resp.status == 404
        assert (await resp.json())["reason"] == "NotFound"


async def test_client_without_certificate_is_refused(pki: Pki, stub: KedaStub) -> None:
    ctx = client_context(pki, None, None)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
        with pytest.raises((aiohttp.ClientError, ssl.SSLError)):
            async with s.get(f"{stub.url}{METRIC_PATH}", headers=identity_headers()) as resp:
                await resp.read()
    assert stub.seen == []


async def test_client_from_another_ca_is_refused(pki: Pki, stub: KedaStub) -> None:
    # CN front-proxy-client, but from a CA the stub does not trust.
    ctx = client_context(pki, pki.rogue_client_cert, pki.rogue_client_key)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
        with pytest.raises((aiohttp.ClientError, ssl.SSLError)):
            async with s.get(f"{stub.url}{METRIC_PATH}", headers=identity_headers()) as resp:
                await resp.read()
    assert stub.seen == []


async def test_wrong_cn_from_trusted_ca_gets_401(pki: Pki, stub: KedaStub, tmp_path: Path) -> None:
    ca = CertAndKey.load(pki.router_client_ca, pki.router_client_ca_key)
    issue_cert(ca, "someone-else", client=True).write(tmp_path / "c.crt", tmp_path / "c.key")
    ctx = client_context(pki, tmp_path / "c.crt", tmp_path / "c.key")
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s,
        s.get(f"{stub.url}{METRIC_PATH}", headers=identity_headers()) as resp,
    ):
        assert resp.status == 401
        body = await resp.json()
    assert body["kind"] == "Status"
    assert body["reason"] == "Unauthorized"
    assert "X-Stub-Seen-User" not in resp.headers
    [seen] = stub.seen
    assert seen.peer_cn == "someone-else"


async def test_any_cn_allowed_when_allowed_names_empty(pki: Pki, tmp_path: Path) -> None:
    ca = CertAndKey.load(pki.router_client_ca, pki.router_client_ca_key)
    issue_cert(ca, "anyone", client=True).write(tmp_path / "c.crt", tmp_path / "c.key")
    ctx = client_context(pki, tmp_path / "c.crt", tmp_path / "c.key")
    stub = KedaStub(
        tenant="b",
        cert_file=pki.upstream_cert("b"),
        key_file=pki.upstream_key("b"),
        client_ca_file=pki.router_client_ca,
        allowed_names=(),
    )
    async with (
        stub,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s,
        s.get(f"{stub.url}{METRIC_PATH}", headers=identity_headers()) as resp,
    ):
        assert resp.status == 200
        assert resp.headers["X-Stub-Tenant"] == "b"


async def test_missing_remote_user_gets_401(stub: KedaStub, session: aiohttp.ClientSession) -> None:
    headers = [(k, v) for k, v in IDENTITY if k != "X-Remote-User"]
    async with session.get(f"{stub.url}{METRIC_PATH}", headers=headers) as resp:
        assert resp.status == 401
        body = await resp.json()
    assert body["code"] == 401
    assert stub.seen[0].user is None
    assert stub.seen[0].groups == ("system:serviceaccounts", "system:authenticated")


async def test_fail_status_answers_status_body(
    stub: KedaStub, session: aiohttp.ClientSession
) -> None:
    stub.behaviour.fail_status = 503
    stub.behaviour.fail_message = "scaler is broken"
    async with session.get(f"{stub.url}{METRIC_PATH}", headers=identity_headers()) as resp:
        assert resp.status == 503
        body = json.loads(await resp.read())
    assert body == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": "scaler is broken",
        "reason": "ServiceUnavailable",
        "code": 503,
    }


async def test_body_override_is_answered_verbatim(
    stub: KedaStub, session: aiohttp.ClientSession
) -> None:
    stub.behaviour.content_type = "application/vnd.kubernetes.protobuf"
    stub.behaviour.body = b"k8s\x00\x01\x02\xff"
    async with session.get(f"{stub.url}{METRIC_PATH}", headers=identity_headers()) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "application/vnd.kubernetes.protobuf"
        assert await resp.read() == b"k8s\x00\x01\x02\xff"


async def test_drop_closes_connection_without_response(
    stub: KedaStub, session: aiohttp.ClientSession
) -> None:
    stub.behaviour.drop = True
    with pytest.raises(aiohttp.ServerDisconnectedError):
        async with session.get(f"{stub.url}{METRIC_PATH}", headers=identity_headers()) as resp:
            await resp.read()
    # aiohttp retries an idempotent request once on a fresh connection; both are dropped.
    assert 1 <= len(stub.seen) <= 2
    assert {s.raw_path for s in stub.seen} == {METRIC_PATH}


async def test_hang_never_answers_and_stop_returns(
    stub: KedaStub, session: aiohttp.ClientSession
) -> None:
    stub.behaviour.hang = True

    async def call() -> int:
        async with session.get(f"{stub.url}{METRIC_PATH}", headers=identity_headers()) as resp:
            return resp.status

    task = asyncio.create_task(call())
    await stub.wait_for_requests(1, timeout=5)
    assert not task.done()
    await asyncio.wait_for(stub.stop(), timeout=5)
    with pytest.raises(aiohttp.ClientError):
        await asyncio.wait_for(task, timeout=5)


async def test_delay_is_cut_short_by_stop(stub: KedaStub, session: aiohttp.ClientSession) -> None:
    stub.behaviour.delay = 3600

    async def call() -> int:
        async with session.get(f"{stub.url}{METRIC_PATH}", headers=identity_headers()) as resp:
            await resp.read()
            return resp.status

    task = asyncio.create_task(call())
    await stub.wait_for_requests(1, timeout=5)
    await asyncio.wait_for(stub.stop(), timeout=5)
    # Either the delayed answer got out during shutdown or the connection was closed.
    try:
        status = await asyncio.wait_for(task, timeout=5)
    except aiohttp.ClientError:
        return
    assert status == 200


async def test_wait_for_requests_times_out(stub: KedaStub) -> None:
    with pytest.raises(TimeoutError):
        await stub.wait_for_requests(1, timeout=0.05)


@pytest.mark.parametrize(
    ("selector", "labels"),
    [
        ("", {}),
        ("a=b", {"a": "b"}),
        ("a==b, c=d", {"a": "b", "c": "d"}),
        ("scaledobject.keda.sh/name=app", {"scaledobject.keda.sh/name": "app"}),
        ("a!=b", {}),
        ("a in (b,c)", {}),
        ("!a", {}),
        ("a", {}),
    ],
)
def test_parse_simple_selector(selector: str, labels: dict[str, str]) -> None:
    assert parse_simple_selector(selector) == labels


async def test_standalone_process(pki: Pki) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "router.devtools.keda_stub",
        "--tenant",
        "a",
        "--cert",
        str(pki.upstream_cert("a")),
        "--key",
        str(pki.upstream_key("a")),
        "--client-ca",
        str(pki.router_client_ca),
        "--value",
        "5",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout=20)).decode().strip()
        assert line.startswith("listening on https://127.0.0.1:")
        url = line.removeprefix("listening on ")
        ctx = client_context(pki, pki.router_client_cert, pki.router_client_key)
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s,
            s.get(f"{url}{METRIC_PATH}", headers=identity_headers()) as resp,
        ):
            assert resp.status == 200
            assert (await resp.json())["items"][0]["value"] == "5"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), timeout=10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_standalone_usage_errors_name_the_flag(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = ["--cert", str(pki.upstream_cert("a")), "--key", str(pki.upstream_key("a"))]
    missing = tmp_path / "nope.crt"
    for argv, named in (
        (["--client-ca", str(missing)], f"--client-ca: {missing} is not a readable file"),
        (["--client-ca", str(pki.router_client_ca), "--delay", "5sec"], "invalid duration '5sec'"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(["--tenant", "tenant-a", *files, *argv])
        assert exc.value.code == 2
        assert named in capsys.readouterr().err
