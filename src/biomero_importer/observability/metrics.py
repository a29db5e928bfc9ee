"""The service's Prometheus metrics, in a registry of their own.

The service builds one with ``create_metrics()`` at startup and passes it to whatever records
or serves metrics; nothing is registered globally, so tests (and the demo) can run several
services in one process.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

from biomero_importer.model import TRANSIENT_KINDS, Progress

Outcome = Literal["completed", "failed", "cancelled", "handed_back"]
Step = Literal["validate", "preprocess", "import", "annotate"]
LeaseOutcome = Literal["requeued", "failed"]
# why an order was put back to wait: its files still changing, or a transient failure
WaitReason = Literal["settle", "omero", "storage", "container_runtime"]

OUTCOMES: tuple[Outcome, ...] = ("completed", "failed", "cancelled", "handed_back")
STEPS: tuple[Step, ...] = ("validate", "preprocess", "import", "annotate")
LEASE_OUTCOMES: tuple[LeaseOutcome, ...] = ("requeued", "failed")
NotificationChannel = Literal["webhook", "email"]
NotificationFailure = Literal["retry", "permanent"]
NOTIFICATION_CHANNELS: tuple[NotificationChannel, ...] = ("webhook", "email")
NOTIFICATION_FAILURES: tuple[NotificationFailure, ...] = ("retry", "permanent")
# why a channel of an outcome was given up: a final answer, or still failing after give-up-after
NotificationGiveUp = Literal["final", "expired"]
NOTIFICATION_GIVE_UPS: tuple[NotificationGiveUp, ...] = ("final", "expired")
WAIT_REASONS: tuple[WaitReason, ...] = ("settle", "omero", "storage", "container_runtime")
# The checks behind /healthz, exported too: Prometheus scrapes /metrics, not /healthz.
HEALTH_CHECKS = ("process", "database", "listener", "helpers")

NAMESPACE = "biomero_importer"

# Enqueue-to-start: a notified claim takes about a millisecond, a fallback poll seconds, and a
# saturated service up to minutes.
PICKUP_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
# Steps range from a millisecond (validate) to hours (a large import, up to import_timeout).
STEP_BUCKETS = (
    0.001,
    0.01,
    0.1,
    0.5,
    1.0,
    5.0,
    15.0,
    60.0,
    300.0,
    900.0,
    1800.0,
    3600.0,
    3 * 3600.0,
    6 * 3600.0,
)


class Metrics:
    """Every metric the service exports, as attributes, registered in ``self.registry``.

    Label values are created up front so each series is exported as 0 before its first event;
    dashboards and ``rate()`` then see the start of a series instead of a gap.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = CollectorRegistry() if registry is None else registry
        reg = self.registry

        self.orders_finished = Counter(
            "orders_finished",
            "Orders that left the running state, by outcome.",
            ["outcome"],
            namespace=NAMESPACE,
            registry=reg,
        )
        self.pickup_latency = Histogram(
            "pickup_latency_seconds",
            "Time from an order becoming pending to a worker claiming it.",
            namespace=NAMESPACE,
            buckets=PICKUP_BUCKETS,
            registry=reg,
        )
        self.step_duration = Histogram(
            "step_duration_seconds",
            "Duration of each step of an order.",
            ["step"],
            namespace=NAMESPACE,
            buckets=STEP_BUCKETS,
            registry=reg,
        )
        self.event_loop_lag = Gauge(
            "event_loop_lag_seconds",
            "How late the event loop ran a timer, at the last probe (blocking work shows here).",
            namespace=NAMESPACE,
            registry=reg,
        )
        self.running_orders = Gauge(
            "running_orders",
            "Orders this worker is running now.",
            namespace=NAMESPACE,
            registry=reg,
        )
        self.pending_orders = Gauge(
            "pending_orders",
            "Orders waiting to be claimed (whole queue, from the database).",
            namespace=NAMESPACE,
            registry=reg,
        )
        self.oldest_pending_age = Gauge(
            "oldest_pending_age_seconds",
            "Age of the oldest order waiting to be claimed; 0 when none waits.",
            namespace=NAMESPACE,
            registry=reg,
        )
        self.fallback_poll_orders = Counter(
            "fallback_poll_orders",
            "Orders found by the fallback poll rather than a notification (missed notifies).",
            namespace=NAMESPACE,
            registry=reg,
        )
        self.listener_reconnects = Counter(
            "listener_reconnects",
            "Times the LISTEN connection was re-established.",
            namespace=NAMESPACE,
            registry=reg,
        )
        self.recovered_leases = Counter(
            "recovered_leases",
            "Orders taken back from an expired lease, by what was done with them.",
            ["outcome"],
            namespace=NAMESPACE,
            registry=reg,
        )

        self.notifications_delivered = Counter(
            "notifications_delivered",
            "Order-outcome notifications delivered, by channel.",
            ["channel"],
            namespace=NAMESPACE,
            registry=reg,
        )
        self.notifications_failed = Counter(
            "notifications_failed",
            "Failed notification attempts, by channel and kind: retry (tried again later) or"
            " permanent (never delivered for that outcome).",
            ["channel", "kind"],
            namespace=NAMESPACE,
            registry=reg,
        )
        self.notifications_given_up = Counter(
            "notifications_given_up",
            "Channels of order outcomes given up (never delivered), by channel and reason:"
            " final (the receiver's answer can never change) or expired (still failing after"
            " notify_give_up_after).",
            ["channel", "reason"],
            namespace=NAMESPACE,
            registry=reg,
        )
        self.notification_backlog = Gauge(
            "notification_backlog",
            "Order outcomes with notifications still to deliver (from the database, capped).",
            namespace=NAMESPACE,
            registry=reg,
        )
        self.oldest_notification_age = Gauge(
            "oldest_notification_age_seconds",
            "Age of the oldest outcome with notifications still to deliver; 0 when none.",
            namespace=NAMESPACE,
            registry=reg,
        )
        self.order_waits = Counter(
            "order_waits",
            "Orders put back to wait instead of running or failing: settle (files still"
            " changing) or the transient failure retried automatically.",
            ["reason"],
            namespace=NAMESPACE,
            registry=reg,
        )

        self.dependency_down = Gauge(
            "dependency_down",
            "1 while this replica's probe finds a dependency down (omero, storage,"
            " container_runtime): orders that need it wait on it instead of being tried.",
            ["cause"],
            namespace=NAMESPACE,
            registry=reg,
        )
        self.dependency_probes = Counter(
            "dependency_probes",
            "Probes of a dependency an order found failing, by what they found (up, down).",
            ["cause", "result"],
            namespace=NAMESPACE,
            registry=reg,
        )
        self.orders_held = Counter(
            "orders_held",
            "Orders handed back to wait without being tried: their dependency was down.",
            ["cause"],
            namespace=NAMESPACE,
            registry=reg,
        )

        self.health_check = Gauge(
            "health_check",
            "1 while a check behind /healthz passes, 0 while it fails (/healthz is then 503).",
            ["check"],
            namespace=NAMESPACE,
            registry=reg,
        )

        # Progress of the orders running on this replica, one series per order (and step):
        # at most max_workers orders at a time, each removed when its order ends. Summed
        # over replicas they give the progress of everything running.
        self.order_units_done = Gauge(
            "order_units_done",
            "Import units (files, folders or converter outputs) a running order has finished"
            " in its current step.",
            ["order_uuid", "step"],
            namespace=NAMESPACE,
            registry=reg,
        )
        self.order_units_total = Gauge(
            "order_units_total",
            "Import units of a running order's current step.",
            ["order_uuid", "step"],
            namespace=NAMESPACE,
            registry=reg,
        )
        self.order_bytes_done = Gauge(
            "order_bytes_done",
            "Bytes a running order has imported (while importing plain files; sizes of"
            " folders are not known).",
            ["order_uuid"],
            namespace=NAMESPACE,
            registry=reg,
        )
        self.order_bytes_total = Gauge(
            "order_bytes_total",
            "Bytes a running order imports (while importing plain files).",
            ["order_uuid"],
            namespace=NAMESPACE,
            registry=reg,
        )
        # The series each running order has, with their children: looked up once per step,
        # not once per progress state, and removed when the order ends (prometheus_client
        # lists none).
        self._progress_units: dict[str, tuple[str, Gauge, Gauge]] = {}
        self._progress_bytes: dict[str, tuple[Gauge, Gauge]] = {}

        # Every labelled child, looked up once here: labels() takes a lock and builds a key
        # on each call, and these are called on every order's path.
        self._finished = {o: self.orders_finished.labels(outcome=o) for o in OUTCOMES}
        self._steps = {step: self.step_duration.labels(step=step) for step in STEPS}
        self._recovered = {o: self.recovered_leases.labels(outcome=o) for o in LEASE_OUTCOMES}
        # keyed by str: the notifier's channel names are plain strings
        self._delivered: dict[str, Counter] = {
            c: self.notifications_delivered.labels(channel=c) for c in NOTIFICATION_CHANNELS
        }
        self._failed: dict[tuple[str, str], Counter] = {
            (c, kind): self.notifications_failed.labels(channel=c, kind=kind)
            for c in NOTIFICATION_CHANNELS
            for kind in NOTIFICATION_FAILURES
        }
        # given up is rare, but its series exist from the start so an alert sees a zero first
        for c in NOTIFICATION_CHANNELS:
            for give_up in NOTIFICATION_GIVE_UPS:
                self.notifications_given_up.labels(channel=c, reason=give_up)
        self._waits = {reason: self.order_waits.labels(reason=reason) for reason in WAIT_REASONS}
        for cause in TRANSIENT_KINDS:
            self.orders_held.labels(cause=cause)
            for result in ("up", "down"):
                self.dependency_probes.labels(cause=cause, result=result)

    def order_finished(self, outcome: Outcome) -> None:
        self._finished[outcome].inc()

    def observe_step(self, step: Step, seconds: float) -> None:
        self._steps[step].observe(seconds)

    def order_progress(self, uuid: str, progress: Progress | None) -> None:
        """Export an order's progress; None (its end) removes its series."""
        units = self._progress_units.get(uuid)
        if units is not None and (progress is None or progress.step != units[0]):
            for gauge in (self.order_units_done, self.order_units_total):
                gauge.remove(uuid, units[0])
            del self._progress_units[uuid]
            units = None
        sizes = self._progress_bytes.get(uuid)
        if sizes is not None and (progress is None or progress.bytes_total is None):
            for gauge in (self.order_bytes_done, self.order_bytes_total):
                gauge.remove(uuid)
            del self._progress_bytes[uuid]
            sizes = None
        if progress is None:
            return
        if units is None:
            units = (
                progress.step,
                self.order_units_done.labels(uuid, progress.step),
                self.order_units_total.labels(uuid, progress.step),
            )
            self._progress_units[uuid] = units
        units[1].set(progress.units_done)
        units[2].set(progress.units_total)
        if progress.bytes_total is not None:
            if sizes is None:
                sizes = (self.order_bytes_done.labels(uuid), self.order_bytes_total.labels(uuid))
                self._progress_bytes[uuid] = sizes
            sizes[0].set(progress.bytes_done or 0)
            sizes[1].set(progress.bytes_total)

    def order_waited(self, reason: WaitReason) -> None:
        self._waits[reason].inc()

    def lease_recovered(self, outcome: LeaseOutcome, count: int = 1) -> None:
        self._recovered[outcome].inc(count)

    def notification_delivered(self, channel: str) -> None:
        child = self._delivered.get(channel)
        (child or self.notifications_delivered.labels(channel=channel)).inc()

    def notification_failed(self, channel: str, kind: NotificationFailure) -> None:
        child = self._failed.get((channel, kind))
        (child or self.notifications_failed.labels(channel=channel, kind=kind)).inc()

    def notification_given_up(self, channel: str, reason: NotificationGiveUp) -> None:
        self.notifications_given_up.labels(channel=channel, reason=reason).inc()

    def set_notification_backlog(self, pending: int, oldest_age_seconds: float) -> None:
        self.notification_backlog.set(pending)
        self.oldest_notification_age.set(oldest_age_seconds if pending else 0.0)

    def follow_health(self, checks: Callable[[], Mapping[str, bool]]) -> None:
        """Export ``checks()`` (the /healthz checks) at every scrape, so the two never differ."""

        def reader(name: str) -> Callable[[], float]:
            return lambda: float(checks()[name])

        for name in HEALTH_CHECKS:
            self.health_check.labels(check=name).set_function(reader(name))

    def set_backlog(self, pending: int, oldest_pending_age_seconds: float | None) -> None:
        """Called by the dispatcher's periodic refresh with numbers read from the database."""
        self.pending_orders.set(pending)
        self.oldest_pending_age.set(oldest_pending_age_seconds or 0.0)


def create_metrics() -> Metrics:
    """The service's metrics, plus process (CPU, memory, fds), Python GC and platform info.

    Those collectors describe the whole process, so only the instance behind a process's
    metrics endpoint should carry them; tests build plain ``Metrics()``.
    """
    metrics = Metrics()
    ProcessCollector(registry=metrics.registry)
    PlatformCollector(registry=metrics.registry)
    GCCollector(registry=metrics.registry)
    return metrics
