"""The blitz backend against the real omero-py: parser, model objects, connection errors."""

from __future__ import annotations

import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

# Everything here needs the real omero-py (Python 3.10, `nox -s contract`).
pytest.importorskip("omero")

import omero.cli
import omero.model

from biomero_importer.model import Order, PreprocessingSpec
from biomero_importer.omero import create_gateway
from biomero_importer.omero.blitz import (
    NGFF_ENTITY_TYPE,
    BlitzBackend,
    map_annotation_link,
    ngff_external_info,
    pixel_type,
)
from biomero_importer.omero.importcli import (
    fetch_jars_argv,
    import_argv,
    log_paths,
    write_session_store,
)
from biomero_importer.omero.metadata import build_annotation_pairs
from biomero_importer.omero.port import ImportedObject, OmeroUnavailable, Target
from biomero_importer.paths import import_area
from biomero_importer.settings import Settings

UUID = "9d7c7c1e-2a2b-4c4d-8e8f-000000000042"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "omero_backend": "blitz",
        "omero_host": "127.0.0.1",
        "omero_port": _free_port(),
        "omero_user": "root",
        "omero_password": "not-a-real-password",
        "omero_retries": 1,
        "order_log_dir": tmp_path / "logs",
        "embedded_db_dir": tmp_path / "pg",
        "log_file_path": None,
    }
    values.update(overrides)
    return Settings(**values)


def _parse(argv: list[str]) -> Any:
    """Parse with the real CLI and its import plugin, without running anything."""
    cli = omero.cli.CLI()
    cli.loadplugins()
    assert argv[0] == "omero"
    return cli.parser.parse_args(argv[1:])


def test_create_gateway_returns_the_blitz_backend(tmp_path: Path) -> None:
    gateway = create_gateway(_settings(tmp_path))
    assert isinstance(gateway, BlitzBackend)
    assert gateway.describe().startswith("OMERO root@127.0.0.1:")
    assert "not-a-real-password" not in gateway.describe()


@pytest.mark.parametrize(
    ("target", "exclude", "overrides"),
    [
        (Target("Dataset", 51), False, {}),
        (Target("Dataset", 51), True, {"skip_checksum": True, "skip_minmax": True}),
        (Target("Screen", 7), True, {"skip_all": True, "import_depth": 10}),
        (
            Target("Screen", 7),
            False,
            {"skip_thumbnails": True, "skip_upgrade": True, "parallel_upload_per_worker": 8},
        ),
    ],
)
def test_every_import_argv_is_accepted_by_the_real_parser(
    tmp_path: Path, target: Target, exclude: bool, overrides: dict[str, Any]
) -> None:
    settings = _settings(tmp_path, **overrides)
    logs = log_paths(settings, UUID)
    path = tmp_path / "data" / "a file.tif"
    argv = import_argv(
        settings,
        path,
        target,
        logs=logs,
        exclude_existing=exclude,
        order_uuid=UUID,
    )
    args = _parse(argv)
    assert args.func.__func__.__name__ == "importer"
    assert args.path == [str(path)]
    # No key: the CLI joins the session recorded in its private session folder.
    assert (args.server, args.port, args.key) == ("127.0.0.1", str(settings.omero_port), None)
    assert args.transfer == "ln_s"
    assert args.exclude == ("clientpath" if exclude else None)
    assert args.output == "yaml"
    assert args.depth == settings.import_depth
    assert args.skip == (settings.skip_flags() or None)
    assert (args.file, args.errs) == (str(logs.stdout), str(logs.stderr))
    assert (args.annotation_ns, args.annotation_text) == ("biomero.import.order", UUID)
    assert args.parallel_upload == str(settings.parallel_upload_per_worker)
    assert args.parallel_fileset == str(settings.parallel_filesets_per_worker)
    if target.type == "Dataset":
        assert "-d" in argv and argv[argv.index("-d") + 1] == "51"
    else:
        assert "-r" in argv and argv[argv.index("-r") + 1] == "7"


