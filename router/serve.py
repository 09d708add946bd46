"""`metrics-router serve`: parse options, build the Router, run until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from router import logs
from router.app import Router, StartupError
from router.config import ConfigError, ServeConfig, add_serve_arguments, serve_config_from_args

logger = logging.getLogger("router.serve")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_serve_arguments(parser)


def install_uvloop() -> bool:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


async def serve(config: ServeConfig, *, reuse_port: bool = False) -> int:
    router = Router(config, reuse_port=reuse_port)
    try:
        await router.start()
    except StartupError as exc:
        await router.stop()
        logger.error("cannot start: %s", exc)
        return 1
    return await router.run_until_signalled()


def run(args: argparse.Namespace) -> int:
    try:
        config = serve_config_from_args(args)
    except ConfigError as exc:
        for error in exc.errors:
            print(f"error: {error}", file=sys.stderr)
        return 1
    logs.setup(config.log_level, config.log_format)
    install_uvloop()
    return asyncio.run(serve(config))
