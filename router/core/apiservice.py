"""The APIService that registers the router as the backend of external.metrics.k8s.io (pure).

`metrics-router render apiservice --ca-file F` prints :func:`apiservice` as YAML for clusters
without cert-manager's cainjector; `deploy/apiservice/` holds the same object with the
cainjector annotation instead of a caBundle.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

import yaml

from router.core.names import is_dns1123_label
from router.core.status import GROUP, VERSION

NAME = f"{VERSION}.{GROUP}"
GROUP_PRIORITY_MINIMUM = 100
VERSION_PRIORITY = 100

DEFAULT_NAMESPACE = "metrics-router"
DEFAULT_SERVICE = "metrics-router"
DEFAULT_PORT = 443

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----", re.DOTALL)
_PRIVATE_KEY = re.compile(rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")


class APIServiceError(ValueError):
    """The inputs cannot make a valid APIService (bad CA bundle, name or port)."""


def certificate_blocks(pem: bytes) -> list[bytes]:
    """Return the PEM CERTIFICATE blocks of ``pem``, each normalised to end with a newline.

    Text around the blocks (such as `openssl x509 -text` output) is dropped. A private key in
    the input is an error, never copied: a caBundle is public and ends up in every client.
    """
    if _PRIVATE_KEY.search(pem):
        raise APIServiceError("the CA file contains a private key; give the CA certificate only")
    blocks: list[bytes] = []
    for match in _PEM_BLOCK.finditer(pem):
        label, body = match.group(1), match.group(2)
        if label != b"CERTIFICATE":
            continue
        try:
            der = base64.b64decode(b"".join(body.split()), validate=True)
        except binascii.Error as exc:
            raise APIServiceError("a CERTIFICATE block is not valid base64") from exc
        if not der:
            raise APIServiceError("a CERTIFICATE block is empty")
        lines = [line.strip() for line in body.splitlines() if line.strip()]
        block = [b"-----BEGIN CERTIFICATE-----", *lines, b"-----END CERTIFICATE-----", b""]
        blocks.append(b"\n".join(block))
    if not blocks:
        raise APIServiceError("no PEM CERTIFICATE block found in the CA file")
    return blocks


def apiservice(
    ca_pem: bytes,
    *,
    namespace: str = DEFAULT_NAMESPACE,
    service: str = DEFAULT_SERVICE,
    port: int = DEFAULT_PORT,
) -> dict[str, Any]:
    """The `apiregistration.k8s.io/v1` APIService for the router's Service, as a plain dict.

    ``ca_pem`` is the CA that signed the router's serving certificate (one or more PEM
    certificates); it becomes ``spec.caBundle``, base64-encoded, so the aggregator verifies
    the router. Raises :class:`APIServiceError` listing every problem found.
    """
    errors: list[str] = []
    if not is_dns1123_label(namespace):
        errors.append(f"namespace {namespace!r} is not a valid namespace name")
    if not is_dns1123_label(service):
        errors.append(f"service {service!r} is not a valid Service name")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        errors.append(f"port {port!r} is not in 1..65535")
    bundle = b""
    try:
        bundle = b"".join(certificate_blocks(ca_pem))
    except APIServiceError as exc:
        errors.append(str(exc))
    if errors:
        raise APIServiceError("; ".join(errors))
    return {
        "apiVersion": "apiregistration.k8s.io/v1",
        "kind": "APIService",
        "metadata": {
            "name": NAME,
            "labels": {
                "app.kubernetes.io/name": "metrics-router",
                "app.kubernetes.io/part-of": "tenant-metrics-router",
            },
        },
        "spec": {
            "group": GROUP,
            "version": VERSION,
            "groupPriorityMinimum": GROUP_PRIORITY_MINIMUM,
            "versionPriority": VERSION_PRIORITY,
            "insecureSkipTLSVerify": False,
            "service": {"namespace": namespace, "name": service, "port": port},
            "caBundle": base64.b64encode(bundle).decode("ascii"),
        },
    }


def to_yaml(obj: dict[str, Any]) -> str:
    """One Kubernetes object as a YAML document, keys in the order given."""
    return yaml.safe_dump(obj, sort_keys=False, default_flow_style=False)
