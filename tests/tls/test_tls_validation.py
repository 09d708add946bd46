"""Certificate files are validated before they take effect: one clear line per mistake."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID

from router import tls as tlsfiles
from router.devtools.pki import CertAndKey, Pki, issue_cert, make_ca
from router.tls import TLSFileError

NOW = dt.datetime.now(dt.UTC)
DAY = dt.timedelta(days=1)


@pytest.fixture(scope="module")
def ca() -> CertAndKey:
    return make_ca("test CA")


def _leaf(ca: CertAndKey, **kwargs: object) -> CertAndKey:
    kwargs.setdefault("server", True)
    return issue_cert(ca, "leaf", **kwargs)  # type: ignore[arg-type]


def test_good_serving_pair_passes(ca: CertAndKey) -> None:
    leaf = _leaf(ca)
    assert (
        tlsfiles.validate_leaf(
            leaf.cert_pem(), leaf.key_pem(), "serving certificate", tlsfiles.SERVER_AUTH
        )
        == leaf.cert
    )


@pytest.mark.parametrize(
    ("make", "usage", "fragment"),
    [
        (lambda ca: _leaf(ca, not_before=NOW - 10 * DAY, not_after=NOW - DAY),
         tlsfiles.SERVER_AUTH, "CN=leaf expired at"),
        (lambda ca: _leaf(ca, not_before=NOW + DAY, not_after=NOW + 10 * DAY),
         tlsfiles.SERVER_AUTH, "CN=leaf is not valid before"),
        (lambda ca: _leaf(ca, server=False, client=True),
         tlsfiles.SERVER_AUTH, "lacks the extended key usage serverAuth (has clientAuth)"),
        (lambda ca: _leaf(ca),
         tlsfiles.CLIENT_AUTH, "lacks the extended key usage clientAuth (has serverAuth)"),
        (lambda ca: _leaf(ca, server=False, extended_key_usages=[ExtendedKeyUsageOID.CODE_SIGNING]),
         tlsfiles.CLIENT_AUTH, "lacks the extended key usage clientAuth (has 1.3.6.1.5.5.7.3.3)"),
    ],
    ids=["expired", "not-yet-valid", "client-as-serving", "serving-as-client", "code-signing"],
)  # fmt: skip
def test_bad_leaf_is_refused_with_one_line(
    ca: CertAndKey, make: object, usage: object, fragment: str
) -> None:
    leaf = make(ca)  # type: ignore[operator]
    with pytest.raises(TLSFileError) as err:
        tlsfiles.validate_leaf(leaf.cert_pem(), leaf.key_pem(), "serving certificate", usage)  # type: ignore[arg-type]
    assert fragment in str(err.value)
    assert str(err.value).startswith("serving certificate: ")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("cert", "key", "fragment"),
    [
        (b"", None, "serving certificate: the file is empty"),
        (b"garbage\n", None, "serving certificate: no PEM certificate"),
        (b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n", None,
         "serving certificate: not a valid PEM certificate"),
        (None, b"", "serving certificate key: the file is empty"),
        (None, b"garbage\n", "serving certificate key: not a PEM private key"),
        (None, "other", "do not load as a pair: the key does not belong to CN=leaf"),
    ],
    ids=["empty-cert", "garbage-cert", "bad-base64", "empty-key", "garbage-key", "mismatch"],
)  # fmt: skip
def test_unusable_files_are_refused(
    ca: CertAndKey, cert: bytes | None, key: bytes | str | None, fragment: str
) -> None:
    leaf = _leaf(ca)
    key_pem = _leaf(ca).key_pem() if key == "other" else key
    with pytest.raises(TLSFileError) as err:
        tlsfiles.validate_leaf(
            leaf.cert_pem() if cert is None else cert,
            leaf.key_pem() if key_pem is None else key_pem,  # type: ignore[arg-type]
            "serving certificate",
            tlsfiles.SERVER_AUTH,
        )
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_ca_bundle_accepts_cas_and_refuses_a_leaf(ca: CertAndKey) -> None:
    tlsfiles.validate_ca_bundle(ca.cert_pem() + make_ca("other").cert_pem(), "client CA")
    leaf = _leaf(ca)
    with pytest.raises(TLSFileError) as err:
        tlsfiles.validate_ca_bundle(ca.cert_pem() + leaf.cert_pem(), "requestheader client CA")
    assert str(err.value) == (
        "requestheader client CA: CN=leaf is not a CA certificate (basicConstraints CA:FALSE or "
        "absent): give the CA that issued it, not the certificate itself"
    )


def test_ca_bundle_needs_one_valid_ca() -> None:
    expired = make_ca("old CA", not_before=NOW - 10 * DAY, not_after=NOW - DAY)
    fresh = make_ca("new CA")
    tlsfiles.validate_ca_bundle(expired.cert_pem() + fresh.cert_pem(), "upstream CA")  # overlap
    with pytest.raises(TLSFileError, match="upstream CA: no CA in the bundle is valid now: "
                       "CN=old CA expired at"):  # fmt: skip
        tlsfiles.validate_ca_bundle(expired.cert_pem(), "upstream CA")
    with pytest.raises(TLSFileError, match="upstream CA: the file is empty"):
        tlsfiles.validate_ca_bundle(b"\n", "upstream CA")


def test_contexts_validate_before_loading(pki: Pki) -> None:
    serving = pki.router_serving_cert.read_bytes()
    serving_key = pki.router_serving_key.read_bytes()
    with pytest.raises(TLSFileError, match="requestheader client CA: CN=front-proxy-client is not"):
        tlsfiles.server_context(serving, serving_key, pki.front_proxy_client_cert.read_bytes())
    with pytest.raises(TLSFileError, match=r"proxy client certificate: .* lacks the extended key"):
        tlsfiles.client_context(serving, serving_key, None)
