"""Why the router cannot start."""


class StartupError(Exception):
    """The router cannot start with this configuration; the message says why."""
