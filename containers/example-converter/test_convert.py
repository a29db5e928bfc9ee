"""The example converter, run directly with Python on small generated TIFFs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

SCRIPT = Path(__file__).with_name("convert.py")


def run(*args: str | Path) -> tuple[int, list[str], str]:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return proc.returncode, proc.stdout.strip().splitlines(), proc.stderr


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path, Path]:
    data = tmp_path / "data"
    data.mkdir()
    return data, data / ".processed", tmp_path / "alt"


def test_2d_tiff_becomes_one_ome_tiff_in_both_folders(folders: tuple[Path, Path, Path]) -> None:
    data, out, alt = folders
    pixels = np.arange(64 * 48, dtype=np.uint16).reshape(48, 64)
    tifffile.imwrite(data / "cells.tif", pixels)
    code, lines, _ = run(
        "--inputfile", data / "cells.tif", "--outputfolder", out, "--altoutputfolder", alt
    )
    assert code == 0
    (item,) = json.loads(lines[-1])
    assert item["name"] == "cells"
    assert item["full_path"] == str(out / "cells.ome.tiff")
    assert item["alt_path"] == str(alt / "cells.ome.tiff")
    assert {"shape": "48x64"} in item["keyvalues"]
    assert {"max": str(64 * 48 - 1)} in item["keyvalues"]
    for path in (item["full_path"], item["alt_path"]):
        with tifffile.TiffFile(path) as tif:
            assert tif.is_ome
            assert np.array_equal(tif.asarray(), pixels)
    assert Path(item["full_path"]).read_bytes() == Path(item["alt_path"]).read_bytes()


def test_stacks_planar_samples_and_rgb_map_to_ome_axes(folders: tuple[Path, Path, Path]) -> None:
    data, out, alt = folders
    stack = np.random.default_rng(1).integers(0, 255, (5, 16, 16), dtype=np.uint8)
    tifffile.imwrite(data / "stack.tif", stack)
    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    tifffile.imwrite(data / "color.tif", rgb, photometric="rgb")
    planar = np.zeros((4, 8, 8), dtype=np.uint16)
    tifffile.imwrite(data / "planar.tif", planar, photometric="minisblack", planarconfig="separate")
    for name, axes in (("stack", "ZYX"), ("color", "YXS"), ("planar", "CYX")):
        code, lines, _ = run(
            "--inputfile", data / f"{name}.tif", "--outputfolder", out, "--altoutputfolder", alt
        )
        assert code == 0
        (item,) = json.loads(lines[-1])
        assert {"axes": axes} in item["keyvalues"]
        with tifffile.TiffFile(item["alt_path"]) as tif:
            assert tif.is_ome and tif.series[0].axes == axes


def test_several_series_give_several_items(folders: tuple[Path, Path, Path]) -> None:
    data, out, alt = folders
    with tifffile.TiffWriter(data / "two.tif") as writer:
        writer.write(np.zeros((4, 4), dtype=np.uint8))
        writer.write(np.ones((6, 6), dtype=np.uint16))
    code, lines, _ = run(
        "--inputfile", data / "two.tif", "--outputfolder", out, "--altoutputfolder", alt
    )
    assert code == 0
    items = json.loads(lines[-1])
    assert [item["name"] for item in items] == ["two #1", "two #2"]
    assert [Path(item["alt_path"]).name for item in items] == ["two_s1.ome.tiff", "two_s2.ome.tiff"]


def test_without_alt_folder_alt_path_is_null_and_extras_are_ignored(
    folders: tuple[Path, Path, Path],
) -> None:
    data, out, _ = folders
    tifffile.imwrite(data / "a.tif", np.zeros((4, 4), dtype=np.uint8))
    code, lines, stderr = run(
        "--inputfile",
        data / "a.tif",
        "--outputfolder",
        out,
        "--image_uuid",
        "123",
        "--outputformat",
        "ometiff",
        "--compression",
        "none",
    )
    assert code == 0
    (item,) = json.loads(lines[-1])
    assert item["alt_path"] is None
    assert Path(item["full_path"]).is_file()
    assert "ignoring unknown arguments: --image_uuid 123" in stderr


@pytest.mark.parametrize("content", [b"not a tiff at all", b""])
def test_unreadable_input_prints_error_and_exits_1(
    folders: tuple[Path, Path, Path], content: bytes
) -> None:
    data, out, alt = folders
    (data / "bad.tif").write_bytes(content)
    code, lines, stderr = run(
        "--inputfile", data / "bad.tif", "--outputfolder", out, "--altoutputfolder", alt
    )
    assert code == 1
    assert lines[-1] == "Error"
    assert "conversion failed" in stderr


def test_ome_input_is_refused(folders: tuple[Path, Path, Path]) -> None:
    data, out, alt = folders
    tifffile.imwrite(data / "done.ome.tif", np.zeros((4, 4), dtype=np.uint8), ome=True)
    code, lines, stderr = run(
        "--inputfile", data / "done.ome.tif", "--outputfolder", out, "--altoutputfolder", alt
    )
    assert (code, lines[-1]) == (1, "Error")
    assert "already an OME-TIFF" in stderr
