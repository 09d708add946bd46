"""`metrics-router certs init`: write a development PKI (see router.devtools.pki for the files)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from router.devtools import pki as certs


def _tenant_list(value: str) -> list[str]:
    tenants = [t.strip() for t in value.split(",") if t.strip()]
    try:
        return list(certs.validate_tenant_names(tenants))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _days(value: str) -> int:
    try:
        days = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"want a whole number of days, got {value!r}") from None
    if days < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return days


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="certs_command", title="actions", required=True)
    init = sub.add_parser(
        "init",
        help="generate CAs, serving and client certificates and Secret manifests",
        description=(
            "Generate a development PKI: the requestheader (front-proxy) CA and the aggregator's "
            "client certificate, the router's serving and client certificates (each from its "
            "own CA), one serving certificate per tenant KEDA metrics server, negative-test "
            "certificates, and secrets.yaml for kubectl apply. Not for production."
        ),
    )
    init.add_argument("--dir", required=True, type=Path, help="output directory (created)")
    init.add_argument(
        "--tenants",
        type=_tenant_list,
        default=",".join(certs.DEFAULT_TENANTS),
        help="comma-separated tenant names, used as given (DNS labels): tenant T gets "
        "upstream-T.crt for keda-operator-metrics-apiserver.T--sys.svc. Name a tenant after "
        "its root namespace (tenant-a) to match the default --tenant-pattern",
    )
    init.add_argument("--force", action="store_true", help="overwrite existing files")
    init.add_argument("--days", type=_days, default=certs.DEFAULT_DAYS, help="validity in days")


def run(args: argparse.Namespace) -> int:
    if args.certs_command != "init":  # pragma: no cover - argparse restricts the choices
        print(f"metrics-router certs: unknown action {args.certs_command!r}", file=sys.stderr)
        return 2
    try:
        pki = certs.generate_pki(args.dir, args.tenants, force=args.force, days=args.days)
    except certs.PkiExistsError as exc:
        print(
            f"metrics-router certs init: refusing to overwrite existing PKI files in "
            f"{exc.directory}: {', '.join(exc.existing)}; --force replaces them",
            file=sys.stderr,
        )
        return 1
    except ValueError as exc:
        print(f"metrics-router certs init: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"metrics-router certs init: cannot write {args.dir}: {exc}", file=sys.stderr)
        return 1
    print(f"wrote development PKI to {pki.directory} (tenants: {', '.join(pki.tenants)}):")
    for path in pki.files():
        print(f"  {path.name}")
    print("serve flags: " + " ".join(pki.serve_flags()))
    return 0
