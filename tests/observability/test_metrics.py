"""Metrics live in their own registry and move when the service records events."""

from __future__ import annotations

from prometheus_client import generate_latest

from biomero_importer.observability.metrics import (
    LEASE_OUTCOMES,
    OUTCOMES,
    STEPS,
    Metrics,
    create_metrics,
)


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_every_series_is_exported_at_zero_before_its_first_event() -> None:
    metrics = Metrics()
    for outcome in OUTCOMES:
        assert value(metrics, "biomero_importer_orders_finished_total", outcome=outcome) == 0
    for step in STEPS:
        assert value(metrics, "biomero_importer_step_duration_seconds_count", step=step) == 0
    for lease_outcome in LEASE_OUTCOMES:
        assert value(metrics, "biomero_importer_recovered_leases_total", outcome=lease_outcome) == 0
    for name in (
        "biomero_importer_pickup_latency_seconds_count",
        "biomero_importer_running_orders",
        "biomero_importer_pending_orders",
        "biomero_importer_oldest_pending_age_seconds",
        "biomero_importer_fallback_poll_orders_total",
        "biomero_importer_listener_reconnects_total",
    ):
        assert value(metrics, name) == 0, name


def test_recording_moves_the_metrics() -> None:
    metrics = Metrics()
    metrics.order_finished("completed")
    metrics.order_finished("completed")
    metrics.order_finished("failed")
    metrics.pickup_latency.observe(0.0007)
    metrics.pickup_latency.observe(3.0)
    metrics.observe_step("import", 12.5)
    metrics.running_orders.inc()
    metrics.running_orders.inc()
    metrics.running_orders.dec()
    metrics.set_backlog(17, 42.0)
    metrics.fallback_poll_orders.inc(3)
    metrics.listener_reconnects.inc()
    metrics.lease_recovered("requeued", 2)
    metrics.lease_recovered("failed")

    assert value(metrics, "biomero_importer_orders_finished_total", outcome="completed") == 2
    assert value(metrics, "biomero_importer_orders_finished_total", outcome="failed") == 1
    assert value(metrics, "biomero_importer_pickup_latency_seconds_count") == 2
    assert value(metrics, "biomero_importer_pickup_latency_seconds_bucket", le="0.001") == 1
    assert value(metrics, "biomero_importer_pickup_latency_seconds_bucket", le="0.0005") == 0
    assert value(metrics, "biomero_importer_pickup_latency_seconds_bucket", le="60.0") == 2
    assert value(metrics, "biomero_importer_step_duration_seconds_sum", step="import") == 12.5
    assert value(metrics, "biomero_importer_running_orders") == 1
    assert value(metrics, "biomero_importer_pending_orders") == 17
    assert value(metrics, "biomero_importer_oldest_pending_age_seconds") == 42
    assert value(metrics, "biomero_importer_fallback_poll_orders_total") == 3
    assert value(metrics, "biomero_importer_listener_reconnects_total") == 1
    assert value(metrics, "biomero_importer_recovered_leases_total", outcome="requeued") == 2
    assert value(metrics, "biomero_importer_recovered_leases_total", outcome="failed") == 1

    metrics.set_backlog(0, None)
    assert value(metrics, "biomero_importer_pending_orders") == 0
    assert value(metrics, "biomero_importer_oldest_pending_age_seconds") == 0


def test_instances_are_independent() -> None:
    first, second = Metrics(), Metrics()
    first.order_finished("cancelled")
    assert value(first, "biomero_importer_orders_finished_total", outcome="cancelled") == 1
    assert value(second, "biomero_importer_orders_finished_total", outcome="cancelled") == 0


def test_service_metrics_include_process_collectors() -> None:
    text = generate_latest(create_metrics().registry).decode()
    assert "process_resident_memory_bytes" in text
    assert "python_info" in text
    assert "biomero_importer_orders_finished_total" in text
    # Two service instances in one process (the demo, tests) must not collide.
    create_metrics()
