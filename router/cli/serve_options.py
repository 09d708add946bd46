"""The flags of `metrics-router serve` (secure serving, requestheader, upstreams, stale answers,
limits, operation) parsed once into a ServeConfig, every error reported at once.

Pure: argparse and the standard library only. Flag names follow kube-apiserver conventions so
operators recognise them (`--secure-port`, `--tls-cert-file`, `--requestheader-*`, ...). The
value types and log flags are in options.py; the tenancy flags in tenancy_options.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from router.cli.options import (
    add_log_arguments,
    byte_size,
    csv,
    duration,
    host_port,
    need_file,
)
from router.cli.tenancy_options import add_tenancy_arguments, tenancy_from_args
from router.core.errors import ConfigError
from router.core.option_values import format_duration
from router.settings.limits import Limits
from router.settings.serve import (
    DEFAULT_EXTRA_PREFIXES,
    DEFAULT_GROUP_HEADERS,
    DEFAULT_STALE_MAX_BYTES,
    DEFAULT_STALE_MAX_ENTRIES_PER_TENANT,
    DEFAULT_UID_HEADERS,
    DEFAULT_USERNAME_HEADERS,
    RequestHeaderSettings,
    ServeConfig,
    StaleSettings,
)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("secure serving")
    g.add_argument("--secure-port", type=int, default=6443, help="HTTPS port")
    g.add_argument("--bind-address", default="0.0.0.0", help="address to listen on")
    g.add_argument("--tls-cert-file", type=Path, help="serving certificate (PEM, with chain)")
    g.add_argument("--tls-private-key-file", type=Path, help="serving certificate key (PEM)")
    g.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes serving the same port with SO_REUSEPORT, each with its own pools; "
        "start-up fails if another process holds the port",
    )

    g = parser.add_argument_group("authentication of the aggregator (requestheader)")
    g.add_argument(
        "--requestheader-client-ca-file",
        type=Path,
        help="CA that signs the aggregator's client certificate (front-proxy CA); default: read "
        "from kube-system/extension-apiserver-authentication in a cluster",
    )
    g.add_argument(
        "--requestheader-allowed-names",
        help="comma list of client certificate common names allowed; empty = any from the CA",
    )
    g.add_argument("--requestheader-username-headers", help="default X-Remote-User")
    g.add_argument("--requestheader-uid-headers", help="default X-Remote-Uid")
    g.add_argument("--requestheader-group-headers", help="default X-Remote-Group")
    g.add_argument("--requestheader-extra-headers-prefix", help="default X-Remote-Extra-")

    g = parser.add_argument_group("upstreams (tenant KEDA metrics servers)")
    g.add_argument("--proxy-client-cert-file", type=Path, help="the router's client certificate")
    g.add_argument("--proxy-client-key-file", type=Path, help="the router's client key")
    g.add_argument("--upstream-ca-file", type=Path, help="CA bundle for upstream serving certs")
    g.add_argument(
        "--upstream-timeout",
        type=duration,
        default="10s",
        help="time per upstream request (Go duration such as 10s, or seconds)",
    )
    g.add_argument(
        "--upstream-connect-timeout",
        type=duration,
        default="3s",
        help="time to connect and handshake with an upstream",
    )
    g.add_argument(
        "--max-inflight-per-tenant",
        type=int,
        default=64,
        help="requests in flight per tenant before fast 429s",
    )
    g.add_argument(
        "--max-idle-connections-per-upstream",
        type=int,
        default=64,  # as many as --max-inflight-per-tenant: no TLS handshake churn at load
        help="keep-alive connections kept per upstream",
    )
    g.add_argument(
        "--serve-stale-for",
        type=duration,
        default=0.0,
        help="answer a caller's failed metric request with its own last good answer when that "
        "is younger than this (unreachable, timeout, 502, upstream 500/503, over the in-flight "
        "limit); per tenant: routes file serveStaleFor, Service annotation "
        "metrics-router.io/serve-stale-for (default 0 = off)",
    )
    g.add_argument(
        "--stale-cache-max-entries-per-tenant",
        type=int,
        default=DEFAULT_STALE_MAX_ENTRIES_PER_TENANT,
        help="last good answers kept per tenant, oldest dropped first (default %(default)s)",
    )
    g.add_argument(
        "--stale-cache-max-bytes",
        type=byte_size,
        default=DEFAULT_STALE_MAX_BYTES,
        help="bytes of last good answers kept in all, oldest dropped first (default 32Mi)",
    )
    g.add_argument("--routes-file", type=Path, help="YAML routes file (instead of the cluster)")
    g.add_argument(
        "--default-upstream",
        help="https URL for namespaces of no tenant (default: such namespaces get 404)",
    )
    g.add_argument("--default-upstream-server-name", help="TLS server name of the default upstream")

    add_tenancy_arguments(parser)
    add_limits_arguments(parser)

    g = parser.add_argument_group("operation")
    g.add_argument(
        "--metrics-bind-address",
        default="0.0.0.0:9090",
        help="HOST:PORT for /metrics, /routes and health; '0' disables",
    )
    g.add_argument(
        "--shutdown-delay-duration",
        type=duration,
        default="0s",
        help="after SIGTERM, /readyz fails at once and the secure port keeps serving this long "
        "(for endpoints to be removed everywhere) before draining; a second signal exits at once",
    )
    g.add_argument(
        "--shutdown-grace-period",
        type=duration,
        default="15s",
        help="time in-flight requests may take once draining starts",
    )
    g.add_argument(
        "--file-check-interval",
        type=duration,
        default="1s",
        help="time between checks of certificate and routes files for changes",
    )
    g.add_argument(
        "--certificate-expiry-warning",
        type=duration,
        default=format_duration(7 * 24 * 3600),
        help="a certificate expiring within this time logs a warning and sets "
        "metrics_router_certificate_expiring_soon",
    )
    add_log_arguments(g)


def add_limits_arguments(parser: argparse.ArgumentParser) -> None:
    """Bounds of the data path (router/settings/limits.py), named as Go's net/http names them."""
    d = Limits()
    g = parser.add_argument_group(
        "limits of the secure port and the upstream client (durations: 500ms, 10s, 1m30s; "
        "sizes: 65536, 64Ki, 16Mi)"
    )

    def dur(flag: str, default: float, text: str) -> None:
        g.add_argument(
            flag,
            type=duration,
            default=default,
            metavar="DURATION",
            help=f"{text} (default {format_duration(default)})",
        )

    def size(flag: str, default: int, text: str) -> None:
        shown = f"{default >> 20}Mi" if default % (1 << 20) == 0 else str(default)
        g.add_argument(
            flag, type=byte_size, default=default, metavar="SIZE", help=f"{text} (default {shown})"
        )

    dur("--tls-handshake-timeout", d.tls_handshake_timeout, "time for a client's TLS handshake")
    dur(
        "--read-header-timeout",
        d.read_header_timeout,
        "time for a request's head (line and headers) to arrive",
    )
    dur("--read-timeout", d.read_timeout, "time for a request's body, after its head")
    dur(
        "--write-timeout",
        d.write_timeout,
        "time an answer may wait for a client that does not read it; then the connection is "
        "aborted",
    )
    dur("--idle-timeout", d.idle_timeout, "keep-alive time between requests")
    size("--max-header-bytes", d.max_header_bytes, "bytes of a request's header block")
    g.add_argument(
        "--max-connections",
        type=int,
        default=d.max_connections,
        help="client connections open at once; more are closed before TLS and counted "
        f"(default {d.max_connections})",
    )
    size(
        "--max-response-header-bytes",
        d.max_response_header_bytes,
        "bytes of an upstream response's header block; over it: 502",
    )
    size(
        "--max-response-bytes",
        d.max_response_bytes,
        "bytes of an upstream response's body; over it: 502 and the upstream connection closed",
    )
    dur(
        "--upstream-idle-conn-timeout",
        d.upstream_idle_conn_timeout,
        "time a pooled upstream connection may stay idle",
    )
    g.add_argument(
        "--access-log",
        action="store_true",
        help="log one line per request (kube-apiserver httplog fields) on logger router.access",
    )


