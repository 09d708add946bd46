"""Development PKI: every certificate the request path needs, generated with `cryptography`.

Not for production (cert-manager issues those, see deploy/). Keys are EC P-256, so generation
takes milliseconds and the test suite can mint a fresh PKI per module.

Files written by :func:`generate_pki` (``*.key`` mode 0600, ``*.crt`` mode 0644)::

    requestheader-ca.crt/.key       the cluster's front-proxy (requestheader) CA, self-signed
    front-proxy-client.crt/.key     CN front-proxy-client, clientAuth, signed by requestheader-ca:
                                    what the kube-apiserver aggregator presents to the router
    router-serving-ca.crt/.key      CA of the router's serving certificate (APIService caBundle)
    router-serving.crt/.key         serverAuth, signed by router-serving-ca; SANs localhost,
                                    127.0.0.1, ::1, metrics-router, metrics-router.metrics-router,
                                    metrics-router.metrics-router.svc[.cluster.local]
    router-client-ca.crt/.key       a SEPARATE CA for the router's client certificate; never the
                                    front-proxy CA (see DESIGN "Trust"). Tenant KEDA metrics
                                    servers trust it via --requestheader-client-ca-file
    router-client.crt/.key          CN metrics-router, clientAuth, signed by router-client-ca
    upstream-ca.crt/.key            CA of the tenants' KEDA metrics server serving certificates
    upstream-<T>.crt/.key           per tenant T (default tenant-a, tenant-b, tenant-c; names are
                                    used as given): serverAuth, signed by upstream-ca; SANs
                                    127.0.0.1, localhost,
                                    keda-operator-metrics-apiserver.<T>--sys.svc[.cluster.local]
    rogue-ca.crt/.key               an unrelated CA (negative tests, demo)
    rogue-client.crt/.key           CN front-proxy-client, clientAuth, signed by rogue-ca
    other-client.crt/.key           CN not-the-aggregator, clientAuth, signed by requestheader-ca
    secrets.yaml                    Secrets (kubernetes.io/tls, with ca.crt) and CA ConfigMaps
                                    for `kubectl apply`

Small building blocks (:func:`make_ca`, :func:`issue_cert`, :class:`CertAndKey`) are public so
tests can mint extra certificates: expired ones, a rotated serving certificate, another CN.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from router.logs import fields

logger = logging.getLogger(__name__)

# Tenants are named after their root namespace (tenant-a), as the default --tenant-pattern and
# the hnc strategy name them; the tenant's KEDA runs in "<tenant>--sys".
DEFAULT_TENANTS: tuple[str, ...] = ("tenant-a", "tenant-b", "tenant-c")
DEFAULT_DAYS = 365
KEY_MODE = 0o600
CERT_MODE = 0o644

FRONT_PROXY_CLIENT_CN = "front-proxy-client"
ROUTER_CLIENT_CN = "metrics-router"
OTHER_CLIENT_CN = "not-the-aggregator"
ROUTER_NAMESPACE = "metrics-router"
ROUTER_SERVICE = "metrics-router"
UPSTREAM_SERVICE = "keda-operator-metrics-apiserver"

ROUTER_SERVING_DNS: tuple[str, ...] = (
    "localhost",
    ROUTER_SERVICE,
    f"{ROUTER_SERVICE}.{ROUTER_NAMESPACE}",
    f"{ROUTER_SERVICE}.{ROUTER_NAMESPACE}.svc",
    f"{ROUTER_SERVICE}.{ROUTER_NAMESPACE}.svc.cluster.local",
)
LOOPBACK_IPS: tuple[str, ...] = ("127.0.0.1", "::1")

# Secret / ConfigMap names in secrets.yaml.
ROUTER_SERVING_SECRET = "metrics-router-serving"
ROUTER_CLIENT_SECRET = "metrics-router-client"
ROUTER_UPSTREAM_CA_CONFIGMAP = "metrics-router-upstream-ca"
UPSTREAM_SECRET = "keda-metrics-apiserver-tls"
UPSTREAM_CLIENT_CA_CONFIGMAP = "metrics-router-client-ca"

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# The tenant's system namespace is "<tenant>--sys"; it must stay a valid 63-char label.
MAX_TENANT_LEN = 63 - len("--sys")


class PkiExistsError(FileExistsError):
    """generate_pki would overwrite files; pass force=True to replace them."""

    def __init__(self, directory: Path, existing: Sequence[str]) -> None:
        self.directory = directory
        self.existing = tuple(existing)
        super().__init__(
            f"refusing to overwrite existing PKI files in {directory}: "
            f"{', '.join(self.existing)} (force=True replaces them)"
        )


def tenant_namespace(tenant: str) -> str:
    """The tenant's system namespace, where its KEDA runs."""
    return f"{tenant}--sys"


