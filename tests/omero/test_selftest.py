"""The OMERO import test (``check --omero-import-test``) through a STUB OF THE SERVER'S ANSWERS:
each port call answers what a test scripts (an object, or the error the blitz backend raises for
that server answer). The whole path against the simulator is in tests/cli/test_check.py."""

from __future__ import annotations

import itertools
import struct
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from biomero_importer.model import ImportedObject, Target
from biomero_importer.omero.port import ImportFailed, OmeroError, UnknownUserOrGroup
from biomero_importer.omero.selftest import run_import_test, tiny_png, write_ngff
from biomero_importer.omero.zarr import expected_tile, read_zarr

from .conftest import make_settings

pytestmark = pytest.mark.unit

IMAGE = ImportedObject("Image", 7, "biomero-importer-selftest.png", "")
ZARR = ImportedObject("Image", 8, "biomero-importer-selftest", "")


class StubServerAnswers:
    """Gateway and session at once; ``answers`` maps a port call to what it returns or an
    exception it raises. Records the calls."""

    def __init__(self, **answers: Any) -> None:
        self.answers = answers
        self.calls: list[str] = []
        self.deleted: list[ImportedObject] = []
        self.files_seen: list[Path] = []
        self.closed = False

    def _answer(self, name: str) -> Any:
        self.calls.append(name)
        answer = self.answers.get(name)
        if isinstance(answer, Exception):
            raise answer
        return answer

    # gateway
    def describe(self) -> str:
        return "OMERO root@omero.example:4064 (stub)"

    def check(self) -> None:
        self._answer("check")

    def open_session(self, user: str, group: str, *, order_uuid: str) -> StubServerAnswers:
        self._answer("open_session")
        return self

    # session
    def import_path(self, path: Path, target: Target, **_: Any) -> list[ImportedObject]:
        self.files_seen.append(path)
        assert path.read_bytes().startswith(b"\x89PNG")
        answer = self._answer("import_path")
        return [IMAGE] if answer is None else list(answer)

    def find_imported(self, path: Path, target: Target, **_: Any) -> list[ImportedObject]:
        answer = self._answer("find_imported")
        return [IMAGE] if answer is None else list(answer)

    def annotate(self, obj: ImportedObject, namespace: str, pairs: Sequence[Any]) -> int:
        self._answer("annotate")
        return 99

    def register_zarr(
        self,
        path: Path,
        target: Target,
        *,
        order_uuid: str,
        on_created: Callable[[ImportedObject], None] | None = None,
        **_: Any,
    ) -> list[ImportedObject]:
        self.files_seen.append(path)
        assert on_created is not None
        # reported before the pixel check, as a failure after it would come
        on_created(ZARR)
        self._answer("register_zarr")
        return [ZARR]

    def delete(self, objects: Sequence[ImportedObject]) -> None:
        self._answer("delete")
        self.deleted.extend(objects)

    def close(self) -> None:
        self.closed = True


def _run(tmp_path: Path, stub: StubServerAnswers) -> list[Any]:
    ticks = itertools.count(0, 0.5)
    folder = tmp_path / "data"
    folder.mkdir(exist_ok=True)
    steps = run_import_test(
        stub,  # type: ignore[arg-type]
        make_settings(tmp_path),
        dataset=5,
        user="alice",
        group="lab",
        folder=folder,
        clock=lambda: next(ticks),
    )
    # whatever happened, the test's files are gone
    assert list(folder.iterdir()) == []
    return steps


def test_every_step_passes_and_what_was_created_is_deleted(tmp_path: Path) -> None:
    stub = StubServerAnswers()
    steps = _run(tmp_path, stub)
    assert [(s.name, s.ok) for s in steps] == [
        ("OMERO admin login", True),
        ("session as alice in lab", True),
        ("import a tiny image in place into Dataset 5", True),
        ("find it by the order comment", True),
        ("annotate it", True),
        ("register a tiny OME-Zarr and read a tile back", True),
        ("delete what the test created", True),
    ]
    assert all(s.seconds == 0.5 for s in steps)
    assert steps[2].detail == "Image 7" and steps[4].detail == "MapAnnotation 99"
    assert stub.deleted == [IMAGE, ZARR] and stub.closed


