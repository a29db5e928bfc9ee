"""Read OME-Zarr (NGFF) metadata from zarr v2 and v3 stores, validated by ``ome-zarr-models``.

Registration needs only what the JSON metadata says: which kind of container it is (one image,
a ``bioformats2raw.layout`` series collection, or a plate), names, the multiscales groups and
the shape of each image's full-resolution array. The attributes are validated with the NGFF
specification's own pydantic models: NGFF 0.4 for zarr v2 stores (``.zattrs``), NGFF 0.5 for
zarr v3 stores (``zarr.json``, attributes under ``ome``). Metadata that does not validate
fails with the validator's first error.

Every path the metadata names (wells, well images, multiscales datasets, series) becomes an
ExternalInfo the OMERO server reads pixels from, so each must be relative, normalised and
inside the store after resolving symlinks (:func:`biomero_importer.paths.member`); so must
every metadata file read. Otherwise the store fails naming the offending entry.
"""

from __future__ import annotations

import functools
import gzip
import json
import math
import os
import zlib
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pydantic

from biomero_importer import paths
from biomero_importer.text import short

ZarrKind = Literal["image", "series", "plate"]

# The NGFF version each zarr format carries: 0.4 is the last on zarr v2, 0.5 the first on v3.
_NGFF = {2: "0.4", 3: "0.5"}


@functools.cache
def _models() -> dict[str, dict[int, type[pydantic.BaseModel]]]:
    """The NGFF models, imported on first use: ome-zarr-models needs Python >= 3.11, and the
    omero-py contract session (Python 3.10) imports this module without registering."""
    # Imported here on purpose (see above).
    from ome_zarr_models.v04.bioformats2raw import (  # noqa: PLC0415
        BioFormats2RawAttrs as Bf2RawV04,
    )
    from ome_zarr_models.v04.hcs import HCSAttrs as PlateV04  # noqa: PLC0415
    from ome_zarr_models.v04.image import ImageAttrs as ImageV04  # noqa: PLC0415
    from ome_zarr_models.v04.well import WellAttrs as WellV04  # noqa: PLC0415
    from ome_zarr_models.v05.bioformats2raw import (  # noqa: PLC0415
        BioFormats2RawAttrs as Bf2RawV05,
    )
    from ome_zarr_models.v05.hcs import HCSAttrs as PlateV05  # noqa: PLC0415
    from ome_zarr_models.v05.image import ImageAttrs as ImageV05  # noqa: PLC0415
    from ome_zarr_models.v05.well import WellAttrs as WellV05  # noqa: PLC0415

    return {
        "image": {2: ImageV04, 3: ImageV05},
        "plate": {2: PlateV04, 3: PlateV05},
        "well": {2: WellV04, 3: WellV05},
        "bioformats2raw": {2: Bf2RawV04, 3: Bf2RawV05},
    }


class ZarrError(Exception):
    """The path is not an OME-Zarr this importer can register; the message says why."""


@dataclass(frozen=True)
class PhysicalSize:
    """The pixel size along one spatial axis: its scale at full resolution and NGFF unit."""

    axis: str
    value: float
    unit: str | None


@dataclass(frozen=True)
class ZarrImage:
    """One multiscales group; ``shape`` and ``axes`` describe its full-resolution array,
    ``levels`` the paths of its resolution levels (``datasets``, full resolution first)."""

    name: str
    path: Path
    axes: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str
    levels: tuple[str, ...] = ("0",)
    zarr_format: int = 2
    channel_names: tuple[str, ...] = ()
    physical_sizes: tuple[PhysicalSize, ...] = ()

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


@dataclass(frozen=True)
class _Group:
    """A zarr group of the store: where it is, its zarr format and its NGFF attributes."""

    path: Path
    zarr_format: int
    attrs: dict[str, Any]


