"""NGFF metadata from small real zarr v2 and v3 stores (written with the zarr package)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from biomero_importer.omero.zarr import ZarrError, read_zarr

AXES = [
    {"name": "c", "type": "channel"},
    {"name": "y", "type": "space"},
    {"name": "x", "type": "space"},
]


def _multiscales(name: str) -> list[dict[str, Any]]:
    return [
        {
            "version": "0.4",
            "name": name,
            "axes": AXES,
            "datasets": [
                {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1, 1, 1]}]}
            ],
        }
    ]


def _image_group(group: Any, name: str, shape: tuple[int, ...] = (2, 8, 16)) -> None:
    group.create_array("0", shape=shape, dtype="uint16", chunks=shape)[...] = np.ones(shape)
    group.attrs.update({"multiscales": _multiscales(name)})


def make_image_v2(path: Path) -> Path:
    _image_group(zarr.open_group(str(path), mode="w", zarr_format=2), "img")
    return path


def make_image_v3(path: Path) -> Path:
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    shape = (3, 4, 5)
    root.create_array("0", shape=shape, dtype="float32", chunks=shape)[...] = np.zeros(shape)
    multiscales = _multiscales("v3 image")
    del multiscales[0]["version"]
    root.attrs.update({"ome": {"version": "0.5", "multiscales": multiscales}})
    return path


def make_series_v2(path: Path, count: int = 2) -> Path:
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    root.attrs.update({"bioformats2raw.layout": 3})
    for index in range(count):
        _image_group(root.create_group(str(index)), f"series {index}")
    root.create_group("OME").attrs.update({"series": [str(i) for i in range(count)]})
    return path


def make_plate_v3(path: Path) -> Path:
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    wells = [("A", "1", 0, 0), ("B", "2", 1, 1)]
    root.attrs.update(
        {
            "ome": {
                "version": "0.5",
                "plate": {
                    "name": "My plate",
                    "rows": [{"name": "A"}, {"name": "B"}],
                    "columns": [{"name": "1"}, {"name": "2"}],
                    "wells": [
                        {"path": f"{r}/{c}", "rowIndex": ri, "columnIndex": ci}
                        for r, c, ri, ci in wells
                    ],
                    "field_count": 1,
                },
            }
        }
    )
    for row, column, _, _ in wells:
        well = root.create_group(f"{row}/{column}")
        well.attrs.update({"ome": {"version": "0.5", "well": {"images": [{"path": "0"}]}}})
        field = well.create_group("0")
        shape = (1, 4, 4)
        field.create_array("0", shape=shape, dtype="uint8", chunks=shape)[...] = np.ones(shape)
        field.attrs.update({"ome": {"version": "0.5", "multiscales": _multiscales("field")}})
    return path


def test_v2_single_image(tmp_path: Path) -> None:
    content = read_zarr(make_image_v2(tmp_path / "cells"))
    assert (content.kind, content.zarr_format, content.ngff_version) == ("image", 2, "0.4")
    (image,) = content.images
    assert image.name == "cells"
    assert image.axes == ("c", "y", "x") and image.shape == (2, 8, 16)
    assert (image.size("x"), image.size("y"), image.size("c"), image.size("z")) == (16, 8, 2, 1)
    assert image.dtype == "<u2"
    assert image.path == tmp_path / "cells"


def test_v3_single_image_with_ome_attributes(tmp_path: Path) -> None:
    content = read_zarr(make_image_v3(tmp_path / "v3.ome.zarr"))
    assert (content.kind, content.zarr_format, content.ngff_version) == ("image", 3, "0.5")
    assert content.images[0].shape == (3, 4, 5)
    assert content.images[0].dtype == "float32"


def test_bioformats2raw_series(tmp_path: Path) -> None:
    content = read_zarr(make_series_v2(tmp_path / "multi.zarr", count=3))
    assert content.kind == "series"
    assert [i.name for i in content.images] == [
        "multi [0]",
        "multi [1]",
        "multi [2]",
    ]
    assert content.images[2].path == tmp_path / "multi.zarr" / "2"


def test_bioformats2raw_series_without_ome_group_counts_folders(tmp_path: Path) -> None:
    store = make_series_v2(tmp_path / "multi.zarr", count=2)
    for name in (".zattrs", ".zgroup"):
        (store / "OME" / name).unlink()
    assert len(read_zarr(store).images) == 2


def test_v3_plate(tmp_path: Path) -> None:
    content = read_zarr(make_plate_v3(tmp_path / "p.zarr"))
    assert content.kind == "plate" and content.plate is not None
    assert content.name == "My plate"
    assert content.plate.rows == ["A", "B"] and content.plate.columns == ["1", "2"]
    assert [(w.path, w.row, w.column) for w in content.plate.wells] == [
        ("A/1", 0, 0),
        ("B/2", 1, 1),
    ]
    (field,) = content.plate.wells[1].fields
    assert field.path == tmp_path / "p.zarr" / "B/2/0"
    assert field.shape == (1, 4, 4)


def _hand_plate(root: Path, well_path: str = "C/3", image_path: str = "0") -> Path:
    """A zarr v2 plate of one well and one field, written without the zarr package."""
    field = root / "C" / "3" / "0"
    (field / "0").mkdir(parents=True)
    (root / ".zgroup").write_text('{"zarr_format": 2}')
    (root / ".zattrs").write_text(
        json.dumps(
            {
                "plate": {
                    "version": "0.4",
                    "rows": [{"name": "C"}],
                    "columns": [{"name": "3"}],
                    "wells": [{"path": well_path, "rowIndex": 0, "columnIndex": 0}],
                }
            }
        )
    )
    (root / "C" / "3" / ".zattrs").write_text(
        json.dumps({"well": {"version": "0.4", "images": [{"path": image_path}]}})
    )
    (field / ".zattrs").write_text(json.dumps({"multiscales": _multiscales("f")}))
    (field / "0" / ".zarray").write_text(json.dumps({"shape": [1, 5, 6], "dtype": "|u1"}))
    return root


def test_v2_plate_written_by_hand(tmp_path: Path) -> None:
    content = read_zarr(_hand_plate(tmp_path / "hand.zarr"))
    assert (content.kind, content.name, content.ngff_version) == ("plate", "hand", "0.4")
    assert content.plate is not None
    well = content.plate.wells[0]
    assert (well.row, well.column) == (0, 0)
    assert well.fields[0].axes == ("c", "y", "x") and well.fields[0].shape == (1, 5, 6)


@pytest.mark.unit
def test_metadata_before_ngff_04_fails_with_the_validators_first_error(tmp_path: Path) -> None:
    store = make_image_v2(tmp_path / "old.zarr")
    # NGFF 0.3 wrote axes as plain names; the 0.4 model wants objects.
    (store / ".zattrs").write_text(
        json.dumps({"multiscales": [{"axes": ["y", "x"], "datasets": [{"path": "0"}]}]})
    )
    with pytest.raises(ZarrError, match=r"not valid NGFF 0.4 image metadata: multiscales\.0\.axes"):
        read_zarr(store)


# --- paths named by the metadata stay inside the store ---------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    ("well_path", "message"),
    [
        ("/data/groupB/x.zarr", "/data/groupB/x.zarr"),
        ("../other.zarr/C/3", "../other.zarr/C/3"),
    ],
)
def test_a_plate_well_path_outside_the_store_fails_naming_it(
    tmp_path: Path, well_path: str, message: str
) -> None:
    store = _hand_plate(tmp_path / "p.zarr", well_path=well_path)
    with pytest.raises(ZarrError, match=re.escape(message)) as caught:
        read_zarr(store)
    assert "plate" in str(caught.value)


@pytest.mark.unit
def test_a_dataset_path_climbing_out_of_the_store_fails_naming_the_entry(tmp_path: Path) -> None:
    other = make_image_v2(tmp_path / "groupB" / "secret.zarr")
    store = make_image_v2(tmp_path / "groupA" / "mine.zarr")
    attrs = json.loads((store / ".zattrs").read_text())
    attrs["multiscales"][0]["datasets"][0]["path"] = "../../groupB/secret.zarr/0"
    (store / ".zattrs").write_text(json.dumps(attrs))
    assert (store / "../../groupB/secret.zarr/0/.zarray").exists()
    with pytest.raises(ZarrError, match=r"multiscales\[0\]\.datasets\[0\]\.path is not"):
        read_zarr(store)
    assert other.exists()


@pytest.mark.unit
def test_a_series_path_that_is_absolute_fails_naming_the_entry(tmp_path: Path) -> None:
    other = make_series_v2(tmp_path / "groupB.zarr", count=1)
    store = make_series_v2(tmp_path / "groupA.zarr", count=1)
    (store / "OME" / ".zattrs").write_text(json.dumps({"series": [str(other / "0")]}))
    with pytest.raises(ZarrError, match=r"OME\.series\[0\] is absolute"):
        read_zarr(store)


@pytest.mark.unit
def test_a_well_folder_symlinked_to_another_store_fails(tmp_path: Path) -> None:
    other = _hand_plate(tmp_path / "groupB" / "p.zarr")
    store = _hand_plate(tmp_path / "groupA" / "p.zarr")
    shutil.rmtree(store / "C" / "3")
    (store / "C" / "3").symlink_to(other / "C" / "3", target_is_directory=True)
    with pytest.raises(
        ZarrError, match=r"Folder links outside the zarr store: .*/groupA/p.zarr/C/3"
    ):
        read_zarr(store)


@pytest.mark.unit
def test_metadata_file_symlinked_out_of_the_store_is_not_read(tmp_path: Path) -> None:
    other = make_image_v2(tmp_path / "groupB.zarr")
    store = make_image_v2(tmp_path / "groupA.zarr")
    (store / "0" / ".zarray").unlink()
    (store / "0" / ".zarray").symlink_to(other / "0" / ".zarray")
    with pytest.raises(ZarrError, match=r"links outside the zarr store: .*/groupA.zarr/0/\.zarray"):
        read_zarr(store)


@pytest.mark.unit
def test_a_symlink_inside_the_store_is_followed(tmp_path: Path) -> None:
    store = make_series_v2(tmp_path / "s.zarr", count=1)
    (store / "0").rename(store / "real")
    (store / "0").symlink_to(store / "real", target_is_directory=True)
    (image,) = read_zarr(store).images
    assert image.path == store / "real"


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: p.mkdir(), "not a zarr store"),
        (lambda p: (p.mkdir(), (p / ".zgroup").write_text("{}")), "no multiscales"),
        (lambda p: (p.mkdir(), (p / ".zattrs").write_text("[1]")), "not a JSON object"),
        (lambda p: (p.mkdir(), (p / "zarr.json").write_text("{oops")), "unreadable"),
    ],
)
def test_not_an_ome_zarr(tmp_path: Path, setup: Any, message: str) -> None:
    store = tmp_path / "bad.zarr"
    setup(store)
    with pytest.raises(ZarrError, match=message):
        read_zarr(store)


@pytest.mark.unit
def test_array_metadata_without_a_shape_fails_the_store(tmp_path: Path) -> None:
    store = make_image_v2(tmp_path / "broken.zarr")
    (store / "0" / ".zarray").write_text(json.dumps({"dtype": "<u2", "shape": "big"}))
    with pytest.raises(ZarrError, match="has no usable shape"):
        read_zarr(store)


def test_missing_array_metadata(tmp_path: Path) -> None:
    store = make_image_v2(tmp_path / "broken.zarr")
    (store / "0" / ".zarray").unlink()
    with pytest.raises(ZarrError, match="no zarr array metadata"):
        read_zarr(store)


def add_plate_labels(plate: Path, label: str) -> Path:
    """A label image ``labels/<label>`` in every field of a plate made by make_plate_v3."""
    for row, column in (("A", "1"), ("B", "2")):
        field = zarr.open_group(str(plate / row / column / "0"), mode="a", zarr_format=3)
        labels = field.create_group("labels")
        labels.attrs.update({"ome": {"version": "0.5", "labels": [label]}})
        image = labels.create_group(label)
        shape = (1, 4, 4)
        image.create_array("0", shape=shape, dtype="uint32", chunks=shape)[...] = np.ones(shape)
        image.attrs.update({"ome": {"version": "0.5", "multiscales": _multiscales(label)}})
    return plate


@pytest.mark.parametrize(
    ("folder", "title"),
    [("cells.zarr", "cells"), ("cells.ome.zarr", "cells"), ("CELLS.OME.ZARR", "CELLS")],
)
def test_titles_drop_the_zarr_suffix(tmp_path: Path, folder: str, title: str) -> None:
    """As the original importer names OME-Zarr objects (no .zarr / .ome.zarr)."""
    content = read_zarr(make_image_v2(tmp_path / folder))
    assert content.name == title and content.images[0].name == title


# --- what registration takes from the NGFF metadata, and the pixel-buffer check -------------


_WINDOW = {"start": 0, "end": 4000, "min": 0, "max": 65535}


def make_pyramid_v2(path: Path, compressor: Any = None, levels: int = 2) -> Path:
    """A zarr v2 NGFF 0.4 image of ``levels`` resolution levels (uint16, c/y/x), with channel
    labels and micrometer scales, as a facility's converter writes one."""
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    data = np.arange(2 * 40 * 48, dtype="<u2").reshape(2, 40, 48)
    datasets = []
    for level in range(levels):
        shrunk = data[:, :: 2**level, :: 2**level]
        root.create_array(
            str(level), shape=shrunk.shape, dtype="<u2", chunks=(1, 40, 48), compressors=compressor
        )[...] = shrunk
        datasets.append(
            {
                "path": str(level),
                "coordinateTransformations": [
                    {"type": "scale", "scale": [1.0, 0.5 * 2**level, 0.25 * 2**level]}
                ],
            }
        )
    root.attrs.update(
        {
            "multiscales": [
                {
                    "version": "0.4",
                    "axes": [
                        {"name": "c", "type": "channel"},
                        {"name": "y", "type": "space", "unit": "micrometer"},
                        {"name": "x", "type": "space", "unit": "micrometer"},
                    ],
                    "datasets": datasets,
                }
            ],
            "omero": {
                "channels": [
                    {"label": "DAPI", "color": "0000FF", "window": _WINDOW},
                    {"label": "GFP", "color": "00FF00", "window": _WINDOW},
                ]
            },
        }
    )
    return path


