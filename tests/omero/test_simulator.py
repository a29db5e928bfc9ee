"""The simulator on a real filesystem and a real SQLite file."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from biomero_importer.model import RegistrationOptions
from biomero_importer.observability.logging import reset_logging
from biomero_importer.omero import create_gateway
from biomero_importer.omero.port import (
    ImportAborted,
    ImportFailed,
    Target,
    UnknownUserOrGroup,
)
from biomero_importer.omero.simulator import SimulatorGateway

from .conftest import make_settings, write_files

DATASET = Target("Dataset", 7)
SCREEN = Target("Screen", 3)


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[SimulatorGateway]:
    gw = SimulatorGateway(make_settings(tmp_path))
    yield gw
    gw.close()


def _columns(db: Path, table: str) -> list[tuple[str, str]]:
    with sqlite3.connect(db) as conn:
        return [(row[1], row[2]) for row in conn.execute(f"PRAGMA table_info({table})")]


def test_tables_have_exactly_the_documented_columns(gateway: SimulatorGateway) -> None:
    assert _columns(gateway.db_path, "objects") == [
        ("id", "INTEGER"),
        ("type", "TEXT"),
        ("name", "TEXT"),
        ("client_path", "TEXT"),
        ("target_type", "TEXT"),
        ("target_id", "INTEGER"),
        ("user_name", "TEXT"),
        ("group_name", "TEXT"),
        ("order_uuid", "TEXT"),
    ]
    assert _columns(gateway.db_path, "annotations") == [
        ("id", "INTEGER"),
        ("object_type", "TEXT"),
        ("object_id", "INTEGER"),
        ("ns", "TEXT"),
        ("key", "TEXT"),
        ("value", "TEXT"),
    ]
    with sqlite3.connect(gateway.db_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_create_gateway_warns_loudly_that_omero_is_simulated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Loggers other tests configured may be cached against their streams: start from defaults.
    reset_logging()
    gateway = create_gateway(make_settings(tmp_path))
    try:
        assert gateway.name == "simulator"
        gateway.check()
        assert str(tmp_path / "omero-sim") in gateway.describe()
    finally:
        gateway.close()
    out = capsys.readouterr()
    assert "OMERO IS SIMULATED" in out.out + out.err


def test_file_import_creates_an_image_and_a_symlink_to_the_source(
    gateway: SimulatorGateway, data_dir: Path
) -> None:
    (source,) = write_files(data_dir, "cells.tif")
    session = gateway.open_session("alice", "lab", order_uuid="u1")
    (image,) = session.import_path(source, DATASET, order_uuid="u1", exclude_existing=False)
    assert (image.type, image.name, image.client_path) == ("Image", "cells.tif", str(source))
    (link,) = session.managed_files(image)
    assert link.is_symlink() and os.readlink(link) == str(source)
    relative = link.relative_to(gateway.repository)
    assert relative.parts[0] == "alice_1"
    assert relative.name == "cells.tif"
    assert len(relative.parts) == 5  # user_id / YYYY-MM / DD / fileset folder / file
    with sqlite3.connect(gateway.db_path) as conn:
        row = conn.execute("SELECT * FROM objects").fetchone()
    assert row == (image.id, "Image", "cells.tif", str(source), "Dataset", 7, "alice", "lab", "u1")


def test_folder_import_links_every_file_and_makes_one_image_per_file(
    gateway: SimulatorGateway, data_dir: Path
) -> None:
    write_files(data_dir, "run/a.tif", "run/sub/b.tif", "run/.processed/hidden.tif")
    session = gateway.open_session("alice", "lab", order_uuid="u1")
    images = session.import_path(data_dir / "run", DATASET, order_uuid="u1", exclude_existing=False)
    assert [i.name for i in images] == ["a.tif", "b.tif"]
    links = session.managed_files(images[0])
    assert [link.name for link in links] == ["a.tif", "b.tif"]
    assert links[1].parent.name == "sub"
    assert os.readlink(links[1]) == str(data_dir / "run/sub/b.tif")


def test_screen_import_creates_a_plate(gateway: SimulatorGateway, data_dir: Path) -> None:
    write_files(data_dir, "plate1/A1.tif", "plate1/A2.tif")
    session = gateway.open_session("bob", "hcs", order_uuid="u2")
    (plate,) = session.import_path(
        data_dir / "plate1", SCREEN, order_uuid="u2", exclude_existing=False
    )
    assert (plate.type, plate.name) == ("Plate", "plate1")
    assert len(session.managed_files(plate)) == 2


def test_importing_the_same_file_twice_creates_two_objects(
    gateway: SimulatorGateway, data_dir: Path
) -> None:
    (source,) = write_files(data_dir, "x.tif")
    session = gateway.open_session("alice", "lab", order_uuid="u1")
    first = session.import_path(source, DATASET, order_uuid="u1", exclude_existing=False)
    second = session.import_path(source, DATASET, order_uuid="u1", exclude_existing=False)
    assert first[0].id != second[0].id
    assert session.managed_files(first[0]) != session.managed_files(second[0])


def test_exclude_existing_skips_what_any_order_imported_into_the_same_target(
    gateway: SimulatorGateway, data_dir: Path
) -> None:
    (source,) = write_files(data_dir, "x.tif")
    gateway.open_session("alice", "lab", order_uuid="old").import_path(
        source, DATASET, order_uuid="old", exclude_existing=False
    )
    session = gateway.open_session("alice", "lab", order_uuid="new")
    assert session.import_path(source, DATASET, order_uuid="new", exclude_existing=True) == []
    other = session.import_path(
        source, Target("Dataset", 8), order_uuid="new", exclude_existing=True
    )
    assert len(other) == 1


def test_find_imported_matches_order_client_path_and_target(
    gateway: SimulatorGateway, data_dir: Path
) -> None:
    a, b = write_files(data_dir, "run/a.tif", "b.tif")
    session = gateway.open_session("alice", "lab", order_uuid="u1")
    folder_images = session.import_path(
        data_dir / "run", DATASET, order_uuid="u1", exclude_existing=False
    )
    session.import_path(b, DATASET, order_uuid="u1", exclude_existing=False)
    gateway.open_session("alice", "lab", order_uuid="u2").import_path(
        a, DATASET, order_uuid="u2", exclude_existing=False
    )
    assert session.find_imported(data_dir / "run", DATASET, order_uuid="u1") == folder_images
    assert session.find_imported(a, DATASET, order_uuid="u1") == folder_images
    assert session.find_imported(data_dir / "ru", DATASET, order_uuid="u1") == []
    assert session.find_imported(a, Target("Dataset", 8), order_uuid="u1") == []
    assert len(session.find_imported(a, DATASET, order_uuid="u2")) == 1


def test_fail_pattern_fails_the_import_naming_the_file(tmp_path: Path, data_dir: Path) -> None:
    gateway = SimulatorGateway(make_settings(tmp_path, omero_simulator_fail_pattern=r"bad"))
    good, _ = write_files(data_dir, "good.tif", "run/bad_2.tif")
    session = gateway.open_session("alice", "lab", order_uuid="u1")
    assert session.import_path(good, DATASET, order_uuid="u1", exclude_existing=False)
    with pytest.raises(ImportFailed) as caught:
        session.import_path(data_dir / "run", DATASET, order_uuid="u1", exclude_existing=False)
    assert "bad_2.tif" in caught.value.reason
    assert "failed" in caught.value.reason
    with sqlite3.connect(gateway.db_path) as conn:
        assert conn.execute("SELECT count(*) FROM objects").fetchone()[0] == 1
    gateway.close()


def test_missing_and_empty_inputs_fail(gateway: SimulatorGateway, data_dir: Path) -> None:
    session = gateway.open_session("alice", "lab", order_uuid="u1")
    with pytest.raises(ImportFailed, match=r"gone\.tif"):
        session.import_path(data_dir / "gone.tif", DATASET, order_uuid="u1", exclude_existing=False)
    (data_dir / "empty").mkdir()
    with pytest.raises(ImportFailed, match="no importable files"):
        session.import_path(data_dir / "empty", DATASET, order_uuid="u1", exclude_existing=False)


def test_unknown_users_and_groups_are_refused_when_users_are_listed(tmp_path: Path) -> None:
    gateway = SimulatorGateway(
        make_settings(tmp_path, omero_simulator_users={"alice": ["lab", "other"]})
    )
    gateway.open_session("alice", "other", order_uuid="u")
    with pytest.raises(UnknownUserOrGroup) as caught:
        gateway.open_session("mallory", "lab", order_uuid="u")
    assert caught.value.reason == "User 'mallory' or group 'lab' not recognized. Contact admin."
    with pytest.raises(UnknownUserOrGroup):
        gateway.open_session("alice", "hcs", order_uuid="u")
    gateway.close()


def test_any_user_is_accepted_without_a_user_list(gateway: SimulatorGateway) -> None:
    gateway.open_session("anyone", "anygroup", order_uuid="u")


def test_abort_interrupts_the_import_delay(tmp_path: Path, data_dir: Path) -> None:
    gateway = SimulatorGateway(make_settings(tmp_path, omero_simulator_import_delay=30))
    (source,) = write_files(data_dir, "slow.tif")
    session = gateway.open_session("alice", "lab", order_uuid="u1")
    threading.Timer(0.2, session.abort).start()
    started = time.monotonic()
    with pytest.raises(ImportAborted):
        session.import_path(source, DATASET, order_uuid="u1", exclude_existing=False)
    assert time.monotonic() - started < 5
    with sqlite3.connect(gateway.db_path) as conn:
        assert conn.execute("SELECT count(*) FROM objects").fetchone()[0] == 0
    with pytest.raises(ImportAborted):
        session.import_path(source, DATASET, order_uuid="u1", exclude_existing=False)
    gateway.close()


def test_delay_is_applied_per_import(tmp_path: Path, data_dir: Path) -> None:
    gateway = SimulatorGateway(make_settings(tmp_path, omero_simulator_import_delay=0.3))
    (source,) = write_files(data_dir, "slow.tif")
    session = gateway.open_session("alice", "lab", order_uuid="u1")
    started = time.monotonic()
    session.import_path(source, DATASET, order_uuid="u1", exclude_existing=False)
    assert time.monotonic() - started >= 0.3
    gateway.close()


def test_annotate_writes_one_row_per_pair_and_rename_changes_the_name(
    gateway: SimulatorGateway, data_dir: Path
) -> None:
    (source,) = write_files(data_dir, "x.tif")
    session = gateway.open_session("alice", "lab", order_uuid="u1")
    (image,) = session.import_path(source, DATASET, order_uuid="u1", exclude_existing=False)
    ann_id = session.annotate(image, "biomero.import", [("UUID", "u1"), ("Filepath", "/x")])
    session.rename(image, "renamed")
    with sqlite3.connect(gateway.db_path) as conn:
        rows = conn.execute(
            "SELECT id, object_type, object_id, ns, key, value FROM annotations ORDER BY id"
        ).fetchall()
        name = conn.execute("SELECT name FROM objects WHERE id = ?", (image.id,)).fetchone()[0]
    assert rows == [
        (ann_id, "Image", image.id, "biomero.import", "UUID", "u1"),
        (ann_id + 1, "Image", image.id, "biomero.import", "Filepath", "/x"),
    ]
    assert name == "renamed"


_WORKER = """
import sys
from pathlib import Path
from biomero_importer.omero.port import Target
from biomero_importer.omero.simulator import SimulatorGateway
from biomero_importer.settings import Settings

