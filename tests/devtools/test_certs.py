"""router.devtools.pki and `metrics-router certs init`: files, names, chains, no overwrite."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
import stat
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from router.cli.main import main as cli_main
from router.devtools.pki import CertAndKey, Pki, PkiExistsError, generate_pki, issue_cert, make_ca

TENANTS = ("a", "b")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return generate_pki(tmp_path_factory.mktemp("pki"), tenants=TENANTS)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def cn(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def eku(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def sans(cert: x509.Certificate) -> tuple[set[str], set[str]]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = set(ext.get_values_for_type(x509.DNSName))
    ips = {str(i) for i in ext.get_values_for_type(x509.IPAddress)}
    return dns, ips


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def verify_server(ca: Path, leaf: Path, name: str) -> None:
    subject: x509.DNSName | x509.IPAddress
    try:
        subject = x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        subject = x509.DNSName(name)
    verifier = PolicyBuilder().store(Store([load(ca)])).time(now()).build_server_verifier(subject)
    verifier.verify(load(leaf), [])


def verify_client(pki: Pki, ca: Path, cert: Path, key: Path) -> None:
    """A real TLS handshake against a server trusting only ca; ssl.SSLError if rejected.

    (cryptography's client verifier insists on a SAN, which Kubernetes client certs lack.)
    """
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku(load(cert))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca))
    server.verify_mode = ssl.CERT_REQUIRED
    server.load_cert_chain(pki.router_serving_cert, pki.router_serving_key)
    client = ssl.create_default_context(cafile=str(pki.router_serving_ca))
    client.load_cert_chain(cert, key)
    _handshake(server, client, "localhost")


def test_writes_every_file_with_permissions(pki: Pki) -> None:
    names = {p.name for p in pki.directory.iterdir()}
    expected = {
        "requestheader-ca.crt",
        "requestheader-ca.key",
        "front-proxy-client.crt",
        "front-proxy-client.key",
        "router-serving-ca.crt",
        "router-serving-ca.key",
        "router-serving.crt",
        "router-serving.key",
        "router-client-ca.crt",
        "router-client-ca.key",
        "router-client.crt",
        "router-client.key",
        "upstream-ca.crt",
        "upstream-ca.key",
        "upstream-a.crt",
        "upstream-a.key",
        "upstream-b.crt",
        "upstream-b.key",
        "rogue-ca.crt",
        "rogue-ca.key",
        "rogue-client.crt",
        "rogue-client.key",
        "other-client.crt",
        "other-client.key",
        "secrets.yaml",
    }
    assert names == expected
    assert {p.name for p in pki.files()} == expected
    for p in pki.files():
        mode = stat.S_IMODE(p.stat().st_mode)
        if p.suffix == ".crt":
            assert mode == 0o644, p.name
        else:  # keys, and secrets.yaml which holds keys
            assert mode == 0o600, p.name
    assert pki.upstream_cert("a") == pki.directory / "upstream-a.crt"
    assert pki.upstream_key("b") == pki.directory / "upstream-b.key"
    with pytest.raises(KeyError):
        pki.upstream_cert("zzz")


def test_aggregator_client_certificate(pki: Pki) -> None:
    cert = load(pki.front_proxy_client_cert)
    assert cn(cert) == "front-proxy-client"
    assert eku(cert) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    verify_client(
        pki, pki.requestheader_ca, pki.front_proxy_client_cert, pki.front_proxy_client_key
    )


def test_router_serving_certificate(pki: Pki) -> None:
    cert = load(pki.router_serving_cert)
    assert eku(cert) == {ExtendedKeyUsageOID.SERVER_AUTH}
    dns, ips = sans(cert)
    assert dns == {
        "localhost",
        "metrics-router",
        "metrics-router.metrics-router",
        "metrics-router.metrics-router.svc",
        "metrics-router.metrics-router.svc.cluster.local",
    }
    assert ips == {"127.0.0.1", "::1"}
    for name in ("metrics-router.metrics-router.svc", "localhost", "127.0.0.1", "::1"):
        verify_server(pki.router_serving_ca, pki.router_serving_cert, name)
    with pytest.raises(VerificationError):
        verify_server(pki.router_serving_ca, pki.router_serving_cert, "evil.example")
    with pytest.raises(VerificationError):
        verify_server(pki.upstream_ca, pki.router_serving_cert, "localhost")


def test_router_client_certificate_has_its_own_ca(pki: Pki) -> None:
    cert = load(pki.router_client_cert)
    assert cn(cert) == "metrics-router"
    assert eku(cert) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    verify_client(pki, pki.router_client_ca, pki.router_client_cert, pki.router_client_key)
    # DESIGN "Trust": never the front-proxy CA, or the router could impersonate the aggregator.
    assert load(pki.router_client_ca).subject != load(pki.requestheader_ca).subject
    assert load(pki.router_client_ca).public_key() != load(pki.requestheader_ca).public_key()
    with pytest.raises(ssl.SSLError):
        verify_client(pki, pki.requestheader_ca, pki.router_client_cert, pki.router_client_key)


@pytest.mark.parametrize("tenant", TENANTS)
def test_upstream_certificates(pki: Pki, tenant: str) -> None:
    cert = load(pki.upstream_cert(tenant))
    assert eku(cert) == {ExtendedKeyUsageOID.SERVER_AUTH}
    svc = f"keda-operator-metrics-apiserver.{tenant}--sys.svc"
    dns, ips = sans(cert)
    assert dns == {"localhost", svc, f"{svc}.cluster.local"}
    assert ips == {"127.0.0.1"}
    for name in (svc, "127.0.0.1", "localhost"):
        verify_server(pki.upstream_ca, pki.upstream_cert(tenant), name)
    other = next(t for t in TENANTS if t != tenant)
    with pytest.raises(VerificationError):
        verify_server(
            pki.upstream_ca,
            pki.upstream_cert(tenant),
            f"keda-operator-metrics-apiserver.{other}--sys.svc",
        )


def test_negative_certificates(pki: Pki) -> None:
    rogue = load(pki.rogue_client_cert)
    assert cn(rogue) == "front-proxy-client"
    verify_client(pki, pki.rogue_ca, pki.rogue_client_cert, pki.rogue_client_key)
    with pytest.raises(ssl.SSLError):
        verify_client(pki, pki.requestheader_ca, pki.rogue_client_cert, pki.rogue_client_key)
    other = load(pki.other_client_cert)
    assert cn(other) == "not-the-aggregator"
    verify_client(pki, pki.requestheader_ca, pki.other_client_cert, pki.other_client_key)


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext, server_name: str) -> ssl.SSLObject:
    """A real TLS handshake in memory; returns the server side's SSLObject."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_hostname=server_name)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(10):
        for side, obj in (("c", c), ("s", s)):
            if not done[side]:
                try:
                    obj.do_handshake()
                    done[side] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            # TLS 1.3: the server checks the client certificate after the client finished;
            # a read surfaces a rejection on the client side.
            c.write(b"x")
            s_in.write(c_out.read())
            assert s.read(1) == b"x"
            return s
    raise AssertionError("handshake did not complete")


def test_tls_handshake_aggregator_to_router(pki: Pki) -> None:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.requestheader_ca))
    server.verify_mode = ssl.CERT_REQUIRED
    server.load_cert_chain(pki.router_serving_cert, pki.router_serving_key)
    client = ssl.create_default_context(cafile=str(pki.router_serving_ca))
    client.load_cert_chain(pki.front_proxy_client_cert, pki.front_proxy_client_key)
    s = _handshake(server, client, "metrics-router.metrics-router.svc")
    peer = s.getpeercert()
    assert peer is not None
    assert (("commonName", "front-proxy-client"),) in peer["subject"]

    rogue = ssl.create_default_context(cafile=str(pki.router_serving_ca))
    rogue.load_cert_chain(pki.rogue_client_cert, pki.rogue_client_key)
    with pytest.raises(ssl.SSLError):
        _handshake(server, rogue, "metrics-router.metrics-router.svc")


