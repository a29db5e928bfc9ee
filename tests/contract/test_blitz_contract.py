"""The blitz backend against the real omero-py: parser, model objects, connection errors."""

from __future__ import annotations

import functools
import importlib.util
import re
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

# Everything here needs the real omero-py (Python 3.10, `nox -s contract`).
pytest.importorskip("omero")

import omero.cli
import omero.model
import omero.rtypes

from biomero_importer.model import Order, PreprocessingSpec
from biomero_importer.omero import create_gateway
from biomero_importer.omero.blitz import (
    NGFF_ENTITY_TYPE,
    BlitzBackend,
    every_hql,
    experimenter_email,
    map_annotation_link,
    ngff_external_info,
    order_comment,
    pixel_type,
    registered_plate,
)
from biomero_importer.omero.importcli import (
    fetch_jars_argv,
    import_argv,
    log_paths,
    write_session_store,
)
from biomero_importer.omero.metadata import build_annotation_pairs
from biomero_importer.omero.port import ImportedObject, OmeroUnavailable, Target
from biomero_importer.omero.zarr import ZarrContent, ZarrImage, ZarrPlate, ZarrWell
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
        run=1,
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


def test_a_closed_port_makes_the_email_lookup_unavailable_not_unknown(tmp_path: Path) -> None:
    """A notification waits for OMERO to answer rather than deciding the user has no address."""
    backend = BlitzBackend(_settings(tmp_path))
    try:
        with pytest.raises(OmeroUnavailable):
            backend.experimenter_email("alice")
    finally:
        backend.close()


@pytest.mark.parametrize(
    ("email", "expected"),
    [("  alice@lab.example ", "alice@lab.example"), ("", None), ("   ", None), (None, None)],
)
def test_the_email_is_read_from_a_real_experimenter(
    email: str | None, expected: str | None
) -> None:
    experimenter = omero.model.ExperimenterI()
    experimenter.setOmeName(omero.rtypes.rstring("alice"))
    if email is not None:
        experimenter.setEmail(omero.rtypes.rstring(email))
    assert experimenter_email(experimenter) == expected


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


# --- HQL and model fields -----------------------------------------------------------------------

# "from Entity e" and the theta-style ", Entity e" of a second root
_ALIAS = re.compile(r"(?:\bfrom|,)\s+([A-Z]\w*)\s+(\w+)")
_JOIN = re.compile(r"\bjoin\s+(?:fetch\s+)?(\w+)\.(\w+(?:\.\w+)*)\s+(\w+)")
_PATH = re.compile(r"(?<![\w.:])([a-z]\w*)((?:\.\w+)+)")
_CLASS_TEST = re.compile(r"\.class\s*=\s*([A-Z]\w*)")
_HQL_WORDS = {
    "select",
    "distinct",
    "from",
    "join",
    "fetch",
    "where",
    "and",
    "exists",
    "is",
    "null",
    "in",
}


def _model(entity: str) -> type:
    cls = getattr(omero.model, f"{entity}I", None)
    assert isinstance(cls, type), f"omero.model has no {entity}I"
    return cls


_FIELD = re.compile(r"\('_(\w+)', \(\), _M_omero(\.model)?\._t_(\w+)")


@functools.cache
def _fields(entity: str) -> dict[str, str | None]:
    """The fields of a model entity and the entity each points to (None: a value), read from
    the Slice definitions omero-py generated (``omero_model_<Entity>_ice.py``): the Python
    model classes do not say which entity a reference points to."""
    spec = importlib.util.find_spec(f"omero_model_{entity}_ice")
    assert spec is not None and spec.origin is not None, f"no Slice module for {entity}"
    source = Path(spec.origin).read_text()
    head = f"IcePy.defineClass('::omero::model::{entity}', {entity}, -1, (), "
    start = source.index(head)
    block = source[start : source.index("\n\n", start)]
    base = re.search(r"_M_omero\.model\._t_(\w+), \(\), \(", block)
    fields: dict[str, str | None] = dict(_fields(base.group(1))) if base else {}
    fields.update({"id": None, "details": "Details"})
    for name, in_model, kind in _FIELD.findall(block):
        if not in_model:
            fields[name] = None  # an rtype: a value
            continue
        if name.endswith("Seq"):
            element = re.search(
                rf"_t_{kind} = IcePy\.defineSequence\('[^']+', \(\), _M_omero\.model\._t_(\w+)\)",
                source,
            )
            assert element is not None, f"{entity}.{name}: sequence {kind} not found"
            fields[name[: -len("Seq")]] = element.group(1)
        elif not name.endswith(("Loaded", "CountPerOwner")):
            fields[name] = kind
    return fields


