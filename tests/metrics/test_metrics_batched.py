"""Per-request figures counted in plain ints until a scrape expose exactly what locked
increments per request expose (router/metrics.py, ``batched``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from router.metrics import ProxyMetrics


def _exposition(registry: CollectorRegistry) -> list[str]:
    text = generate_latest(registry).decode()
    return [
        line for line in text.splitlines() if "_created" not in line and "start_time" not in line
    ]


def _drive(metrics: ProxyMetrics, inflight: dict[str, int]) -> None:
    for tenant, code, seconds in [
        ("a", 200, 0.0004),
        ("a", 200, 0.0005),  # on a bucket bound: counted in that bucket (le is "<=")
        ("a", 200, 0.003),
        ("a", 503, 12.0),
        ("b", 200, 45.0),  # beyond the last bound: +Inf only
        ("", 404, None),
        ("", 401, None),
        ("", 404, None),
    ]:
        metrics.observe(tenant, code, seconds)
    for tenant in ("a", "b"):
        gauge = metrics.track_inflight(tenant, lambda t=tenant: inflight.get(t, 0))  # type: ignore[misc]
        if gauge is not None:
            gauge.inc()
            gauge.inc()
            gauge.dec()
    inflight.update(a=1, b=1)


def test_batched_metrics_expose_what_direct_increments_expose() -> None:
    direct, batched = CollectorRegistry(), CollectorRegistry()
    d = ProxyMetrics(direct, batched=False)
    b = ProxyMetrics(batched, batched=True)
    _drive(d, {})
    _drive(b, {})
    assert (
        b.registry.get_sample_value("metrics_router_requests_total", {"tenant": "a", "code": "200"})
        == 3
    )
    assert _exposition(batched) == _exposition(direct)
    # a second scrape adds only what came since
    d.observe("a", 200, 0.2)
    b.observe("a", 200, 0.2)
    assert _exposition(batched) == _exposition(direct)
    assert (
        b.registry.get_sample_value(
            "metrics_router_request_duration_seconds_count", {"tenant": "a"}
        )
        == 5
    )
    assert b.registry.get_sample_value("metrics_router_inflight_requests", {"tenant": "a"}) == 1
