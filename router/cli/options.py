"""The command line's shared pieces: the value types of every flag (durations, sizes, comma
lists, files, HOST:PORT) and the log flags of the long-running commands.

Pure: argparse and the standard library only. Each command's flag groups live beside it:
serve_options.py (`serve`), tenancy_options.py (`serve`, `reloader`, `render`, `doctor`),
policy_options.py (the NetworkPolicy flags).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from router.core.option_values import parse_byte_size, parse_duration, parse_host_port

LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")

T = TypeVar("T")


def _argparse_type(parse: Callable[[str], T], name: str) -> Callable[[str], T]:
    """An argparse ``type=``: the parser's ValueError becomes argparse's one-line error."""

    def convert(text: str) -> T:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = name  # argparse names the type in its message
    return convert


duration = _argparse_type(parse_duration, "duration")
byte_size = _argparse_type(parse_byte_size, "size")


def add_log_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The log flags every long-running subcommand shares."""
    parser.add_argument(
        "--log-format", choices=LOG_FORMATS, default="text", help="text (key=value) or json"
    )
    parser.add_argument(
        "--log-level", choices=LOG_LEVELS, default="info", help="lowest level logged"
    )


def csv(value: str | None) -> tuple[str, ...]:
    """A comma list flag ("a, b,,c") as its non-empty parts."""
    if not value:
        return ()
    return tuple(part.strip() for part in value.split(",") if part.strip())


def need_file(errors: list[str], flag: str, value: Path | None) -> None:
    """A required file flag: appends to ``errors`` when it is missing or not a file."""
    if value is None:
        errors.append(f"{flag} is required")
    elif not value.is_file():
        errors.append(f"{flag}: {value} is not a readable file")


def address(value: str, flag: str, errors: list[str]) -> tuple[str, int] | None:
    """A HOST:PORT flag as (host, port); None when off ('0') or when it does not parse, which
    appends to ``errors``."""
    try:
        return parse_host_port(value)
    except ValueError as exc:
        errors.append(f"{flag}: {exc}")
        return None


def host_port(value: str, flag: str, errors: list[str]) -> str | None:
    """A HOST:PORT flag as given ('0' = off, None): appends to ``errors`` when it does not
    parse."""
    return None if address(value, flag, errors) is None else value
