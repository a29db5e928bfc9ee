"""Issue 14 acceptance, end to end: paths that reach the importer through zarr metadata and
metadata.csv stay inside what the order may touch (real service, PostgreSQL, files, simulator).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import zarr
from structlog.testing import capture_logs

from tests.support import insert_order, make_settings, make_tiffs, running_service, wait_for_stage

from .conftest import sim_annotations, sim_objects


def _plate(path: Path, well_path: str) -> Path:
    """A zarr v2 NGFF 0.4 plate with one real well ``A/1``; the metadata names ``well_path``."""
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    root.attrs.update(
        {
            "plate": {
                "version": "0.4",
                "name": path.name,
                "rows": [{"name": "A"}],
                "columns": [{"name": "1"}],
                "wells": [{"path": well_path, "rowIndex": 0, "columnIndex": 0}],
            }
        }
    )
    well = root.create_group("A/1")
    well.attrs.update({"well": {"version": "0.4", "images": [{"path": "0"}]}})
    field = well.create_group("0")
    shape = (1, 4, 4)
    field.create_array("0", shape=shape, dtype="uint8", chunks=shape)[...] = np.ones(shape)
    axes = [{"name": n, "type": t} for n, t in (("c", "channel"), ("y", "space"), ("x", "space"))]
    transform = [{"type": "scale", "scale": [1, 1, 1]}]
    multiscale: dict[str, Any] = {
        "version": "0.4",
        "axes": axes,
        "datasets": [{"path": "0", "coordinateTransformations": transform}],
    }
    field.attrs.update({"multiscales": [multiscale]})
    return path


async def test_zarr_plates_naming_paths_outside_the_store_register_nothing(
    migrated_url: str, tmp_path: Path, import_root: Path
) -> None:
    group_b = _plate(tmp_path / "groupB" / "secret.zarr", "A/1")
    absolute = _plate(import_root / "absolute.zarr", f"{group_b}/A/1")
    climbing = _plate(import_root / "climbing.zarr", "../../groupB/secret.zarr/A/1")
    good = _plate(import_root / "good.zarr", "A/1")
    settings = make_settings(tmp_path, migrated_url, [import_root], use_register_zarr=True)
    async with running_service(settings, migrated_url):
        orders = [
            await insert_order(
                migrated_url, [store], destination_type="Screen", destination_id="52"
            )
            for store in (absolute, climbing, good)
        ]
        rows = await asyncio.gather(*(wait_for_stage(migrated_url, o, timeout=30) for o in orders))
    entries = (f"{group_b}/A/1", "../../groupB/secret.zarr/A/1")
    for row, entry in zip(rows[:2], entries, strict=True):
        assert row["stage"] == "Import Failed"
        assert "plate" in row["description"] and entry in row["description"]
        assert sim_objects(settings.simulator_dir, row["uuid"]) == []
    # The same plate with its own well registers: the refusal is about the path alone.
    assert rows[2]["stage"] == "Import Completed"
    assert [o.type for o in sim_objects(settings.simulator_dir, rows[2]["uuid"])] == ["Plate"]


async def test_metadata_csv_linked_to_another_groups_csv_is_skipped(
    migrated_url: str, tmp_path: Path, import_root: Path
) -> None:
    other = tmp_path / "groupB"
    other.mkdir()
    (other / "metadata.csv").write_text("patient,Jane Doe\n")
    files = make_tiffs(import_root / "mine", 1)
    (import_root / "mine" / "metadata.csv").symlink_to(other / "metadata.csv")
    settings = make_settings(tmp_path, migrated_url, [import_root])
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as events:
        async with running_service(settings, migrated_url):
            order = await insert_order(migrated_url, files)
            row = await wait_for_stage(migrated_url, order, timeout=30)
    assert row["stage"] == "Import Completed"
    link = import_root / "mine" / "metadata.csv"
    assert row["description"] == f"skipped metadata.csv links outside the import roots: {link}"
    (image,) = sim_objects(settings.simulator_dir, order)
    (annotation,) = sim_annotations(settings.simulator_dir, image)
    assert not [key for key in annotation if key.startswith("csv_")]
    assert "Jane Doe" not in json.dumps(annotation)
    # The order's log: the warning carries the order's uuid and the reason.
    (skipped,) = [e for e in events if e["event"] == "metadata_csv_skipped"]
    assert (skipped["log_level"], skipped["order_uuid"]) == ("warning", order)
    assert skipped["file"] == str(link) and "links outside the import roots" in skipped["reason"]
