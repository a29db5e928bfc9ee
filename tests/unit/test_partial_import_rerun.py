"""A partly imported folder is not a finished unit (issue 19, item 6).

Without ``-c`` the importer stops after the first failed fileset (exit 2) with the filesets
before it committed. Before, a re-run found those objects by the order's comment, took the
folder as "found in OMERO" and completed the order without the failed and untried files.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from biomero_importer.model import STAGE_IMPORTED, STAGE_INGEST_FAILED
from biomero_importer.store import MemoryStore
from tests.support import make_tiffs
from tests.unit.conftest import finished, memory_replica, order, unit_settings

pytestmark = pytest.mark.unit


def _objects(settings: Any, uuid: str) -> list[str]:
    db = sqlite3.connect(settings.simulator_dir / "omero.sqlite")
    try:
        rows = db.execute(
            "SELECT client_path FROM objects WHERE order_uuid = ? ORDER BY id", (uuid,)
        ).fetchall()
    finally:
        db.close()
    return [row[0] for row in rows]


async def test_a_retried_partly_imported_folder_imports_what_is_missing_once(
    tmp_path: Path, root: Path
) -> None:
    folder = root / "run"
    a, b, c = make_tiffs(folder, 3)
    bad = b.rename(b.with_name("image1-bad.tif"))
    failing = unit_settings(
        tmp_path, root, omero_simulator_fail_pattern="bad", omero_simulator_failure="partial"
    )
    store = MemoryStore(worker_id=failing.worker_id, lease_seconds=failing.lease_seconds)
    placed = order([folder])
    async with memory_replica(failing, store):
        await store.submit(placed)
        stage, description = await finished(store, placed.uuid)
    assert stage == STAGE_INGEST_FAILED and "image1-bad.tif" in (description or "")
    # committed before the failure: only the first file's image
    assert _objects(failing, placed.uuid) == [str(a)]

    fixed = unit_settings(tmp_path, root)
    store = MemoryStore(worker_id=fixed.worker_id, lease_seconds=fixed.lease_seconds, shared=store)
    async with memory_replica(fixed, store):
        await store.retry(placed.uuid, "retry")
        stage, description = await finished(store, placed.uuid)
        detail = await store.order_detail(placed.uuid)
    assert (stage, description) == (STAGE_IMPORTED, None)
    # every file once: the committed one not again, the failed and the untried ones now
    assert Counter(_objects(fixed, placed.uuid)) == {str(a): 1, str(bad): 1, str(c): 1}
    assert detail is not None
    assert Counter(r["client_path"] for r in detail.objects) == {str(a): 1, str(bad): 1, str(c): 1}
    assert all(r["unit_complete"] for r in detail.objects)
