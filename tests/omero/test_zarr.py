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
