"""``check --omero-import-test``: the production path, proven on the facility's own server.

Against the configured OMERO, as a named user in a named group, into a scratch Dataset the admin
names: import a tiny generated PNG in place (the same ``import_path`` every order uses, so the
same ``omero import`` argv and the same verdict, ``importcli.parse_import_result``), find it again
by the order comment, annotate it, register a tiny NGFF 0.4 OME-Zarr (the same
``register_zarr``, whose pixel check reads the resolution levels and a tile back), then delete
everything it created, OMERO objects and files. Each step is timed and says how to fix it.

The files are written in a fresh folder under ``folder`` (by default the first import root):
the server must see them at the same path, as it must see every in-place import.
"""

from __future__ import annotations

import json
import shutil
import struct
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from biomero_importer.omero.port import (
    ImportedObject,
    OmeroError,
    OmeroGateway,
    OmeroSession,
    Target,
)
from biomero_importer.settings import Settings

T = TypeVar("T")

SELFTEST_NAME = "biomero-importer-selftest"
IMAGE_SIZE = 64


@dataclass
class Step:
    name: str
    ok: bool
    seconds: float
    detail: str
    hint: str = ""


@dataclass
class _Run:
    steps: list[Step] = field(default_factory=list)
    clock: Callable[[], float] = time.monotonic

    def step(self, name: str, call: Callable[[], T], detail: Callable[[T], str], hint: str) -> T:
        """Run one step and record it; an OMERO error ends the test (raised as _Stop)."""
        start = self.clock()
        try:
            value = call()
        except OmeroError as exc:
            self.steps.append(Step(name, False, self.clock() - start, exc.reason, hint))
            raise _Stop from exc
        self.steps.append(Step(name, True, self.clock() - start, detail(value)))
        return value


class _Stop(Exception):
    """A step failed: the later ones cannot run (cleanup still does)."""


