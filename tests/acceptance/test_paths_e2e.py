"""Issue 14 acceptance, end to end: paths that reach the importer through zarr metadata and
metadata.csv stay inside what the order may touch (real service, PostgreSQL, files, simulator).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog
import zarr
from structlog.testing import capture_logs

from biomero_importer.settings import Settings
from tests.podman_support import container_running
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


async def test_a_file_swapped_while_the_order_waits_for_its_import_is_not_imported(
    migrated_url: str, tmp_path: Path, import_root: Path
) -> None:
    """The first file's import takes 2 s; meanwhile the second becomes a link out of the
    roots. The check right before the second import fails the order."""
    secret = make_tiffs(tmp_path / "groupB", 1, prefix="secret")[0]
    first, second = make_tiffs(import_root / "mine", 2)
    settings = make_settings(
        tmp_path, migrated_url, [import_root], omero_simulator_import_delay=2.0
    )
    async with running_service(settings, migrated_url) as service:
        order = await insert_order(migrated_url, [first, second])
        await wait_for_stage(migrated_url, order, ("Import Started",), timeout=30)
        # 'Import Started' is written at the claim, before validation: swap only once the
        # order was validated (its first import then runs for 2 s), and atomically
        validated = "biomero_importer_step_duration_seconds_count"
        for _ in range(1000):
            if service.metrics.registry.get_sample_value(validated, {"step": "validate"}):
                break
            await asyncio.sleep(0.01)
        link = second.with_name("swap.tmp")
        link.symlink_to(secret)
        os.replace(link, second)
        row = await wait_for_stage(migrated_url, order, timeout=30)
    assert row["stage"] == "Import Failed"
    assert row["description"] == f"Files changed while the order waited: {second}"
    imported = [o.client_path for o in sim_objects(settings.simulator_dir, order)]
    assert imported == [str(first)]


async def _preprocessed(
    podman_image: str, migrated_url: str, tmp_path: Path, files: list[Path], mode: str
) -> tuple[Settings, str, asyncio.Task[Any]]:
    settings = make_settings(
        tmp_path,
        migrated_url,
        [files[0].parent.parent],
        poll_interval=0.5,
        allowed_containers=["localhost/biomero-test-converter:*"],
        preprocessing_timeout=30.0,
    )
    order = await insert_order(
        migrated_url,
        files,
        preprocessing={"container": podman_image, "extra_params": {"mode": mode}},
    )
    waiting = asyncio.ensure_future(wait_for_stage(migrated_url, order, timeout=60))
    return settings, order, waiting


@pytest.mark.podman
async def test_a_converter_writing_a_link_to_etc_fails_the_order_naming_it(
    podman_image: str, migrated_url: str, tmp_path: Path, import_root: Path
) -> None:
    files = make_tiffs(import_root / "plate", 1)
    settings, order, waiting = await _preprocessed(
        podman_image, migrated_url, tmp_path, files, "linketc"
    )
    async with running_service(settings, migrated_url):
        row = await waiting
    assert row["stage"] == "Import Failed"
    link = Path(os.path.abspath(settings.omero_inplace_dir)) / order / "1" / "sub" / "etc"
    assert row["description"] == f"Folder links outside the container's mounts: {link}"
    assert sim_objects(settings.simulator_dir, order) == []


@pytest.mark.podman
async def test_a_file_swapped_while_the_order_waits_in_preprocessing_fails_the_order(
    podman_image: str, migrated_url: str, tmp_path: Path, import_root: Path
) -> None:
    secret = make_tiffs(tmp_path / "groupB", 1, prefix="secret")[0]
    first, second = make_tiffs(import_root / "plate", 2)
    settings, order, waiting = await _preprocessed(
        podman_image, migrated_url, tmp_path, [first, second], "waitgo"
    )
    async with running_service(settings, migrated_url):
        deadline = time.monotonic() + 30
        while not container_running(f"biomero-{order}-1"):
            assert time.monotonic() < deadline, "the first container did not start"
            await asyncio.sleep(0.1)
        second.unlink()
        second.symlink_to(secret)
        (first.parent / "go").touch()
        row = await waiting
    assert row["stage"] == "Import Failed"
    assert row["description"] == f"Files changed while the order waited: {second}"
    assert sim_objects(settings.simulator_dir, order) == []
