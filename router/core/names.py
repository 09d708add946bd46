"""Kubernetes name rules (pure)."""

from __future__ import annotations

import re

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)


def is_dns1123_label(value: str) -> bool:
    """A namespace name: lower-case alphanumerics and '-', at most 63 characters."""
    return len(value) <= 63 and _DNS1123_LABEL.fullmatch(value) is not None


def is_dns1123_subdomain(value: str) -> bool:
    """A DNS name such as a Service host name: labels joined by dots, at most 253 characters."""
    return len(value) <= 253 and _DNS1123_SUBDOMAIN.fullmatch(value) is not None
