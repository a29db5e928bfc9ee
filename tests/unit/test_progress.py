"""Progress of running orders: the reporter's rate of writes, its final states, its end; and a
real replica (memory store, simulator) recording progress that status and /metrics show."""

from __future__ import annotations

import asyncio
import gc
import itertools
from pathlib import Path
from typing import Any

import pytest
import structlog

from biomero_importer.model import STAGE_IMPORTED, Progress
from biomero_importer.observability.metrics import Metrics
from biomero_importer.pipeline import progress
from biomero_importer.pipeline.progress import ProgressReporter
from biomero_importer.store import MemoryStore
from tests.support import make_tiffs
from tests.unit.conftest import finished, memory_replica, order, unit_settings

pytestmark = pytest.mark.unit


class Sink:
    """Records every write with the event loop's time; ``pause`` makes each write slow."""

    def __init__(self, pause: float = 0.0, fail: bool = False) -> None:
        self.writes: list[tuple[float, Progress]] = []
        self.pause = pause
        self.fail = fail

    async def record_progress(self, uuid: str, progress: Progress, *, run: int) -> bool:
        if self.pause:
            await asyncio.sleep(self.pause)
        if self.fail:
            raise RuntimeError("the sink is broken")
        self.writes.append((asyncio.get_running_loop().time(), progress))
        return True

    async def until(self, wanted: Progress, timeout: float = 5.0) -> None:
        """Wait until ``wanted`` was written (a bound for a hung writer, not a speed check)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while wanted not in [p for _, p in self.writes]:
            assert asyncio.get_running_loop().time() < deadline, (wanted, self.writes[-3:])
            await asyncio.sleep(0.005)


async def test_a_stream_of_updates_is_written_at_most_once_per_interval() -> None:
    sink = Sink()
    reporter = ProgressReporter("o", sink, run=1, interval=0.05, delay=0)
    reporter.start()
    # 250 updates a millisecond or more apart: at least five intervals of them
    reporter.start_step("import", 250)
    for done in range(250):
        reporter.advance(units_done=done, current_file=f"image{done}.tif")
        await asyncio.sleep(0.001)  # an import unit
    reporter.advance(units_done=250)
    reporter.end_step()
    await sink.until(Progress("import", 250, 250))
    await reporter.stop()
    steps = [p for _, p in sink.writes]
    # the first state of the step is written at once (with what came before the writer ran),
    # the last one too
    assert (steps[0].step, steps[0].units_done, steps[0].units_total) == ("import", 0, 250)
    assert steps[-1] == Progress("import", 250, 250)
    # in between, the writes are an interval apart: 250 updates, a handful of rows
    between = [t for t, p in sink.writes if p.current_file is not None]
    gaps = [b - a for a, b in itertools.pairwise(between)]
    assert all(gap >= 0.05 - 1e-3 for gap in gaps), gaps
    assert 1 < len(sink.writes) < 100


async def test_a_steps_first_and_last_state_do_not_wait_for_the_interval() -> None:
    sink = Sink()
    # an interval longer than the test: only the first/last rule can get these written
    reporter = ProgressReporter("o", sink, run=1, interval=600, delay=0)
    reporter.start()
    reporter.start_step("import", 2)
    await sink.until(Progress("import", 0, 2))
    reporter.advance(units_done=1, current_file="b.tif")
    reporter.advance(units_done=2)
    reporter.end_step()
    await sink.until(Progress("import", 2, 2))
    reporter.start_step("annotate", 2)
    await sink.until(Progress("annotate", 0, 2))
    await reporter.stop()
    # the state in the middle fell within the interval and was never written
    assert Progress("import", 1, 2, "b.tif") not in [p for _, p in sink.writes]


async def test_an_order_that_ends_within_the_delay_writes_nothing() -> None:
    """Most orders take milliseconds: they cost no write, no task and no metric series."""
    seen: list[Progress | None] = []
    sink = Sink()
    reporter = ProgressReporter("o", sink, run=1, interval=0, delay=600, observe=seen.append)
    reporter.start()
    reporter.start_step("validate")
    reporter.start_step("import", 1)
    reporter.end_step()
    await asyncio.sleep(0.05)
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("progress-")]
    await reporter.stop()
    assert sink.writes == []
    assert seen == []


async def test_a_slow_database_merges_states_and_never_holds_up_the_order() -> None:
    # each write takes 0.1 s: the 500 updates (a few ms) all come while the first is written
    sink = Sink(pause=0.1)
    reporter = ProgressReporter("o", sink, run=1, interval=0, delay=0)
    reporter.start()
    reporter.start_step("import", 500)
    for done in range(500):
        reporter.advance(units_done=done)  # plain calls: nothing here waits for the sink
        await asyncio.sleep(0)
    reporter.advance(units_done=500)
    reporter.end_step()
    await sink.until(Progress("import", 500, 500))
    await reporter.stop()
    assert len(sink.writes) < 10


async def test_stop_ends_the_writer_and_forgets_the_order() -> None:
    """A cancelled order stops its writer, even in the middle of a write: no task is left."""
    seen: list[Progress | None] = []
    sink = Sink(pause=600)
    reporter = ProgressReporter("o", sink, run=1, interval=0, delay=0, observe=seen.append)
    reporter.start()
    reporter.start_step("import", 3)
    await asyncio.sleep(0.01)  # the write is in flight now
    await reporter.stop()
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("progress-")]
    assert seen == [Progress("import", 0, 3), None]


class Stubborn:
    """A database call that, once cancelled, waits on something only it knows about (as a
    pooled connection being reset does) before it ends."""

    async def record_progress(self, uuid: str, progress: Progress, *, run: int) -> bool:
        try:
            await asyncio.sleep(600)
        except asyncio.CancelledError:
            await asyncio.get_running_loop().create_future()
        return False


async def test_a_writer_slow_to_stop_is_kept_until_it_ends() -> None:
    """Before: the ending order dropped its writer after the wait, and the event loop
    destroyed it half way ("Task was destroyed but it is pending!", logged as an error)."""
    loop = asyncio.get_running_loop()
    faults: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: faults.append(context))
    try:
        reporter = ProgressReporter(
            "stubborn", Stubborn(), run=1, interval=0, delay=0, stop_wait=0.05
        )
        reporter.start()
        reporter.start_step("import", 1)
        await asyncio.sleep(0.01)  # the write is in flight
        with structlog.testing.capture_logs() as logs:
            await reporter.stop()
        del reporter
        gc.collect()
        assert faults == []
        assert [e["event"] for e in logs] == ["progress_writer_still_stopping"]
        (lingering,) = progress._stopping
        assert not lingering.done()
        lingering.cancel()  # its database call ends: the writer ends and is forgotten
        await asyncio.wait([lingering], timeout=5)
        assert lingering.cancelled() and not progress._stopping
    finally:
        loop.set_exception_handler(None)


async def test_a_sink_that_raises_is_logged_once_and_the_order_goes_on() -> None:
    sink = Sink(fail=True)
    reporter = ProgressReporter("o", sink, run=1, interval=0, delay=0)
    reporter.start()
    with structlog.testing.capture_logs() as logs:
        for done in range(5):
            reporter.start_step("import", 5)
            reporter.advance(units_done=done)
            await asyncio.sleep(0.01)
        await reporter.stop()
    assert [e["event"] for e in logs] == ["progress_write_failed"]


def _series(metrics: Metrics, uuid: str) -> dict[str, float]:
    """The progress samples of one order on /metrics."""
    return {
        f"{sample.name}{{{sample.labels.get('step', '')}}}": sample.value
        for family in metrics.registry.collect()
        for sample in family.samples
        if sample.labels.get("order_uuid") == uuid
    }


def test_metrics_follow_an_orders_progress_and_forget_it_at_the_end() -> None:
    metrics = Metrics()
    metrics.order_progress("o", Progress("import", 12, 50, "a.tif", 100, 400))
    assert _series(metrics, "o") == {
        "biomero_importer_order_units_done{import}": 12,
        "biomero_importer_order_units_total{import}": 50,
        "biomero_importer_order_bytes_done{}": 100,
        "biomero_importer_order_bytes_total{}": 400,
    }
    # the next step replaces the series of the last one; its bytes are not known
    metrics.order_progress("o", Progress("annotate", 1, 50))
    assert _series(metrics, "o") == {
        "biomero_importer_order_units_done{annotate}": 1,
        "biomero_importer_order_units_total{annotate}": 50,
    }
    metrics.order_progress("o", None)
    assert _series(metrics, "o") == {}
    metrics.order_progress("o", None)  # twice is harmless


async def test_a_running_order_shows_its_progress_in_status_and_metrics(
    tmp_path: Path, root: Path
) -> None:
    """A real replica (memory store, simulator taking 20 ms per file): status reads 'import
    N/20' while the order runs, /metrics has its series, and both are gone at the end."""
    files = make_tiffs(root / "slow", 20)
    settings = unit_settings(tmp_path, root, omero_simulator_import_delay=0.02)
    store = MemoryStore(worker_id=settings.worker_id, lease_seconds=settings.lease_seconds)
    async with memory_replica(settings, store) as (service, _):
        # progress first written after 0.1 s, not the 0.5 s a service waits: the 0.4 s
        # import is then seen half way, as a 1 s one was
        service.dispatcher.pipeline.progress_delay = 0.1
        slow = order(files)
        await store.submit(slow)
        seen: list[Progress] = []
        series: dict[str, float] = {}
        while not (seen and 0 < seen[-1].units_done < 20 and series):
            (summary,) = await store.list_orders()
            assert summary.stage != STAGE_IMPORTED, f"never saw progress: {seen}"
            if summary.progress is not None and summary.progress.step == "import":
                seen.append(summary.progress)
                series = _series(service.metrics, slow.uuid)
            await asyncio.sleep(0.02)
        middle = seen[-1]
        assert middle.units_total == 20
        assert middle.current_file is not None and middle.current_file.startswith("image")
        total = sum(f.stat().st_size for f in files)
        assert middle.bytes_total == total
        assert middle.bytes_done is not None and 0 < middle.bytes_done < total
        assert series["biomero_importer_order_units_total{import}"] == 20
        assert await finished(store, slow.uuid) == (STAGE_IMPORTED, None)
        (summary,) = await store.list_orders()
        assert summary.progress is None
        assert _series(service.metrics, slow.uuid) == {}
