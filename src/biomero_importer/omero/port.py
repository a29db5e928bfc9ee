"""The one narrow interface between the order pipeline and OMERO.

Every method blocks (omero-py and the ``omero import`` CLI are synchronous), so the pipeline
calls them through its bounded thread executor. Backends: ``blitz`` (omero-py, production)
and ``simulator`` (SQLite plus real symlinks, for the quickstart, demo, tests and benchmarks).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from biomero_importer.model import (
    ImportedObject,
    ObjectType,
    RegistrationOptions,
    Target,
    TargetType,
)

__all__ = [
    "OMERO_UNAVAILABLE",
    "ImportAborted",
    "ImportFailed",
    "ImportedObject",
    "ObjectType",
    "OmeroError",
    "OmeroGateway",
    "OmeroSession",
    "OmeroUnavailable",
    "RegistrationOptions",
    "Target",
    "TargetType",
    "UnknownUserOrGroup",
]

OMERO_UNAVAILABLE = "OMERO unavailable, retry later"


class OmeroError(Exception):
    """``reason`` is short and fit for the order's description; ``detail`` goes to the logs."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


class OmeroUnavailable(OmeroError):
    def __init__(self, detail: str = "") -> None:
        super().__init__(OMERO_UNAVAILABLE, detail)


class UnknownUserOrGroup(OmeroError):
    def __init__(self, user: str, group: str, detail: str = "") -> None:
        super().__init__(f"User '{user}' or group '{group}' not recognized. Contact admin.", detail)


class ImportFailed(OmeroError):
    """OMERO refused or failed one import; ``reason`` names the file."""


class ImportAborted(OmeroError):
    """The session was aborted (cancel or shutdown) while a call ran."""

    def __init__(self, detail: str = "") -> None:
        super().__init__("Import aborted", detail)


class OmeroSession(Protocol):
    """Work done as one user in one group, for one order."""

    def import_path(
        self, path: Path, target: Target, *, order_uuid: str, exclude_existing: bool
    ) -> list[ImportedObject]:
        """Import one file or folder in place (``ln_s``) into the target.

        ``exclude_existing`` asks the backend to skip what was already imported from the
        same client path (used on retried orders). Raises ImportFailed naming the file.
        """
        ...

    def register_zarr(
        self,
        path: Path,
        target: Target,
        *,
        order_uuid: str,
        options: RegistrationOptions | None = None,
    ) -> list[ImportedObject]:
        """Register an OME-Zarr (image, bioformats2raw series, plate) without copying pixels.

        ``options`` are the order's registration ImportOptions (a plate's pixel source)."""
        ...

    def find_imported(
        self, client_path: Path, target: Target, *, order_uuid: str
    ) -> list[ImportedObject]:
        """What this order already imported from this client path into this target."""
        ...

    def annotate(
        self, obj: ImportedObject, namespace: str, pairs: Sequence[tuple[str, str]]
    ) -> int:
        """Link one MapAnnotation to the object; returns the annotation id."""
        ...

    def rename(self, obj: ImportedObject, name: str) -> None: ...

    def managed_files(self, obj: ImportedObject) -> list[Path]:
        """Absolute ManagedRepository paths of the object's fileset files (symlinks for ln_s)."""
        ...

    def abort(self) -> None:
        """Thread-safe: stop any running call (kill its process tree); it raises ImportAborted."""
        ...

    def close(self) -> None: ...


class OmeroGateway(Protocol):
    """A connection factory for one backend, shared by every order of a replica."""

    name: str

    def describe(self) -> str:
        """Where it points, for logs and ``check`` (never a secret)."""
        ...

    def check(self) -> None:
        """Raise OmeroError unless the server is reachable and the admin login works."""
        ...

    def open_session(self, user: str, group: str, *, order_uuid: str) -> OmeroSession:
        """A session as ``user`` in ``group``; raises UnknownUserOrGroup or OmeroUnavailable."""
        ...

    def close(self) -> None: ...
