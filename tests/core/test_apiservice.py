"""router.core.apiservice: the APIService object with a caBundle from the serving CA."""

from __future__ import annotations

import base64

import kubernetes_validate
import pytest
import yaml
from cryptography import x509

from router.core.apiservice import (
    GROUP,
    NAME,
    VERSION,
    APIServiceError,
    apiservice,
    certificate_blocks,
    to_yaml,
)
from router.devtools import pki as certs


@pytest.fixture(scope="module")
def ca() -> certs.CertAndKey:
    return certs.make_ca("router-serving-ca")


@pytest.fixture(scope="module")
def other_ca() -> certs.CertAndKey:
    return certs.make_ca("previous-serving-ca")


def bundle_of(obj: dict[str, object]) -> list[x509.Certificate]:
    spec = obj["spec"]
    assert isinstance(spec, dict)
    return x509.load_pem_x509_certificates(base64.b64decode(spec["caBundle"]))


def test_apiservice_registers_the_router_for_external_metrics(ca: certs.CertAndKey) -> None:
    obj = apiservice(ca.cert_pem())
    assert obj["apiVersion"] == "apiregistration.k8s.io/v1"
    assert obj["kind"] == "APIService"
    assert obj["metadata"]["name"] == NAME == "v1beta1.external.metrics.k8s.io"
    spec = obj["spec"]
    assert (spec["group"], spec["version"]) == (GROUP, VERSION)
    assert (spec["groupPriorityMinimum"], spec["versionPriority"]) == (100, 100)
    assert spec["service"] == {"namespace": "metrics-router", "name": "metrics-router", "port": 443}
    assert spec["insecureSkipTLSVerify"] is False
    assert bundle_of(obj) == [ca.cert]


def test_apiservice_is_valid_for_kubernetes(ca: certs.CertAndKey) -> None:
    obj = apiservice(ca.cert_pem(), namespace="platform", service="router", port=8443)
    assert kubernetes_validate.validate(obj, "1.32", strict=True) == "1.32"
    assert obj["spec"]["service"] == {"namespace": "platform", "name": "router", "port": 8443}


def test_bundle_keeps_every_certificate_in_order_and_drops_surrounding_text(
    ca: certs.CertAndKey, other_ca: certs.CertAndKey
) -> None:
    # During a CA rotation the bundle carries the new and the old CA.
    text = (
        b"subject=CN = router-serving-ca\n"
        + ca.cert_pem()
        + b"\nsome note\r\n"
        + other_ca.cert_pem().replace(b"\n", b"\r\n")
    )
    obj = apiservice(text)
    assert bundle_of(obj) == [ca.cert, other_ca.cert]
    raw = base64.b64decode(obj["spec"]["caBundle"])
    assert b"subject=" not in raw
    assert b"note" not in raw
    assert b"\r" not in raw
    assert raw == ca.cert_pem() + other_ca.cert_pem()


def test_certificate_blocks_skip_other_pem_blocks(ca: certs.CertAndKey) -> None:
    crl_like = b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n"
    assert certificate_blocks(crl_like + ca.cert_pem()) == [ca.cert_pem()]


@pytest.mark.parametrize(
    "pem",
    [
        b"",
        b"not a certificate",
        b"-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n",
        b"-----BEGIN CERTIFICATE-----\nno*base64!\n-----END CERTIFICATE-----\n",
    ],
    ids=["empty", "text", "empty-block", "bad-base64"],
)
def test_rejects_input_without_a_certificate(pem: bytes) -> None:
    with pytest.raises(APIServiceError, match="CERTIFICATE"):
        apiservice(pem)


def test_never_copies_a_private_key(ca: certs.CertAndKey) -> None:
    with pytest.raises(APIServiceError, match="private key"):
        apiservice(ca.cert_pem() + ca.key_pem())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"namespace": "Not_A_Namespace"}, "namespace"),
        ({"service": "a.b"}, "service"),
        ({"port": 0}, "port"),
        ({"port": 65536}, "port"),
        ({"port": True}, "port"),
    ],
)
def test_rejects_bad_service_reference(
    ca: certs.CertAndKey, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(APIServiceError, match=message):
        apiservice(ca.cert_pem(), **kwargs)  # type: ignore[arg-type]


def test_reports_every_problem_at_once() -> None:
    with pytest.raises(APIServiceError) as info:
        apiservice(b"", namespace="BAD", port=0)
    message = str(info.value)
    for part in ("namespace", "port", "CERTIFICATE"):
        assert part in message


def test_to_yaml_round_trips_in_field_order(ca: certs.CertAndKey) -> None:
    obj = apiservice(ca.cert_pem())
    text = to_yaml(obj)
    assert yaml.safe_load(text) == obj
    assert text.startswith("apiVersion: apiregistration.k8s.io/v1\nkind: APIService\n")
