"""The unit tier: a real dispatcher, pipeline and simulator around the in-memory store.

No PostgreSQL: ``pytest -m unit`` runs these (and the other unit-marked tests) in seconds.
"""

from __future__ import annotations

import asyncio
import json
import uuid as uuidlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from biomero_importer.dispatcher.supervisor import Supervisor
from biomero_importer.model import TERMINAL_STAGES, NewOrder
from biomero_importer.observability.health import HealthState
from biomero_importer.observability.metrics import Metrics
from biomero_importer.service import Service, assemble
from biomero_importer.settings import Settings
from biomero_importer.store import MemoryStore
from tests.support import make_settings

pytestmark = pytest.mark.unit

UNUSED_DB = "postgresql://unused@127.0.0.1:1/none"  # the memory store never connects


def unit_settings(tmp_path: Path, root: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"lease_seconds": 1.0, "poll_interval": 0.05, "max_attempts": 2}
    values.update(overrides)
    return make_settings(tmp_path, UNUSED_DB, [root], **values)


@asynccontextmanager
async def memory_replica(
    settings: Settings, store: MemoryStore | None = None, supervisor: Supervisor | None = None
) -> AsyncIterator[tuple[Service, asyncio.Task[None]]]:
    store = store or MemoryStore(worker_id=settings.worker_id, lease_seconds=settings.lease_seconds)
    await store.open()
    async with assemble(settings, store, Metrics(), HealthState(migrated=True)) as service:
        if supervisor is not None:
            service.dispatcher.supervisor = supervisor
        task = asyncio.create_task(service.dispatcher.run(), name="dispatcher")
        try:
            yield service, task
        finally:
            service.dispatcher.request_stop()
            await asyncio.wait_for(task, timeout=settings.shutdown_timeout + 10)


def order(files: Sequence[str | Path], **kw: Any) -> NewOrder:
    return NewOrder(
        uuid=kw.get("uuid", str(uuidlib.uuid4())),
        group=kw.get("group", "Demo"),
        user=kw.get("user", "researcher"),
        destination_type=kw.get("destination_type", "Dataset"),
        destination_id=kw.get("destination_id", "151"),
        files=kw.get("files_text", json.dumps([str(f) for f in files])),
    )


async def finished(store: MemoryStore, uuid: str, timeout: float = 10.0) -> tuple[str, str | None]:
    """(stage, description) once the order is finished."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        # order_state, not order_detail: the detail deep-copies the order's ledger, 0.1 s of
        # the event loop for 2000 objects, at every poll, slowing the order it waits for
        state = await store.order_state(uuid)
        if state is not None and state.stage in TERMINAL_STAGES:
            detail = await store.order_detail(uuid)
            assert detail is not None
            return detail.summary.stage, detail.summary.description
        if asyncio.get_running_loop().time() > deadline:
            stage = state.stage if state else None
            raise AssertionError(f"order {uuid} not finished in {timeout}s (at {stage})")
        await asyncio.sleep(0.01)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    return folder
