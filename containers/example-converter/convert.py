"""An example preprocessing converter for biomero-importer: TIFF to OME-TIFF.

It follows the contract every BIOMERO converter follows:

* arguments ``--inputfile``, ``--outputfolder``, ``--altoutputfolder`` plus its own extras
  (here ``--outputformat`` and ``--compression``); extras it does not know are reported on
  stderr and ignored, because the importer passes every extra param of an order;
* every output is written to ``--outputfolder`` (shared storage, kept) and copied to
  ``--altoutputfolder`` (fast local disk, imported, then deleted by the importer);
* on success the LAST stdout line is a JSON list with one item per output:
  ``{"name", "full_path", "alt_path", "keyvalues"}``; keyvalues become annotations;
* on failure it prints ``Error`` and exits 1 (the reason goes to stderr).

Run ``python convert.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

# Axes an OME-TIFF may carry; tifffile names stacked pages of a plain TIFF 'I' or 'Q'.
OME_AXES = "TCZYXS"
GENERIC_AXES = "IQ"


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--inputfile", required=True, help="TIFF file to convert")
    parser.add_argument("--outputfolder", required=True, help="kept copy (shared storage)")
    parser.add_argument("--altoutputfolder", help="copy to import from (fast local disk)")
    parser.add_argument("--outputformat", default="ometiff", choices=["ometiff"])
    parser.add_argument("--compression", default="zlib", choices=["none", "zlib"])
    return parser.parse_known_args(argv)


def ome_axes(axes: str) -> str:
    """Plain-TIFF axes as OME axes: one stack of pages becomes Z, planar samples channels."""
    generic = [axis for axis in axes if axis in GENERIC_AXES]
    if len(generic) > 1:
        raise ValueError(f"cannot map axes {axes} to OME")
    mapped = axes.replace(generic[0], "Z") if generic else axes
    if "S" in mapped and not mapped.endswith("S") and "C" not in mapped:
        mapped = mapped.replace("S", "C")
    unknown = sorted(set(mapped) - set(OME_AXES))
    if unknown or len(set(mapped)) != len(mapped):
        raise ValueError(f"cannot map axes {axes} to OME")
    return mapped


def keyvalues(data: np.ndarray, axes: str, source: Path) -> list[dict[str, str]]:
    return [
        {"source_format": "tiff"},
        {"source_file": source.name},
        {"axes": axes},
        {"shape": "x".join(str(n) for n in data.shape)},
        {"dtype": str(data.dtype)},
        {"min": str(data.min())},
        {"max": str(data.max())},
    ]


def convert(
    inputfile: Path, outputfolder: Path, altoutputfolder: Path | None, compression: str
) -> list[dict[str, Any]]:
    outputfolder.mkdir(parents=True, exist_ok=True)
    if altoutputfolder is not None:
        altoutputfolder.mkdir(parents=True, exist_ok=True)
    stem = inputfile.name.split(".")[0] or "image"
    items: list[dict[str, Any]] = []
    with tifffile.TiffFile(inputfile) as tif:
        if tif.is_ome:
            raise ValueError("input is already an OME-TIFF")
        series = list(tif.series)
        for number, one in enumerate(series, start=1):
            print(f"converting series {number}/{len(series)} {one.shape} {one.axes}", flush=True)
            data = one.asarray()
            axes = ome_axes(one.axes)
            single = len(series) == 1
            name = stem if single else f"{stem} #{number}"
            filename = f"{stem}.ome.tiff" if single else f"{stem}_s{number}.ome.tiff"
            target = outputfolder / filename
            tifffile.imwrite(
                target,
                data,
                ome=True,
                photometric="rgb" if axes.endswith("S") else "minisblack",
                metadata={"axes": axes, "Name": name},
                compression=None if compression == "none" else "zlib",
            )
            alt = None
            if altoutputfolder is not None:
                alt = altoutputfolder / filename
                shutil.copyfile(target, alt)
            items.append(
                {
                    "name": name,
                    "full_path": str(target),
                    "alt_path": str(alt) if alt is not None else None,
                    "keyvalues": keyvalues(data, axes, inputfile),
                }
            )
    return items


def main(argv: list[str] | None = None) -> int:
    args, ignored = parse_args(sys.argv[1:] if argv is None else argv)
    if ignored:
        print(f"ignoring unknown arguments: {' '.join(ignored)}", file=sys.stderr)
    try:
        items = convert(
            Path(args.inputfile),
            Path(args.outputfolder),
            Path(args.altoutputfolder) if args.altoutputfolder else None,
            args.compression,
        )
    # Any failure at all is reported the way the contract says.
    except Exception as exc:
        print(f"conversion failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        print("Error", flush=True)
        return 1
    print(json.dumps(items), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
