"""`metrics-router doctor`: check a live installation end to end, and say how to fix each fault.

```
metrics-router doctor [serve's flags: --kubeconfig F | --routes-file F, tenancy flags,
                       --proxy-client-cert-file F --proxy-client-key-file F --upstream-ca-file F,
                       --requestheader-*, --manage-network-policies --network-policy-kind K
                       --policy-config F]
                      [--args-from-pid PID] [--apiservice-name N] [--router-service NS/NAME]
                      [--metrics-url URL] [--network auto|direct|try|none] [--timeout 5s]
                      [--expiry-warning 168h] [-o text|json]
```

It accepts every flag of `serve`, so the flags the router runs with can be given as they are;
``--args-from-pid 1`` reads them from the router's own command line inside its container
(``kubectl exec deploy/metrics-router -- metrics-router doctor --args-from-pid 1``); flags
given on the doctor's command line win. Exit 0 when nothing failed, 1 when a check failed, 2 on
usage errors.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from router import tls as tlsfiles
from router.cli.options import duration
from router.cli.serve_options import add_serve_arguments, requestheader_from_args
from router.cli.tenancy_options import tenancy_from_args
from router.core.option_values import parse_host_port
from router.doctor import checks, collect, gather, probes, report
from router.doctor.snapshot import RequestHeader

NETWORK_MODES = ("auto", "direct", "try", "none")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from router.cli.policy_options import add_policy_arguments

    add_serve_arguments(parser)
    add_policy_arguments(parser)
    g = parser.add_argument_group("doctor")
    g.add_argument(
        "--args-from-pid",
        type=int,
        metavar="PID",
        help="take serve's flags from /proc/PID/cmdline (1 in the router's container); flags "
        "given here win",
    )
    g.add_argument(
        "--apiservice-name",
        default="v1beta1.external.metrics.k8s.io",
        help="the router's APIService (default %(default)s)",
    )
    g.add_argument(
        "--router-service",
        default="metrics-router/metrics-router",
        metavar="NS/NAME",
        help="the router's Service the APIService must point at (default %(default)s)",
    )
    g.add_argument(
        "--metrics-url",
        help="the router's metrics endpoint (/metrics, /routes); default: its "
        "--metrics-bind-address on 127.0.0.1 when the router runs beside the doctor (in its "
        "pod, --args-from-pid, --routes-file), else the kube-apiserver's services proxy to the "
        "router Service's port 'metrics'",
    )
    g.add_argument(
        "--network",
        choices=NETWORK_MODES,
        default="auto",
        help="direct: probe tenants and the router and count a failed connection as a fault; "
        "try: a failed connection means 'not reachable from here'; none: no probes; auto: "
        "direct in a pod or with --routes-file, else try (default %(default)s)",
    )
    g.add_argument(
        "--timeout",
        type=duration,
        default=5.0,
        help="per connection and request (default 5s)",
    )
    g.add_argument(
        "--expiry-warning",
        type=duration,
        default=7 * 86400.0,
        help="certificates expiring sooner fail (default 168h)",
    )
    g.add_argument("-o", "--output", choices=("text", "json"), default="text", help="report format")


def merge_process_args(
    args: argparse.Namespace, parser: argparse.ArgumentParser, serve_argv: Sequence[str]
) -> argparse.Namespace:
    """``args`` with every option left at its default taken from ``serve_argv`` instead."""
    base, _unknown = parser.parse_known_args(list(serve_argv))
    merged = argparse.Namespace(**vars(args))
    for key, value in vars(base).items():
        if key.startswith("_") or not hasattr(args, key):
            continue
        if getattr(args, key) == parser.get_default(key):
            setattr(merged, key, value)
    return merged


def serve_argv_of(pid: int) -> list[str]:
    """The arguments after ``serve`` on the command line of process ``pid``."""
    raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    argv = [a.decode() for a in raw.split(b"\0") if a]
    if "serve" not in argv:
        raise ValueError(f"process {pid} is not `metrics-router serve`: {' '.join(argv[:4])}")
    return argv[argv.index("serve") + 1 :]


def local_metrics_url(bind_address: str) -> str | None:
    """The router's metrics endpoint in its own pod, from its --metrics-bind-address."""
    try:
        address = parse_host_port(bind_address)
    except ValueError:
        return None
    if address is None:
        return None
    host = address[0] if address[0] not in ("", "0.0.0.0", "::") else "127.0.0.1"
    return f"http://{f'[{host}]' if ':' in host else host}:{address[1]}"


