"""OME-Zarr registration by the blitz backend, on real omero-py model objects shaped as the
server returns them (through ``server_answers.StubServerAnswers``, a stub of the server's
answers)."""

from __future__ import annotations

import json
from array import array
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("omero")

import omero.model

import omero
from biomero_importer.omero.blitz import (
    BlitzBackend,
    BlitzSession,
    imported_hql,
    managed_files_hql,
    registered_image,
)
from biomero_importer.omero.port import ImportedObject, ImportFailed, OmeroError, Target
from biomero_importer.omero.zarr import (
    PhysicalSize,
    ZarrContent,
    ZarrImage,
    ZarrPlate,
    ZarrWell,
)

from .server_answers import StubServerAnswers, server_shaped
from .test_blitz_contract import UUID, _settings

DATASET = Target("Dataset", 51)
SCREEN = Target("Screen", 7)


def write_image(path: Path, levels: int = 2, name: str = "img") -> ZarrImage:
    """A zarr v2 NGFF 0.4 image (c, y, x uint16, uncompressed), written byte by byte: the
    contract session has no zarr package."""
    shape = [2, 40, 48]
    for level in range(levels):
        folder = path / str(level)
        folder.mkdir(parents=True)
        level_shape = [shape[0], shape[1] >> level, shape[2] >> level]
        (folder / ".zarray").write_text(
            json.dumps(
                {
                    "zarr_format": 2,
                    "shape": level_shape,
                    "chunks": [1, *level_shape[1:]],
                    "dtype": "<u2",
                    "compressor": None,
                    "fill_value": 0,
                    "filters": None,
                    "order": "C",
                }
            )
        )
        values = array("H", range(level_shape[1] * level_shape[2]))
        (folder / "0.0.0").write_bytes(values.tobytes())
    return ZarrImage(
        name,
        path,
        ("c", "y", "x"),
        tuple(shape),
        "<u2",
        levels=tuple(str(n) for n in range(levels)),
        channel_names=("DAPI", "GFP"),
        physical_sizes=(PhysicalSize("y", 0.5, "micrometer"), PhysicalSize("x", 0.25, None)),
    )


def _series(tmp_path: Path, count: int = 2) -> ZarrContent:
    store = tmp_path / "s.zarr"
    images = [write_image(store / str(n), name=f"s [{n}]") for n in range(count)]
    return ZarrContent("series", store, 2, "0.4", "s", images)


def _plate(tmp_path: Path) -> ZarrContent:
    store = tmp_path / "p.zarr"
    fields = [
        write_image(store / "A/1/0", name="A/1/0"),
        write_image(store / "B/2/0", name="B/2/0"),
    ]
    wells = [ZarrWell("A/1", 0, 0, [fields[0]]), ZarrWell("B/2", 1, 1, [fields[1]])]
    plate = ZarrPlate("My plate", ["A", "B"], ["1", "2"], wells)
    return ZarrContent("plate", store, 2, "0.4", "My plate", [], plate)


def _session(tmp_path: Path, server: StubServerAnswers) -> BlitzSession:
    backend = BlitzBackend(_settings(tmp_path))
    return BlitzSession(backend, server, UUID, "alice", "lab")  # type: ignore[arg-type]


def _serve(server: StubServerAnswers, content: ZarrContent) -> None:
    images = list(content.images)
    if content.plate is not None:
        images = [f for w in content.plate.wells for f in w.fields]
    server.stores.update({str(image.path): image for image in images})


