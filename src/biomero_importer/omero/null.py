"""A port that records nothing: for measuring the service's own overhead in benchmarks.

Every import "creates" one object with a fresh id and every annotation succeeds, but nothing
is kept anywhere: a re-run finds nothing, so it is no stand-in for OMERO (use the simulator).
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import structlog

from biomero_importer.omero.port import (
    ImportAborted,
    ImportedObject,
    ObjectType,
    RegistrationOptions,
    Target,
)
from biomero_importer.settings import Settings

log = structlog.get_logger(__name__)


class NullGateway:
    name = "null"
    # calls return at once: a one-file order's OMERO work is one executor job
    one_job = True

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # next() on itertools.count is atomic under the GIL: ids stay unique across threads
        self._ids = itertools.count(1)
        log.warning(
            "omero_null_backend",
            message="OMERO IS A NULL BACKEND: nothing is imported anywhere (benchmarks only)",
        )

    def describe(self) -> str:
        return "null OMERO backend (records nothing)"

    def check(self) -> None:
        return None

    def open_session(self, user: str, group: str, *, order_uuid: str) -> NullSession:
        return NullSession(self)

    def experimenter_email(self, user: str) -> str | None:
        return None

    def next_id(self) -> int:
        return next(self._ids)

    def close(self) -> None:
        return None


class NullSession:
    def __init__(self, gateway: NullGateway) -> None:
        self.gateway = gateway
        self._aborted = threading.Event()

    def _made(self, path: Path, target: Target) -> list[ImportedObject]:
        if self._aborted.is_set():
            raise ImportAborted("aborted")
        kind: ObjectType = "Plate" if target.type == "Screen" else "Image"
        return [ImportedObject(kind, self.gateway.next_id(), path.name, str(path))]

    def import_path(
        self,
        path: Path,
        target: Target,
        *,
        order_uuid: str,
        exclude_existing: bool,
        already: Sequence[ImportedObject] = (),
    ) -> list[ImportedObject]:
        # it never finds anything, so ``already`` is always empty here
        return self._made(path, target)

    def register_zarr(
        self,
        path: Path,
        target: Target,
        *,
        order_uuid: str,
        options: RegistrationOptions | None = None,
        existing: Sequence[ImportedObject] = (),
        on_created: Callable[[ImportedObject], None] | None = None,
    ) -> list[ImportedObject]:
        if existing:
            return list(existing)
        objects = self._made(path, target)
        for obj in objects:
            if on_created is not None:
                on_created(obj)
        return objects

    def find_imported(
        self, client_path: Path, target: Target, *, order_uuid: str
    ) -> list[ImportedObject]:
        return []

    def annotate(
        self, obj: ImportedObject, namespace: str, pairs: Sequence[tuple[str, str]]
    ) -> int:
        if self._aborted.is_set():
            raise ImportAborted("aborted before annotating")
        return self.gateway.next_id()

    def rename(self, obj: ImportedObject, name: str) -> None:
        return None

    def managed_files(self, obj: ImportedObject) -> list[Path]:
        return []

    def delete(self, objects: Sequence[ImportedObject]) -> None:
        return None

    def remaining(self) -> float:
        return math.inf

    def abort(self) -> None:
        self._aborted.set()

    def close(self) -> None:
        return None
