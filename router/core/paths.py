"""Request paths: classify and validate (pure).

The router answers discovery and health itself and forwards only
GET /apis/external.metrics.k8s.io/v1beta1/namespaces/{namespace}/{metric}.
Anything else is a 404, and anything malformed (traversal, encoded slashes, invalid names)
a 400: nothing ambiguous is ever forwarded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from router.core import status
from router.core.names import is_dns1123_label

PREFIX = f"/apis/{status.GROUP}/{status.VERSION}"
_NS_PREFIX = PREFIX + "/namespaces/"
# KEDA names external metrics s<index>-<scaler>[-<name>], lower-cased; custom-metrics-apiserver
# accepts any path segment name. Allow the characters metric names carry in practice.
_METRIC = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._:-]{0,252})$")


class Kind(Enum):
    METRIC = "metric"
    APIS = "apis"
    GROUP = "group"
    GROUP_VERSION = "group-version"
    OPENAPI = "openapi"
    HEALTH = "health"


@dataclass(frozen=True, slots=True)
class Target:
    kind: Kind
    namespace: str = ""
    metric: str = ""


_STATIC: dict[str, Target] = {
    "/apis": Target(Kind.APIS),
    "/apis/": Target(Kind.APIS),
    f"/apis/{status.GROUP}": Target(Kind.GROUP),
    f"/apis/{status.GROUP}/": Target(Kind.GROUP),
    PREFIX: Target(Kind.GROUP_VERSION),
    PREFIX + "/": Target(Kind.GROUP_VERSION),
    "/healthz": Target(Kind.HEALTH),
    "/livez": Target(Kind.HEALTH),
    "/readyz": Target(Kind.HEALTH),
}


def classify(raw_path: str) -> Target | status.StatusError:
    """Classify the raw (still percent-encoded) request path, without its query string."""
    target = _STATIC.get(raw_path)
    if target is not None:
        return target
    if raw_path.startswith(_NS_PREFIX):
        return _metric_target(raw_path[len(_NS_PREFIX) :])
    if raw_path.startswith("/openapi/"):
        return Target(Kind.OPENAPI)
    if "%" in raw_path or "/." in raw_path or "//" in raw_path or "\\" in raw_path:
        return status.bad_request(f"malformed path {_clip(raw_path)!r}")
    return status.not_found(f"the server could not find the requested resource ({_clip(raw_path)})")


def _metric_target(rest: str) -> Target | status.StatusError:
    parts = rest.split("/")
    if len(parts) != 2:
        # /namespaces/{ns} alone, or deeper paths, are not resources of this group version.
        if "%" in rest or ".." in parts or "" in parts[:-1]:
            return status.bad_request(f"malformed path {_clip(PREFIX + '/namespaces/' + rest)!r}")
        return status.not_found(
            "the server could not find the requested resource "
            f"({_clip(PREFIX + '/namespaces/' + rest)})"
        )
    namespace, metric = parts
    if not is_dns1123_label(namespace):
        return status.bad_request(
            f"invalid namespace {_clip(namespace)!r}: must be a DNS-1123 label"
        )
    if not _METRIC.match(metric) or ".." in metric:
        return status.bad_request(f"invalid metric name {_clip(metric)!r}")
    return Target(Kind.METRIC, namespace=namespace, metric=metric)


def _clip(value: str, limit: int = 200) -> str:
    return value if len(value) <= limit else value[:limit] + "..."