def test_linking_a_server_shaped_image_makes_new_link_objects() -> None:
    """The Image comes back from IQuery.get with its collections unloaded: linkAnnotation or
    linkDataset on it raise UnloadedEntityException (as they did here before the fix)."""
    image = server_shaped(omero.model.ImageI(5, True))
    with pytest.raises(omero.UnloadedEntityException):
        image.linkAnnotation(omero.model.CommentAnnotationI(12, False))
    saved = registered_image(image, "/data/s.zarr/0", comment=12, dataset=51)
    assert saved[0] is image
    assert image.getDetails().getExternalInfo().getLsid().getValue() == "/data/s.zarr/0"
    annotation_link, dataset_link = saved[1:]
    assert isinstance(annotation_link, omero.model.ImageAnnotationLinkI)
    assert annotation_link.getParent().getId().getValue() == 5
    assert not annotation_link.getParent().isLoaded()
    assert annotation_link.getChild().getId().getValue() == 12
    assert isinstance(dataset_link, omero.model.DatasetImageLinkI)
    assert (
        dataset_link.getParent().getId().getValue(),
        dataset_link.getChild().getId().getValue(),
    ) == (
        51,
        5,
    )
    assert not dataset_link.getParent().isLoaded() and not dataset_link.getChild().isLoaded()


def test_a_series_registers_into_a_dataset_with_links_names_and_sizes(tmp_path: Path) -> None:
    content = _series(tmp_path)
    server = StubServerAnswers()
    _serve(server, content)
    created: list[ImportedObject] = []
    objects = _session(tmp_path, server).register_content(
        content, DATASET, order_uuid=UUID, on_created=created.append
    )
    assert objects == created and [o.type for o in objects] == ["Image", "Image"]
    ((comment_id, text),) = server.comments.items()
    assert text == UUID
    for obj, image in zip(objects, content.images, strict=True):
        stored = server.images[obj.id]
        assert stored.lsid == str(image.path)
        assert ("Image", obj.id, comment_id) in server.annotation_links
        assert (51, obj.id) in server.dataset_links
        assert stored.channel_names == {0: "DAPI", 1: "GFP"}
        # x has no unit in the metadata: left unset rather than guessed
        assert stored.physical_sizes == {"Y": (0.5, "MICROMETER")}
    # the pixel check ran once, on the first image, before it was reported
    assert server.calls.count("setPixelsId") == 1
    again = _session(tmp_path, server).register_content(
        content, DATASET, order_uuid=UUID, existing=objects
    )
    assert again == objects and len(server.images) == 2


def test_a_link_the_server_refuses_leaves_no_orphan(tmp_path: Path) -> None:
    content = _series(tmp_path, 1)
    server = StubServerAnswers()
    _serve(server, content)
    server.refuse_dataset_link = omero.SecurityViolation(None, None, "cannot link Dataset 51")
    created: list[ImportedObject] = []
    with pytest.raises(ImportFailed) as caught:
        _session(tmp_path, server).register_content(
            content, DATASET, order_uuid=UUID, on_created=created.append
        )
    assert "OMERO refused registering s [0] (SecurityViolation)" in caught.value.reason
    assert created == [] and server.images == {} and server.comments == {}
    assert [kind for kind, _ in server.deleted] == ["Image", "Annotation"]


def test_a_romio_buffer_fails_the_registration_and_removes_it(tmp_path: Path) -> None:
    """The server has no omero-zarr-pixel-buffer (or cannot see the store): setPixelsId
    succeeds on a ROMIO buffer; its one resolution level gives it away."""
    content = _series(tmp_path)
    server = StubServerAnswers(buffer="romio")
    created: list[ImportedObject] = []
    with pytest.raises(ImportFailed) as caught:
        _session(tmp_path, server).register_content(
            content, DATASET, order_uuid=UUID, on_created=created.append
        )
    assert "1 resolution level where the NGFF image has 2" in caught.value.reason
    assert created == [] and server.images == {} and server.dataset_links == []
    assert server.comments == {}


def test_one_level_images_are_judged_by_their_tile(tmp_path: Path) -> None:
    image = write_image(tmp_path / "one.zarr", levels=1, name="one")
    content = ZarrContent("image", image.path, 2, "0.4", "one", [image])
    romio = StubServerAnswers(buffer="romio")
    with pytest.raises(ImportFailed, match="pixels differ"):
        _session(tmp_path, romio).register_content(content, DATASET, order_uuid=UUID)
    assert romio.images == {}
    zarr_server = StubServerAnswers()
    _serve(zarr_server, content)
    (obj,) = _session(tmp_path, zarr_server).register_content(content, DATASET, order_uuid=UUID)
    assert zarr_server.images[obj.id].lsid == str(image.path)


