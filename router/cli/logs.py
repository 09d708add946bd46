"""Log handler setup for the long-running subcommands (the formatters live in router.logs)."""

from __future__ import annotations

import logging
import sys

from router.logs import JsonFormatter, TextFormatter


def setup(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log is one line per request: too much for a hot proxy.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