def metrics_url_for(given: str | None, bind_address: str, *, router_is_local: bool) -> str | None:
    """--metrics-url when given; else, when the router runs beside the doctor (in its pod, read
    with --args-from-pid, or in routes-file mode, where there is no cluster to go through), its
    --metrics-bind-address on loopback; else None (cluster mode: the services proxy)."""
    if given is not None:
        return given
    return local_metrics_url(bind_address) if router_is_local else None


def _in_pod() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def run(args: argparse.Namespace) -> int:
    if args.args_from_pid is not None:
        try:
            serve_argv = serve_argv_of(args.args_from_pid)
        except (OSError, ValueError) as exc:
            print(f"error: --args-from-pid: {exc}", file=sys.stderr)
            return 2
        parser = argparse.ArgumentParser(prog="metrics-router doctor", add_help=False)
        add_arguments(parser)
        args = merge_process_args(args, parser, serve_argv)
    errors: list[str] = []
    tenancy = tenancy_from_args(args, errors)
    for flag, value in (
        ("--proxy-client-cert-file", args.proxy_client_cert_file),
        ("--proxy-client-key-file", args.proxy_client_key_file),
    ):
        if value is None:
            errors.append(f"{flag} is required (the router's client certificate)")
    if args.routes_file is not None and args.kubeconfig is not None:
        errors.append("--routes-file and --kubeconfig are mutually exclusive")
    ns, sep, name = str(args.router_service).partition("/")
    if not sep or not ns or not name:
        errors.append(f"--router-service: want NS/NAME, got {args.router_service!r}")
    files: dict[str, Path] = {}
    for key, flag, value in (
        ("cert", "--proxy-client-cert-file", args.proxy_client_cert_file),
        ("key", "--proxy-client-key-file", args.proxy_client_key_file),
        ("ca", "--upstream-ca-file", args.upstream_ca_file),
        ("rh-ca", "--requestheader-client-ca-file", args.requestheader_client_ca_file),
    ):
        if value is not None:
            if not Path(value).is_file():
                errors.append(f"{flag}: {value} is not a readable file")
            files[key] = Path(value)
    if errors:
        for error in errors:
            print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        data = {k: p.read_bytes() for k, p in files.items()}
        tls = probes.client_tls(data["cert"], data["key"], data.get("ca"))
    except (OSError, tlsfiles.TLSFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    header, from_flags = requestheader_from_args(args)
    requestheader = RequestHeader(
        from_flags=from_flags,
        client_ca_pem=data.get("rh-ca"),
        allowed_names=header.allowed_names,
        username_headers=header.username_headers,
        group_headers=header.group_headers,
        extra_headers_prefixes=header.extra_headers_prefixes,
    )
    mode = args.network
    if mode == "auto":
        mode = "direct" if args.routes_file is not None or _in_pod() else "try"
    network = probes.Network(mode=mode, timeout=args.timeout)
    metrics_url = metrics_url_for(
        args.metrics_url,
        args.metrics_bind_address,
        router_is_local=_in_pod() or args.routes_file is not None or args.args_from_pid is not None,
    )
    policy_kind = args.network_policy_kind if args.manage_network_policies else "auto"
    try:
        policy_config = gather.load_policy_config(args.policy_config)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    inputs = gather.ClusterInputs(
        tenancy=tenancy,
        apiservice_name=args.apiservice_name,
        router_namespace=ns,
        router_service=name,
        requestheader=requestheader,
        policy_kind=policy_kind,
        policy_config=policy_config,
    )
    snapshot = asyncio.run(
        collect.collect(
            args.routes_file,
            args.kubeconfig,
            inputs,
            tls,
            network,
            metrics_url,
            router_cn=probes.first_cn(data["cert"]) or "metrics-router",
            expiry_warning=args.expiry_warning,
        )
    )
    results = checks.run_checks(snapshot)
    out = report.to_json(results) if args.output == "json" else report.text(results)
    sys.stdout.write(out)
    return checks.exit_code(results)