def _entities_below(entity: str) -> list[str]:
    """The entity and its subclasses (Hibernate resolves a subclass's property on an alias of
    its superclass: ``a.textValue`` on an Annotation)."""
    found = [entity]
    for sub in getattr(omero.model, entity).__subclasses__():
        if sub.__module__ == "omero.model" and not sub.__name__.endswith("I"):
            found.extend(_entities_below(sub.__name__))
    return found


def _field(entity: str, name: str) -> str | None:
    """The entity ``entity.name`` points to (None for a value), or fail."""
    for candidate in _entities_below(entity):
        fields = _fields(candidate)
        if name in fields:
            return fields[name]
    raise AssertionError(f"{entity} (or a subclass) has no field {name!r}")


def _resolve(aliases: dict[str, str], alias: str, path: str) -> str | None:
    assert alias in aliases, f"unknown alias {alias!r}"
    current: str | None = aliases[alias]
    for name in path.split("."):
        assert current is not None, f"{alias}.{path}: {name!r} follows a value"
        current = _field(current, name)
    return current


def check_hql(hql: str) -> None:
    """Every entity, alias, join and property path of ``hql`` against the real omero.model."""
    aliases: dict[str, str] = {}
    for entity, alias in _ALIAS.findall(hql):
        _model(entity)
        aliases[alias] = entity
    for parent, path, alias in _JOIN.findall(hql):
        target = _resolve(aliases, parent, path)
        assert target is not None, f"join {parent}.{path} is not an object"
        aliases[alias] = target
    for entity in _CLASS_TEST.findall(hql):
        _model(entity)
    for alias, path in _PATH.findall(_CLASS_TEST.sub("", hql)):
        if alias in _HQL_WORDS:
            continue
        _resolve(aliases, alias, path.lstrip("."))


@pytest.mark.parametrize("hql", every_hql())
def test_every_hql_string_names_real_model_fields(hql: str) -> None:
    check_hql(hql)


@pytest.mark.parametrize(
    "bad",
    [
        "select i.id from Image i join i.filesets fs",  # no such field
        "select i.id from Imagee i",  # no such entity
        "select a.id from ImageAnnotationLink l join l.child a where a.textValu = :x",
        "select i.name.value from Image i",  # a value has no fields
    ],
)
def test_the_hql_check_catches_mistakes(bad: str) -> None:
    with pytest.raises(AssertionError):
        check_hql(bad)


def test_the_order_comment_is_a_real_comment_annotation() -> None:
    comment = order_comment("biomero.import.order", UUID)
    assert (comment.getNs().getValue(), comment.getTextValue().getValue()) == (
        "biomero.import.order",
        UUID,
    )


def test_a_registered_plate_carries_wells_external_info_the_order_comment_and_its_screen(
    tmp_path: Path,
) -> None:
    image = ZarrImage("f", tmp_path / "plate.zarr/A/1/0", ("y", "x"), (4, 4), "uint8")
    wells = [ZarrWell("A/1", 0, 0, [image, image]), ZarrWell("B/2", 1, 1, [image])]
    plate_content = ZarrPlate("My plate", ["A", "B"], ["1", "2"], wells)
    content = ZarrContent("plate", tmp_path / "plate.zarr", 3, "0.5", "My plate", [], plate_content)
    assert content.plate is not None
    fields = [[100 + n for n, _ in enumerate(well.fields)] for well in content.plate.wells]
    plate = registered_plate(content, fields, comment=12, screen=7)
    assert plate.getName().getValue() == content.plate.name
    samples = [
        s.getImage().getId().getValue() for w in plate.copyWells() for s in w.copyWellSamples()
    ]
    assert samples == [i for ids in fields for i in ids]
    assert plate.getDetails().getExternalInfo().getLsid().getValue() == str(content.path)
    (annotation_link,) = plate.copyAnnotationLinks()
    assert isinstance(annotation_link, omero.model.PlateAnnotationLinkI)
    (screen_link,) = plate.copyScreenLinks()
    assert isinstance(screen_link, omero.model.ScreenPlateLinkI)
    assert screen_link.getParent().getId().getValue() == 7
