"""Status bodies and the discovery documents the router serves itself (pure)."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from router.core import status


@pytest.mark.parametrize(
    ("make", "code", "reason"),
    [
        (lambda: status.bad_request("m"), 400, "BadRequest"),
        (lambda: status.unauthorized("m"), 401, "Unauthorized"),
        (lambda: status.not_found("m"), 404, "NotFound"),
        (lambda: status.method_not_allowed("POST"), 405, "MethodNotAllowed"),
        (lambda: status.too_many_requests("a"), 429, "TooManyRequests"),
        (lambda: status.bad_gateway("m"), 502, "InternalError"),
        (lambda: status.service_unavailable("m"), 503, "ServiceUnavailable"),
        (lambda: status.gateway_timeout("m"), 504, "Timeout"),
    ],
)
def test_status_errors_are_kubernetes_status_json(
    make: Callable[[], status.StatusError], code: int, reason: str
) -> None:
    err = make()
    doc = json.loads(err.body())
    assert doc == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": err.message,
        "reason": reason,
        "code": code,
    }
    assert err.code == code


def test_method_not_allowed_says_allow_get() -> None:
    err = status.method_not_allowed("DELETE")
    assert ("Allow", "GET") in err.headers
    assert "DELETE" in err.message


def test_too_many_requests_has_retry_after() -> None:
    err = status.too_many_requests("a", retry_after=3)
    assert ("Retry-After", "3") in err.headers
    assert "'a'" in err.message


def test_status_body_escapes_messages() -> None:
    body = status.status_body(400, "BadRequest", 'quote " and \\ and \n newline')
    assert json.loads(body)["message"] == 'quote " and \\ and \n newline'


def test_api_resource_list() -> None:
    doc = json.loads(status.API_RESOURCE_LIST)
    assert doc["kind"] == "APIResourceList"
    assert doc["apiVersion"] == "v1"
    assert doc["groupVersion"] == "external.metrics.k8s.io/v1beta1"
    assert doc["resources"] == [
        {
            "name": "externalmetrics",
            "singularName": "",
            "namespaced": True,
            "kind": "ExternalMetricValueList",
            "verbs": ["get"],
        }
    ]


def test_api_group_and_group_list() -> None:
    group = json.loads(status.API_GROUP)
    assert group["kind"] == "APIGroup"
    assert group["name"] == "external.metrics.k8s.io"
    gv = {"groupVersion": "external.metrics.k8s.io/v1beta1", "version": "v1beta1"}
    assert group["versions"] == [gv]
    assert group["preferredVersion"] == gv
    listing = json.loads(status.API_GROUP_LIST)
    assert listing["kind"] == "APIGroupList"
    assert listing["groups"] == [group]


AGGREGATOR_ACCEPT = (
    "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json"
)


@pytest.mark.parametrize(
    ("accept", "content_type"),
    [
        (AGGREGATOR_ACCEPT, status.DISCOVERY_V2),
        (
            "application/json; g=apidiscovery.k8s.io; v=v2; as=APIGroupDiscoveryList",
            status.DISCOVERY_V2,
        ),
        (
            "application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,"
            "application/json",
            status.DISCOVERY_V2BETA1,
        ),
        ("application/json", status.JSON),
        ("*/*", status.JSON),
        ("", status.JSON),
        ("application/vnd.kubernetes.protobuf", status.JSON),
        ("application/json;g=apidiscovery.k8s.io;v=v3;as=APIGroupDiscoveryList", status.JSON),
    ],
)
def test_negotiate_apis(accept: str, content_type: str) -> None:
    body, ctype = status.negotiate_apis(accept)
    assert ctype == content_type
    doc = json.loads(body)
    if content_type == status.JSON:
        assert doc["kind"] == "APIGroupList"
    else:
        version = content_type.split("v=")[1].split(";")[0]
        assert doc["kind"] == "APIGroupDiscoveryList"
        assert doc["apiVersion"] == f"apidiscovery.k8s.io/{version}"


def test_discovery_v2_lists_the_resource() -> None:
    doc = json.loads(status.API_DISCOVERY_V2)
    (item,) = doc["items"]
    assert item["metadata"]["name"] == "external.metrics.k8s.io"
    (version,) = item["versions"]
    assert version["version"] == "v1beta1"
    assert version["freshness"] == "Current"
    (resource,) = version["resources"]
    assert resource["resource"] == "externalmetrics"
    assert resource["scope"] == "Namespaced"
    assert resource["verbs"] == ["get"]
    assert resource["responseKind"]["kind"] == "ExternalMetricValueList"
