"""paths.classify: which requests are forwarded, answered locally, 400 or 404 (pure)."""

from __future__ import annotations

import pytest

from router.core import paths, status
from router.core.paths import Kind, Target

GV = "/apis/external.metrics.k8s.io/v1beta1"
NS = GV + "/namespaces"


@pytest.mark.parametrize(
    ("path", "namespace", "metric"),
    [
        (f"{NS}/tenant-a/s0-prometheus", "tenant-a", "s0-prometheus"),
        (f"{NS}/tenant-a--dev/s1-rabbitmq-queue", "tenant-a--dev", "s1-rabbitmq-queue"),
        (f"{NS}/default/s12-kafka-lag-orders", "default", "s12-kafka-lag-orders"),
        (f"{NS}/a/x", "a", "x"),
        (f"{NS}/{'n' * 63}/s0-cron", "n" * 63, "s0-cron"),
        (f"{NS}/ns1/S0-Metric_Name.v2:total", "ns1", "S0-Metric_Name.v2:total"),
        (f"{NS}/ns1/{'m' * 253}", "ns1", "m" * 253),
    ],
)
def test_metric_paths_are_forwarded(path: str, namespace: str, metric: str) -> None:
    assert paths.classify(path) == Target(Kind.METRIC, namespace=namespace, metric=metric)


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("/apis", Kind.APIS),
        ("/apis/", Kind.APIS),
        ("/apis/external.metrics.k8s.io", Kind.GROUP),
        ("/apis/external.metrics.k8s.io/", Kind.GROUP),
        (GV, Kind.GROUP_VERSION),
        (GV + "/", Kind.GROUP_VERSION),
        ("/openapi/v2", Kind.OPENAPI),
        ("/openapi/v3", Kind.OPENAPI),
        ("/openapi/v3/apis/external.metrics.k8s.io/v1beta1", Kind.OPENAPI),
        ("/healthz", Kind.HEALTH),
        ("/livez", Kind.HEALTH),
        ("/readyz", Kind.HEALTH),
    ],
)
def test_local_paths(path: str, kind: Kind) -> None:
    target = paths.classify(path)
    assert isinstance(target, Target)
    assert target.kind is kind
    assert target.namespace == ""


@pytest.mark.parametrize(
    "path",
    [
        # namespace not a DNS-1123 label
        f"{NS}/Tenant-A/s0-prometheus",
        f"{NS}/-tenant/s0-prometheus",
        f"{NS}/tenant-/s0-prometheus",
        f"{NS}/tenant_a/s0-prometheus",
        f"{NS}/tenant.a/s0-prometheus",
        f"{NS}/{'n' * 64}/s0-prometheus",
        f"{NS}//s0-prometheus",
        # traversal
        f"{NS}/../s0-prometheus",
        f"{NS}/tenant-a/..",
        f"{NS}/tenant-a/../tenant-b/s0",
        f"{NS}/../namespaces/tenant-a/s0",
        "/apis/external.metrics.k8s.io/../../etc/passwd",
        "/apis/..",
        "/apis/./external.metrics.k8s.io",
        # encoded slashes and other encodings
        f"{NS}/tenant-a%2Fb/s0-prometheus",
        f"{NS}/tenant-a/s0%2Fprometheus",
        f"{NS}/tenant-a/s0%2fprometheus",
        f"{NS}/tenant-a%2F..%2Ftenant-b/s0",
        f"{NS}/tenant-a/%2e%2e",
        "/apis/external.metrics.k8s.io%2Fv1beta1",
        "/apis%2F..",
        # bad metric names
        f"{NS}/tenant-a/-s0",
        f"{NS}/tenant-a/.s0",
        f"{NS}/tenant-a/s0..x",
        f"{NS}/tenant-a/s0 x",
        f"{NS}/tenant-a/s0;x",
        f"{NS}/tenant-a/s0?x",
        f"{NS}/tenant-a/{'m' * 254}",
        f"{NS}/tenant-a/",
        # other malformed paths
        "//apis",
        "/apis//external.metrics.k8s.io",
        "/apis\\external.metrics.k8s.io",
    ],
)
def test_malformed_paths_are_400(path: str) -> None:
    target = paths.classify(path)
    assert isinstance(target, status.StatusError), target
    assert target.code == 400
    assert target.reason == "BadRequest"


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/api",
        "/api/v1/pods",
        "/apis/custom.metrics.k8s.io/v1beta2",
        "/apis/external.metrics.k8s.io/v1beta2",
        "/apis/external.metrics.k8s.io/v1beta1/namespaces",
        f"{NS}/tenant-a",
        f"{NS}/tenant-a/s0-prometheus/extra",
        f"{NS}/tenant-a/s0-prometheus/",
        "/metrics",
        "/version",
    ],
)
def test_unknown_paths_are_404(path: str) -> None:
    target = paths.classify(path)
    assert isinstance(target, status.StatusError), target
    assert target.code == 404
    assert target.reason == "NotFound"


def test_long_paths_are_clipped_in_messages() -> None:
    target = paths.classify("/nope/" + "x" * 5000)
    assert isinstance(target, status.StatusError)
    assert len(target.message) < 400
