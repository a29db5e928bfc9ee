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
    OmeroUnavailable,
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
        ("map_id", "INTEGER"),
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


def test_folder_import_links_every_file_and_makes_one_fileset_and_image_per_file(
    gateway: SimulatorGateway, data_dir: Path
) -> None:
    """OMERO rule: each single-file image of a folder is its own import candidate (fileset)."""
    write_files(data_dir, "run/a.tif", "run/sub/b.tif", "run/.processed/hidden.tif")
    session = gateway.open_session("alice", "lab", order_uuid="u1")
    images = session.import_path(data_dir / "run", DATASET, order_uuid="u1", exclude_existing=False)
    assert [i.name for i in images] == ["a.tif", "b.tif"]
    assert len({i.fileset_id for i in images}) == 2
    assert [link.name for link in session.managed_files(images[0])] == ["a.tif"]
    (link,) = session.managed_files(images[1])
    assert link.parent.name == "sub"
    assert os.readlink(link) == str(data_dir / "run/sub/b.tif")


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


def test_exclude_existing_skips_what_any_visible_fileset_holds(
    gateway: SimulatorGateway, data_dir: Path
) -> None:
    """OMERO's ClientPathExclusion: not scoped to the target, the order or a successful import."""
    (source,) = write_files(data_dir, "x.tif")
    gateway.open_session("alice", "lab", order_uuid="old").import_path(
        source, DATASET, order_uuid="old", exclude_existing=False
    )
    session = gateway.open_session("alice", "lab", order_uuid="new")
    assert session.import_path(source, DATASET, order_uuid="new", exclude_existing=True) == []
    other = Target("Dataset", 8)
    assert session.import_path(source, other, order_uuid="new", exclude_existing=True) == []
    # another group cannot see alice's filesets
    elsewhere = gateway.open_session("bob", "other", order_uuid="b")
    assert len(elsewhere.import_path(source, other, order_uuid="b", exclude_existing=True)) == 1


def test_exclusion_can_be_switched_back_to_the_target_only_rule(
    tmp_path: Path, data_dir: Path
) -> None:
    gateway = SimulatorGateway(make_settings(tmp_path, omero_simulator_exclusion="target"))
    (source,) = write_files(data_dir, "x.tif")
    session = gateway.open_session("alice", "lab", order_uuid="old")
    session.import_path(source, DATASET, order_uuid="old", exclude_existing=False)
    assert session.import_path(source, DATASET, order_uuid="new", exclude_existing=True) == []
    other = Target("Dataset", 8)
    assert len(session.import_path(source, other, order_uuid="new", exclude_existing=True)) == 1


def _count(gateway: SimulatorGateway, query: str) -> int:
    with sqlite3.connect(gateway.db_path) as conn:
        return int(conn.execute(query).fetchone()[0])


def test_a_server_side_failure_leaves_an_orphan_fileset_that_exclusion_then_skips(
    tmp_path: Path, data_dir: Path
) -> None:
    gateway = SimulatorGateway(
        make_settings(
            tmp_path, omero_simulator_fail_pattern="bad", omero_simulator_failure="orphan_fileset"
        )
    )
    (bad,) = write_files(data_dir, "bad.tif")
    session = gateway.open_session("alice", "lab", order_uuid="u1")
    with pytest.raises(ImportFailed, match=r"bad\.tif"):
        session.import_path(bad, DATASET, order_uuid="u1", exclude_existing=False)
    assert _count(gateway, "SELECT count(*) FROM filesets") == 1
    assert _count(gateway, "SELECT count(*) FROM fileset_files") == 1
    assert _count(gateway, "SELECT count(*) FROM objects") == 0
    # the file is fixed: --exclude=clientpath still skips it, exit 0, no ids
    fixed = SimulatorGateway(make_settings(tmp_path))
    again = fixed.open_session("alice", "lab", order_uuid="u1")
    assert again.import_path(bad, DATASET, order_uuid="u1", exclude_existing=True) == []
    assert len(again.import_path(bad, DATASET, order_uuid="u1", exclude_existing=False)) == 1


