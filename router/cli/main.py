"""The `metrics-router` command: one console script, one subcommand per module.

Each subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``. Modules are
imported only when their subcommand runs, so `metrics-router reloader` starts without loading
the proxy and `--help` stays fast.

Every subcommand follows the same conventions: exit 2 for a usage error (an unknown flag, a
bad value; the message names the subcommand and shows its usage), 1 for a runtime error, and
``--help`` shows each flag's default.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from router.core.version import version

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("router.cli.serve", "run the router: the external.metrics.k8s.io APIService backend"),
    "certs": ("router.cli.certs", "development PKI: CAs, serving and client certificates"),
    "render": (
        "router.cli.render",
        "render manifests (NetworkPolicies, APIService) for the tenants",
    ),
    "reloader": (
        "router.cli.reloader",
        "run a tenant's KEDA operator, restarting it on namespace changes",
    ),
    "demo": ("router.devtools.demo", "the whole request path on this machine, no cluster needed"),
    "doctor": ("router.cli.doctor", "check a live installation end to end; a fix per fault"),
    "version": ("router.cli.version", "print the version"),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, but not for flags without one (None, False), nor twice: a help text that
    states its default itself, as an operator writes it ("(default 1m15s)"), keeps only that
    (the parsed value would read "(default: 75.0)")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "(default" in text:
            return text
        return super()._get_help_string(action) or text


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose unknown flags are reported by the (sub)command they were given
    to, with that command's usage, and whose subcommands share the formatter."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras

    def error(self, message: str) -> NoReturn:
        usage = self.format_usage()
        if usage.count("\n") > 4:  # `serve` has fifty flags: no wall of text for one typo
            usage = f"usage: {self.prog} [flags]\n"
        sys.stderr.write(usage)
        self.exit(2, f"{self.prog}: error: {message}\nRun '{self.prog} --help' for every flag.\n")


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = Parser(
        prog="metrics-router",
        description="Route external.metrics.k8s.io requests to each tenant's KEDA metrics server.",
    )
    parser.add_argument("--version", action="version", version=f"metrics-router {version()}")
    sub = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=Parser
    )
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
    run_command = getattr(args, "_run", None)
    if run_command is None:  # pragma: no cover - argparse requires a command
        parser.print_help()
        return 2
    try:
        return int(run_command(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `metrics-router ... | head`
        sys.stderr.close()
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