def tiny_png(width: int, height: int) -> bytes:
    """An 8-bit greyscale PNG with a gradient: a real format Bio-Formats reads (APNGReader)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    rows = b"".join(b"\x00" + bytes((x + y) % 256 for x in range(width)) for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def write_ngff(path: Path, size: int = IMAGE_SIZE) -> Path:
    """A zarr v2 NGFF 0.4 image of two resolution levels (uint8, y/x, uncompressed): what
    omero-zarr-pixel-buffer 0.6.1 reads."""
    path.mkdir(parents=True)
    (path / ".zgroup").write_text(json.dumps({"zarr_format": 2}))
    datasets = []
    for level in range(2):
        side = size >> level
        folder = path / str(level)
        folder.mkdir()
        meta = {
            "zarr_format": 2,
            "shape": [side, side],
            "chunks": [side, side],
            "dtype": "|u1",
            "compressor": None,
            "fill_value": 0,
            "filters": None,
            "order": "C",
        }
        (folder / ".zarray").write_text(json.dumps(meta))
        (folder / "0.0").write_bytes(
            bytes((x * 3 + y) % 256 for y in range(side) for x in range(side))
        )
        scale = float(2**level)
        datasets.append(
            {
                "path": str(level),
                "coordinateTransformations": [{"type": "scale", "scale": [scale, scale]}],
            }
        )
    attrs = {
        "multiscales": [
            {
                "version": "0.4",
                "name": SELFTEST_NAME,
                "axes": [
                    {"name": "y", "type": "space", "unit": "micrometer"},
                    {"name": "x", "type": "space", "unit": "micrometer"},
                ],
                "datasets": datasets,
            }
        ]
    }
    (path / ".zattrs").write_text(json.dumps(attrs))
    return path


@contextmanager
def _scratch(folder: Path) -> Iterator[Path]:
    work = folder / f".{SELFTEST_NAME}-{uuid.uuid4().hex[:8]}"
    work.mkdir()
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _names(objects: list[ImportedObject]) -> str:
    return ", ".join(f"{o.type} {o.id}" for o in objects) or "nothing"


def run_import_test(
    gateway: OmeroGateway,
    settings: Settings,
    *,
    dataset: int,
    user: str,
    group: str,
    folder: Path | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> list[Step]:
    """Every step run, in order; a failed step ends the test after the cleanup step."""
    run = _Run(clock=clock)
    order_uuid = f"selftest-{uuid.uuid4()}"
    try:
        run.step(
            "OMERO admin login",
            gateway.check,
            lambda _: gateway.describe(),
            "set omero_host, omero_port, omero_user and omero_password (an administrator)",
        )
        session = run.step(
            f"session as {user} in {group}",
            lambda: gateway.open_session(user, group, order_uuid=order_uuid),
            lambda _: "opened",
            f"the user '{user}' must exist and be a member of group '{group}'",
        )
    except _Stop:
        return run.steps
    where = folder if folder is not None else settings.effective_import_roots[0]
    created: list[ImportedObject] = []
    try:
        with _scratch(where) as work:
            _import_and_register(
                run,
                session,
                settings,
                work,
                dataset=dataset,
                order_uuid=order_uuid,
                created=created,
            )
    except _Stop:
        pass
    except OSError as exc:
        run.steps.append(
            Step(
                "write the test files",
                False,
                0.0,
                f"{where}: {exc.strerror or exc}",
                f"the importer must be able to write in {where} (or pass --scratch-folder)",
            )
        )
    finally:
        _cleanup(run, session, created, dataset)
    return run.steps


def _import_and_register(
    run: _Run,
    session: OmeroSession,
    settings: Settings,
    work: Path,
    *,
    dataset: int,
    order_uuid: str,
    created: list[ImportedObject],
) -> None:
    target = Target("Dataset", dataset)
    image = work / f"{SELFTEST_NAME}.png"
    image.write_bytes(tiny_png(IMAGE_SIZE, IMAGE_SIZE))
    store = write_ngff(work / f"{SELFTEST_NAME}.ome.zarr")
    imported = run.step(
        f"import a tiny image in place into Dataset {dataset}",
        lambda: session.import_path(image, target, order_uuid=order_uuid, exclude_existing=False),
        _names,
        f"Dataset {dataset} must exist in the group and be writable by the user; the server"
        f" must see {work.parent} at the same path (ln_s in-place import); the CLI's logs are"
        f" in {settings.order_log_dir}",
    )
    created.extend(imported)
    run.step(
        "find it by the order comment",
        lambda: _same(session.find_imported(image, target, order_uuid=order_uuid), imported),
        _names,
        "the import's comment annotation (--annotation-ns/--annotation-text) was not found:"
        " a server or CLI version the importer does not know; report it",
    )
    run.step(
        "annotate it",
        lambda: session.annotate(
            imported[0], settings.annotation_namespace, [("selftest", order_uuid)]
        ),
        lambda annotation: f"MapAnnotation {annotation}",
        "the user must be allowed to annotate in the group",
    )

    def register() -> list[ImportedObject]:
        objects = session.register_zarr(
            store, target, order_uuid=order_uuid, on_created=created.append
        )
        created.extend(o for o in objects if o not in created)
        return objects

    run.step(
        "register a tiny OME-Zarr and read a tile back",
        register,
        lambda objects: f"{_names(objects)}: 2 resolution levels and a tile read as written",
        "install omero-zarr-pixel-buffer on the OMERO server and let it see"
        f" {work.parent} at the same path (needed only with use_register_zarr)",
    )


def _same(found: list[ImportedObject], imported: list[ImportedObject]) -> list[ImportedObject]:
    if sorted(o.id for o in found) != sorted(o.id for o in imported):
        raise OmeroError(f"found {_names(found)} by the order comment, imported {_names(imported)}")
    return found


def _cleanup(run: _Run, session: OmeroSession, created: list[ImportedObject], dataset: int) -> None:
    try:
        if created:
            # the test's own objects: their annotations go with them
            run.step(
                "delete what the test created",
                lambda: session.delete(created),
                lambda _: _names(created),
                f"delete {_names(created)} in Dataset {dataset} by hand",
            )
    except _Stop:
        pass
    finally:
        session.close()