def test_a_folder_import_stops_at_its_first_failed_fileset_keeping_those_before(
    tmp_path: Path, data_dir: Path
) -> None:
    """OMERO rule (no -c): the importer stops after the first failed fileset and exits 2;
    the filesets before it are committed, the files after it never tried."""
    gateway = SimulatorGateway(
        make_settings(
            tmp_path, omero_simulator_fail_pattern="bad", omero_simulator_failure="partial"
        )
    )
    write_files(data_dir, "run/a.tif", "run/bad.tif", "run/c.tif")
    session = gateway.open_session("alice", "lab", order_uuid="u1")
    with pytest.raises(ImportFailed, match=r"1 error: bad\.tif"):
        session.import_path(data_dir / "run", DATASET, order_uuid="u1", exclude_existing=False)
    found = session.find_imported(data_dir / "run", DATASET, order_uuid="u1")
    assert [Path(o.client_path).name for o in found] == ["a.tif"]
    # a.tif's fileset, and the orphan bad.tif left: c.tif was never reached
    assert _count(gateway, "SELECT count(*) FROM filesets") == 2
    assert (
        _count(gateway, "SELECT count(*) FROM fileset_files WHERE client_path LIKE '%c.tif'") == 0
    )


def test_a_re_run_with_what_the_order_already_has_imports_only_the_missing_files(
    tmp_path: Path, data_dir: Path
) -> None:
    failing = SimulatorGateway(
        make_settings(
            tmp_path, omero_simulator_fail_pattern="bad", omero_simulator_failure="partial"
        )
    )
    write_files(data_dir, "run/a.tif", "run/bad.tif", "run/c.tif")
    run = data_dir / "run"
    with pytest.raises(ImportFailed):
        failing.open_session("alice", "lab", order_uuid="u1").import_path(
            run, DATASET, order_uuid="u1", exclude_existing=False
        )
    fixed = SimulatorGateway(make_settings(tmp_path))
    session = fixed.open_session("alice", "lab", order_uuid="u1")
    already = session.find_imported(run, DATASET, order_uuid="u1")
    new = session.import_path(
        run, DATASET, order_uuid="u1", exclude_existing=False, already=already
    )
    assert [o.name for o in new] == ["bad.tif", "c.tif"]
    every = session.find_imported(run, DATASET, order_uuid="u1")
    assert sorted(o.name for o in every) == ["a.tif", "bad.tif", "c.tif"]
    # nothing missing any more: no import at all
    assert (
        session.import_path(run, DATASET, order_uuid="u1", exclude_existing=False, already=every)
        == []
    )
    assert _count(fixed, "SELECT count(*) FROM objects") == 3


def test_session_time_to_live_is_a_hard_lifetime_on_a_simulated_clock(
    tmp_path: Path, data_dir: Path
) -> None:
    settings = make_settings(
        tmp_path, ttl_for_user_conn=60_000, import_timeout=60.0, omero_simulator_import_seconds=400
    )
    gateway = SimulatorGateway(settings)
    a, b, c = write_files(data_dir, "a.tif", "b.tif", "c.tif")
    session = gateway.open_session("alice", "lab", order_uuid="u1")
    assert session.ttl == 660  # import_timeout + 600 s margin, not the configured 60 s
    started = time.monotonic()
    session.import_path(a, DATASET, order_uuid="u1", exclude_existing=False)
    assert 250 < session.remaining() < 261
    with pytest.raises(ImportFailed, match="session expired"):
        session.import_path(b, DATASET, order_uuid="u1", exclude_existing=False)
    assert time.monotonic() - started < 5  # simulated time, no waiting
    lenient = SimulatorGateway(
        make_settings(
            tmp_path, omero_simulator_session_ttl=False, omero_simulator_import_seconds=1e6
        )
    )
    forever = lenient.open_session("alice", "lab", order_uuid="u2")
    forever.import_path(b, DATASET, order_uuid="u2", exclude_existing=False)
    assert forever.import_path(c, DATASET, order_uuid="u2", exclude_existing=False)


