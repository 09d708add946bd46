"""A stand-in for the KEDA operator, run as the reloader's child in tests (stdlib only).

On start it installs its signal handlers, then reports one JSON line
``{"event": "start", "pid": ..., "watch": <WATCH_NAMESPACE or null>, "pgid": ...}`` to the
test's TCP listener (--report HOST:PORT) and prints ``reloader-child watch=<value>`` on stdout.
Each SIGTERM/SIGINT is reported as ``{"event": "signal", "signal": N}`` and then handled by mode:

  --on-signal exit     exit with --signal-exit-code (default 0)
  --on-signal default  die by the signal (exit status 128+N for the parent)
  --on-signal ignore   keep running (the reloader must SIGKILL it)

--exit N makes it exit with code N right after reporting start (a crashing operator).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
from types import FrameType


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--report", required=True, help="HOST:PORT of the test's listener")
    parser.add_argument("--env-name", default="WATCH_NAMESPACE")
    parser.add_argument("--on-signal", choices=("exit", "default", "ignore"), default="exit")
    parser.add_argument("--signal-exit-code", type=int, default=0)
    parser.add_argument("--exit", type=int, default=None, dest="exit_code")
    args = parser.parse_args()

    host, _, port = args.report.rpartition(":")
    conn = socket.create_connection((host, int(port)))

    def report(**event: object) -> None:
        event["pid"] = os.getpid()
        conn.sendall((json.dumps(event) + "\n").encode())

    def on_signal(signum: int, frame: FrameType | None) -> None:
        report(event="signal", signal=signum)
        if args.on_signal == "ignore":
            return
        if args.on_signal == "default":
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        sys.exit(args.signal_exit_code)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    watch = os.environ.get(args.env_name)
    report(event="start", watch=watch, pgid=os.getpgrp())
    print(f"reloader-child watch={watch}", flush=True)
    if args.exit_code is not None:
        return int(args.exit_code)
    while True:
        signal.pause()


if __name__ == "__main__":
    sys.exit(main())
