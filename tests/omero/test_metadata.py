"""Annotation keys: the original importer's, including csv_ and processing_output_ keys."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from biomero_importer.model import Order, PreprocessingSpec
from biomero_importer.omero.metadata import (
    build_annotation_pairs,
    normalise_keyvalues,
    read_metadata_csv,
)
from biomero_importer.omero.port import Target
from biomero_importer.paths import import_area

NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def _order(files: list[Path], preprocessing: PreprocessingSpec | None = None) -> Order:
    return Order(
        uuid="0b6c2a3e-0000-4000-8000-000000000001",
        group="lab",
        user="alice",
        target=Target("Dataset", 12),
        files=files,
        file_names=[f.name for f in files],
        preprocessing=preprocessing,
        attempt=1,
        run=1,
    )


def test_plain_order_has_the_core_keys_in_order(tmp_path: Path) -> None:
    file = tmp_path / "a.tif"
    pairs = build_annotation_pairs(
        _order([file, tmp_path / "b.tif"]),
        file,
        preprocessing_keyvalues=None,
        processed_folder_name=".processed",
        imported_at=NOW,
        import_roots=import_area([tmp_path]),
        notes=[],
    )
    assert pairs == [
        ("UUID", "0b6c2a3e-0000-4000-8000-000000000001"),
        ("Filepath", str(file)),
        ("Group", "lab"),
        ("Username", "alice"),
        ("DestinationID", "12"),
        ("DestinationType", "Dataset"),
        ("Files", str([str(file), str(tmp_path / "b.tif")])),
        ("FileNames", "['a.tif', 'b.tif']"),
        ("Import_Timestamp", "2025-01-02T03:04:05+00:00"),
    ]


def test_preprocessing_output_and_csv_keys(tmp_path: Path) -> None:
    processed = tmp_path / ".processed"
    processed.mkdir()
    (tmp_path / "metadata.csv").write_text("key,value\nstain,DAPI\nbroken\n,empty key\n")
    (processed / "metadata.csv").write_text("objective,63x\nstain,Hoechst\n")
    spec = PreprocessingSpec(
        id=5,
        container="cellularimagingcf/convertleica-docker:v1.2.0",
        input_file="{Files}",
        output_folder="/data",
        alt_output_folder="/out",
        extra_params={"image_uuid": "abc", "saveoption": "single"},
    )
    source = tmp_path / "scan.lif"
    with capture_logs() as logs:
        pairs = build_annotation_pairs(
            _order([source], spec),
            processed / "scan.ome.tiff",
            preprocessing_keyvalues=[("Instrument", "Stellaris"), ("Series", "2")],
            processed_folder_name=".processed",
            imported_at=NOW,
            import_roots=import_area([tmp_path]),
            notes=[],
        )
    values = dict(pairs)
    assert len(values) == len(pairs)
    assert values["Filepath"] == str(processed / "scan.ome.tiff")
    assert values["preprocessing_container"] == spec.container
    assert values["preprocessing_inputfile"] == "{Files}"
    assert values["preprocessing_outputfolder"] == "/data"
    assert values["preprocessing_altoutputfolder"] == "/out"
    assert values["preprocessing_image_uuid"] == "abc"
    assert values["preprocessing_saveoption"] == "single"
    assert values["preprocessing_id"] == "5"
    assert values["processing_output_Instrument"] == "Stellaris"
    assert values["processing_output_Series"] == "2"
    # the .processed copy is read after the original's, so its value wins
    assert values["csv_stain"] == "Hoechst"
    assert values["csv_objective"] == "63x"
    assert "csv_key" not in values
    skipped = [e for e in logs if e["event"] == "metadata_csv_row_skipped"]
    assert [e["line"] for e in skipped] == [3, 4]


def test_csv_in_processed_folder_beside_an_unprocessed_file(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "metadata.csv").write_text("well,B2\n")
    pairs = build_annotation_pairs(
        _order([tmp_path / "a.tif"]),
        tmp_path / "a.tif",
        preprocessing_keyvalues=None,
        processed_folder_name="out",
        imported_at=NOW,
        import_roots=import_area([tmp_path]),
        notes=[],
    )
    assert ("csv_well", "B2") in pairs


@pytest.mark.unit
def test_csv_linked_to_another_groups_csv_is_not_read(tmp_path: Path) -> None:
    """Issue 14: a metadata.csv symlinked out of the import roots gives no csv_ keys."""
    root = tmp_path / "groupA"
    root.mkdir()
    other = tmp_path / "groupB"
    other.mkdir()
    (other / "metadata.csv").write_text("patient,Jane Doe\n")
    (root / "metadata.csv").symlink_to(other / "metadata.csv")
    notes: list[str] = []
    with capture_logs() as logs:
        pairs = build_annotation_pairs(
            _order([root / "a.tif"]),
            root / "a.tif",
            preprocessing_keyvalues=None,
            processed_folder_name=".processed",
            imported_at=NOW,
            import_roots=import_area([root]),
            notes=notes,
        )
    assert not [key for key, _ in pairs if key.startswith("csv_")]
    reason = f"metadata.csv links outside the import roots: {root / 'metadata.csv'}"
    assert notes == [f"skipped {reason}"]
    (warning,) = [e for e in logs if e["event"] == "metadata_csv_skipped"]
    assert warning["log_level"] == "warning" and warning["reason"] == reason


@pytest.mark.unit
def test_csv_linked_inside_the_roots_is_read(tmp_path: Path) -> None:
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "metadata.csv").write_text("stain,DAPI\n")
    (tmp_path / "metadata.csv").symlink_to(tmp_path / "shared" / "metadata.csv")
    notes: list[str] = []
    pairs = build_annotation_pairs(
        _order([tmp_path / "a.tif"]),
        tmp_path / "a.tif",
        preprocessing_keyvalues=None,
        processed_folder_name=".processed",
        imported_at=NOW,
        import_roots=import_area([tmp_path]),
        notes=notes,
    )
    assert ("csv_stain", "DAPI") in pairs and notes == []


def test_unreadable_csv_is_skipped_with_a_warning(tmp_path: Path) -> None:
    (tmp_path / "metadata.csv").write_bytes(b"\xff\xfe\x00bad")
    with capture_logs() as logs:
        assert read_metadata_csv(tmp_path / "metadata.csv") == []
    assert logs[0]["event"] == "metadata_csv_unreadable"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, []),
        ({"a": 1, "b": "x"}, [("a", "1"), ("b", "x")]),
        ([{"a": "1"}, {"b": {"nested": True}}], [("a", "1"), ("b", '{"nested": true}')]),
        ([("a", "1"), 5], [("a", "1")]),
        ("not keyvalues", []),
    ],
)
def test_normalise_keyvalues(raw: object, expected: list[tuple[str, str]]) -> None:
    assert normalise_keyvalues(raw) == expected