def test_levels_channel_names_and_physical_sizes_are_read(tmp_path: Path) -> None:
    from biomero_importer.omero.zarr import PhysicalSize

    (image,) = read_zarr(make_pyramid_v2(tmp_path / "p.zarr", levels=3)).images
    assert image.levels == ("0", "1", "2")
    assert image.zarr_format == 2
    assert image.channel_names == ("DAPI", "GFP")
    assert image.physical_sizes == (
        PhysicalSize("y", 0.5, "micrometer"),
        PhysicalSize("x", 0.25, "micrometer"),
    )
    # without labels for every channel, no names (a partial list names the wrong channels)
    store = make_image_v2(tmp_path / "plain.zarr")
    (plain,) = read_zarr(store).images
    assert plain.channel_names == () and plain.levels == ("0",)
    assert [p.axis for p in plain.physical_sizes] == ["y", "x"]


@pytest.mark.parametrize("codec", ["none", "zlib", "gzip"])
def test_the_expected_tile_is_the_stores_pixels_big_endian(tmp_path: Path, codec: str) -> None:
    """What omero-zarr-pixel-buffer's getTile returns (big-endian rows, ZarrPixelBuffer
    ``toPixelData``), computed from the store's own chunk."""
    import numcodecs

    from biomero_importer.omero.zarr import check_tile_size, expected_tile

    compressor = {"none": None, "zlib": numcodecs.Zlib(), "gzip": numcodecs.GZip()}[codec]
    (image,) = read_zarr(make_pyramid_v2(tmp_path / "p.zarr", compressor)).images
    width, height = check_tile_size(image)
    assert (width, height) == (32, 32)
    wanted = zarr.open_array(str(tmp_path / "p.zarr" / "0"), mode="r")[0, :height, :width]
    assert expected_tile(image) == wanted.astype(">u2").tobytes()


