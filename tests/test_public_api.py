"""The original importer's public Python API, as OMERO.biomero, OMERO.Analysis and
biomero-scripts import it: the compatibility writer, ``biomero_importer.api``, the package
root and ``utils.initialize.load_settings`` (issue 13)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import biomero_importer
from biomero_importer import api, options
from biomero_importer.utils import ingest_tracker
from biomero_importer.utils.initialize import load_settings
from tests.support import history, make_settings, make_tiffs, running_service, wait_for_stage

# Top-level public names of the original's biomero_importer/utils/ingest_tracker.py (1.4.2)
# and of its package root; biomero-scripts adds the private ``_mask_url``.
UPSTREAM_TRACKER_NAMES = [
    "STAGE_IMPORTED",
    "STAGE_PREPROCESSING",
    "STAGE_NEW_ORDER",
    "STAGE_INGEST_STARTED",
    "STAGE_INGEST_FAILED",
    "Base",
    "CREATED_ANY_TABLES",
    "Preprocessing",
    "IngestionTracking",
    "receive_after_create",
    "IngestTracker",
    "get_ingest_tracker",
    "initialize_ingest_tracker",
    "prepare_ingest_tracker_for_worker",
    "log_ingestion_step",
    "logger",
    "_mask_url",
    "_ingest_tracker",
]
UPSTREAM_ROOT_NAMES = [
    "get_ingest_tracker",
    "IngestTracker",
    "IngestionTracking",
    "load_settings",
    "IMPORTER_API_SCHEMA",
    "UnsupportedImportOperation",
    "get_importer_capabilities",
    "submit_import_order",
    "supports_import_options",
]
LABEL_PREVIEW = {"schema": 1, "platePixelSource": "label", "plateLabelName": "nuclei"}
SHALLOW = {"schema": 2, "operations": [{"kind": "biomero.shallow-zarr"}]}


@pytest.fixture
def tracker_slot(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test gets its own process-wide tracker, disposed afterwards."""
    monkeypatch.delenv("INGEST_TRACKING_DB_URL", raising=False)
    monkeypatch.setattr(ingest_tracker, "_ingest_tracker", None)
    yield
    tracker = ingest_tracker.get_ingest_tracker()
    if tracker is not None:
        tracker.dispose()


def _order(**extra: Any) -> dict[str, Any]:
    return {
        "Group": "Demo",
        "Username": "researcher",
        "DestinationID": 151,
        "DestinationType": "Dataset",
        "UUID": str(uuid.uuid4()),
        "Files": ["/data/Demo/image.tif"],
        **extra,
    }


def test_every_public_name_of_the_original_is_there() -> None:
    missing = [name for name in UPSTREAM_TRACKER_NAMES if not hasattr(ingest_tracker, name)]
    assert missing == []
    assert [name for name in UPSTREAM_ROOT_NAMES if not hasattr(biomero_importer, name)] == []
    assert biomero_importer.IngestTracker is ingest_tracker.IngestTracker
    assert biomero_importer.submit_import_order is api.submit_import_order
    assert ingest_tracker._mask_url("postgresql+psycopg2://u:pw@db/x") == (
        "postgresql+psycopg2://u:***@db/x"
    )


@pytest.mark.parametrize(
    ("scheme", "driver"),
    [
        ("postgresql", "psycopg2"),
        ("postgresql+psycopg2", "psycopg2"),
        ("postgresql+psycopg", "psycopg"),
    ],
)
async def test_writer_takes_any_postgresql_url(
    tracker_slot: None, migrated_url: str, scheme: str, driver: str
) -> None:
    """A plain postgresql:// keeps the psycopg2 driver we ship (SQLAlchemy 2.1 would pick
    psycopg 3); psycopg 3 works when asked for."""
    url = migrated_url.replace("postgresql://", f"{scheme}://", 1)
    assert ingest_tracker.initialize_ingest_tracker({"ingest_tracking_db": url})
    tracker = ingest_tracker.get_ingest_tracker()
    assert tracker is not None and tracker.engine.dialect.driver == driver
    order = _order(ImportOptions=LABEL_PREVIEW)
    assert ingest_tracker.log_ingestion_step(order, ingest_tracker.STAGE_NEW_ORDER) is not None
    (row,) = await history(migrated_url, order["UUID"])
    assert (row["stage"], row["destination_id"]) == ("Import Pending", "151")
    assert json.loads(row["import_options"]) == LABEL_PREVIEW