def test_a_plate_registers_with_its_fields_and_a_romio_plate_leaves_nothing(
    tmp_path: Path,
) -> None:
    content = _plate(tmp_path)
    server = StubServerAnswers()
    _serve(server, content)
    (plate,) = _session(tmp_path, server).register_content(content, SCREEN, order_uuid=UUID)
    assert plate.type == "Plate" and plate.id in server.plates
    assert sorted(s.lsid for s in server.images.values()) == [
        str(tmp_path / "p.zarr/A/1/0"),
        str(tmp_path / "p.zarr/B/2/0"),
    ]
    romio = StubServerAnswers(buffer="romio")
    with pytest.raises(ImportFailed, match="resolution level"):
        _session(tmp_path, romio).register_content(content, SCREEN, order_uuid=UUID)
    assert romio.images == {} and romio.plates == {} and romio.comments == {}


def test_a_lost_registration_reply_is_not_saved_twice(tmp_path: Path) -> None:
    """The Image already has its ExternalInfo (the reply of the save was lost): no second
    set of links."""
    content = _series(tmp_path, 1)
    server = StubServerAnswers()
    _serve(server, content)
    session = _session(tmp_path, server)
    (obj,) = session.register_content(content, DATASET, order_uuid=UUID)
    links = len(server.annotation_links)
    session._save_registration(obj.id, content.images[0], 1, 51)
    assert len(server.annotation_links) == links


@pytest.mark.parametrize(
    ("build", "subquery"), [(imported_hql, " exists (select "), (managed_files_hql, " in (select ")]
)
def test_plate_queries_read_used_files_per_fileset(build: Any, subquery: str) -> None:
    """Joining each field image with each used file of its fileset is images x files rows
    (12 M for a 3,456-image screen, benchmarks/plate_hql.py): the used files are joined per
    fileset only, the field images only in the subquery that ties filesets to the plate."""
    hql = build("Plate")
    outer, _, inner = hql.partition(subquery)
    assert inner, hql
    assert "usedFiles" in outer
    assert "wellSamples" not in outer and "WellSample" not in outer
    assert "WellSample ws join ws.image i" in inner and "usedFiles" not in inner


def test_a_series_half_registered_before_checks_the_first_new_image(tmp_path: Path) -> None:
    """A re-run after a stop half way: the image that exists is passed on, the first image
    this run creates is the one pixel-checked (a ROMIO buffer fails it) and removed."""
    content = _series(tmp_path)
    server = StubServerAnswers()
    _serve(server, content)
    (first,) = _session(tmp_path, server).register_content(
        ZarrContent("series", content.path, 2, "0.4", "s", content.images[:1]),
        DATASET,
        order_uuid=UUID,
    )
    server.buffer = "romio"
    with pytest.raises(ImportFailed, match="resolution level"):
        _session(tmp_path, server).register_content(
            content, DATASET, order_uuid=UUID, existing=[first]
        )
    assert list(server.images) == [first.id]


def test_the_self_tests_delete_takes_the_annotations_and_names_a_refusal(tmp_path: Path) -> None:
    content = _series(tmp_path, 1)
    server = StubServerAnswers()
    _serve(server, content)
    session = _session(tmp_path, server)
    (obj,) = session.register_content(content, DATASET, order_uuid=UUID)
    session.delete([obj])
    assert server.deleted_with_annotations == [("Image", obj.id)] and server.images == {}
    server.refuse["deleteObjects"] = omero.SecurityViolation(None, None, "not yours")
    with pytest.raises(OmeroError, match=f"OMERO refused deleting Image {obj.id}"):
        session.delete([obj])