sim, data, worker = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
gateway = SimulatorGateway(Settings(omero_backend="simulator", omero_simulator_dir=sim))
for n in range(40):
    uuid = f"{worker}-{n}"
    session = gateway.open_session("alice", "lab", order_uuid=uuid)
    (image,) = session.import_path(
        data / f"f{n % 5}.tif", Target("Dataset", 1), order_uuid=uuid, exclude_existing=False
    )
    session.annotate(image, "ns", [("UUID", uuid), ("n", str(n))])
gateway.close()
"""


def test_several_processes_share_one_simulator(tmp_path: Path, data_dir: Path) -> None:
    write_files(data_dir, *(f"f{n}.tif" for n in range(5)))
    sim = tmp_path / "omero-sim"
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(sim), str(data_dir), f"w{i}"],
            stderr=subprocess.PIPE,
        )
        for i in range(4)
    ]
    for proc in workers:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
    with sqlite3.connect(sim / "omero.sqlite") as conn:
        objects = conn.execute(
            "SELECT count(*), count(DISTINCT order_uuid) FROM objects"
        ).fetchone()
        pairs = conn.execute(
            "SELECT a.value, o.order_uuid FROM annotations a JOIN objects o ON o.id = a.object_id"
            " WHERE a.key = 'UUID'"
        ).fetchall()
    assert objects == (160, 160)
    assert len(pairs) == 160 and all(value == uuid for value, uuid in pairs)
    links = [p for p in (sim / "ManagedRepository").rglob("*.tif")]
    assert len(links) == 160 and all(p.is_symlink() and p.exists() for p in links)


def test_register_zarr_records_the_zarr_path(gateway: SimulatorGateway, tmp_path: Path) -> None:
    from .test_zarr import make_image_v2, make_plate_v3

    image_store = make_image_v2(tmp_path / "img.zarr")
    plate_store = make_plate_v3(tmp_path / "plate.zarr")
    session = gateway.open_session("alice", "lab", order_uuid="z")
    (image,) = session.register_zarr(image_store, DATASET, order_uuid="z")
    (plate,) = session.register_zarr(plate_store, SCREEN, order_uuid="z")
    assert (image.type, image.client_path) == ("Image", str(image_store))
    assert (plate.type, plate.name, plate.client_path) == ("Plate", "My plate", str(plate_store))
    assert session.managed_files(image) == []
    assert session.find_imported(image_store, DATASET, order_uuid="z") == [image]
    with pytest.raises(ImportFailed, match="send it to a Screen"):
        session.register_zarr(plate_store, DATASET, order_uuid="z")
    (tmp_path / "plain.zarr").mkdir()
    with pytest.raises(ImportFailed, match=r"plain\.zarr"):
        session.register_zarr(tmp_path / "plain.zarr", DATASET, order_uuid="z")


def _registration(gateway: SimulatorGateway, object_id: int) -> tuple[str, str | None, list[str]]:
    with sqlite3.connect(gateway.db_path) as conn:
        source, label, paths = conn.execute(
            "SELECT pixel_source, label_name, image_paths FROM registrations WHERE object_id = ?",
            (object_id,),
        ).fetchone()
    return source, label, json.loads(paths)


def test_register_zarr_plate_with_label_pixels(gateway: SimulatorGateway, tmp_path: Path) -> None:
    """ImportOptions {"platePixelSource": "label", "plateLabelName": "nuclei"}: a label-backed
    Plate preview, its fields read from labels/nuclei."""
    from .test_zarr import add_plate_labels, make_plate_v3

    store = add_plate_labels(make_plate_v3(tmp_path / "plate.ome.zarr"), "nuclei")
    session = gateway.open_session("alice", "lab", order_uuid="z")
    (source,) = session.register_zarr(store, SCREEN, order_uuid="z")
    (label,) = session.register_zarr(
        store,
        SCREEN,
        order_uuid="z",
        options=RegistrationOptions(plate_pixel_source="label", plate_label_name="nuclei"),
    )
    assert _registration(gateway, source.id) == (
        "source",
        None,
        [str(store / "A/1/0"), str(store / "B/2/0")],
    )
    assert _registration(gateway, label.id) == (
        "label",
        "nuclei",
        [str(store / "A/1/0/labels/nuclei"), str(store / "B/2/0/labels/nuclei")],
    )
    with pytest.raises(ImportFailed, match="no label image 'cells'"):
        session.register_zarr(
            store,
            SCREEN,
            order_uuid="z",
            options=RegistrationOptions(plate_pixel_source="label", plate_label_name="cells"),
        )