async def test_import_options_are_stored_as_json_and_empty_as_null(
    tracker_slot: None, migrated_url: str
) -> None:
    from biomero_schema.imports import parse_import_options

    assert ingest_tracker.initialize_ingest_tracker({"ingest_tracking_db": migrated_url})
    cases: list[tuple[Any, Any]] = [
        ({}, None),
        (None, None),
        (LABEL_PREVIEW, LABEL_PREVIEW),
        (parse_import_options(LABEL_PREVIEW), parse_import_options(LABEL_PREVIEW).to_dict()),
    ]
    for given, stored in cases:
        order = _order(ImportOptions=given)
        assert ingest_tracker.log_ingestion_step(order, "Import Pending") is not None
        (row,) = await history(migrated_url, order["UUID"])
        value = row["import_options"]
        assert (json.loads(value) if value is not None else None) == stored, given


async def test_extra_params_that_are_no_mapping_are_stored_and_the_order_fails_saying_why(
    tracker_slot: None, migrated_url: str, tmp_path: Path, import_root: Path
) -> None:
    """The original stored them; the service then fails the order with a description."""
    (image,) = make_tiffs(import_root, 1)
    assert ingest_tracker.initialize_ingest_tracker({"ingest_tracking_db": migrated_url})
    order = _order(
        Files=[str(image)],
        preprocessing_container="localhost/convert:1",
        preprocessing_inputfile="{Files}",
        preprocessing_outputfolder="/data",
        preprocessing_altoutputfolder="/out",
        extra_params=["--image_uuid", "abc"],
    )
    assert ingest_tracker.log_ingestion_step(order, "Import Pending") is not None
    settings = make_settings(tmp_path, migrated_url, [import_root], poll_interval=0.5)
    async with running_service(settings, migrated_url):
        done = await wait_for_stage(migrated_url, order["UUID"], timeout=30)
    assert done["stage"] == "Import Failed"
    assert done["description"] == "Preprocessing extra_params must be a JSON object"


def test_writer_takes_a_sqlite_url(tracker_slot: None, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'orders.db'}"
    assert ingest_tracker.initialize_ingest_tracker({"ingest_tracking_db": url})
    assert ingest_tracker.log_ingestion_step(_order(ImportOptions=SHALLOW), "Import Pending") == 1


def test_a_failed_start_logs_why_without_the_password(
    tracker_slot: None, caplog: pytest.LogCaptureFixture
) -> None:
    url = "postgresql://importer:s3cr3t-pw@127.0.0.1:1/biomero"
    with caplog.at_level(logging.ERROR):
        assert not ingest_tracker.initialize_ingest_tracker({"ingest_tracking_db": url})
    assert "OperationalError" in caplog.text and "127.0.0.1" in caplog.text
    assert "s3cr3t-pw" not in caplog.text


