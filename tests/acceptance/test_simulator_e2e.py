"""Issue 4 acceptance, end to end: the real service, a real PostgreSQL, real files, and the
simulated OMERO (its SQLite state and ManagedRepository symlinks checked afterwards)."""

from __future__ import annotations

import ast
import asyncio
import os
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import pytest
import zarr

from biomero_importer.settings import Settings
from tests.support import (
    ainvoke,
    insert_order,
    make_settings,
    make_tiffs,
    running_service,
    wait_for_stage,
    write_config,
)

from .conftest import CORE_KEYS, managed_links, sim_annotations, sim_objects

METADATA_CSV = (
    "key,value\n"
    "microscope,Leica SP8\n"
    "objective, 63x oil \n"
    "this row,has,three columns\n"  # malformed: skipped with a warning
    "temperature,37\n"
)
CSV_KEYS = {"csv_microscope": "Leica SP8", "csv_objective": "63x oil", "csv_temperature": "37"}


def _zarr_v2_image(path: Path) -> Path:
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    shape = (2, 8, 16)
    group.create_array("0", shape=shape, dtype="uint16", chunks=shape)[...] = np.ones(shape)
    axes = [
        {"name": "c", "type": "channel"},
        {"name": "y", "type": "space"},
        {"name": "x", "type": "space"},
    ]
    transform = [{"type": "scale", "scale": [1, 1, 1]}]
    attrs: dict[str, Any] = {
        "multiscales": [
            {
                "version": "0.4",
                "name": "cells",
                "axes": axes,
                "datasets": [{"path": "0", "coordinateTransformations": transform}],
            }
        ]
    }
    group.attrs.update(attrs)
    return path


def _assert_annotation(
    annotation: dict[str, str],
    *,
    order: str,
    filepath: Path,
    files: list[Path],
    destination: tuple[str, str],
    user: tuple[str, str] = ("researcher", "Demo"),
    csv: dict[str, str] | None = None,
) -> None:
    expected_keys = [*CORE_KEYS, "Import_Timestamp", *(csv or {})]
    assert list(annotation) == expected_keys
    assert annotation["UUID"] == order
    assert annotation["Filepath"] == str(filepath)
    assert (annotation["Username"], annotation["Group"]) == user
    assert (annotation["DestinationType"], annotation["DestinationID"]) == destination
    assert ast.literal_eval(annotation["Files"]) == [str(f) for f in files]
    assert ast.literal_eval(annotation["FileNames"]) == [f.name for f in files]
    assert datetime.fromisoformat(annotation["Import_Timestamp"]).tzinfo is not None
    for key, value in (csv or {}).items():
        assert annotation[key] == value


