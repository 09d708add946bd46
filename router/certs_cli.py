"""`metrics-router certs init`: write a development PKI (see router.certs for the files)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from router import certs


def _tenant_list(value: str) -> list[str]:
    return [t.strip() for t in value.split(",") if t.strip()]


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
        default=list(certs.DEFAULT_TENANTS),
        help="comma-separated tenant names, DNS labels (default: %(default)s)",
    )
    init.add_argument("--force", action="store_true", help="overwrite existing files")
    init.add_argument(
        "--days", type=int, default=certs.DEFAULT_DAYS, help="validity (default: %(default)s)"
    )


def run(args: argparse.Namespace) -> int:
    if args.certs_command != "init":  # pragma: no cover - argparse restricts the choices
        print(f"metrics-router certs: unknown action {args.certs_command!r}", file=sys.stderr)
        return 2
    if args.days < 1:
        print("metrics-router certs init: --days must be at least 1", file=sys.stderr)
        return 1
    try:
        pki = certs.generate_pki(args.dir, args.tenants, force=args.force, days=args.days)
    except certs.PkiExistsError as exc:
        print(f"metrics-router certs init: {exc}", file=sys.stderr)
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
