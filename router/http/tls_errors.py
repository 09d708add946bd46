"""Pure: why a TLS handshake failed, as a short label for metrics and logs.

OpenSSL reports a failure two ways: the local verification of the peer's certificate failed
(``SSLCertVerificationError`` with an X.509 ``verify_code``), or the peer refused ours and sent
an alert (``SSLError.reason`` such as ``TLSV1_ALERT_UNKNOWN_CA``). In TLS 1.3 a client learns
that the server refused its certificate only on its first read, after the handshake.
"""

from __future__ import annotations

import ssl

# X.509 verify codes (openssl/x509_vfy.h)
_UNKNOWN_CA_CODES = frozenset({2, 18, 19, 20, 21, 24, 27})
_EXPIRED_CODES = frozenset({10, 12})
_NOT_YET_VALID_CODES = frozenset({9, 11})
_HOSTNAME_MISMATCH_CODES = frozenset({62, 64})

# Alerts a peer sends when it refuses our certificate, by the cause they name.
_ALERT_CAUSES = {
    "TLSV1_ALERT_UNKNOWN_CA": "unknown-ca",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "expired-certificate",
    "SSLV3_ALERT_BAD_CERTIFICATE": "bad-certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "bad-certificate",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "bad-certificate",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "bad-certificate",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "bad-certificate",
    "TLSV1_ALERT_ACCESS_DENIED": "bad-certificate",
    "TLSV1_ALERT_DECRYPT_ERROR": "bad-certificate",
}
_PROTOCOL_REASONS = frozenset(
    {
        "NO_SHARED_CIPHER",
        "NO_CIPHERS_AVAILABLE",
        "UNSUPPORTED_PROTOCOL",
        "TLSV1_ALERT_PROTOCOL_VERSION",
        "SSLV3_ALERT_HANDSHAKE_FAILURE",
        "NO_PROTOCOLS_AVAILABLE",
        "TLSV1_ALERT_INSUFFICIENT_SECURITY",
    }
)
_NOT_TLS_REASONS = frozenset({"HTTP_REQUEST", "HTTPS_PROXY_REQUEST", "WRONG_VERSION_NUMBER"})

# The listener's reasons (metrics_router_tls_handshake_failures_total{reason}).
HANDSHAKE_REASONS = (
    "unknown-ca",
    "expired-certificate",
    "bad-certificate",
    "no-shared-cipher",
    "not-tls",
    "timeout",
    "eof",
    "other",
)
# Upstream causes (metrics_router_upstream_tls_errors_total{cause}).
UPSTREAM_CAUSES = (
    "expired-certificate",
    "unknown-ca",
    "hostname-mismatch",
    "client-certificate-rejected",
    "other",
)


def _verify_cause(code: int) -> str:
    if code in _UNKNOWN_CA_CODES:
        return "unknown-ca"
    if code in _EXPIRED_CODES:
        return "expired-certificate"
    if code in _HOSTNAME_MISMATCH_CODES:
        return "hostname-mismatch"
    return "bad-certificate"


def handshake_failure_reason(exc: BaseException) -> str:
    """The listener's reason for a failed handshake with a client (a HANDSHAKE_REASONS value)."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ssl.SSLCertVerificationError):
        cause = _verify_cause(exc.verify_code)
        return "bad-certificate" if cause == "hostname-mismatch" else cause
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or ""
        if reason in _ALERT_CAUSES:
            return _ALERT_CAUSES[reason]
        if reason in _PROTOCOL_REASONS:
            return "no-shared-cipher"
        if reason in _NOT_TLS_REASONS:
            return "not-tls"
        if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
            return "eof"
        return "other"
    if isinstance(exc, ConnectionError | EOFError):
        return "eof"
    return "other"


def handshake_failure_detail(exc: BaseException) -> str:
    """A one-line description for the log (never for a response body)."""
    if isinstance(exc, TimeoutError):
        return "handshake timed out"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"client certificate refused: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason in _ALERT_CAUSES:
        return f"client refused the serving certificate ({exc.reason})"
    return str(exc) or type(exc).__name__


def upstream_tls_cause(exc: BaseException) -> str:
    """Why TLS with an upstream failed (an UPSTREAM_CAUSES value).

    Our verification of the upstream's certificate names its cause; an alert from the upstream
    means it refused the router's own client certificate.
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        cause = _verify_cause(exc.verify_code)
        return "other" if cause == "bad-certificate" else cause
    if isinstance(exc, ssl.SSLError) and (exc.reason or "") in _ALERT_CAUSES:
        return "client-certificate-rejected"
    return "other"
