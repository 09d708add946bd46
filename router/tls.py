"""TLS contexts from PEM files, rebuilt when the files change, last good version kept.

Serving: the listening socket has one SSLContext whose SNI callback hands every new handshake
the *current* context (serving certificate and requestheader client CA). A rotated certificate
or CA therefore applies to new connections at once, established connections are untouched,
and a bad new file never replaces a working context.

The client certificate of the aggregator is requested, not required (as kube-apiserver does):
health endpoints need none, and API paths answer a 401 Status without a verified one. A
certificate that fails verification against the client CA fails the handshake.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

logger = logging.getLogger(__name__)

ALPN = ["http/1.1"]


class TLSFileError(Exception):
    """Files that cannot make a TLS context; the message names the files and the reason."""


def _base_context(purpose: int) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(ALPN)
    if purpose == ssl.PROTOCOL_TLS_SERVER:
        # No session resumption: a resumed session skips client certificate verification, so
        # a session from before a requestheader CA rotation would keep the old CA's trust.
        # (Session tickets off in TLS 1.2, no tickets issued in TLS 1.3.) The aggregator keeps
        # its connections alive, so full handshakes are rare.
        ctx.options |= ssl.OP_NO_TICKET
        ctx.num_tickets = 0
    return ctx


def _load_chain(ctx: ssl.SSLContext, cert: bytes, key: bytes, what: str) -> None:
    # load_cert_chain only takes paths: write the validated bytes to private temp files so the
    # context is built from exactly the bytes we hashed (no race with a concurrent rotation).
    with tempfile.TemporaryDirectory(prefix="mr-tls-") as tmp:
        cert_path = Path(tmp) / "tls.crt"
        key_path = Path(tmp) / "tls.key"
        cert_path.write_bytes(cert)
        key_path.touch(mode=0o600)
        key_path.write_bytes(key)
        try:
            ctx.load_cert_chain(cert_path, key_path)
        except ssl.SSLError as exc:
            raise TLSFileError(f"{what}: certificate and key do not load as a pair: {exc}") from exc
        except ValueError as exc:
            raise TLSFileError(f"{what}: {exc}") from exc


def _load_ca(ctx: ssl.SSLContext, pem: bytes, what: str) -> None:
    try:
        ctx.load_verify_locations(cadata=pem.decode("ascii", errors="strict"))
    except (ssl.SSLError, ValueError, UnicodeDecodeError) as exc:
        raise TLSFileError(f"{what}: not a PEM CA bundle: {exc}") from exc


# ---- validation: every problem of a file in one line, before any context is built --------

SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH
CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH
_USAGE_NAMES = {SERVER_AUTH: "serverAuth", CLIENT_AUTH: "clientAuth"}


def describe(cert: x509.Certificate) -> str:
    """A certificate as an operator recognises it: its CN (or whole subject) and serial."""
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    name = str(cns[0].value) if cns else cert.subject.rfc4514_string() or "(empty subject)"
    return f"CN={name}"


def _when(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_certificates(pem: bytes, what: str) -> list[x509.Certificate]:
    """Every certificate of a PEM bundle; TLSFileError for an empty file or no certificate."""
    if not pem.strip():
        raise TLSFileError(f"{what}: the file is empty")
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise TLSFileError(f"{what}: no PEM certificate (-----BEGIN CERTIFICATE-----) in the file")
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise TLSFileError(f"{what}: not a valid PEM certificate: {exc}") from exc


def _validity_problem(cert: x509.Certificate, now: datetime) -> str | None:
    if now > cert.not_valid_after_utc:
        return f"{describe(cert)} expired at {_when(cert.not_valid_after_utc)}"
    if now < cert.not_valid_before_utc:
        return f"{describe(cert)} is not valid before {_when(cert.not_valid_before_utc)}"
    return None


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def validate_ca_bundle(pem: bytes, what: str, now: datetime | None = None) -> None:
    """A CA bundle holds only CA certificates (basicConstraints CA:TRUE), at least one of
    them valid now. A leaf given as a CA would make every handshake fail."""
    now = now or datetime.now(UTC)
    certs = parse_certificates(pem, what)
    leaves = [describe(c) for c in certs if not _is_ca(c)]
    if leaves:
        raise TLSFileError(
            f"{what}: {', '.join(leaves)} is not a CA certificate (basicConstraints CA:FALSE "
            "or absent): give the CA that issued it, not the certificate itself"
        )
    problems = [_validity_problem(c, now) for c in certs]
    if all(problems):
        raise TLSFileError(
            f"{what}: no CA in the bundle is valid now: {'; '.join(map(str, problems))}"
        )


def _load_private_key(pem: bytes, what: str) -> Any:
    if not pem.strip():
        raise TLSFileError(f"{what} key: the file is empty")
    try:
        return serialization.load_pem_private_key(pem, password=None)
    except TypeError as exc:  # encrypted with a passphrase
        raise TLSFileError(f"{what} key: encrypted keys are not supported ({exc})") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise TLSFileError(f"{what} key: not a PEM private key ({exc})") from exc


def _spki(public_key: Any) -> bytes:
    data: bytes = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return data


def validate_leaf(
    cert_pem: bytes,
    key_pem: bytes,
    what: str,
    usage: x509.ObjectIdentifier,
    now: datetime | None = None,
) -> x509.Certificate:
    """The first certificate of ``cert_pem`` is valid now, belongs to the key and carries the
    extended key usage ``usage`` (a certificate without the EKU extension allows every usage,
    as Go and OpenSSL read it). Returns that certificate."""
    now = now or datetime.now(UTC)
    leaf = parse_certificates(cert_pem, what)[0]
    key = _load_private_key(key_pem, what)
    if _spki(key.public_key()) != _spki(leaf.public_key()):
        raise TLSFileError(
            f"{what}: certificate and key do not load as a pair: the key does not belong to "
            f"{describe(leaf)}"
        )
    problems = []
    problem = _validity_problem(leaf, now)
    if problem:
        problems.append(problem)
    try:
        usages = list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        usages = [usage]
    if usage not in usages and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in usages:
        have = ", ".join(_USAGE_NAMES.get(u, u.dotted_string) for u in usages) or "none"
        problems.append(
            f"{describe(leaf)} lacks the extended key usage {_USAGE_NAMES[usage]} (has {have})"
        )
    if problems:
        raise TLSFileError(f"{what}: " + "; ".join(problems))
    return leaf


def server_context(cert: bytes, key: bytes, client_ca: bytes) -> ssl.SSLContext:
    validate_leaf(cert, key, "serving certificate", SERVER_AUTH)
    validate_ca_bundle(client_ca, "requestheader client CA")
    ctx = _base_context(ssl.PROTOCOL_TLS_SERVER)
    _load_chain(ctx, cert, key, "serving certificate")
    _load_ca(ctx, client_ca, "requestheader client CA")
    ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def client_context(cert: bytes, key: bytes, ca: bytes | None) -> ssl.SSLContext:
    validate_leaf(cert, key, "proxy client certificate", CLIENT_AUTH)
    if ca is not None:
        validate_ca_bundle(ca, "upstream CA")
    ctx = _base_context(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    if ca is None:
        ctx.load_default_certs()
    else:
        _load_ca(ctx, ca, "upstream CA")
    _load_chain(ctx, cert, key, "proxy client certificate")
    return ctx


def not_after(pem: bytes) -> datetime:
    """Expiry of the first certificate in a PEM bundle."""
    try:
        return x509.load_pem_x509_certificates(pem)[0].not_valid_after_utc
    except (ValueError, IndexError) as exc:
        raise TLSFileError(f"not a PEM certificate: {exc}") from exc


@dataclass(frozen=True, slots=True)
class Loaded:
    context: ssl.SSLContext
    digest: str
    expiry: dict[str, datetime]  # certificate name -> not-after
    data: dict[str, bytes]  # the bytes the context was built from


Source = Callable[[], dict[str, bytes]]


def _digest(data: dict[str, bytes]) -> str:
    return hashlib.sha256(b"\0".join(data[k] for k in sorted(data))).hexdigest()


class ReloadingContext:
    """Builds an SSLContext from named byte sources; rebuilds when their bytes change.

    ``read`` returns the current bytes by name (files, or a CA from the ConfigMap);
    ``build`` turns them into a context or raises TLSFileError. ``expiry_of`` names which
    inputs are certificates whose expiry is exported.
    """

    def __init__(
        self,
        name: str,
        read: Source,
        build: Callable[[dict[str, bytes]], ssl.SSLContext],
        expiry_of: Sequence[str] = (),
    ) -> None:
        self.name = name
        self._read = read
        self._build = build
        self._expiry_of = tuple(expiry_of)
        self._loaded = self._load()  # raises at start-up: a bad file there is fatal

    @property
    def context(self) -> ssl.SSLContext:
        return self._loaded.context

    @property
    def expiry(self) -> dict[str, datetime]:
        return self._loaded.expiry

    def loaded_bytes(self, name: str) -> bytes:
        """The bytes of input ``name`` in the context in force (the last good load)."""
        return self._loaded.data.get(name, b"")

    def _load(self) -> Loaded:
        try:
            data = self._read()
        except OSError as exc:
            raise TLSFileError(f"{self.name}: cannot read {exc.filename}: {exc.strerror}") from exc
        digest = _digest(data)
        ctx = self._build(data)
        expiry = {k: not_after(data[k]) for k in self._expiry_of if k in data}
        return Loaded(ctx, digest, expiry, data)

    def changed(self) -> bool:
        """True when the sources hold other bytes than the loaded ones (cheap: one read)."""
        try:
            data = self._read()
        except OSError:
            return True  # surface the read error through reload()
        digest = _digest(data)
        return digest != self._loaded.digest

    def reload(self) -> None:
        """Rebuild from the current sources; on failure keep the last good context and raise."""
        self._loaded = self._load()

    def set_source(self, read: Source) -> None:
        """Switch sources (e.g. a new client CA from the ConfigMap), validating before use."""
        old = self._read
        self._read = read
        try:
            self.reload()
        except Exception:
            self._read = old
            raise


def read_files(files: dict[str, Path]) -> Source:
    def read() -> dict[str, bytes]:
        return {name: path.read_bytes() for name, path in files.items()}

    return read


def listening_context(current: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
    """The context given to the listening socket: each handshake switches to ``current()``."""
    first = current()
    listen = _base_context(ssl.PROTOCOL_TLS_SERVER)
    # The listening context itself needs the same verify mode: OpenSSL keeps the verify mode
    # of the context the connection was created with and takes certificate, key and the CA
    # store from the context switched to in the callback.
    listen.verify_mode = ssl.CERT_OPTIONAL
    listen.load_verify_locations(cadata=_ca_der_placeholder(first))

    def switch(sslobj: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        sslobj.context = current()

    listen.sni_callback = switch
    return listen


def _ca_der_placeholder(ctx: ssl.SSLContext) -> bytes:
    """DER of the CAs in ``ctx`` (the listening context must trust something to request certs)."""
    certs = ctx.get_ca_certs(binary_form=True)
    return b"".join(c for c in certs if isinstance(c, bytes))


class ResumedPeerVerifier:
    """Re-checks the client certificate of a *resumed* TLS session against the current CA.

    A resumed session skips certificate verification; in TLS 1.2 OpenSSL resumes by session
    ID from a cache that Python cannot switch off, so a session from before a requestheader CA
    rotation would keep the old CA's trust. Resumed connections are rare (the aggregator
    keeps connections alive and does not resume), so this slow path costs nothing in practice:
    the peer must be directly issued by a CA of the current bundle and be within its validity.
    """

    def __init__(self, ca_pem: Callable[[], bytes]) -> None:
        self._ca_pem = ca_pem
        self._bundle_pem: bytes | None = None
        self._cas: list[x509.Certificate] = []
        self._verdicts: dict[bytes, bool] = {}

    def __call__(self, peer_der: bytes | None) -> bool:
        if not peer_der:
            return False
        pem = self._ca_pem()
        if pem != self._bundle_pem:
            self._bundle_pem = pem
            self._verdicts.clear()
            try:
                self._cas = x509.load_pem_x509_certificates(pem)
            except ValueError:
                self._cas = []
        verdict = self._verdicts.get(peer_der)
        if verdict is None:
            verdict = self._verify(peer_der)
            if len(self._verdicts) > 1024:
                self._verdicts.clear()
            self._verdicts[peer_der] = verdict
        return verdict

    def _verify(self, peer_der: bytes) -> bool:
        try:
            cert = x509.load_der_x509_certificate(peer_der)
        except ValueError:
            return False
        now = datetime.now(UTC)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            return False
        for ca in self._cas:
            try:
                cert.verify_directly_issued_by(ca)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return True
        return False
