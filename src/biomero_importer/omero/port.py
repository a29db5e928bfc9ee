"""The one narrow interface between the order pipeline and OMERO.

Every method blocks (omero-py and the ``omero import`` CLI are synchronous), so the pipeline
calls them through its bounded thread executor. Backends: ``blitz`` (omero-py, production)
and ``simulator`` (SQLite plus real symlinks, for the quickstart, demo, tests and benchmarks).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from biomero_importer.model import (
    ImportedObject,
    ObjectType,
    RegistrationOptions,
    Target,
    TargetType,
)
from biomero_importer.settings import Settings

__all__ = [
    "OMERO_UNAVAILABLE",
    "SESSION_TTL_MARGIN_SECONDS",
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
    "session_ttl_ms",
]

OMERO_UNAVAILABLE = "OMERO unavailable, retry later"

# What a session must still have to live when an import unit starts, beyond import_timeout:
# the calls around the import (find, rename, annotate) and the clock of a busy server.
SESSION_TTL_MARGIN_SECONDS = 600.0


def session_ttl_ms(settings: Settings) -> int:
    """The time-to-live every user session is opened with.

    OMERO's ``suConn(ttl)`` sets a hard lifetime (timeToLive; timeToIdle 0): keep-alives never
    extend it, so a session must outlive the longest single import it may run. The pipeline
    opens a fresh session whenever less than that is left, so an order may take any time.
    """
    needed = int((settings.import_timeout + SESSION_TTL_MARGIN_SECONDS) * 1000)
    return max(settings.ttl_for_user_conn, needed)


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
        self,
        path: Path,
        target: Target,
        *,
        order_uuid: str,
        exclude_existing: bool,
        already: Sequence[ImportedObject] = (),
    ) -> list[ImportedObject]:
        """Import one file or folder in place (``ln_s``) into the target.

        ``exclude_existing`` is ``omero import --exclude=clientpath``: OMERO then skips every
        file that *any* fileset visible to the user holds (any order, orphans included), so
        the pipeline never asks for it: re-runs are made idempotent by the order's ledger and
        comment annotation instead. ``already``: what this order made from ``path`` in an
        earlier, unfinished run (found by ``find_imported``); the files of their filesets are
        not imported again, only the rest (nothing left: returns ``[]`` without importing).
        Returns the new objects only. Raises ImportFailed naming the file.
        """
        ...

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
        """Register an OME-Zarr (image, bioformats2raw series, plate) without copying pixels.

        ``options`` are the order's registration ImportOptions (a plate's pixel source).
        Each object is created in one step, carrying the order's comment annotation, and
        reported to ``on_created`` before the next step starts; what ``existing`` already
        holds (by client path) is not created again; abort() is honoured between steps and a
        lost connection never replays a step that succeeded. Returns existing plus new."""
        ...

    def find_imported(
        self, client_path: Path, target: Target, *, order_uuid: str
    ) -> list[ImportedObject]:
        """What this order already created from this client path in this target: found by the
        order's comment annotation, so registered objects (no fileset) are found too."""
        ...

    def annotate(
        self, obj: ImportedObject, namespace: str, pairs: Sequence[tuple[str, str]]
    ) -> int:
        """Link one MapAnnotation to the object unless it already has one in ``namespace``
        (a re-run after an interrupted annotate step); returns the annotation id."""
        ...

    def rename(self, obj: ImportedObject, name: str) -> None: ...

    def managed_files(self, obj: ImportedObject) -> list[Path]:
        """Absolute ManagedRepository paths of the object's fileset files (symlinks for ln_s)."""
        ...

    def delete(self, objects: Sequence[ImportedObject]) -> None:
        """Delete the objects with their annotations and, once none of its objects is left,
        their fileset: only for objects that share no annotation with others (the OMERO
        self-test's own). Raises OmeroError naming the object it could not delete."""
        ...

    def remaining(self) -> float:
        """Seconds this session has left to live (its time-to-live is a hard lifetime)."""
        ...

    def abort(self) -> None:
        """Thread-safe: stop any running call (kill its process tree); it raises ImportAborted."""
        ...

    def close(self) -> None: ...


class OmeroGateway(Protocol):
    """A connection factory for one backend, shared by every order of a replica."""

    name: str
    #: Whether every call returns at once (no network, no subprocess): the pipeline then runs a
    #: one-file order's session, import, annotation and close in one executor job, checking
    #: for a cancel between the calls. False: one job per call, each abortable on its own.
    one_job: bool

    def describe(self) -> str:
        """Where it points, for logs and ``check`` (never a secret)."""
        ...

    def check(self) -> None:
        """Raise OmeroError unless the server is reachable and the admin login works."""
        ...

    def open_session(self, user: str, group: str, *, order_uuid: str) -> OmeroSession:
        """A session as ``user`` in ``group``; raises UnknownUserOrGroup or OmeroUnavailable."""
        ...

    def experimenter_email(self, user: str) -> str | None:
        """The email address of the OMERO experimenter named ``user`` (omeName); None when
        the user is unknown or has none. Raises OmeroUnavailable when OMERO cannot say."""
        ...

    def close(self) -> None: ...
