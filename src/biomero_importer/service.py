"""The running service: database, migrations, OMERO gateway, dispatcher, signals."""

from __future__ import annotations

import asyncio
import gc
import signal
import sys
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import structlog
from sqlalchemy.exc import OperationalError

from biomero_importer import cpus
from biomero_importer.db.embedded import EmbeddedPostgres
from biomero_importer.db.migrate import is_at_head, migrate
from biomero_importer.db.urls import asyncpg_dsn
from biomero_importer.dispatcher.causes import Causes
from biomero_importer.dispatcher.dispatcher import Dispatcher, RetryPolicy
from biomero_importer.dispatcher.listener import Listener
from biomero_importer.dispatcher.probes import default_probes
from biomero_importer.notify import Notifier
from biomero_importer.observability.health import HealthState, start_http_server
from biomero_importer.observability.logging import Redactor
from biomero_importer.observability.metrics import Metrics, create_metrics
from biomero_importer.omero import create_gateway
from biomero_importer.omero.port import OmeroGateway
from biomero_importer.pipeline.runner import Pipeline
from biomero_importer.preprocessing import allowlist_warning
from biomero_importer.settings import Settings
from biomero_importer.store import OrderStore, PostgresStore

log = structlog.get_logger(__name__)


# objects allocated and not yet freed before the collector looks at the young generation
SERVING_GC_THRESHOLD = 10_000


class StartupError(Exception):
    """The service cannot start; the message says what to fix."""


@contextmanager
def database(settings: Settings) -> Iterator[str]:
    """The configured database URL, or an embedded server's for as long as the block runs."""
    if settings.ingest_tracking_db is not None:
        yield settings.ingest_tracking_db
        return
    embedded = EmbeddedPostgres(settings.embedded_db_dir)
    url = embedded.start()
    try:
        yield url
    finally:
        embedded.stop()


