"""Read OME-Zarr (NGFF) metadata from zarr v2 and v3 stores, without the ``zarr`` package.

Registration needs only what the JSON metadata says: which kind of container it is (one image,
a ``bioformats2raw.layout`` series collection, or a plate), names, the multiscales groups and
the shape of each image's full-resolution array.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

ZarrKind = Literal["image", "series", "plate"]

# NGFF before 0.4 stored axes as plain names; with none at all, OME's canonical order applies.
_DEFAULT_AXES = "tczyx"


class ZarrError(Exception):
    """The path is not an OME-Zarr this importer can register; the message says why."""


@dataclass(frozen=True)
class ZarrImage:
    """One multiscales group; ``shape`` and ``axes`` describe its full-resolution array."""

    name: str
    path: Path
    axes: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str

    def size(self, axis: str) -> int:
        """Length along ``axis`` (1 when the image has no such axis)."""
        return self.shape[self.axes.index(axis)] if axis in self.axes else 1


@dataclass(frozen=True)
class ZarrWell:
    path: str
    row: int
    column: int
    fields: list[ZarrImage]


@dataclass(frozen=True)
class ZarrPlate:
    name: str
    rows: list[str]
    columns: list[str]
    wells: list[ZarrWell]


@dataclass(frozen=True)
class ZarrContent:
    kind: ZarrKind
    path: Path
    zarr_format: int
    ngff_version: str | None
    name: str
    images: list[ZarrImage] = field(default_factory=list)
    plate: ZarrPlate | None = None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ZarrError(f"unreadable zarr metadata {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ZarrError(f"zarr metadata {path} is not a JSON object")
    return data


def _group_attrs(group: Path) -> tuple[int, dict[str, Any]] | None:
    """(zarr format, NGFF attributes) of a group, or None when the folder is no zarr group."""
    v3 = _read_json(group / "zarr.json")
    if v3 is not None:
        attrs = v3.get("attributes") or {}
        # NGFF 0.5 nests everything under "ome"; keep the version next to the other keys.
        ome = attrs.get("ome")
        if isinstance(ome, dict):
            return 3, ome
        return 3, attrs
    v2 = _read_json(group / ".zattrs")
    if v2 is not None:
        return 2, v2
    if (group / ".zgroup").is_file():
        return 2, {}
    return None


def _array_meta(array: Path) -> tuple[tuple[int, ...], str]:
    v3 = _read_json(array / "zarr.json")
    if v3 is not None and v3.get("node_type") == "array":
        return tuple(int(n) for n in v3["shape"]), str(v3.get("data_type", ""))
    v2 = _read_json(array / ".zarray")
    if v2 is not None:
        return tuple(int(n) for n in v2["shape"]), str(v2.get("dtype", ""))
    raise ZarrError(f"no zarr array metadata in {array}")


def _axes(multiscale: dict[str, Any], ndim: int) -> tuple[str, ...]:
    raw = multiscale.get("axes")
    if not raw:
        return tuple(_DEFAULT_AXES[-ndim:])
    names = [str(a["name"] if isinstance(a, dict) else a) for a in raw]
    return tuple(names)


def _image(group: Path, name: str) -> ZarrImage:
    found = _group_attrs(group)
    if found is None:
        raise ZarrError(f"no zarr group at {group}")
    multiscales = found[1].get("multiscales")
    if not isinstance(multiscales, list) or not multiscales:
        raise ZarrError(f"no multiscales metadata in {group}")
    first = multiscales[0]
    datasets = first.get("datasets") or []
    if not datasets:
        raise ZarrError(f"multiscales in {group} lists no datasets")
    shape, dtype = _array_meta(group / str(datasets[0]["path"]))
    axes = _axes(first, len(shape))
    if len(axes) != len(shape):
        raise ZarrError(f"{group}: {len(axes)} axes for a {len(shape)}-dimensional array")
    return ZarrImage(name=name, path=group, axes=axes, shape=shape, dtype=dtype)


def _series_paths(root: Path, ome_attrs: dict[str, Any] | None) -> list[str]:
    if ome_attrs and isinstance(ome_attrs.get("series"), list):
        return [str(s) for s in ome_attrs["series"]]
    paths: list[str] = []
    while (root / str(len(paths))).is_dir():
        paths.append(str(len(paths)))
    return paths


def _plate(root: Path, plate: dict[str, Any], default_name: str) -> ZarrPlate:
    rows = [str(r["name"]) for r in plate.get("rows", [])]
    columns = [str(c["name"]) for c in plate.get("columns", [])]
    wells: list[ZarrWell] = []
    for well in plate.get("wells", []):
        well_path = str(well["path"])
        row_name, _, column_name = well_path.partition("/")
        row = int(well["rowIndex"]) if "rowIndex" in well else rows.index(row_name)
        column = int(well["columnIndex"]) if "columnIndex" in well else columns.index(column_name)
        found = _group_attrs(root / well_path)
        well_attrs = found[1].get("well", {}) if found else {}
        fields = [
            _image(root / well_path / str(image["path"]), f"{well_path}/{image['path']}")
            for image in well_attrs.get("images", [])
        ]
        wells.append(ZarrWell(path=well_path, row=row, column=column, fields=fields))
    return ZarrPlate(
        name=str(plate.get("name") or default_name), rows=rows, columns=columns, wells=wells
    )


def read_zarr(path: Path) -> ZarrContent:
    """Classify an OME-Zarr and read what registration needs; raises ZarrError otherwise."""
    found = _group_attrs(path)
    if found is None:
        raise ZarrError(f"{path.name} is not a zarr store (no zarr.json, .zattrs or .zgroup)")
    zarr_format, attrs = found
    version = attrs.get("version")
    name = zarr_title(path.name)
    if isinstance(attrs.get("plate"), dict):
        plate = _plate(path, attrs["plate"], name)
        version = version or attrs["plate"].get("version")
        return ZarrContent(
            "plate", path, zarr_format, _str_or_none(version), plate.name, plate=plate
        )
    if "bioformats2raw.layout" in attrs:
        ome = _group_attrs(path / "OME")
        series = _series_paths(path, ome[1] if ome else None)
        if not series:
            raise ZarrError(f"{name}: bioformats2raw.layout without any series folder")
        images = [_image(path / s, f"{name} [{s}]") for s in series]
        return ZarrContent("series", path, zarr_format, _str_or_none(version), name, images)
    if isinstance(attrs.get("multiscales"), list):
        image = _image(path, name)
        version = version or attrs["multiscales"][0].get("version")
        return ZarrContent("image", path, zarr_format, _str_or_none(version), name, [image])
    raise ZarrError(f"{name} has no multiscales, plate or bioformats2raw.layout metadata")


def zarr_title(name: str) -> str:
    """OMERO object title of a store: its folder name without ``.ome.zarr`` or ``.zarr``,
    as the original importer names them."""
    for suffix in (".ome.zarr", ".zarr"):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def _str_or_none(value: object) -> str | None:
    return None if value is None else str(value)