def test_no_expected_tile_when_the_chunk_cannot_be_decoded_here(tmp_path: Path) -> None:
    import numcodecs

    from biomero_importer.omero.zarr import expected_tile

    (image,) = read_zarr(make_pyramid_v2(tmp_path / "p.zarr", numcodecs.Blosc())).images
    assert expected_tile(image) is None
    (v3,) = read_zarr(make_image_v3(tmp_path / "v3.zarr")).images
    assert expected_tile(v3) is None


def test_the_pixel_verdict_fails_on_a_romio_buffer_and_on_other_pixels(tmp_path: Path) -> None:
    from biomero_importer.omero.zarr import expected_tile, pixel_buffer_problem

    (image,) = read_zarr(make_pyramid_v2(tmp_path / "p.zarr")).images
    tile = expected_tile(image)
    assert tile is not None
    assert pixel_buffer_problem(image, 2, tile) is None
    # a ROMIO buffer opened in place of the Zarr one: one level
    problem = pixel_buffer_problem(image, 1, bytes(len(tile)))
    assert problem is not None and "1 resolution level where the NGFF image has 2" in problem
    problem = pixel_buffer_problem(image, 2, bytes(len(tile)))
    assert problem is not None and "pixels differ" in problem


def _sim_session(tmp_path: Path, **overrides: Any) -> Any:
    from biomero_importer.omero.simulator import SimulatorGateway

    from .conftest import make_settings

    gateway = SimulatorGateway(make_settings(tmp_path, **overrides))
    return gateway, gateway.open_session("alice", "lab", order_uuid="z")


