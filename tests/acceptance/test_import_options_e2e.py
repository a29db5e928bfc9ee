"""Issue 13 acceptance: ImportOptions (``imports.import_options``, upstream revision
92e8f9e637a1) end to end, on a database the current original importer left behind."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from biomero_importer.db.migrate import migrate
from biomero_importer.db.sql import DEFAULT_CHANNEL
from tests.db.upstream import columns, create_upstream, dump
from tests.omero.test_zarr import add_plate_labels, make_plate_v3
from tests.support import history, insert_order, make_settings, running_service, wait_for_stage

from .conftest import sim_objects

LABEL_PREVIEW = '{"schema": 1, "platePixelSource": "label", "plateLabelName": "nuclei"}'
SHALLOW = json.dumps(
    {"schema": 2, "registration": {}, "operations": [{"kind": "biomero.shallow-zarr"}]}
)
NO_LABEL_NAME = '{"schema": 1, "platePixelSource": "label"}'


def _pixel_source(simulator_dir: Path, object_id: int) -> tuple[str, str | None]:
    with sqlite3.connect(simulator_dir / "omero.sqlite") as db:
        row = db.execute(
            "SELECT pixel_source, label_name FROM registrations WHERE object_id = ?", (object_id,)
        ).fetchone()
    return row[0], row[1]


async def test_stamped_92e8_database_keeps_rows_and_runs_orders_with_options(
    database_url: str, tmp_path: Path, import_root: Path
) -> None:
    create_upstream(
        database_url, with_description=True, stamped=True, orders=30, revision="92e8f9e637a1"
    )
    names = columns(database_url, "imports")
    assert "import_options" in names
    before = dump(database_url, "imports")
    assert any(row[names.index("import_options")] for row in before)

    migrate(database_url, channel=DEFAULT_CHANNEL)
    assert dump(database_url, "imports", names) == before

    store = add_plate_labels(make_plate_v3(import_root / "plate.ome.zarr"), "nuclei")
    settings = make_settings(
        tmp_path,
        database_url,
        [import_root],
        poll_interval=0.5,
        use_register_zarr=True,
        omero_zarr_reads_v3=True,  # the plate is zarr v3
    )
    async with running_service(settings, database_url):
        label = await insert_order(
            database_url,
            [store],
            destination_type="Screen",
            destination_id="52",
            import_options=LABEL_PREVIEW,
        )
        shallow = await insert_order(
            database_url,
            [store],
            destination_type="Screen",
            destination_id="52",
            import_options=SHALLOW,
        )
        invalid = await insert_order(
            database_url,
            [store],
            destination_type="Screen",
            destination_id="52",
            import_options=NO_LABEL_NAME,
        )
        label_row = await wait_for_stage(database_url, label, timeout=30)
        shallow_row = await wait_for_stage(database_url, shallow, timeout=30)
        invalid_row = await wait_for_stage(database_url, invalid, timeout=30)

    assert label_row["stage"] == "Import Completed", label_row["description"]
    (plate,) = sim_objects(settings.simulator_dir, label)
    assert (plate.type, plate.name) == ("Plate", "My plate")
    assert _pixel_source(settings.simulator_dir, plate.id) == ("label", "nuclei")

    assert shallow_row["stage"] == "Import Failed"
    assert shallow_row["description"] == (
        "Operation 'biomero.shallow-zarr' is not supported by this importer"
    )
    assert invalid_row["stage"] == "Import Failed"
    assert invalid_row["description"] == (
        "ImportOptions are invalid: plateLabelName is required for label Plate pixels"
    )
    assert sim_objects(settings.simulator_dir, shallow) == []
    assert sim_objects(settings.simulator_dir, invalid) == []

    # every row the service wrote for an order carries its options forward unchanged
    for order, options in ((label, LABEL_PREVIEW), (shallow, SHALLOW), (invalid, NO_LABEL_NAME)):
        rows = await history(database_url, order)
        assert len(rows) >= 3
        assert {row["import_options"] for row in rows} == {options}
    # and the history the original left is still untouched
    assert dump(database_url, "imports", names)[: len(before)] == before