def limits_from_args(args: argparse.Namespace, errors: list[str]) -> Limits:
    """The data path's limits from `serve` flags; problems are appended to ``errors``."""
    positive = {
        "--tls-handshake-timeout": args.tls_handshake_timeout,
        "--read-header-timeout": args.read_header_timeout,
        "--read-timeout": args.read_timeout,
        "--write-timeout": args.write_timeout,
        "--idle-timeout": args.idle_timeout,
        "--upstream-idle-conn-timeout": args.upstream_idle_conn_timeout,
        "--max-header-bytes": args.max_header_bytes,
        "--max-connections": args.max_connections,
        "--max-response-header-bytes": args.max_response_header_bytes,
        "--max-response-bytes": args.max_response_bytes,
    }
    for flag, value in positive.items():
        if not value > 0:
            errors.append(f"{flag}: must be > 0")
    return Limits(
        tls_handshake_timeout=args.tls_handshake_timeout,
        read_header_timeout=args.read_header_timeout,
        read_timeout=args.read_timeout,
        write_timeout=args.write_timeout,
        idle_timeout=args.idle_timeout,
        max_header_bytes=args.max_header_bytes,
        max_connections=args.max_connections,
        max_response_header_bytes=args.max_response_header_bytes,
        max_response_bytes=args.max_response_bytes,
        upstream_idle_conn_timeout=args.upstream_idle_conn_timeout,
        access_log=args.access_log,
    )


