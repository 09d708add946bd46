"""Kubernetes Status bodies and the discovery documents the router answers itself (pure).

Nobody builds a Status by hand: use the constructors here. Bodies are bytes, ready to write.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

GROUP = "external.metrics.k8s.io"
VERSION = "v1beta1"
GROUP_VERSION = f"{GROUP}/{VERSION}"
JSON = "application/json"
DISCOVERY_V2 = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"
DISCOVERY_V2BETA1 = "application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList"


@dataclass(frozen=True, slots=True)
class StatusError:
    """An error answer: HTTP code, Kubernetes reason, message, and extra response headers."""

    code: int
    reason: str
    message: str
    headers: tuple[tuple[str, str], ...] = ()

    def body(self) -> bytes:
        return status_body(self.code, self.reason, self.message)


def status_body(code: int, reason: str, message: str) -> bytes:
    doc = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def bad_request(message: str) -> StatusError:
    return StatusError(400, "BadRequest", message)


def unauthorized(message: str = "Unauthorized") -> StatusError:
    return StatusError(401, "Unauthorized", message)


def not_found(message: str) -> StatusError:
    return StatusError(404, "NotFound", message)


def method_not_allowed(method: str) -> StatusError:
    return StatusError(
        405,
        "MethodNotAllowed",
        f"the server does not allow this method ({method}) on the requested resource",
        (("Allow", "GET"),),
    )


def too_many_requests(tenant: str, retry_after: int = 1) -> StatusError:
    return StatusError(
        429,
        "TooManyRequests",
        f"too many requests in flight for tenant {tenant!r}, please try again later",
        (("Retry-After", str(retry_after)),),
    )


def service_unavailable(message: str) -> StatusError:
    return StatusError(503, "ServiceUnavailable", message)


def bad_gateway(message: str) -> StatusError:
    # Kubernetes has no BadGateway reason; InternalError with code 502 is what the aggregator
    # itself uses for proxy errors.
    return StatusError(502, "InternalError", message)


def gateway_timeout(message: str) -> StatusError:
    return StatusError(504, "Timeout", message)


def _dump(doc: object) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


_GROUP_VERSION_DOC = {"groupVersion": GROUP_VERSION, "version": VERSION}
_API_GROUP = {
    "kind": "APIGroup",
    "apiVersion": "v1",
    "name": GROUP,
    "versions": [_GROUP_VERSION_DOC],
    "preferredVersion": _GROUP_VERSION_DOC,
}

API_GROUP_LIST = _dump({"kind": "APIGroupList", "apiVersion": "v1", "groups": [_API_GROUP]})
API_GROUP = _dump(_API_GROUP)
API_RESOURCE_LIST = _dump(
    {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": GROUP_VERSION,
        "resources": [
            {
                "name": "externalmetrics",
                "singularName": "",
                "namespaced": True,
                "kind": "ExternalMetricValueList",
                "verbs": ["get"],
            }
        ],
    }
)


def _discovery_list(api_version: str) -> bytes:
    return _dump(
        {
            "kind": "APIGroupDiscoveryList",
            "apiVersion": api_version,
            "metadata": {},
            "items": [
                {
                    "metadata": {"name": GROUP},
                    "versions": [
                        {
                            "version": VERSION,
                            "resources": [
                                {
                                    "resource": "externalmetrics",
                                    "responseKind": {
                                        "group": "",
                                        "version": "",
                                        "kind": "ExternalMetricValueList",
                                    },
                                    "scope": "Namespaced",
                                    "singularResource": "",
                                    "verbs": ["get"],
                                }
                            ],
                            "freshness": "Current",
                        }
                    ],
                }
            ],
        }
    )


API_DISCOVERY_V2 = _discovery_list("apidiscovery.k8s.io/v2")
API_DISCOVERY_V2BETA1 = _discovery_list("apidiscovery.k8s.io/v2beta1")


def negotiate_apis(accept: str) -> tuple[bytes, str]:
    """Body and content type for GET /apis given the Accept header.

    The aggregator asks for aggregated discovery (apidiscovery.k8s.io/v2) first and falls back
    to the legacy documents when the answer is not v2; kubectl asks for either.
    """
    for part in accept.split(","):
        media = part.strip().replace(" ", "")
        params = set(media.split(";")[1:])
        if media.startswith(JSON) and "as=APIGroupDiscoveryList" in params:
            if "v=v2" in params:
                return API_DISCOVERY_V2, DISCOVERY_V2
            if "v=v2beta1" in params:
                return API_DISCOVERY_V2BETA1, DISCOVERY_V2BETA1
    return API_GROUP_LIST, JSON