class _Store:
    """One store, resolved once; every folder and file it reads is checked to lie inside."""

    def __init__(self, path: Path) -> None:
        try:
            self.root = paths.contained(path, paths.Area.of("the zarr store", [path]), "Store")
        except paths.PathRefused as exc:
            raise ZarrError(exc.reason) from None
        self.name = path.name
        # OMERO object titles drop .zarr/.ome.zarr, as the original importer names them
        self.title = zarr_title(path.name)

    def folder(self, relative: str, entry: str) -> Path:
        if not relative:
            return self.root
        try:
            return paths.member(self.root, relative, entry)
        except paths.PathRefused as exc:
            raise ZarrError(exc.reason) from None

    def json(self, relative: str, name: str) -> dict[str, Any] | None:
        """A metadata file of the store, or None when there is none."""
        where = f"{relative}/{name}" if relative else name
        if not os.path.lexists(self.root / where):
            return None
        path = self.folder(where, where)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ZarrError(f"unreadable zarr metadata {short(where)}: {exc}") from exc
        if not isinstance(data, dict):
            raise ZarrError(f"zarr metadata {short(where)} is not a JSON object")
        return data

    def group(self, relative: str, entry: str) -> _Group | None:
        """The group at ``relative`` (named ``entry`` in errors), or None when it is none."""
        path = self.folder(relative, entry)
        v3 = self.json(relative, "zarr.json")
        if v3 is not None:
            attrs = v3.get("attributes") or {}
            if not isinstance(attrs, dict):
                raise ZarrError(f"{short(entry)}: zarr.json attributes are not an object")
            # NGFF 0.5 nests everything under "ome".
            ome = attrs.get("ome")
            return _Group(path, 3, ome if isinstance(ome, dict) else {})
        v2 = self.json(relative, ".zattrs")
        if v2 is not None:
            return _Group(path, 2, v2)
        if os.path.lexists(path / ".zgroup"):
            return _Group(path, 2, {})
        return None

    def array(self, relative: str, entry: str) -> tuple[tuple[int, ...], str]:
        self.folder(relative, entry)
        v3 = self.json(relative, "zarr.json")
        found: tuple[dict[str, Any], str] | None
        if v3 is not None and v3.get("node_type") == "array":
            found = v3, "data_type"
        else:
            v2 = self.json(relative, ".zarray")
            found = None if v2 is None else (v2, "dtype")
        if found is None:
            raise ZarrError(f"no zarr array metadata in {short(entry)}")
        meta, dtype_key = found
        try:
            return tuple(int(n) for n in meta["shape"]), str(meta.get(dtype_key, ""))
        except (KeyError, TypeError, ValueError):
            raise ZarrError(f"array metadata of {short(entry)} has no usable shape") from None


def _join(*parts: str) -> str:
    return "/".join(part for part in parts if part)


def _validated(kind: str, group: _Group, label: str) -> Any:
    """``group``'s attributes as the NGFF model of ``kind`` for its zarr format."""
    try:
        return _models()[kind][group.zarr_format].model_validate(group.attrs)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or kind
        # pydantic's message can quote a whole list of wells: cut it for the description.
        message = short(first["msg"].replace("\n", " "), 300)
        version = _NGFF[group.zarr_format]
        raise ZarrError(
            f"{short(label)} is not valid NGFF {version} {kind} metadata: {where}: {message}"
        ) from None


def _image(store: _Store, relative: str, name: str) -> ZarrImage:
    label = relative or store.name
    group = store.group(relative, label)
    if group is None:
        raise ZarrError(f"no zarr group at {short(label)}")
    attrs = _validated("image", group, label)
    first = attrs.multiscales[0]
    entry = f"{relative or store.name}: multiscales[0].datasets[0].path"
    shape, dtype = store.array(_join(relative, first.datasets[0].path), entry)
    axes = tuple(axis.name for axis in first.axes)
    if len(axes) != len(shape):
        raise ZarrError(f"{short(label)}: {len(axes)} axes for a {len(shape)}-dimensional array")
    return ZarrImage(
        name=name,
        path=group.path,
        axes=axes,
        shape=shape,
        dtype=dtype,
        levels=tuple(dataset.path for dataset in first.datasets),
        zarr_format=group.zarr_format,
        channel_names=_channel_names(group.attrs, _size(axes, shape, "c")),
        physical_sizes=_physical_sizes(group.attrs, axes),
    )


def _size(axes: tuple[str, ...], shape: tuple[int, ...], axis: str) -> int:
    return shape[axes.index(axis)] if axis in axes else 1


def _channel_names(attrs: dict[str, Any], channels: int) -> tuple[str, ...]:
    """``omero.channels[].label``, as omero-cli-zarr names channels (``get_channels``); none
    unless there is one label per channel (a partial list would name the wrong channels)."""
    omero = attrs.get("omero")
    entries = omero.get("channels") if isinstance(omero, dict) else None
    if not isinstance(entries, list) or len(entries) != channels:
        return ()
    names = [e.get("label") if isinstance(e, dict) else None for e in entries]
    if not all(isinstance(n, str) and n.strip() for n in names):
        return ()
    return tuple(str(n) for n in names)