def requestheader_from_args(args: argparse.Namespace) -> tuple[RequestHeaderSettings, bool]:
    """The --requestheader-* flags as settings (defaults for those not given), and whether any
    was given: then the extension-apiserver-authentication ConfigMap is not consulted."""
    given = (
        args.requestheader_client_ca_file,
        args.requestheader_allowed_names,
        args.requestheader_username_headers,
        args.requestheader_uid_headers,
        args.requestheader_group_headers,
        args.requestheader_extra_headers_prefix,
    )
    settings = RequestHeaderSettings(
        client_ca_file=args.requestheader_client_ca_file,
        allowed_names=csv(args.requestheader_allowed_names),
        username_headers=csv(args.requestheader_username_headers) or DEFAULT_USERNAME_HEADERS,
        uid_headers=csv(args.requestheader_uid_headers) or DEFAULT_UID_HEADERS,
        group_headers=csv(args.requestheader_group_headers) or DEFAULT_GROUP_HEADERS,
        extra_headers_prefixes=csv(args.requestheader_extra_headers_prefix)
        or DEFAULT_EXTRA_PREFIXES,
    )
    return settings, any(v is not None for v in given)


def serve_config_from_args(args: argparse.Namespace) -> ServeConfig:
    """Validate and complete `serve` options; raise ConfigError listing every problem."""
    errors: list[str] = []
    need_file(errors, "--tls-cert-file", args.tls_cert_file)
    need_file(errors, "--tls-private-key-file", args.tls_private_key_file)
    need_file(errors, "--proxy-client-cert-file", args.proxy_client_cert_file)
    need_file(errors, "--proxy-client-key-file", args.proxy_client_key_file)
    if args.upstream_ca_file is not None:
        need_file(errors, "--upstream-ca-file", args.upstream_ca_file)
    if args.routes_file is not None:
        need_file(errors, "--routes-file", args.routes_file)
        if args.kubeconfig is not None:
            errors.append("--routes-file and --kubeconfig are mutually exclusive")
    if args.kubeconfig is not None:
        need_file(errors, "--kubeconfig", args.kubeconfig)
    if not 0 <= args.secure_port <= 65535:
        errors.append(f"--secure-port: {args.secure_port} is not a port")
    for flag, value in (
        ("--upstream-timeout", args.upstream_timeout),
        ("--upstream-connect-timeout", args.upstream_connect_timeout),
        ("--file-check-interval", args.file_check_interval),
    ):
        if not value > 0:
            errors.append(f"{flag}: must be > 0")
    if args.max_inflight_per_tenant < 1:
        errors.append("--max-inflight-per-tenant: must be >= 1")
    if args.max_idle_connections_per_upstream < 0:
        errors.append("--max-idle-connections-per-upstream: must be >= 0")
    if args.stale_cache_max_entries_per_tenant < 1:
        errors.append("--stale-cache-max-entries-per-tenant: must be >= 1")
    if args.stale_cache_max_bytes < 1:
        errors.append("--stale-cache-max-bytes: must be >= 1")
    if args.workers < 1:
        errors.append("--workers: must be >= 1")
    elif args.workers > 1 and args.secure_port == 0:
        errors.append("--workers > 1 needs a fixed --secure-port (the workers share it)")
    if args.default_upstream is not None and not args.default_upstream.startswith("https://"):
        errors.append("--default-upstream: must be an https:// URL")

    requestheader, from_flags = requestheader_from_args(args)
    if args.requestheader_client_ca_file is not None:
        need_file(errors, "--requestheader-client-ca-file", args.requestheader_client_ca_file)
    elif args.routes_file is not None:
        errors.append(
            "--requestheader-client-ca-file is required with --routes-file (outside a cluster "
            "there is no extension-apiserver-authentication ConfigMap to read)"
        )
    elif from_flags:
        errors.append("--requestheader-client-ca-file is required with other --requestheader-*")
    tenancy = tenancy_from_args(args, errors)
    limits = limits_from_args(args, errors)
    metrics = host_port(args.metrics_bind_address, "--metrics-bind-address", errors)
    if errors:
        raise ConfigError(errors)
    return ServeConfig(
        secure_port=args.secure_port,
        bind_address=args.bind_address,
        tls_cert_file=args.tls_cert_file,
        tls_private_key_file=args.tls_private_key_file,
        requestheader=requestheader,
        requestheader_from_flags=from_flags,
        proxy_client_cert_file=args.proxy_client_cert_file,
        proxy_client_key_file=args.proxy_client_key_file,
        upstream_ca_file=args.upstream_ca_file,
        upstream_timeout=args.upstream_timeout,
        upstream_connect_timeout=args.upstream_connect_timeout,
        routes_file=args.routes_file,
        kubeconfig=args.kubeconfig,
        default_upstream=args.default_upstream,
        default_upstream_server_name=args.default_upstream_server_name,
        metrics_bind_address=metrics,
        max_inflight_per_tenant=args.max_inflight_per_tenant,
        max_idle_connections_per_upstream=args.max_idle_connections_per_upstream,
        shutdown_grace_period=args.shutdown_grace_period,
        file_check_interval=args.file_check_interval,
        workers=args.workers,
        log_format=args.log_format,
        log_level=args.log_level,
        tenancy=tenancy,
        stale=StaleSettings(
            serve_stale_for=args.serve_stale_for,
            max_entries_per_tenant=args.stale_cache_max_entries_per_tenant,
            max_bytes=args.stale_cache_max_bytes,
        ),
        shutdown_delay_duration=args.shutdown_delay_duration,
        certificate_expiry_warning=args.certificate_expiry_warning,
        limits=limits,
    )
