"""Where the tests find things: the checkout's root, whatever folder a test lives in."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
