"""The fake's API errors: an exception carrying a Kubernetes Status, and the Status body."""

from __future__ import annotations

from typing import Any


class ApiStatus(Exception):
    """Answer the request with this Status (code, reason, message, extra headers)."""

    def __init__(self, code: int, reason: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message
        self.headers = headers or {}


def status_body(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
