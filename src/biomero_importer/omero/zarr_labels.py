"""Registration options applied to an OME-Zarr before it is registered.

A Plate registered with ``platePixelSource: label`` is a label-backed preview: each field
image shows its NGFF label image ``labels/<plateLabelName>`` (itself a multiscales image)
instead of the source pixels. Only the public reader of ``omero.zarr`` is used here.
"""

from __future__ import annotations

from dataclasses import replace

from biomero_importer.model import RegistrationOptions
from biomero_importer.omero.zarr import ZarrContent, ZarrError, ZarrImage, read_zarr


def _label_image(field: ZarrImage, label_name: str) -> ZarrImage:
    group = field.path / "labels" / label_name
    try:
        label = read_zarr(group)
    except ZarrError as exc:
        raise ZarrError(f"field {field.name} has no label image '{label_name}': {exc}") from None
    if label.kind != "image":
        raise ZarrError(f"labels/{label_name} of field {field.name} is not a single image")
    return replace(label.images[0], name=field.name)


def for_registration(content: ZarrContent, options: RegistrationOptions | None) -> ZarrContent:
    """``content`` as it is to be registered: a plate's fields swapped for their label images
    when the options ask for label pixels; anything else unchanged."""
    if options is None or options.plate_pixel_source != "label" or content.plate is None:
        return content
    label_name = options.plate_label_name or ""
    wells = [
        replace(well, fields=[_label_image(field, label_name) for field in well.fields])
        for well in content.plate.wells
    ]
    return replace(content, plate=replace(content.plate, wells=wells))
