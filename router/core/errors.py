"""The one error-list exception: every problem found in a configuration, at once."""

from __future__ import annotations


class ConfigError(Exception):
    """Invalid options; ``errors`` holds every problem found, one message each."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors
