"""Every bound of the data path in one place: the secure port's server and the upstream client.

Named after Go's ``net/http`` (Server ``ReadHeaderTimeout``, ``ReadTimeout``, ``WriteTimeout``,
``IdleTimeout``, ``MaxHeaderBytes``; Transport ``TLSHandshakeTimeout``,
``MaxResponseHeaderBytes``, ``IdleConnTimeout``), as kube-apiserver operators know them. Each
field is a `serve` flag of the same name (router/cli/serve_options.py, ``add_limits_arguments``).

What one client connection can make the router hold, at most (README, "Limits"):
``MAX_PIPELINED`` parsed request heads of at most ``max_header_bytes`` each, plus one answer of
at most ``max_response_bytes + max_response_header_bytes`` waiting in the write buffer (no
further answer is produced while the client does not read). What one upstream request can make
it hold: ``max_response_header_bytes + max_response_bytes``.
"""

from __future__ import annotations

from dataclasses import dataclass

# Fixed bounds of the request parser (not flags): a request line as long as NGINX and Go allow,
# one header line, requests read ahead of their answers, and the body of a request (the router
# forwards GETs only; a body is read and discarded).
MAX_REQUEST_LINE = 8190
MAX_HEADER_LINE = 16384
MAX_PIPELINED = 16
MAX_REQUEST_BODY_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class Limits:
    """Timeouts (seconds) and sizes (bytes) of the secure port and the upstream client."""

    # secure port (server)
    tls_handshake_timeout: float = 10.0
    read_header_timeout: float = 10.0
    read_timeout: float = 30.0  # the request body, after its head
    write_timeout: float = 30.0  # an answer the client does not read
    idle_timeout: float = 75.0  # keep-alive between requests
    max_header_bytes: int = 1 << 20  # Go's DefaultMaxHeaderBytes
    max_connections: int = 4096
    # upstream client
    max_response_header_bytes: int = 1 << 20
    max_response_bytes: int = 8 << 20
    upstream_idle_conn_timeout: float = 90.0  # Go's DefaultTransport IdleConnTimeout
    # the access log (one line per request, off by default)
    access_log: bool = False

    def connection_buffer_bound(self) -> int:
        """Bytes one client connection can make the router hold, at most (see module doc)."""
        return (
            MAX_PIPELINED * (self.max_header_bytes + MAX_REQUEST_LINE)
            + self.max_response_bytes
            + self.max_response_header_bytes
        )
