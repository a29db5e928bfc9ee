"""The one containment check: every path the importer reads, imports or mounts passes here.

Paths reach the importer in several ways: an order's files and the folders they name, paths
written in OME-Zarr metadata, ``metadata.csv`` beside the data, and what a converter reports
or leaves in its output folders. Each is checked the same way against an :class:`Area` (the
import roots, a zarr store, a container's mounts):

* as written, after normalising ``..`` away, it lies inside the area;
* after resolving every symlink it still does, and it exists;
* a folder is walked, following the symlinks that stay inside (once each, so link cycles
  end): any entry that resolves outside is refused, because an import takes all of it, and a
  folder that cannot be listed is refused too (an import would fail on it). The walk is
  :func:`entries`; the settle check reads the data through it, so it sees what is imported.

The resolved path is what the caller uses from then on, and :func:`recheck` repeats the check
right before the path is imported or mounted: a file swapped for a symlink while the order
waited is caught there. Functions here do filesystem work and block; callers on the event
loop run them in a thread. This module imports nothing above ``text``.
"""

from __future__ import annotations

import errno
import os
import posixpath
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from biomero_importer.text import short

CHANGED = "Files changed while the order waited"

#: Errors of shared storage that pass (an NFS server restarting, a network that drops): the
#: order waits and is retried. They propagate as OSError; every other error of a path is the
#: path's own problem and refuses it.
TRANSIENT_ERRNOS = frozenset({errno.ESTALE, errno.EIO, errno.ETIMEDOUT})


def transient(exc: OSError) -> bool:
    return exc.errno in TRANSIENT_ERRNOS


def why(exc: OSError) -> str:
    """The error as a person reads it ("Permission denied"), for a description."""
    return os.strerror(exc.errno) if exc.errno else type(exc).__name__


class PathRefused(Exception):
    """A path left its area, or is missing; ``reason`` is the order's failure description
    and ``path`` the offending entry (a folder's entry when the folder's walk found it)."""

    def __init__(self, reason: str, path: Path) -> None:
        super().__init__(reason)
        self.reason = reason
        self.path = path


@dataclass(frozen=True)
class Area:
    """Folders a path may lie in, as written (normalised) and resolved, and their name."""

    label: str
    roots: tuple[Path, ...]
    resolved: tuple[Path, ...]

    @classmethod
    def of(cls, label: str, roots: Iterable[Path]) -> Area:
        written = tuple(Path(os.path.normpath(os.path.abspath(root))) for root in roots)
        return cls(label, written, tuple(Path(os.path.realpath(root)) for root in written))

    def holds(self, path: Path) -> bool:
        """Whether a resolved path lies in one of the resolved roots."""
        return _inside(path, self.resolved)


def import_area(roots: Iterable[Path]) -> Area:
    """The import roots: every order file, and whatever it links to, lies in them."""
    return Area.of("the import roots", roots)


def _inside(path: Path, roots: Iterable[Path]) -> bool:
    """``path`` is one of ``roots`` or lies under one, as ``Path.is_relative_to`` says, read
    off the paths' text (pathlib's normalised form): relative_to, which is_relative_to calls,
    builds a path and its parts for every root, for every path checked."""
    text = str(path)
    for root in roots:
        base = str(root)
        if text == base:
            return True
        if base == "/":
            # pathlib roots '//x' at '//' (POSIX leaves its meaning to the system), not '/'
            if text.startswith("/") and not text.startswith("//"):
                return True
        elif text.startswith(base if base.endswith("/") else base + "/"):
            return True
    return False


