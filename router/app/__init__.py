"""The composition root of `metrics-router serve` (router.app.root.Router) and the parts it
builds, one job each."""

from router.app.errors import StartupError
from router.app.root import Router

__all__ = ["Router", "StartupError"]
