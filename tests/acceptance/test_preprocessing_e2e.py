"""Issue 5 acceptance, end to end: orders with preprocessing through the real service, real
PostgreSQL, real podman running the local test converter, and the simulated OMERO."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from biomero_importer.settings import Settings
from tests.podman_support import container_running, leftover_containers, podman
from tests.support import insert_order, make_settings, make_tiffs, running_service, wait_for_stage

from .conftest import CORE_KEYS, managed_links, sim_annotations, sim_objects

pytestmark = pytest.mark.podman

PREPROCESSING_KEYS = [
    "preprocessing_container",
    "preprocessing_inputfile",
    "preprocessing_outputfolder",
    "preprocessing_altoutputfolder",
]


def _settings(tmp_path: Path, url: str, root: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "poll_interval": 0.5,
        "max_workers": 8,
        "allowed_containers": ["localhost/biomero-test-converter:*"],
        "preprocessing_timeout": 4.0,
    }
    values.update(overrides)
    return make_settings(tmp_path, url, [root], **values)


def _preprocessing(image: str, **extra: str) -> dict[str, Any]:
    return {"container": image, "extra_params": extra}


def _no_container_left(order: str) -> None:
    left = leftover_containers(f"biomero-{order}-")
    if left:
        podman("rm", "-f", *left)
    assert left == [], f"containers left behind by {order}: {left}"


async def test_every_converted_item_is_imported_renamed_and_linked_to_shared_storage(
    podman_image: str, migrated_url: str, tmp_path: Path, import_root: Path
) -> None:
    folder = import_root / "plate 1"
    (source,) = make_tiffs(folder, 1, prefix="scan")
    (folder / "metadata.csv").write_text("key,value\nstain,DAPI\nbad,row,here\n")
    settings = _settings(tmp_path, migrated_url, import_root)
    sim = settings.simulator_dir
    async with running_service(settings, migrated_url):
        order = await insert_order(
            migrated_url,
            [source],
            preprocessing=_preprocessing(podman_image, mode="multi", image_uuid="{UUID}"),
        )
        row = await wait_for_stage(migrated_url, order, timeout=40)
    assert (row["stage"], row["description"]) == ("Import Completed", None)
    _no_container_left(order)

    processed = folder / ".processed"
    images = sim_objects(sim, order)
    # Every item the converter reported (mode multi: two), renamed to the item's name.
    assert [(o.type, o.name) for o in images] == [("Image", "Series 1"), ("Image", "Series 2")]
    finals = [processed / "scan0-s1.ome.tiff", processed / "scan0-s2.ome.tiff"]
    series_keyvalues = [
        {"processing_output_series": "1", "processing_output_channels": "3"},
        {"processing_output_series": "2", "processing_output_channels": "1"},
    ]
    for obj, final, keyvalues in zip(images, finals, series_keyvalues, strict=True):
        # The ManagedRepository links point at the copy on shared storage, not the temp copy.
        (link,) = managed_links(sim, obj)
        assert link.is_symlink()
        target = Path(os.readlink(link))
        assert target == final
        assert target.is_relative_to(processed)
        assert target.read_text() == "converted from /data/scan0.tif\n"
        (annotation,) = sim_annotations(sim, obj)
        assert list(annotation) == [
            *CORE_KEYS,
            *PREPROCESSING_KEYS,
            "preprocessing_mode",
            "preprocessing_image_uuid",
            "preprocessing_id",
            *keyvalues,
            "Import_Timestamp",
            "csv_stain",
        ]
        assert annotation["UUID"] == order
        assert annotation["Filepath"] == str(final)
        assert annotation["Files"] == str([str(source)])
        assert annotation["preprocessing_container"] == podman_image
        assert annotation["preprocessing_mode"] == "multi"
        assert annotation["preprocessing_id"].isdigit()
        assert annotation["csv_stain"] == "DAPI"
        for key, value in keyvalues.items():
            assert annotation[key] == value
    # The temporary folder is deleted once everything is in place.
    assert not (Path(os.path.abspath(settings.omero_inplace_dir)) / order).exists()


FAILURES: dict[str, tuple[dict[str, Any], str]] = {
    "disallowed-image": (
        {"container": "docker.io/evil/miner:latest"},
        "Container image 'docker.io/evil/miner:latest' is not allowed",
    ),
    "bad-extra-key": ({"extra_params": {"bad key!": "x"}}, "bad key!"),
    "exit-1": (
        {"extra_params": {"mode": "exit1"}},
        "Converter exited with code 1 for {name}: ValueError: unsupported pixel type",
    ),
    "malformed-json": ({"extra_params": {"mode": "badjson"}}, "is not valid JSON"),
    "path-outside-mounts": (
        {"extra_params": {"mode": "outside"}},
        "path outside the container's mounts: /etc/passwd",
    ),
    "timeout": ({"extra_params": {"mode": "sleep"}}, "{name} timed out after 4 s"),
}


async def test_failing_conversions_end_with_their_own_description_and_leave_no_container(
    podman_image: str, migrated_url: str, tmp_path: Path, import_root: Path
) -> None:
    settings = _settings(tmp_path, migrated_url, import_root)
    orders: dict[str, str] = {}
    async with running_service(settings, migrated_url):
        for case, (spec, _) in FAILURES.items():
            (source,) = make_tiffs(import_root / case, 1, prefix=case)
            orders[case] = await insert_order(
                migrated_url, [source], preprocessing={"container": podman_image, **spec}
            )
        rows = await asyncio.gather(
            *(wait_for_stage(migrated_url, order, timeout=40) for order in orders.values())
        )
    descriptions = {}
    for (case, (_, expected)), row in zip(FAILURES.items(), rows, strict=True):
        assert row["stage"] == "Import Failed", (case, row["description"])
        assert expected.format(name=f"{case}0.tif") in row["description"], case
        descriptions[case] = row["description"]
        _no_container_left(orders[case])
        assert sim_objects(settings.simulator_dir, orders[case]) == []
        assert not (Path(os.path.abspath(settings.omero_inplace_dir)) / orders[case]).exists()
    assert len(set(descriptions.values())) == len(FAILURES), descriptions


async def test_cancel_during_a_conversion_removes_the_container_within_2_s(
    podman_image: str, migrated_url: str, tmp_path: Path, import_root: Path
) -> None:
    settings = _settings(tmp_path, migrated_url, import_root, preprocessing_timeout=60)
    (source,) = make_tiffs(import_root, 1)
    async with running_service(settings, migrated_url):
        order = await insert_order(
            migrated_url, [source], preprocessing=_preprocessing(podman_image, mode="sleep")
        )
        name = f"biomero-{order}-1"
        deadline = time.monotonic() + 30
        while not await asyncio.to_thread(container_running, name):
            assert time.monotonic() < deadline, f"{name} never started"
            await asyncio.sleep(0.1)
        conn = await asyncpg.connect(migrated_url)
        try:
            await conn.execute(
                "UPDATE importer_orders SET cancel_requested = true WHERE uuid = $1", order
            )
        finally:
            await conn.close()
        started = time.monotonic()
        while await asyncio.to_thread(leftover_containers, f"biomero-{order}-"):
            assert time.monotonic() - started < 2.0, "container still there after 2 s"
            await asyncio.sleep(0.05)
        gone_after = time.monotonic() - started
        row = await wait_for_stage(migrated_url, order, timeout=10)
    # Stage strings are a public interface: a cancelled order is 'Import Failed' with the
    # description 'Cancelled' (README, "Cancel").
    assert (row["stage"], row["description"]) == ("Import Failed", "Cancelled")
    assert gone_after < 2.0
    assert sim_objects(settings.simulator_dir, order) == []
    assert not (Path(os.path.abspath(settings.omero_inplace_dir)) / order).exists()


async def test_a_retried_preprocessing_order_creates_no_duplicate(
    podman_image: str, migrated_url: str, tmp_path: Path, import_root: Path
) -> None:
    """The second item fails in OMERO; after a retry both items are there exactly once,
    renamed, linked to shared storage and annotated once."""
    (source,) = make_tiffs(import_root, 1, prefix="scan")
    first = _settings(
        tmp_path, migrated_url, import_root, omero_simulator_fail_pattern=r"-s2\.ome\.tiff$"
    )
    sim = first.simulator_dir
    async with running_service(first, migrated_url):
        order = await insert_order(
            migrated_url, [source], preprocessing=_preprocessing(podman_image, mode="multi")
        )
        failed = await wait_for_stage(migrated_url, order, timeout=40)
    assert failed["stage"] == "Import Failed"
    assert "scan0-s2.ome.tiff" in failed["description"]
    assert [o.name for o in sim_objects(sim, order)] == ["Series 1"]

    second = _settings(tmp_path, migrated_url, import_root)
    async with running_service(second, migrated_url):
        conn = await asyncpg.connect(migrated_url)
        try:
            await conn.execute("UPDATE imports SET stage = 'Import Pending' WHERE uuid = $1", order)
        finally:
            await conn.close()
        done = await wait_for_stage(migrated_url, order, timeout=40)
    assert (done["stage"], done["description"]) == ("Import Completed", None)
    _no_container_left(order)
    images = sim_objects(sim, order)
    assert [o.name for o in images] == ["Series 1", "Series 2"]
    processed = import_root / ".processed"
    for obj, final in zip(
        images, [processed / "scan0-s1.ome.tiff", processed / "scan0-s2.ome.tiff"], strict=True
    ):
        (link,) = managed_links(sim, obj)
        assert Path(os.readlink(link)) == final
        (annotation,) = sim_annotations(sim, obj)
        assert annotation["Filepath"] == str(final)
    assert not (Path(os.path.abspath(second.omero_inplace_dir)) / order).exists()
