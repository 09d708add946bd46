"""`metrics-router version`: print the installed version."""

from __future__ import annotations

import argparse

from router.core.version import version


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`metrics-router version` takes no flags."""


def run(args: argparse.Namespace) -> int:
    print(f"metrics-router {version()}")
    return 0
