"""Recording on an order's path looks no metric child up (issue 22): ``labels()`` takes a lock
and builds a key on every call, so the children are found once, at start or once per step."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client.metrics import MetricWrapperBase

from biomero_importer.model import Progress
from biomero_importer.observability.metrics import Metrics

pytestmark = pytest.mark.unit


def _counting_labels(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    calls: list[tuple[Any, ...]] = []
    original = MetricWrapperBase.labels

    def labels(self: MetricWrapperBase, *args: Any, **kwargs: Any) -> Any:
        calls.append((self._name, args, tuple(kwargs.items())))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MetricWrapperBase, "labels", labels)
    return calls


def test_per_order_recording_looks_up_no_child(monkeypatch: pytest.MonkeyPatch) -> None:
    metrics = Metrics()
    calls = _counting_labels(monkeypatch)
    for _ in range(100):
        metrics.order_finished("completed")
        metrics.observe_step("import", 0.01)
        metrics.order_waited("settle")
        metrics.lease_recovered("requeued")
        metrics.notification_delivered("webhook")
        metrics.notification_failed("email", "retry")
    assert calls == []
    value = metrics.registry.get_sample_value
    assert value("biomero_importer_orders_finished_total", {"outcome": "completed"}) == 100
    assert value("biomero_importer_step_duration_seconds_count", {"step": "import"}) == 100
    assert (
        value("biomero_importer_notifications_failed_total", {"channel": "email", "kind": "retry"})
        == 100
    )


def test_progress_looks_up_its_children_once_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    metrics = Metrics()
    calls = _counting_labels(monkeypatch)
    for done in range(50):
        metrics.order_progress("u1", Progress("import", done, 50, None, done * 10, 500))
    assert len(calls) == 4  # units done/total and bytes done/total, once
    for done in range(50):
        metrics.order_progress("u1", Progress("annotate", done, 50))
    assert len(calls) == 6  # the new step's units; its bytes series went away
    value = metrics.registry.get_sample_value
    assert (
        value("biomero_importer_order_units_done", {"order_uuid": "u1", "step": "annotate"}) == 49
    )
    assert (
        value("biomero_importer_order_units_done", {"order_uuid": "u1", "step": "import"}) is None
    )
    assert value("biomero_importer_order_bytes_total", {"order_uuid": "u1"}) is None
    metrics.order_progress("u1", None)
    assert (
        value("biomero_importer_order_units_done", {"order_uuid": "u1", "step": "annotate"}) is None
    )
