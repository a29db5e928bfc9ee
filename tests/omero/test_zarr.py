"""NGFF metadata from small real zarr v2 and v3 stores (written with the zarr package)."""

from __future__ import annotations

import json
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


def test_v2_single_image(tmp_path: Path) -> None:
    content = read_zarr(make_image_v2(tmp_path / "cells.zarr"))
    assert (content.kind, content.zarr_format, content.ngff_version) == ("image", 2, "0.4")
    (image,) = content.images
    assert image.name == "cells"
    assert image.axes == ("c", "y", "x") and image.shape == (2, 8, 16)
    assert (image.size("x"), image.size("y"), image.size("c"), image.size("z")) == (16, 8, 2, 1)
    assert image.dtype == "<u2"
    assert image.path == tmp_path / "cells.zarr"


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


def test_v2_plate_written_by_hand(tmp_path: Path) -> None:
    root = tmp_path / "hand.zarr"
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
                    "wells": [{"path": "C/3"}],
                }
            }
        )
    )
    (root / "C" / "3" / ".zattrs").write_text(json.dumps({"well": {"images": [{"path": "0"}]}}))
    (field / ".zattrs").write_text(
        json.dumps({"multiscales": [{"axes": ["y", "x"], "datasets": [{"path": "0"}]}]})
    )
    (field / "0" / ".zarray").write_text(json.dumps({"shape": [5, 6], "dtype": "|u1"}))
    content = read_zarr(root)
    assert (content.kind, content.name, content.ngff_version) == ("plate", "hand", "0.4")
    assert content.plate is not None
    well = content.plate.wells[0]
    assert (well.row, well.column) == (0, 0)
    assert well.fields[0].axes == ("y", "x") and well.fields[0].shape == (5, 6)


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


def test_missing_array_metadata(tmp_path: Path) -> None:
    store = make_image_v2(tmp_path / "broken.zarr")
    (store / "0" / ".zarray").unlink()
    with pytest.raises(ZarrError, match="no zarr array metadata"):
        read_zarr(store)