def test_secrets_yaml(pki: Pki) -> None:
    docs = list(yaml.safe_load_all(pki.secrets_yaml.read_text()))
    by_key = {(d["kind"], d["metadata"]["namespace"], d["metadata"]["name"]): d for d in docs}
    serving = by_key[("Secret", "metrics-router", "metrics-router-serving")]
    assert serving["type"] == "kubernetes.io/tls"
    assert serving["stringData"]["tls.crt"] == pki.router_serving_cert.read_text()
    assert serving["stringData"]["tls.key"] == pki.router_serving_key.read_text()
    assert serving["stringData"]["ca.crt"] == pki.router_serving_ca.read_text()
    client = by_key[("Secret", "metrics-router", "metrics-router-client")]
    assert client["stringData"]["tls.crt"] == pki.router_client_cert.read_text()
    assert client["stringData"]["ca.crt"] == pki.router_client_ca.read_text()
    upstream_ca = by_key[("ConfigMap", "metrics-router", "metrics-router-upstream-ca")]
    assert upstream_ca["data"]["ca.crt"] == pki.upstream_ca.read_text()
    for t in TENANTS:
        tls = by_key[("Secret", f"{t}--sys", "keda-metrics-apiserver-tls")]
        assert tls["type"] == "kubernetes.io/tls"
        assert tls["stringData"]["tls.crt"] == pki.upstream_cert(t).read_text()
        assert tls["stringData"]["ca.crt"] == pki.upstream_ca.read_text()
        ca = by_key[("ConfigMap", f"{t}--sys", "metrics-router-client-ca")]
        assert ca["data"]["ca.crt"] == pki.router_client_ca.read_text()
    assert len(docs) == 3 + 2 * len(TENANTS)