def run_event_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run the service on uvloop where it is installed: the dispatcher's per-order overhead is
    mostly event-loop work, which uvloop does in C."""
    # The event loop shares the GIL with executor threads running blocking OMERO calls; a
    # shorter switch interval keeps a busy thread from delaying a claim by up to 5 ms.
    sys.setswitchinterval(0.001)
    # Every running order holds objects until it ends (its task, futures, rows). With the
    # default young-generation threshold (700) the collector ran every dozen orders, walking
    # them, and every full collection walked the ~100,000 objects start-up leaves: 0.13 ms of
    # CPU per order (docs/performance.md). Start-up's objects are left out of collections
    # and the young generation waits for 10,000 objects; reference counting still frees all
    # that is not a cycle at once, so memory does not grow.
    threshold, frozen = gc.get_threshold(), gc.get_freeze_count()
    gc.freeze()
    gc.set_threshold(SERVING_GC_THRESHOLD, *threshold[1:])
    try:
        try:
            import uvloop  # noqa: PLC0415 - optional speed-up, absent on some platforms
        except ImportError:
            asyncio.run(main)
        else:
            uvloop.run(main)
    finally:
        gc.set_threshold(*threshold)
        if not frozen:  # what others froze stays frozen: gc cannot thaw only ours
            gc.unfreeze()


def prepare_schema(settings: Settings, url: str, *, force: bool = False, wait: float = 0.0) -> None:
    """Migrate (when enabled, or ``force``) or check the schema. ``run`` waits (``wait``
    seconds) for a database that is still starting, as it often is when a compose stack comes
    up; one-off commands report an unreachable database at once."""
    delay, waited = 0.5, 0.0
    while True:
        try:
            if settings.run_migrations or force:
                migrate(url, channel=settings.notify_channel)
                return
            at_head, current = is_at_head(url)
            break
        except OperationalError as exc:
            if waited >= wait:
                reason = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
                raise StartupError(
                    f"cannot reach the database ({settings.masked_db_url()}): {reason}"
                ) from None
            log.warning("database_unavailable", during="startup", retry_in=delay)
            time.sleep(delay)
            waited += delay
            delay = min(delay * 2, 5.0)
    if not at_head:
        raise StartupError(
            f"database schema is at revision {current}, not at head, and migrations are off"
            " (ADI_RUN_MIGRATIONS=0): run 'biomero-importer migrate' first"
        )


@dataclass
class Service:
    settings: Settings
    url: str
    gateway: OmeroGateway
    store: OrderStore
    dispatcher: Dispatcher
    executor: ThreadPoolExecutor
    metrics: Metrics
    health: HealthState
    reconnects_counted: int = 0
    notifier: Notifier | None = None


@asynccontextmanager
async def open_service(
    settings: Settings, url: str, metrics: Metrics | None = None
) -> AsyncIterator[Service]:
    """Everything a replica needs, opened in order and closed in reverse."""
    metrics = metrics or Metrics()
    health = HealthState(migrated=True)
    store = PostgresStore(
        asyncpg_dsn(url),
        worker_id=settings.worker_id,
        lease_seconds=settings.lease_seconds,
        pool_size=settings.db_pool_size,
        max_running_per_user=settings.max_running_per_user,
    )
    await store.open()
    async with assemble(settings, store, metrics, health) as service:
        service.url = url
        listener = Listener(
            asyncpg_dsn(url),
            settings.notify_channel,
            on_pending=service.dispatcher.notify_pending,
            on_cancel=service.dispatcher.notify_cancel,
            on_reconnect=service.dispatcher.wake,
        )
        service.dispatcher.listener = listener
        yield service


@asynccontextmanager
async def assemble(
    settings: Settings, store: OrderStore, metrics: Metrics, health: HealthState
) -> AsyncIterator[Service]:
    """A replica around any order store (PostgreSQL, or memory for the unit tier); the store
    is closed, within a bound, when the block ends."""
    metrics.follow_health(health.liveness)
    gateway = create_gateway(settings)
    executor = ThreadPoolExecutor(
        max_workers=settings.omero_threads,
        thread_name_prefix="omero",
        initializer=cpus.pool_thread_joins,
    )
    # Storage calls get their own threads: a hung mount must not starve OMERO calls.
    storage = ThreadPoolExecutor(
        max_workers=STORAGE_THREADS,
        thread_name_prefix="storage",
        initializer=cpus.pool_thread_joins,
    )
    pipeline = Pipeline(
        settings,
        gateway,
        executor,
        store,
        metrics.observe_step,
        storage=storage,
        observe_progress=metrics.order_progress,
    )
    dispatcher = Dispatcher(
        store=store,
        pipeline=pipeline,
        listener=None,
        max_workers=settings.max_workers,
        poll_interval=settings.poll_interval,
        lease_seconds=settings.lease_seconds,
        max_attempts=settings.max_attempts,
        shutdown_timeout=settings.shutdown_timeout,
        metrics=metrics,
        health=health,
        retry_policy=RetryPolicy(
            settings.transient_retries, settings.transient_backoff, settings.transient_backoff_max
        ),
    )
    dispatcher.causes = Causes(
        default_probes(settings, gateway, executor, storage),
        wake_waiting=store.wake_waiting,
        on_wake=dispatcher.wake,
        metrics=metrics,
        health=health,
        backoff=settings.dependency_probe_backoff,
        backoff_max=settings.dependency_probe_backoff_max,
    )
    service = Service(settings, "", gateway, store, dispatcher, executor, metrics, health)
    dispatcher.helpers["health"] = partial(watch_health, service)
    dispatcher.helpers["loop-lag"] = partial(watch_loop_lag, metrics)
    # outcomes are queued by the database whatever the settings, owing the channels the
    # replicas recorded: recorded before the first claim, so no outcome of this replica is
    # queued without its channels (with none anywhere, outcomes are done at once)
    service.notifier = Notifier(settings, store, gateway, metrics)
    dispatcher.helpers["notifications"] = service.notifier.run
    try:
        await service.notifier.record_channels()
        yield service
    finally:
        await store.close(timeout=CLOSE_TIMEOUT)
        service.notifier.close()
        executor.shutdown(wait=False, cancel_futures=True)
        storage.shutdown(wait=False, cancel_futures=True)
        gateway.close()


async def serve(settings: Settings, url: str) -> None:
    """Run until SIGTERM/SIGINT; a second signal skips the grace period."""
    warning = allowlist_warning(settings)
    if warning:
        log.warning("containers_not_restricted", message=warning)
    # before any of the replica's threads exists: each inherits the CPU
    cpu = cpus.pin_threads() if settings.one_cpu else None
    try:
        await _serve(settings, url, cpu)
    finally:
        cpus.unpin_threads()


async def _serve(settings: Settings, url: str, cpu: int | None) -> None:
    async with open_service(settings, url, create_metrics()) as service:
        server = None
        if settings.metrics_port is not None:
            server = await start_http_server(
                settings.metrics_host,
                settings.metrics_port,
                service.metrics,
                service.health,
                redact=Redactor.from_settings(settings),
            )
            log.info("http_listening", host=server.host, port=server.port)
        loop = asyncio.get_running_loop()
        signals = 0

        def on_signal(signum: int) -> None:
            nonlocal signals
            signals += 1
            if signals == 1:
                log.info("shutdown_requested", signal=signal.Signals(signum).name)
                service.dispatcher.request_stop()
            else:
                log.warning("shutdown_forced", signal=signal.Signals(signum).name)
                service.dispatcher.stop_now()

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)
        log.info(
            "importer_ready",
            worker_id=settings.worker_id,
            database=settings.masked_db_url(),
            omero=service.gateway.describe(),
            cpu=cpu,
        )
        try:
            await service.dispatcher.run()
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            if server is not None:
                await server.close()


HEALTH_INTERVAL = 2.0
LAG_INTERVAL = 0.5
STORAGE_THREADS = 16
# store.close waits this long twice at most (queued writes, then the pool): with the
# dispatcher's two hand-back graces of 3 s, SIGTERM ends within shutdown_timeout + 10 s.
CLOSE_TIMEOUT = 1.5


async def watch_loop_lag(metrics: Metrics) -> None:
    """How late a timer fires: blocking work on the event loop shows here first."""
    while True:
        start = time.perf_counter()
        await asyncio.sleep(LAG_INTERVAL)
        metrics.event_loop_lag.set(max(0.0, time.perf_counter() - start - LAG_INTERVAL))


async def watch_health(service: Service) -> None:
    """Keep /healthz, the backlog gauges and the reconnect counter current."""
    health, metrics = service.health, service.metrics
    while True:
        listener = service.dispatcher.listener
        health.db_ok = await service.store.ping()
        health.last_db_error = None if health.db_ok else "database unreachable"
        health.listener_connected = listener is None or listener.connected
        if listener is not None:
            # counted on the service, so a restarted watcher does not count them twice
            metrics.listener_reconnects.inc(listener.reconnects - service.reconnects_counted)
            service.reconnects_counted = listener.reconnects
        stats = await service.store.queue_stats() if health.db_ok else None
        if stats is not None:
            pending, oldest = stats
            metrics.set_backlog(pending, oldest if pending else None)
        # Look again soon while the listener is (re)connecting, so /healthz turns healthy
        # as soon as it is, not up to an interval later.
        listening = listener is None or listener.connected
        await asyncio.sleep(HEALTH_INTERVAL if listening else 0.1)