def test_the_simulator_refuses_zarr_v3_unless_the_server_reads_it(tmp_path: Path) -> None:
    from biomero_importer.model import Target
    from biomero_importer.omero.port import ImportFailed

    store = make_image_v3(tmp_path / "v3.ome.zarr")
    gateway, session = _sim_session(tmp_path)
    try:
        with pytest.raises(ImportFailed) as caught:
            session.register_zarr(store, Target("Dataset", 1), order_uuid="z")
        assert "the OMERO pixel buffer reads NGFF 0.4 on zarr v2 only" in caught.value.reason
        assert session.find_imported(store, Target("Dataset", 1), order_uuid="z") == []
    finally:
        gateway.close()
    gateway, session = _sim_session(tmp_path, omero_zarr_reads_v3=True)
    try:
        (image,) = session.register_zarr(store, Target("Dataset", 1), order_uuid="z")
        assert image.type == "Image"
    finally:
        gateway.close()


def test_the_simulator_fails_a_store_its_pixel_buffer_cannot_read_and_keeps_nothing(
    tmp_path: Path,
) -> None:
    """A level whose array metadata is gone: the server's Zarr buffer fails, a one-level
    ROMIO buffer opens instead; the check sees it, the order fails, nothing stays."""
    import sqlite3

    from biomero_importer.model import Target
    from biomero_importer.omero.port import ImportFailed

    store = make_pyramid_v2(tmp_path / "p.zarr")
    (store / "1" / ".zarray").unlink()
    created: list[Any] = []
    gateway, session = _sim_session(tmp_path)
    try:
        with pytest.raises(ImportFailed) as caught:
            session.register_zarr(
                store, Target("Dataset", 1), order_uuid="z", on_created=created.append
            )
        assert "1 resolution level where the NGFF image has 2" in caught.value.reason
        assert created == []
        with sqlite3.connect(gateway.db_path) as db:
            assert db.execute("SELECT count(*) FROM objects").fetchone() == (0,)
            assert db.execute("SELECT count(*) FROM registrations").fetchone() == (0,)
        # the whole store is readable again: registered, with the same checks
        make_pyramid_v2(store)
        (image,) = session.register_zarr(store, Target("Dataset", 1), order_uuid="z")
        assert image.type == "Image"
    finally:
        gateway.close()