def test_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    first = generate_pki(tmp_path, tenants=("a",))
    before = first.router_serving_cert.read_bytes()
    serial = load(first.router_serving_cert).serial_number
    with pytest.raises(PkiExistsError) as err:
        generate_pki(tmp_path, tenants=("a",))
    assert "router-serving.crt" in str(err.value)
    assert "force" in str(err.value)
    assert first.router_serving_cert.read_bytes() == before

    again = generate_pki(tmp_path, tenants=("a",), force=True)
    assert load(again.router_serving_cert).serial_number != serial


def test_refuses_when_any_single_file_exists(tmp_path: Path) -> None:
    (tmp_path / "upstream-b.key").write_text("mine")
    with pytest.raises(PkiExistsError) as err:
        generate_pki(tmp_path, tenants=("a", "b"))
    assert err.value.existing == ("upstream-b.key",)
    assert [p.name for p in tmp_path.iterdir()] == ["upstream-b.key"]


@pytest.mark.parametrize("tenants", [("A",), ("a_b",), ("-a",), ("a", "a"), (), ("x" * 59,)])
def test_rejects_invalid_tenant_names(tmp_path: Path, tenants: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="tenant"):
        generate_pki(tmp_path, tenants=tenants)
    assert list(tmp_path.iterdir()) == []


def test_load_existing_and_missing(pki: Pki, tmp_path: Path) -> None:
    assert Pki.load(pki.directory, TENANTS) == pki
    with pytest.raises(FileNotFoundError, match=r"upstream-c\.crt"):
        Pki.load(pki.directory, ("a", "b", "c"))
    with pytest.raises(FileNotFoundError, match="certs init"):
        Pki.load(tmp_path)


def test_building_blocks_for_tests(pki: Pki, tmp_path: Path) -> None:
    ca = pki.load_pair(pki.requestheader_ca, pki.requestheader_ca_key)
    expired = issue_cert(
        ca,
        "front-proxy-client",
        client=True,
        not_before=now() - dt.timedelta(days=2),
        not_after=now() - dt.timedelta(days=1),
    )
    expired.write(tmp_path / "expired.crt", tmp_path / "expired.key")
    with pytest.raises(ssl.SSLError, match="expired"):
        verify_client(pki, pki.requestheader_ca, tmp_path / "expired.crt", tmp_path / "expired.key")

    serving_ca = CertAndKey.load(pki.router_serving_ca, pki.router_serving_ca_key)
    rotated = issue_cert(serving_ca, "x", server=True, dns_names=["localhost"])
    rotated.write(tmp_path / "rotated.crt", tmp_path / "rotated.key")
    assert rotated.cert.serial_number != load(pki.router_serving_cert).serial_number
    verify_server(pki.router_serving_ca, tmp_path / "rotated.crt", "localhost")
    assert stat.S_IMODE((tmp_path / "rotated.key").stat().st_mode) == 0o600
    reloaded = CertAndKey.load(tmp_path / "rotated.crt", tmp_path / "rotated.key")
    assert (reloaded.cert, reloaded.key_pem()) == (rotated.cert, rotated.key_pem())

    fresh = make_ca("test CA")
    leaf = issue_cert(fresh, "someone", client=True, organizations=["system:masters"])
    assert leaf.common_name == "someone"
    with pytest.raises(ValueError, match="server=True"):
        issue_cert(fresh, "nobody")


# ----------------------------------------------------------------------------- CLI


def test_cli_init(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "out"
    assert cli_main(["certs", "init", "--dir", str(out_dir), "--tenants", "x,y"]) == 0
    out = capsys.readouterr().out
    assert "upstream-x.crt" in out
    assert "--requestheader-client-ca-file" in out
    assert (out_dir / "upstream-y.key").exists()
    assert not (out_dir / "upstream-tenant-a.crt").exists()

    assert cli_main(["certs", "init", "--dir", str(out_dir), "--tenants", "x,y"]) == 1
    err = capsys.readouterr().err
    assert "refusing to overwrite" in err
    assert err.rstrip().endswith("; --force replaces them")  # the flag, not the Python API
    assert "force=True" not in err
    assert "Traceback" not in err

    assert cli_main(["certs", "init", "--dir", str(out_dir), "--tenants", "x,y", "--force"]) == 0


def test_cli_invalid_tenant(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:  # a usage error: exit 2, this command's usage
        cli_main(["certs", "init", "--dir", str(tmp_path), "--tenants", "ok,Not_OK"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: metrics-router certs init" in err
    assert "'Not_OK' is not a valid tenant name" in err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_cli_requires_action(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli_main(["certs"])
    assert exc.value.code == 2
    assert "{init}" in capsys.readouterr().err
