"""Option value syntaxes shared by every subcommand: durations, HOST:PORT, byte sizes.

Pure (standard library only). Each parser raises ``ValueError`` with a message that names the
syntax it wants; router.cli.options wraps them as argparse types (``duration``, ``byte_size``).
"""

from __future__ import annotations

import math
import re

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_HINT = "want a duration such as 500ms, 10s, 1m30s, or plain seconds such as 2.5"


def parse_duration(text: str) -> float:
    """Seconds from a Go duration ("500ms", "10s", "1m30s", "1h") or plain seconds ("2.5").

    Durations are never negative: "-1" is refused, "0" is zero.
    """
    value = text.strip()
    if not value:
        raise ValueError(f"invalid duration {text!r}: {_DURATION_HINT}")
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"invalid duration {text!r}: must be a finite number >= 0")
        return seconds
    pos, total = 0, 0.0
    while pos < len(value):
        match = _DURATION_PART.match(value, pos)
        if match is None:
            raise ValueError(f"invalid duration {text!r}: {_DURATION_HINT}")
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    return total


def format_duration(seconds: float) -> str:
    """The shortest Go-style text for a duration (for --help defaults and logs)."""
    if seconds == 0:
        return "0s"
    if seconds < 1:
        ms = seconds * 1000
        return f"{ms:g}ms"
    whole = int(seconds)
    if whole != seconds or whole < 60:
        return f"{seconds:g}s"
    out = []
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        out.append(f"{hours}h")
    if minutes:
        out.append(f"{minutes}m")
    if secs:
        out.append(f"{secs}s")
    return "".join(out)


_SIZE = re.compile(r"^(\d+)\s*(|k|ki|m|mi|g|gi)b?$", re.IGNORECASE)
_SIZE_UNITS = {
    "": 1,
    "k": 1000,
    "ki": 1024,
    "m": 1000**2,
    "mi": 1024**2,
    "g": 1000**3,
    "gi": 1024**3,
}


def parse_byte_size(text: str) -> int:
    """Bytes from "65536", "64Ki", "16Mi", "1M" (Kubernetes quantity suffixes, integers)."""
    match = _SIZE.match(text.strip())
    if match is None:
        raise ValueError(f"invalid size {text!r}: want bytes such as 65536, 64Ki or 16Mi")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


def parse_host_port(text: str) -> tuple[str, int] | None:
    """(host, port) from "HOST:PORT", "[::1]:PORT" or ":PORT" (host "" = all addresses);
    None for "0" or "" (the listener is disabled)."""
    value = text.strip()
    if value in ("0", ""):
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"invalid address {text!r}: want HOST:PORT, [IPv6]:PORT, or 0 to disable")
    if host.startswith("[") != host.endswith("]"):
        raise ValueError(f"invalid address {text!r}: unbalanced brackets around the host")
    host = host.strip("[]")
    if ":" in host and not value.startswith("["):
        raise ValueError(f"invalid address {text!r}: write an IPv6 host in brackets, [::1]:PORT")
    return host, int(port)