def upstream_dns_names(tenant: str) -> tuple[str, ...]:
    svc = f"{UPSTREAM_SERVICE}.{tenant_namespace(tenant)}.svc"
    return ("localhost", svc, f"{svc}.cluster.local")


def validate_tenant_names(tenants: Sequence[str]) -> tuple[str, ...]:
    """Return the tenants as a tuple; raise ValueError naming every invalid or repeated name."""
    errors: list[str] = []
    seen: set[str] = set()
    for t in tenants:
        if not _DNS_LABEL.match(t) or len(t) > MAX_TENANT_LEN:
            errors.append(
                f"{t!r} is not a valid tenant name (a DNS label: lowercase letters, digits and "
                f"'-', starting and ending alphanumeric, at most {MAX_TENANT_LEN} characters)"
            )
        elif t in seen:
            errors.append(f"tenant {t!r} is given twice")
        seen.add(t)
    if not tenants:
        errors.append("at least one tenant is required")
    if errors:
        raise ValueError("; ".join(errors))
    return tuple(tenants)


# --------------------------------------------------------------------------- building blocks


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class CertAndKey:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @property
    def common_name(self) -> str:
        attrs = self.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(attrs[0].value) if attrs else ""

    def write(self, cert_path: Path, key_path: Path) -> None:
        """Write both files atomically (key 0600, cert 0644). The key is written first."""
        write_file(key_path, self.key_pem(), KEY_MODE)
        write_file(cert_path, self.cert_pem(), CERT_MODE)

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> CertAndKey:
        cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
        key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key_path}: expected an EC private key")
        return cls(cert=cert, key=key)