def _scale(transforms: object, count: int) -> list[float] | None:
    if not isinstance(transforms, list):
        return None
    for transform in transforms:
        if isinstance(transform, dict) and transform.get("type") == "scale":
            scale = transform.get("scale")
            if isinstance(scale, list) and len(scale) == count:
                try:
                    return [float(v) for v in scale]
                except (TypeError, ValueError):
                    return None
    return None


def _physical_sizes(attrs: dict[str, Any], axes: tuple[str, ...]) -> tuple[PhysicalSize, ...]:
    """x, y and z pixel sizes: the full-resolution dataset's scale (times the multiscales'
    own scale, when it has one) with each axis's unit, as NGFF defines them."""
    multiscales = attrs.get("multiscales")
    if not isinstance(multiscales, list) or not multiscales:
        return ()
    first = multiscales[0]
    datasets = first.get("datasets") or [{}]
    scale = _scale(datasets[0].get("coordinateTransformations"), len(axes))
    if scale is None:
        return ()
    outer = _scale(first.get("coordinateTransformations"), len(axes))
    if outer is not None:
        scale = [a * b for a, b in zip(scale, outer, strict=True)]
    units = [a.get("unit") if isinstance(a, dict) else None for a in first.get("axes", [])]
    return tuple(
        PhysicalSize(axis, scale[i], units[i] if i < len(units) else None)
        for i, axis in enumerate(axes)
        if axis in ("x", "y", "z") and math.isfinite(scale[i]) and scale[i] > 0
    )


def _check(store: _Store, relative: str, entry: str) -> str:
    """``relative`` once it is known to name a folder inside the store."""
    store.folder(relative, entry)
    return relative


def _series(store: _Store) -> list[str]:
    ome = store.group("OME", "OME")
    if ome is not None and "series" in ome.attrs:
        series = ome.attrs["series"]
        if not isinstance(series, list) or not all(isinstance(s, str) for s in series):
            raise ZarrError("OME series must be a list of paths")
        return list(series)
    paths_found: list[str] = []
    while (store.root / str(len(paths_found))).is_dir():
        paths_found.append(str(len(paths_found)))
    return paths_found


def _plate(store: _Store, group: _Group) -> ZarrPlate:
    plate = _validated("plate", group, store.name).plate
    wells: list[ZarrWell] = []
    for index, well in enumerate(plate.wells):
        entry = f"plate.wells[{index}].path"
        well_group = store.group(well.path, entry)
        images = []
        if well_group is not None:
            images = _validated("well", well_group, well.path).well.images
        fields = [
            _image(
                store,
                _check(store, _join(well.path, image.path), f"{well.path}: well.images[{n}].path"),
                f"{well.path}/{image.path}",
            )
            for n, image in enumerate(images)
        ]
        wells.append(
            ZarrWell(path=well.path, row=well.rowIndex, column=well.columnIndex, fields=fields)
        )
    return ZarrPlate(
        name=str(plate.name or store.title),
        rows=[row.name for row in plate.rows],
        columns=[column.name for column in plate.columns],
        wells=wells,
    )


def read_zarr(path: Path) -> ZarrContent:
    """Classify an OME-Zarr and read what registration needs; raises ZarrError otherwise."""
    store = _Store(path)
    group = store.group("", store.name)
    if group is None:
        raise ZarrError(f"{store.name} is not a zarr store (no zarr.json, .zattrs or .zgroup)")
    version = _NGFF[group.zarr_format]
    common = (store.root, group.zarr_format, version)
    # A converted plate keeps bioformats2raw.layout next to its plate metadata.
    if "plate" in group.attrs:
        plate = _plate(store, group)
        return ZarrContent("plate", *common, plate.name, plate=plate)
    if "bioformats2raw.layout" in group.attrs:
        _validated("bioformats2raw", group, store.name)
        series = _series(store)
        if not series:
            raise ZarrError(f"{store.name}: bioformats2raw.layout without any series folder")
        images = [
            _image(store, _check(store, s, f"OME.series[{n}]"), f"{store.title} [{s}]")
            for n, s in enumerate(series)
        ]
        return ZarrContent("series", *common, store.title, images)
    if "multiscales" in group.attrs:
        image = _image(store, "", store.title)
        return ZarrContent("image", *common, store.title, [image])
    raise ZarrError(f"{store.name} has no multiscales, plate or bioformats2raw.layout metadata")


def zarr_title(name: str) -> str:
    """OMERO object title of a store: its folder name without ``.ome.zarr`` or ``.zarr``."""
    for suffix in (".ome.zarr", ".zarr"):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