def test_registered_images_have_no_fileset_and_are_found_by_the_order_comment(
    gateway: SimulatorGateway, tmp_path: Path
) -> None:
    from .test_zarr import make_series_v2

    series = make_series_v2(tmp_path / "s.zarr", 3)
    session = gateway.open_session("alice", "lab", order_uuid="z")
    images = session.register_zarr(series, DATASET, order_uuid="z")
    assert [o.fileset_id for o in images] == [None, None, None]
    assert _count(gateway, "SELECT count(*) FROM fileset_objects") == 0
    assert session.find_imported(series, DATASET, order_uuid="z") == images
    assert session.find_imported(series, DATASET, order_uuid="other") == []
    # what exists is passed on and not registered again
    again = session.register_zarr(series, DATASET, order_uuid="z", existing=images[:2])
    assert again[:2] == images[:2] and again[2].id not in {o.id for o in images}


def test_connection_lost_in_the_middle_of_a_registration_keeps_earlier_steps(
    tmp_path: Path,
) -> None:
    from .test_zarr import make_series_v2

    gateway = SimulatorGateway(make_settings(tmp_path, omero_simulator_connection_lost_after=2))
    series = make_series_v2(tmp_path / "s.zarr", 4)
    session = gateway.open_session("alice", "lab", order_uuid="z")
    created: list[object] = []
    with pytest.raises(OmeroUnavailable):
        session.register_zarr(series, DATASET, order_uuid="z", on_created=created.append)
    assert len(created) == 2 == len(session.find_imported(series, DATASET, order_uuid="z"))
    done = session.register_zarr(series, DATASET, order_uuid="z", existing=created)  # type: ignore[arg-type]
    assert len(done) == 4 == _count(gateway, "SELECT count(*) FROM objects")


def test_abort_is_honoured_between_registration_steps(tmp_path: Path) -> None:
    from .test_zarr import make_series_v2

    gateway = SimulatorGateway(make_settings(tmp_path))
    series = make_series_v2(tmp_path / "s.zarr", 3)
    session = gateway.open_session("alice", "lab", order_uuid="z")
    with pytest.raises(ImportAborted):
        session.register_zarr(
            series, DATASET, order_uuid="z", on_created=lambda _obj: session.abort()
        )
    assert _count(gateway, "SELECT count(*) FROM objects") == 1


def test_annotate_links_at_most_one_map_annotation_per_namespace(
    gateway: SimulatorGateway, data_dir: Path
) -> None:
    (source,) = write_files(data_dir, "x.tif")
    session = gateway.open_session("alice", "lab", order_uuid="u1")
    (image,) = session.import_path(source, DATASET, order_uuid="u1", exclude_existing=False)
    first = session.annotate(image, "ns", [("a", "1"), ("b", "2")])
    assert session.annotate(image, "ns", [("a", "other")]) == first
    assert session.annotate(image, "ns2", [("a", "1")]) != first
    assert _count(gateway, "SELECT count(DISTINCT map_id) FROM annotations") == 2
    assert _count(gateway, "SELECT count(*) FROM annotations WHERE map_id IS NULL") == 0


def test_sessions_are_tracked_until_closed(gateway: SimulatorGateway) -> None:
    session = gateway.open_session("alice", "lab", order_uuid="u1")
    assert gateway.open_sessions == {id(session)}
    session.close()
    assert gateway.open_sessions == set()


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


def test_a_user_entry_may_carry_groups_and_an_email_address(tmp_path: Path) -> None:
    users = {
        "alice": ["lab"],
        "bob": {"groups": ["lab"], "email": " bob@lab.example "},
        "carol": {"groups": ["hcs"], "email": ""},
    }
    gateway = SimulatorGateway(make_settings(tmp_path, omero_simulator_users=users))
    try:
        gateway.open_session("bob", "lab", order_uuid="u")
        with pytest.raises(UnknownUserOrGroup):
            gateway.open_session("bob", "hcs", order_uuid="u")
        gateway.open_session("carol", "hcs", order_uuid="u")
        assert gateway.experimenter_email("bob") == "bob@lab.example"
        # OMERO's email is optional: a list entry, an empty address or no such user has none
        assert gateway.experimenter_email("alice") is None
        assert gateway.experimenter_email("carol") is None
        assert gateway.experimenter_email("mallory") is None
    finally:
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