def write_file(path: Path, data: bytes, mode: int) -> None:
    """Write data to path atomically (temp file + rename) with the given permission bits."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _validity(
    not_before: dt.datetime | None, not_after: dt.datetime | None, days: int
) -> tuple[dt.datetime, dt.datetime]:
    start = not_before if not_before is not None else _utcnow() - dt.timedelta(minutes=5)
    end = not_after if not_after is not None else start + dt.timedelta(days=days)
    return start, end


def make_ca(
    common_name: str,
    *,
    days: int = DEFAULT_DAYS,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> CertAndKey:
    """A self-signed CA certificate (pathlen 0) with a fresh P-256 key."""
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    start, end = _validity(not_before, not_after, days)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return CertAndKey(cert=cert, key=key)


def issue_cert(
    ca: CertAndKey,
    common_name: str,
    *,
    server: bool = False,
    client: bool = False,
    dns_names: Iterable[str] = (),
    ip_addresses: Iterable[str] = (),
    organizations: Iterable[str] = (),
    days: int = DEFAULT_DAYS,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    key: ec.EllipticCurvePrivateKey | None = None,
    extended_key_usages: Sequence[x509.ObjectIdentifier] | None = None,
) -> CertAndKey:
    """A leaf certificate signed by ca, with serverAuth and/or clientAuth EKU.

    Each call gets a new random serial (and a new key unless one is given), so issuing twice
    gives a "rotated" certificate. Negative tests pass ``not_before``/``not_after`` for an
    expired or not-yet-valid certificate, and ``extended_key_usages`` for a certificate with
    other usages than ``server``/``client`` ask for (e.g. ``[CODE_SIGNING]``).
    """
    if not (server or client or extended_key_usages):
        raise ValueError("issue_cert: ask for server=True and/or client=True")
    key = key if key is not None else _new_key()
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations]
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    start, end = _validity(not_before, not_after, days)
    usages = []
    if server:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    if client:
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    if extended_key_usages is not None:
        usages = list(extended_key_usages)
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attrs))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
    )
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ip_addresses]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return CertAndKey(cert=builder.sign(ca.key, hashes.SHA256()), key=key)


# --------------------------------------------------------------------------- the PKI layout


@dataclass(frozen=True)
class Pki:
    """Paths of a development PKI directory (see the module docstring for what signs what)."""

    directory: Path
    tenants: tuple[str, ...]

    requestheader_ca: Path
    requestheader_ca_key: Path
    front_proxy_client_cert: Path
    front_proxy_client_key: Path
    router_serving_ca: Path
    router_serving_ca_key: Path
    router_serving_cert: Path
    router_serving_key: Path
    router_client_ca: Path
    router_client_ca_key: Path
    router_client_cert: Path
    router_client_key: Path
    upstream_ca: Path
    upstream_ca_key: Path
    rogue_ca: Path
    rogue_ca_key: Path
    rogue_client_cert: Path
    rogue_client_key: Path
    other_client_cert: Path
    other_client_key: Path
    secrets_yaml: Path

    @classmethod
    def at(cls, directory: Path, tenants: Sequence[str] = DEFAULT_TENANTS) -> Pki:
        """The paths for directory, whether or not the files exist."""
        d = Path(directory)

        def p(name: str) -> Path:
            return d / name

        return cls(
            directory=d,
            tenants=validate_tenant_names(tenants),
            requestheader_ca=p("requestheader-ca.crt"),
            requestheader_ca_key=p("requestheader-ca.key"),
            front_proxy_client_cert=p("front-proxy-client.crt"),
            front_proxy_client_key=p("front-proxy-client.key"),
            router_serving_ca=p("router-serving-ca.crt"),
            router_serving_ca_key=p("router-serving-ca.key"),
            router_serving_cert=p("router-serving.crt"),
            router_serving_key=p("router-serving.key"),
            router_client_ca=p("router-client-ca.crt"),
            router_client_ca_key=p("router-client-ca.key"),
            router_client_cert=p("router-client.crt"),
            router_client_key=p("router-client.key"),
            upstream_ca=p("upstream-ca.crt"),
            upstream_ca_key=p("upstream-ca.key"),
            rogue_ca=p("rogue-ca.crt"),
            rogue_ca_key=p("rogue-ca.key"),
            rogue_client_cert=p("rogue-client.crt"),
            rogue_client_key=p("rogue-client.key"),
            other_client_cert=p("other-client.crt"),
            other_client_key=p("other-client.key"),
            secrets_yaml=p("secrets.yaml"),
        )

    @classmethod
    def load(cls, directory: Path, tenants: Sequence[str] = DEFAULT_TENANTS) -> Pki:
        """The paths for an existing PKI directory; FileNotFoundError names any missing file."""
        pki = cls.at(directory, tenants)
        missing = [f.name for f in pki.files() if not f.exists()]
        if missing:
            raise FileNotFoundError(
                f"incomplete PKI in {pki.directory}: missing {', '.join(missing)} "
                "(run `metrics-router certs init`)"
            )
        return pki

    def upstream_cert(self, tenant: str) -> Path:
        return self.directory / f"upstream-{self._known(tenant)}.crt"

    def upstream_key(self, tenant: str) -> Path:
        return self.directory / f"upstream-{self._known(tenant)}.key"

    def _known(self, tenant: str) -> str:
        if tenant not in self.tenants:
            raise KeyError(f"tenant {tenant!r} is not in this PKI (tenants: {self.tenants})")
        return tenant

    def serve_flags(self) -> list[str]:
        """The `metrics-router serve` TLS flags that use this PKI (the aggregator's CN
        front-proxy-client is the one allowed name)."""
        return [
            "--tls-cert-file", str(self.router_serving_cert),
            "--tls-private-key-file", str(self.router_serving_key),
            "--requestheader-client-ca-file", str(self.requestheader_ca),
            "--requestheader-allowed-names", FRONT_PROXY_CLIENT_CN,
            "--proxy-client-cert-file", str(self.router_client_cert),
            "--proxy-client-key-file", str(self.router_client_key),
            "--upstream-ca-file", str(self.upstream_ca),
        ]  # fmt: skip

    def files(self) -> tuple[Path, ...]:
        """Every file generate_pki writes, in a stable order."""
        fixed = (
            self.requestheader_ca,
            self.requestheader_ca_key,
            self.front_proxy_client_cert,
            self.front_proxy_client_key,
            self.router_serving_ca,
            self.router_serving_ca_key,
            self.router_serving_cert,
            self.router_serving_key,
            self.router_client_ca,
            self.router_client_ca_key,
            self.router_client_cert,
            self.router_client_key,
            self.upstream_ca,
            self.upstream_ca_key,
        )
        per_tenant = tuple(
            p for t in self.tenants for p in (self.upstream_cert(t), self.upstream_key(t))
        )
        negative = (
            self.rogue_ca,
            self.rogue_ca_key,
            self.rogue_client_cert,
            self.rogue_client_key,
            self.other_client_cert,
            self.other_client_key,
        )
        return (*fixed, *per_tenant, *negative, self.secrets_yaml)

    def load_pair(self, cert_path: Path, key_path: Path) -> CertAndKey:
        """For tests: pki.load_pair(pki.requestheader_ca, pki.requestheader_ca_key) -> a CA."""
        return CertAndKey.load(cert_path, key_path)


def generate_pki(
    directory: Path,
    tenants: Sequence[str] = DEFAULT_TENANTS,
    force: bool = False,
    *,
    days: int = DEFAULT_DAYS,
) -> Pki:
    """Write a complete development PKI to directory (created if needed) and return its paths.

    Raises ValueError for invalid tenant names and PkiExistsError (before writing anything) if
    any target file exists and force is False.
    """
    pki = Pki.at(Path(directory), tenants)
    pki.directory.mkdir(parents=True, exist_ok=True)
    existing = [f.name for f in pki.files() if f.exists()]
    if existing and not force:
        raise PkiExistsError(pki.directory, existing)

    requestheader_ca = make_ca("metrics-router-dev requestheader (front-proxy) CA", days=days)
    requestheader_ca.write(pki.requestheader_ca, pki.requestheader_ca_key)
    issue_cert(requestheader_ca, FRONT_PROXY_CLIENT_CN, client=True, days=days).write(
        pki.front_proxy_client_cert, pki.front_proxy_client_key
    )
    issue_cert(requestheader_ca, OTHER_CLIENT_CN, client=True, days=days).write(
        pki.other_client_cert, pki.other_client_key
    )

    serving_ca = make_ca("metrics-router-dev router serving CA", days=days)
    serving_ca.write(pki.router_serving_ca, pki.router_serving_ca_key)
    serving = issue_cert(
        serving_ca,
        f"{ROUTER_SERVICE}.{ROUTER_NAMESPACE}.svc",
        server=True,
        dns_names=ROUTER_SERVING_DNS,
        ip_addresses=LOOPBACK_IPS,
        days=days,
    )
    serving.write(pki.router_serving_cert, pki.router_serving_key)

    client_ca = make_ca("metrics-router-dev router client CA", days=days)
    client_ca.write(pki.router_client_ca, pki.router_client_ca_key)
    router_client = issue_cert(client_ca, ROUTER_CLIENT_CN, client=True, days=days)
    router_client.write(pki.router_client_cert, pki.router_client_key)

    upstream_ca = make_ca("metrics-router-dev tenant upstream CA", days=days)
    upstream_ca.write(pki.upstream_ca, pki.upstream_ca_key)
    upstreams: dict[str, CertAndKey] = {}
    for t in pki.tenants:
        dns = upstream_dns_names(t)
        upstreams[t] = issue_cert(
            upstream_ca, dns[1], server=True, dns_names=dns, ip_addresses=("127.0.0.1",), days=days
        )
        upstreams[t].write(pki.upstream_cert(t), pki.upstream_key(t))

    rogue_ca = make_ca("metrics-router-dev rogue CA (trusted by nobody)", days=days)
    rogue_ca.write(pki.rogue_ca, pki.rogue_ca_key)
    issue_cert(rogue_ca, FRONT_PROXY_CLIENT_CN, client=True, days=days).write(
        pki.rogue_client_cert, pki.rogue_client_key
    )

    docs = secret_manifests(
        serving=serving,
        serving_ca=serving_ca,
        router_client=router_client,
        client_ca=client_ca,
        upstream_ca=upstream_ca,
        upstreams=upstreams,
    )
    write_file(pki.secrets_yaml, yaml.safe_dump_all(docs, sort_keys=False).encode(), KEY_MODE)
    logger.info("pki generated", extra=fields(directory=str(pki.directory), tenants=pki.tenants))
    return pki


# --------------------------------------------------------------------------- Secret manifests


def _tls_secret(name: str, namespace: str, pair: CertAndKey, ca: CertAndKey) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/managed-by": "metrics-router-certs"},
        },
        "type": "kubernetes.io/tls",
        "stringData": {
            "tls.crt": pair.cert_pem().decode(),
            "tls.key": pair.key_pem().decode(),
            "ca.crt": ca.cert_pem().decode(),
        },
    }


def _ca_configmap(name: str, namespace: str, ca: CertAndKey) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/managed-by": "metrics-router-certs"},
        },
        "data": {"ca.crt": ca.cert_pem().decode()},
    }


def secret_manifests(
    *,
    serving: CertAndKey,
    serving_ca: CertAndKey,
    router_client: CertAndKey,
    client_ca: CertAndKey,
    upstream_ca: CertAndKey,
    upstreams: dict[str, CertAndKey],
) -> list[dict[str, object]]:
    """Kubernetes objects carrying the development certificates (pure: no I/O).

    Router namespace: Secret metrics-router-serving (serving cert, ca.crt = serving CA),
    Secret metrics-router-client (client cert, ca.crt = router client CA), ConfigMap
    metrics-router-upstream-ca (ca.crt = upstream CA). Each tenant namespace <T>--sys: Secret
    keda-metrics-apiserver-tls (serving cert, ca.crt = upstream CA) and ConfigMap
    metrics-router-client-ca (ca.crt = router client CA, for --requestheader-client-ca-file).
    """
    docs: list[dict[str, object]] = [
        _tls_secret(ROUTER_SERVING_SECRET, ROUTER_NAMESPACE, serving, serving_ca),
        _tls_secret(ROUTER_CLIENT_SECRET, ROUTER_NAMESPACE, router_client, client_ca),
        _ca_configmap(ROUTER_UPSTREAM_CA_CONFIGMAP, ROUTER_NAMESPACE, upstream_ca),
    ]
    for tenant, pair in upstreams.items():
        ns = tenant_namespace(tenant)
        docs.append(_tls_secret(UPSTREAM_SECRET, ns, pair, upstream_ca))
        docs.append(_ca_configmap(UPSTREAM_CLIENT_CA_CONFIGMAP, ns, client_ca))
    return docs