# What the server's pixel buffer reads (omero-zarr-pixel-buffer 0.6.1, jzarr 0.4.2: `.zgroup`).
ZARR_V3_REFUSED = "the OMERO pixel buffer reads NGFF 0.4 on zarr v2 only"


def require_servable_format(content: ZarrContent, reads_v3: bool) -> None:
    """Refuse a zarr v3 (NGFF 0.5) store unless the server's extension reads zarr v3
    (``omero_zarr_reads_v3``): registered, it would show no pixels."""
    if content.zarr_format == 3 and not reads_v3:
        raise ZarrError(
            f"{content.path.name} is zarr v3 (NGFF 0.5): {ZARR_V3_REFUSED}"
            " (convert it to NGFF 0.4, or set omero_zarr_reads_v3 once the server reads zarr v3)"
        )


# The largest tile the pixel check reads: a few kilobytes, whatever the image.
CHECK_TILE = 32


def check_tile_size(image: ZarrImage) -> tuple[int, int]:
    """The (width, height) of the top-left tile the pixel check compares."""
    return min(CHECK_TILE, image.size("x")), min(CHECK_TILE, image.size("y"))


def _decompress(data: bytes, compressor: object) -> bytes | None:
    if compressor is None:
        return data
    name = compressor.get("id") if isinstance(compressor, dict) else None
    if name == "zlib":
        return zlib.decompress(data)
    if name == "gzip":
        return gzip.decompress(data)
    return None  # blosc, zstd...: not readable without their codecs


def expected_tile(image: ZarrImage) -> bytes | None:
    """The first plane's top-left tile (z, c, t = 0) of the full-resolution array, as a
    pixel buffer returns it (big-endian, row after row: omero-zarr-pixel-buffer
    ``ZarrPixelBuffer.toPixelData``); None when this process cannot decode the chunk (zarr v3,
    a codec other than zlib/gzip, filters, F order), so only the levels can be compared."""
    if image.zarr_format != 2:
        return None
    folder = image.path / image.levels[0]
    try:
        meta = json.loads((folder / ".zarray").read_text(encoding="utf-8"))
        chunks = [int(n) for n in meta["chunks"]]
        dtype = str(meta["dtype"])
        if meta.get("filters") or meta.get("order", "C") != "C" or len(chunks) != len(image.axes):
            return None
        separator = str(meta.get("dimension_separator") or ".")
        raw = (folder / separator.join("0" * len(chunks))).read_bytes()
        data = _decompress(raw, meta.get("compressor"))
    except (OSError, ValueError, KeyError, TypeError, zlib.error):
        return None
    width, height = check_tile_size(image)
    item = int(dtype[2:]) if dtype[2:].isdigit() else 0
    # NGFF puts y and x last; C order with every leading index 0: row r starts at r * cx.
    yx = image.axes[-2:] == ("y", "x")
    if data is None or not yx or item not in (1, 2, 4, 8) or dtype[0] not in "<>|":
        return None
    if width > chunks[-1] or height > chunks[-2]:
        return None
    stride = chunks[-1] * item
    tile = b"".join(data[r * stride : r * stride + width * item] for r in range(height))
    if len(tile) != width * height * item:
        return None
    if item > 1 and dtype[0] == "<":
        values = array({2: "H", 4: "I", 8: "Q"}[item], tile)
        values.byteswap()
        tile = values.tobytes()
    return tile


def pixel_buffer_problem(image: ZarrImage, levels: int, tile: bytes | None) -> str | None:
    """What the server's answers say about its pixel buffer for ``image``: None when they
    are what only an OME-Zarr pixel buffer gives, else why not.

    ``RawPixelsStore.setPixelsId`` succeeds whatever happens: omero-server's
    ``ZarrPixelsService`` returns null on a Zarr failure and a ROMIO buffer (one resolution
    level, no data) is opened instead. So the buffer's resolution levels are compared with
    the NGFF datasets, and its top-left tile with the store's own bytes where this process
    can decode them."""
    expected = len(image.levels)
    if levels != expected:
        return (
            f"the server's pixel buffer has {levels} resolution level"
            f"{'' if levels == 1 else 's'} where the NGFF image has {expected}: it does not"
            " read this OME-Zarr (omero-zarr-pixel-buffer missing, or the store not visible"
            " to the server at this path)"
        )
    if tile is not None:
        wanted = expected_tile(image)
        if wanted is not None and tile != wanted:
            return (
                "the server's pixels differ from the store's (top-left tile): it does not read"
                " this OME-Zarr (omero-zarr-pixel-buffer missing, or another store at this path)"
            )
    return None