def test_capabilities(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BIOMERO_SHALLOW_ZARR", raising=False)
    assert api.get_importer_capabilities() == {
        "schema": 1,
        "importOptionsSchemas": [1, 2],
        "lifecycleOperations": [],
        "externalPreprocessing": True,
        "isccBioIdentity": False,
        "configurationErrors": [],
    }
    assert api.IMPORTER_API_SCHEMA == 1
    # upstream's opt-in switch has no effect here, and the capabilities say so up front
    monkeypatch.setenv("BIOMERO_SHALLOW_ZARR", "true")
    capabilities = api.get_importer_capabilities()
    assert capabilities["lifecycleOperations"] == []
    assert capabilities["configurationErrors"] == [
        "BIOMERO_SHALLOW_ZARR is set, but this importer does not run biomero.shallow-zarr"
    ]


def test_supports_import_options() -> None:
    assert api.supports_import_options(None)
    assert api.supports_import_options(LABEL_PREVIEW)
    assert api.supports_import_options({"schema": 2, "registration": {}, "operations": []})
    assert not api.supports_import_options(SHALLOW)
    with pytest.raises(ValueError, match="plateLabelName"):
        api.supports_import_options({"schema": 1, "platePixelSource": "label"})


def test_submit_import_order_checks_before_writing() -> None:
    written: list[tuple[dict[str, Any], str]] = []

    def log_order(order: dict[str, Any], stage: str) -> None:
        written.append((order, stage))

    order = _order(ImportOptions={"schema": 1})
    assert api.submit_import_order(order, log_order=log_order) == order["UUID"]
    assert written == [(order, "Import Pending")]

    with pytest.raises(api.UnsupportedImportOperation, match=r"'biomero\.shallow-zarr' is not"):
        api.submit_import_order(_order(ImportOptions=SHALLOW), log_order=log_order)
    with pytest.raises(ValueError, match="Missing required import order fields: Files"):
        api.submit_import_order(
            {k: v for k, v in _order().items() if k != "Files"}, log_order=log_order
        )
    with pytest.raises(ValueError, match="ImportOptions are invalid"):
        api.submit_import_order(
            _order(ImportOptions={"schema": 1, "platePixelSource": "label"}), log_order=log_order
        )
    assert len(written) == 1


async def test_submit_import_order_writes_through_the_compatibility_writer(
    tracker_slot: None, migrated_url: str
) -> None:
    assert ingest_tracker.initialize_ingest_tracker({"ingest_tracking_db": migrated_url})
    order = _order(ImportOptions=LABEL_PREVIEW)
    api.submit_import_order(order)
    (row,) = await history(migrated_url, order["UUID"])
    assert json.loads(row["import_options"]) == LABEL_PREVIEW


def test_load_settings_returns_a_dict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("INGEST_TRACKING_DB_URL", "BIOMERO_IMPORTER_INGEST_TRACKING_DB"):
        monkeypatch.delenv(name, raising=False)
    config = tmp_path / "settings.yml"
    config.write_text("ingest_tracking_db: postgresql+psycopg2://u:p@db:5432/biomero\n")
    settings = load_settings(str(config))
    assert settings["ingest_tracking_db"] == "postgresql://u:p@db:5432/biomero"
    assert settings["use_register_zarr"] is False
    json.dumps(settings)
    with pytest.raises(FileNotFoundError):
        load_settings(str(tmp_path / "missing.yml"))


def test_without_biomero_schema_options_are_stored_and_fail_saying_why() -> None:
    """Beside biomero 2.8 (OMERO.biomero 1.6.1's web image) biomero-schema is 0.1, without
    ImportOptions: the writer still stores them; parsing them fails naming the extra, and the
    capabilities say so up front."""
    code = """
import json, sys
sys.modules["biomero_schema"] = None  # as if only biomero-schema 0.1 were installed
sys.modules["biomero_schema.imports"] = None
from biomero_importer import api, options
print(json.dumps(api.get_importer_capabilities()["configurationErrors"]))
print(options.to_column({"schema": 1, "platePixelSource": "label", "plateLabelName": "n"}))
print(options.parse_column(None))
try:
    options.parse_column('{"schema": 1}')
except options.InvalidImportOptions as exc:
    print(exc)
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    errors, stored, empty, failure = done.stdout.splitlines()
    assert json.loads(errors) == [options.MISSING_SCHEMA]
    assert json.loads(stored) == {"schema": 1, "platePixelSource": "label", "plateLabelName": "n"}
    assert empty == "RegistrationOptions(plate_pixel_source='source', plate_label_name=None)"
    assert failure == options.MISSING_SCHEMA
    assert "biomero-importer[import-options]" in failure