def test_fetch_jars_argv_is_accepted_by_the_real_parser(tmp_path: Path) -> None:
    argv = fetch_jars_argv(_settings(tmp_path, fetch_jars="5.9.2"))
    assert argv is not None
    assert _parse(argv).fetch_jars == "5.9.2"


def test_annotation_builds_real_model_objects_with_every_key(tmp_path: Path) -> None:
    (tmp_path / "metadata.csv").write_text("stain,DAPI\n")
    order = Order(
        uuid=UUID,
        group="lab",
        user="alice",
        target=Target("Dataset", 3),
        files=[tmp_path / "a.tif"],
        file_names=["a.tif"],
        preprocessing=PreprocessingSpec(
            id=4,
            container="c:1",
            input_file="{Files}",
            output_folder="/data",
            alt_output_folder="/out",
            extra_params={"image_uuid": "x"},
        ),
        attempt=1,
    )
    pairs = build_annotation_pairs(
        order,
        tmp_path / "a.tif",
        preprocessing_keyvalues=[("Instrument", "SP8")],
        processed_folder_name=".processed",
        imported_at=datetime.now(timezone.utc),
        import_roots=import_area([tmp_path]),
        notes=[],
    )
    link = map_annotation_link(ImportedObject("Image", 11, "a.tif", ""), "biomero.import", pairs)
    assert isinstance(link, omero.model.ImageAnnotationLinkI)
    assert link.getParent().getId().getValue() == 11
    annotation = link.getChild()
    assert isinstance(annotation, omero.model.MapAnnotationI)
    assert annotation.getNs().getValue() == "biomero.import"
    assert [(nv.name, nv.value) for nv in annotation.getMapValue()] == pairs
    keys = [nv.name for nv in annotation.getMapValue()]
    for key in (
        "UUID",
        "Filepath",
        "Group",
        "Username",
        "DestinationID",
        "DestinationType",
        "Files",
        "FileNames",
        "preprocessing_container",
        "preprocessing_image_uuid",
        "preprocessing_id",
        "processing_output_Instrument",
        "csv_stain",
        "Import_Timestamp",
    ):
        assert key in keys

    plate_link = map_annotation_link(ImportedObject("Plate", 5, "p", ""), "ns", [("k", "v")])
    assert isinstance(plate_link, omero.model.PlateAnnotationLinkI)
    assert plate_link.getParent().getId().getValue() == 5


def test_ngff_external_info_is_a_real_model_object() -> None:
    info = ngff_external_info("/data/img.zarr")
    assert isinstance(info, omero.model.ExternalInfoI)
    assert info.getEntityType().getValue() == NGFF_ENTITY_TYPE
    assert info.getEntityId().getValue() == 3
    assert info.getLsid().getValue() == "/data/img.zarr"
    assert pixel_type("<u2") == "uint16" and pixel_type("float32") == "float"


def test_closed_port_becomes_omero_unavailable(tmp_path: Path) -> None:
    backend = BlitzBackend(_settings(tmp_path))
    try:
        with pytest.raises(OmeroUnavailable) as caught:
            backend.check()
        assert caught.value.reason == "OMERO unavailable, retry later"
        assert "Connect" in caught.value.detail or "Refused" in caught.value.detail
        with pytest.raises(OmeroUnavailable):
            backend.open_session("alice", "lab", order_uuid=UUID)
    finally:
        backend.close()


def test_the_cli_finds_the_session_recorded_for_it(tmp_path: Path) -> None:
    """omero-py's own session store reads what the importer wrote as the current session,
    with no conflict for a login without a group: ``omero import -s -p`` attaches to it."""
    from omero.util.sessions import SessionsStore

    settings = _settings(tmp_path)
    key = "0f0e0d0c-aaaa-bbbb-cccc-123456789abc"
    write_session_store(tmp_path / "sessions", settings, "alice", key)
    store = SessionsStore(tmp_path / "sessions")
    assert store.get_current() == ("127.0.0.1", "alice", key, str(settings.omero_port))
    assert store.conflicts("127.0.0.1", "alice", key, {}, True) == ""
    assert store.get("127.0.0.1", "alice", key)["omero.sess"] == key