async def test_orders_end_to_end_through_the_simulator(
    migrated_url: str, tmp_path: Path, import_root: Path
) -> None:
    dataset_files = make_tiffs(import_root / "dataset", 3)
    (import_root / "dataset" / "metadata.csv").write_text(METADATA_CSV)
    plate_folder = import_root / "plate 1"
    make_tiffs(plate_folder, 2, prefix="well")
    broken = make_tiffs(import_root / "failing", 1, prefix="broken")[0]
    stranger_file = make_tiffs(import_root / "stranger", 1)[0]
    store = _zarr_v2_image(import_root / "zarr" / "cells.zarr")
    settings = make_settings(
        tmp_path,
        migrated_url,
        [import_root],
        poll_interval=0.5,
        omero_simulator_fail_pattern=r"broken\d*\.tif$",
        omero_simulator_users={"researcher": ["Demo"]},
        use_register_zarr=True,
    )
    sim = settings.simulator_dir
    async with running_service(settings, migrated_url):
        dataset = await insert_order(migrated_url, dataset_files)
        screen = await insert_order(
            migrated_url, [plate_folder], destination_type="Screen", destination_id="52"
        )
        failing = await insert_order(migrated_url, [broken])
        stranger = await insert_order(migrated_url, [stranger_file], user="x", group="y")
        zarr_order = await insert_order(migrated_url, [store], destination_id="153")
        rows = await asyncio.gather(
            *(
                wait_for_stage(migrated_url, order, timeout=30)
                for order in (dataset, screen, failing, stranger, zarr_order)
            )
        )
    dataset_row, screen_row, failing_row, stranger_row, zarr_row = rows

    # A Dataset order of 3 TIFFs: 3 Images, each with one complete annotation.
    assert (dataset_row["stage"], dataset_row["description"]) == ("Import Completed", None)
    images = sim_objects(sim, dataset)
    assert [(o.type, o.name, o.client_path) for o in images] == [
        ("Image", f.name, str(f)) for f in dataset_files
    ]
    for obj, file in zip(images, dataset_files, strict=True):
        assert (obj.target_type, obj.target_id) == ("Dataset", 151)
        assert (obj.user_name, obj.group_name) == ("researcher", "Demo")
        (annotation,) = sim_annotations(sim, obj)
        _assert_annotation(
            annotation,
            order=dataset,
            filepath=file,
            files=dataset_files,
            destination=("Dataset", "151"),
            csv=CSV_KEYS,
        )
        (link,) = managed_links(sim, obj)
        assert link.is_relative_to(sim / "ManagedRepository")
        assert os.readlink(link) == str(file)

    # A Screen order: one Plate for the folder, annotated.
    assert screen_row["stage"] == "Import Completed"
    (plate,) = sim_objects(sim, screen)
    assert (plate.type, plate.name, plate.client_path) == ("Plate", "plate 1", str(plate_folder))
    assert (plate.target_type, plate.target_id) == ("Screen", 52)
    (annotation,) = sim_annotations(sim, plate)
    _assert_annotation(
        annotation,
        order=screen,
        filepath=plate_folder,
        files=[plate_folder],
        destination=("Screen", "52"),
    )

    # A file matching the fail pattern: the order fails naming the file.
    assert failing_row["stage"] == "Import Failed"
    assert "broken0.tif" in failing_row["description"]
    assert sim_objects(sim, failing) == []

    # An unknown user: the message users are told to act on.
    assert stranger_row["stage"] == "Import Failed"
    assert stranger_row["description"] == "User 'x' or group 'y' not recognized. Contact admin."
    assert sim_objects(sim, stranger) == []

    # OME-Zarr with use_register_zarr: registered (no fileset, no ManagedRepository links),
    # named from the store without .zarr (as the original names it), annotated like any import.
    assert zarr_row["stage"] == "Import Completed", zarr_row["description"]
    (image,) = sim_objects(sim, zarr_order)
    assert (image.type, image.name, image.client_path) == ("Image", "cells", str(store))
    assert managed_links(sim, image) == []
    (annotation,) = sim_annotations(sim, image)
    _assert_annotation(
        annotation,
        order=zarr_order,
        filepath=store,
        files=[store],
        destination=("Dataset", "153"),
    )


def _settings(tmp_path: Path, url: str, root: Path, fail_pattern: str | None) -> Settings:
    return make_settings(
        tmp_path, url, [root], poll_interval=0.5, omero_simulator_fail_pattern=fail_pattern
    )


@pytest.mark.parametrize("how", ["cli", "sql"])
async def test_a_retried_order_creates_no_duplicate(
    how: str, migrated_url: str, tmp_path: Path, import_root: Path
) -> None:
    files = make_tiffs(import_root, 3)
    first = _settings(tmp_path, migrated_url, import_root, r"image1\.tif$")
    sim = first.simulator_dir
    async with running_service(first, migrated_url):
        order = await insert_order(migrated_url, files)
        failed = await wait_for_stage(migrated_url, order)
    assert failed["stage"] == "Import Failed"
    assert "image1.tif" in failed["description"]
    # The first file made it into OMERO before the second one failed.
    assert [o.client_path for o in sim_objects(sim, order)] == [str(files[0])]

    # OMERO is fixed (the pattern no longer matches) and the order is retried.
    second = _settings(tmp_path, migrated_url, import_root, None)
    async with running_service(second, migrated_url):
        if how == "cli":
            config = write_config(tmp_path / "retry.yml", second)
            result = await ainvoke("retry", order, "--config", config)
            assert result.exit_code == 0, result.output
        else:
            conn = await asyncpg.connect(migrated_url)
            try:
                await conn.execute(
                    "UPDATE imports SET stage = 'Import Pending' WHERE uuid = $1", order
                )
            finally:
                await conn.close()
        done = await wait_for_stage(migrated_url, order, timeout=30)
    assert (done["stage"], done["description"]) == ("Import Completed", None)
    objects = sim_objects(sim, order)
    assert sorted(o.client_path for o in objects) == sorted(str(f) for f in files)
    assert len(sim_objects(sim)) == 3  # no second Image for image0.tif
    for obj in objects:
        (annotation,) = sim_annotations(sim, obj)
        assert annotation["UUID"] == order
        assert annotation["Filepath"] == obj.client_path
