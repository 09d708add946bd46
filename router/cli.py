"""The `metrics-router` command: one console script, one subcommand per module.

Each subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``. Modules are
imported only when their subcommand runs, so `metrics-router reloader` starts without loading
the proxy and `--help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("router.serve", "run the router: the external.metrics.k8s.io APIService backend"),
    "certs": ("router.certs_cli", "development PKI: CAs, serving and client certificates"),
    "render": ("router.render", "render manifests (NetworkPolicies, APIService) for the tenants"),
    "reloader": (
        "router.reloader_cli",
        "run a tenant's KEDA operator, restarting it on namespace changes",
    ),
    "demo": ("router.demo", "the whole request path on this machine, no cluster needed"),
    "doctor": ("router.doctor.command", "check a live installation end to end; a fix per fault"),
}


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metrics-router",
        description="Route external.metrics.k8s.io requests to each tenant's KEDA metrics server.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # Only the chosen subcommand's module is imported; the others are listed by name.
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(args_list)
    args = parser.parse_args(args_list)
    run = getattr(args, "_run", None)
    if run is None:  # pragma: no cover - argparse requires a command
        parser.print_help()
        return 2
    try:
        return int(run(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