def test_a_failed_import_stops_the_test_with_its_reason_and_fix(tmp_path: Path) -> None:
    reason = "OMERO import of biomero-importer-selftest.png failed: no import summary found"
    stub = StubServerAnswers(import_path=ImportFailed(reason))
    steps = _run(tmp_path, stub)
    assert [s.name for s in steps][-1] == "import a tiny image in place into Dataset 5"
    assert (steps[-1].ok, steps[-1].detail) == (False, reason)
    assert "at the same path" in steps[-1].hint and "Dataset 5" in steps[-1].hint
    assert "delete" not in stub.calls and stub.closed


def test_an_import_not_found_by_its_comment_fails_and_is_deleted(tmp_path: Path) -> None:
    stub = StubServerAnswers(find_imported=[])
    steps = _run(tmp_path, stub)
    find = next(s for s in steps if s.name == "find it by the order comment")
    assert not find.ok
    assert find.detail == "found nothing by the order comment, imported Image 7"
    assert steps[-1].name == "delete what the test created" and steps[-1].ok
    assert stub.deleted == [IMAGE]


def test_a_registration_the_server_cannot_read_is_reported_and_cleaned_up(
    tmp_path: Path,
) -> None:
    problem = (
        "OME-Zarr registration of biomero-importer-selftest.ome.zarr failed: the server's pixel"
        " buffer has 1 resolution level where the NGFF image has 2"
    )
    stub = StubServerAnswers(register_zarr=ImportFailed(problem))
    steps = _run(tmp_path, stub)
    register = steps[-2]
    assert (register.ok, register.detail) == (False, problem)
    assert "omero-zarr-pixel-buffer" in register.hint
    assert stub.deleted == [IMAGE, ZARR]


def test_a_failed_delete_names_what_is_left(tmp_path: Path) -> None:
    stub = StubServerAnswers(delete=OmeroError("OMERO refused deleting Image 7"))
    steps = _run(tmp_path, stub)
    assert not steps[-1].ok
    assert steps[-1].hint == "delete Image 7, Image 8 in Dataset 5 by hand"


def test_a_refused_session_stops_before_any_file(tmp_path: Path) -> None:
    stub = StubServerAnswers(open_session=UnknownUserOrGroup("alice", "lab"))
    steps = _run(tmp_path, stub)
    assert [s.ok for s in steps] == [True, False]
    assert stub.files_seen == []


def test_the_generated_png_is_a_valid_png(tmp_path: Path) -> None:
    data = tiny_png(64, 64)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    offset, chunks = 8, {}
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind, body = data[offset + 4 : offset + 8], data[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length : offset + 12 + length])
        assert crc == zlib.crc32(kind + body)
        chunks[kind] = body
        offset += 12 + length
    assert struct.unpack(">IIBBBBB", chunks[b"IHDR"]) == (64, 64, 8, 0, 0, 0, 0)
    rows = zlib.decompress(chunks[b"IDAT"])
    assert len(rows) == 64 * 65 and rows[65 * 3 + 1 + 2] == 5  # filter byte, then x + y


def test_the_generated_ome_zarr_is_ngff_04_with_two_levels_and_a_readable_tile(
    tmp_path: Path,
) -> None:
    content = read_zarr(write_ngff(tmp_path / "t.ome.zarr"))
    assert (content.kind, content.zarr_format, content.ngff_version) == ("image", 2, "0.4")
    (image,) = content.images
    assert image.levels == ("0", "1") and image.shape == (64, 64)
    tile = expected_tile(image)
    assert tile is not None and len(tile) == 32 * 32 and tile[1] == 3