def entries(folder: Path, area: Area) -> Iterator[os.DirEntry[str]]:
    """Every entry under ``folder``, as an import reads them: symlinked folders that stay in
    ``area`` are walked too, once each by resolved path (so link cycles end); an entry whose
    link resolves outside raises PathRefused before it is yielded. A folder that cannot be
    listed raises its OSError: nothing is skipped silently.
    """
    pending = [folder]
    seen: set[Path] = set()
    while pending:
        top = pending.pop()
        real = Path(os.path.realpath(top))
        if real in seen:
            continue
        seen.add(real)
        folders = [str(top)]
        while folders:
            with os.scandir(folders.pop()) as listing:
                for entry in listing:
                    if entry.is_symlink():
                        target = Path(os.path.realpath(entry.path))
                        if not area.holds(target):
                            path = Path(entry.path)
                            raise PathRefused(
                                f"Folder links outside {area.label}: {short(str(path))}", path
                            )
                        if target.is_dir():
                            pending.append(target)
                    elif entry.is_dir(follow_symlinks=False):
                        folders.append(entry.path)
                    yield entry


def contained(path: Path, area: Area, what: str = "File", *, walk: bool = True) -> Path:
    """The resolved ``path``, checked as the module describes, or PathRefused saying why.

    ``what`` names the path in the description ("File", "Converter output", ...). ``walk``
    is False only for a path inside a folder whose own walk already passed for this area.
    """
    text = str(path)
    if not path.is_absolute():
        raise PathRefused(f"Path is not absolute: {short(text)}", path)
    if not _inside(Path(os.path.normpath(text)), area.roots + area.resolved):
        raise PathRefused(f"{what} is outside {area.label}: {short(text)}", path)
    try:
        resolved = path.resolve(strict=True)
    except FileNotFoundError:
        raise PathRefused(f"{what} not found: {short(text)}", path) from None
    except OSError as exc:
        if transient(exc):
            raise
        raise PathRefused(f"{what} cannot be resolved ({why(exc)}): {short(text)}", path) from None
    except RuntimeError as exc:  # a symlink loop (Python before 3.13)
        raise PathRefused(
            f"{what} cannot be resolved ({type(exc).__name__}): {short(text)}", path
        ) from None
    if not area.holds(resolved):
        raise PathRefused(f"{what} links outside {area.label}: {short(text)}", path)
    if walk and resolved.is_dir():
        try:
            for _ in entries(resolved, area):
                pass
        except OSError as exc:
            if transient(exc):
                raise
            where = Path(exc.filename) if exc.filename else resolved
            raise PathRefused(f"Cannot read ({why(exc)}): {short(str(where))}", where) from None
    return resolved


def member(store: Path, relative: str, entry: str) -> Path:
    """A path written in a store's own metadata: relative, normalised and inside the store.

    ``store`` is the store's resolved folder, already checked by :func:`contained` (so its
    walk found no link out and members need not be walked again); ``entry`` names the
    metadata field in the description (``plate.wells[0].path``) so the data's owner can
    find it.
    """
    problem: str | None = None
    if not relative or "\x00" in relative or "\\" in relative:
        problem = "is not a usable path"
    elif relative.startswith("/"):
        problem = "is absolute"
    elif posixpath.normpath(relative) != relative or ".." in relative.split("/"):
        problem = "is not a normalised relative path"
    if problem is not None:
        raise PathRefused(
            f"OME-Zarr entry {entry} {problem}: {short(relative)!r}", store / relative
        )
    try:
        return contained(store / relative, Area.of("the zarr store", [store]), entry, walk=False)
    except PathRefused as exc:
        raise PathRefused(f"OME-Zarr entry {exc.reason}", exc.path) from None


def recheck(
    path: Path, checked: Path | None, area: Area, what: str = "File", *, walk: bool = True
) -> Path:
    """Check ``path`` again right before use; it must still resolve to ``checked``.

    A path that now leaves the area, is gone, or resolves elsewhere than when it was
    checked fails with "Files changed while the order waited". ``checked`` is None only for
    a path nobody checked before, which then just gets its first check.
    """
    try:
        resolved = contained(path, area, what, walk=walk)
    except PathRefused as exc:
        if checked is None:
            raise
        raise PathRefused(f"{CHANGED}: {short(str(exc.path))}", exc.path) from exc
    if checked is not None and resolved != checked:
        raise PathRefused(f"{CHANGED}: {short(str(path))}", path)
    return resolved
