"""``storage_timeout`` is a hang detector: a storage job that goes on from path to path (one
job now validates, looks and re-checks a large folder) is answered; one stuck on a path is not."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from biomero_importer.omero.null import NullGateway
from biomero_importer.pipeline.runner import Pipeline, _PathWatch
from biomero_importer.pipeline.storage import StorageTimeout
from tests.unit.conftest import unit_settings

pytestmark = pytest.mark.unit


class NoSink:
    async def append_stage(
        self, uuid: str, stage: str, description: str | None = None, *, run: int
    ) -> bool:
        return True

    async def record_objects(self, uuid: str, objects: list[dict[str, Any]], *, run: int) -> None:
        return None

    async def record_progress(self, uuid: str, progress: Any, *, run: int) -> bool:
        return True


def pipeline(tmp_path: Path, pool: ThreadPoolExecutor) -> Pipeline:
    root = tmp_path / "data"
    root.mkdir()
    settings = unit_settings(tmp_path, root, omero_backend="null", storage_timeout=0.1)
    return Pipeline(settings, NullGateway(settings), pool, NoSink(), storage=pool)


async def test_a_job_that_moves_on_outlives_the_timeout_and_a_stuck_one_does_not(
    tmp_path: Path,
) -> None:
    with ThreadPoolExecutor(2) as pool:
        pipe = pipeline(tmp_path, pool)
        watch = _PathWatch("/data/start")

        def walking() -> str:
            for n in range(12):  # 0.36 s in all, never 0.1 s on one path
                watch(f"/data/entry{n}")
                time.sleep(0.03)
            return "done"

        started = time.monotonic()
        assert await pipe._storage(watch, walking) == "done"
        assert time.monotonic() - started > 0.3

        stuck = _PathWatch("/data/stuck")
        with pytest.raises(StorageTimeout) as info:
            await pipe._storage(stuck, lambda: time.sleep(0.3))
        assert info.value.reason == "Storage did not answer within 0.1 s: /data/stuck"
