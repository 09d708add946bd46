"""The installed version of the product (from the package metadata)."""

from __future__ import annotations

from importlib import metadata

DISTRIBUTION = "tenant-metrics-router"


def version() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0+unknown"
