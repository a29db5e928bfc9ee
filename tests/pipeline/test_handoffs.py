"""Thread hand-offs per order (issue 22, item 3), counted on the real pipeline: each job handed
to the storage or the OMERO executor, with the real executors underneath."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from pathlib import Path
from typing import Any

import pytest

from biomero_importer import paths
from biomero_importer.model import STAGE_IMPORTED, STAGE_INGEST_FAILED
from biomero_importer.omero.simulator import SimulatorGateway
from biomero_importer.store import MemoryStore
from tests.support import make_tiffs
from tests.unit.conftest import finished, memory_replica, order, unit_settings

pytestmark = pytest.mark.unit


class Counting(Executor):
    """Hands every job to ``inner`` and counts it."""

    def __init__(self, inner: Executor) -> None:
        self.inner = inner
        self.jobs = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.jobs += 1
        return self.inner.submit(fn, *args, **kwargs)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    return folder


@pytest.mark.parametrize("backend", ["simulator", "null"])
@pytest.mark.parametrize("settle", [0.0, 0.05])
async def test_a_one_file_order_is_one_storage_job_and_one_omero_job_per_run(
    tmp_path: Path, root: Path, backend: str, settle: float
) -> None:
    """Before: 7 hand-offs (validate; open session, re-check, import, read metadata.csv,
    annotate, close), 8 with settle."""
    (file,) = make_tiffs(root / "run", 1)
    settings = unit_settings(
        tmp_path, root, omero_backend=backend, settle_seconds=settle, poll_interval=60.0
    )
    store = MemoryStore(worker_id=settings.worker_id, lease_seconds=settings.lease_seconds)
    placed = order([file])
    async with memory_replica(settings, store) as (service, _):
        pipeline = service.dispatcher.pipeline
        storage, omero = Counting(pipeline.storage), Counting(pipeline.executor)
        pipeline.storage, pipeline.executor = storage, omero
        await store.submit(placed)
        assert await finished(store, placed.uuid) == (STAGE_IMPORTED, None)
        runs = len(
            [e for e in await store.order_events(placed.uuid) if e.stage == "Import Started"]
        )
    # with settle, a first run looks and waits; the second looks again and imports
    assert runs == (2 if settle else 1)
    assert (storage.jobs, omero.jobs) == (runs, 1)


async def test_an_order_opens_one_session_while_it_lasts(tmp_path: Path, root: Path) -> None:
    """Before: sessions are opened with a time-to-live of exactly import_timeout plus the
    margin the pipeline asks of a session before each import, so the session just opened
    was closed and replaced before the first import (with the default settings too)."""
    files = make_tiffs(root / "run", 3)
    settings = unit_settings(tmp_path, root, poll_interval=60.0)
    store = MemoryStore(worker_id=settings.worker_id, lease_seconds=settings.lease_seconds)
    placed = order(files)
    async with memory_replica(settings, store) as (service, _):
        gateway = service.gateway
        opened = []
        opening = gateway.open_session

        def counted(*args: Any, **kwargs: Any) -> Any:
            opened.append(args)
            return opening(*args, **kwargs)

        gateway.open_session = counted  # type: ignore[method-assign]
        await store.submit(placed)
        assert await finished(store, placed.uuid) == (STAGE_IMPORTED, None)
    assert len(opened) == 1


async def test_a_cancel_stops_a_one_job_import_within_a_second(tmp_path: Path, root: Path) -> None:
    """The one executor job still hears a cancel: the running import is aborted, the session
    closed, and the order ends 'Cancelled' within a second."""
    (file,) = make_tiffs(root / "run", 1)
    settings = unit_settings(tmp_path, root, omero_simulator_import_delay=30.0)
    store = MemoryStore(worker_id=settings.worker_id, lease_seconds=settings.lease_seconds)
    placed = order([file])
    async with memory_replica(settings, store) as (service, _):
        gateway = service.gateway
        assert isinstance(gateway, SimulatorGateway)
        await store.submit(placed)
        deadline = time.monotonic() + 10
        while not gateway.open_sessions:  # the import is running
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        asked = time.monotonic()
        await store.request_cancel(placed.uuid)
        assert await finished(store, placed.uuid) == (STAGE_INGEST_FAILED, "Cancelled")
        took = time.monotonic() - asked
        assert gateway.open_sessions == set()
    assert took < 1.0


@pytest.mark.parametrize("settle", [0.0, 0.05])
async def test_a_one_file_order_resolves_its_file_once_unless_it_settled_between(
    tmp_path: Path, root: Path, settle: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: resolved and walked twice in the same storage job, validation then the
    re-check, with nothing between them. After a settle look (which takes time) the re-check
    before use stays."""
    (file,) = make_tiffs(root / "run", 1)
    settings = unit_settings(
        tmp_path, root, omero_backend="null", settle_seconds=settle, poll_interval=60.0
    )
    resolved: list[Path] = []
    contained = paths.contained

    def counted(path: Path, *args: Any, **kwargs: Any) -> Path:
        resolved.append(path)
        return contained(path, *args, **kwargs)

    monkeypatch.setattr(paths, "contained", counted)
    store = MemoryStore(worker_id=settings.worker_id, lease_seconds=settings.lease_seconds)
    placed = order([file])
    async with memory_replica(settings, store):
        await store.submit(placed)
        assert await finished(store, placed.uuid) == (STAGE_IMPORTED, None)
    # with settle: a first run validates and looks; the second validates, looks, re-checks
    assert resolved == ([file] * 3 if settle else [file])