def test_a_long_annotation_is_one_map_annotation_with_its_pairs_in_order(
    gateway: SimulatorGateway, data_dir: Path
) -> None:
    """A metadata.csv of many keys: the pairs are written in statements of many rows, and
    the annotation is the same as one row at a time (ids in order, one map_id)."""
    (source,) = write_files(data_dir, "x.tif")
    session = gateway.open_session("alice", "lab", order_uuid="u1")
    (image,) = session.import_path(source, DATASET, order_uuid="u1", exclude_existing=False)
    pairs = [(f"key {n}", f"value {n}") for n in range(250)]
    first = session.annotate(image, "biomero.import", pairs)
    with sqlite3.connect(gateway.db_path) as conn:
        rows = conn.execute(
            "SELECT id, object_id, key, value, map_id FROM annotations ORDER BY id"
        ).fetchall()
    assert rows == [
        (first + n, image.id, key, value, first) for n, (key, value) in enumerate(pairs)
    ]
    assert session.annotate(image, "biomero.import", [("again", "x")]) == first


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


@pytest.fixture
def gateway_v3(tmp_path: Path) -> Iterator[SimulatorGateway]:
    """A simulated server whose pixel buffer reads zarr v3 (the v3 plates below)."""
    gw = SimulatorGateway(make_settings(tmp_path, omero_zarr_reads_v3=True))
    yield gw
    gw.close()


def test_register_zarr_records_the_zarr_path(gateway_v3: SimulatorGateway, tmp_path: Path) -> None:
    from .test_zarr import make_image_v2, make_plate_v3

    gateway = gateway_v3
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


def test_register_zarr_plate_with_label_pixels(
    gateway_v3: SimulatorGateway, tmp_path: Path
) -> None:
    """ImportOptions {"platePixelSource": "label", "plateLabelName": "nuclei"}: a label-backed
    Plate preview, its fields read from labels/nuclei."""
    from .test_zarr import add_plate_labels, make_plate_v3

    gateway = gateway_v3
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


def test_a_folder_made_by_the_previous_simulator_is_upgraded(
    tmp_path: Path, data_dir: Path
) -> None:
    """The quickstart keeps its simulator folder: the new columns are added and filled in."""
    (source,) = write_files(data_dir, "x.tif")
    folder = tmp_path / "omero-sim"
    folder.mkdir()
    with sqlite3.connect(folder / "omero.sqlite") as conn:
        conn.executescript(
            "CREATE TABLE objects (id INTEGER PRIMARY KEY, type TEXT, name TEXT,"
            " client_path TEXT, target_type TEXT, target_id INTEGER, user_name TEXT,"
            " group_name TEXT, order_uuid TEXT);"
            "CREATE TABLE annotations (id INTEGER PRIMARY KEY, object_type TEXT,"
            " object_id INTEGER, ns TEXT, key TEXT, value TEXT);"
            "CREATE TABLE filesets (id INTEGER PRIMARY KEY, template_prefix TEXT, order_uuid TEXT);"
            "CREATE TABLE fileset_files (fileset_id INTEGER, managed_path TEXT, client_path TEXT);"
            "CREATE TABLE fileset_objects (fileset_id INTEGER, object_id INTEGER);"
            f"INSERT INTO objects VALUES (1, 'Image', 'x.tif', '{source}', 'Dataset', 7,"
            " 'alice', 'lab', 'old');"
            "INSERT INTO annotations VALUES (1, 'Image', 1, 'ns', 'a', '1'),"
            " (2, 'Image', 1, 'ns', 'b', '2');"
            "INSERT INTO filesets VALUES (1, 'alice_1/x/', 'old');"
            f"INSERT INTO fileset_files VALUES (1, '/m/x.tif', '{source}');"
            "INSERT INTO fileset_objects VALUES (1, 1);"
        )
    conn.close()
    gateway = SimulatorGateway(make_settings(tmp_path, omero_simulator_dir=folder))
    session = gateway.open_session("alice", "lab", order_uuid="new")
    (old,) = session.find_imported(source, DATASET, order_uuid="old")
    assert session.annotate(old, "ns", [("a", "again")]) == 1  # the old one is kept
    assert session.import_path(source, DATASET, order_uuid="new", exclude_existing=True) == []
    assert ("map_id", "INTEGER") in _columns(gateway.db_path, "annotations")
