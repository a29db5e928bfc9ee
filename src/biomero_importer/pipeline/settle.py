"""Is an order's data still being written? Two looks at it, ``settle_seconds`` apart, decide.

A look is the newest time stamp among the order's files, its folders and everything in
them, their total size and their number. Only looks are compared, never a time stamp with
the importer's clock: the time stamps come from the file server, whose clock may be minutes
behind (a file still growing would look old) or ahead. An acquisition PC copying a dataset
onto the share, or an rsync still running, changes sizes, modification times and the
folders it adds to; ``st_ctime`` is taken too, because ``rsync -t`` and ``cp -p`` set the
modification time back to the source's at the end of a copy while the inode change time
records the copy itself, and no client can set it.

The walk is :func:`biomero_importer.paths.entries` over the checked (resolved) paths: the
data an import reads, symlinked folders in the import roots included. Blocking: it runs in
a storage thread, never on the event loop.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from biomero_importer import paths
from biomero_importer.pipeline.validate import InvalidOrder
from biomero_importer.text import short

#: An entry that vanished between its folder's listing and its stat (rsync renaming its
#: temporary file): the rename changed the folder's times, which this or the next look sees.
VANISHED = frozenset({errno.ENOENT, errno.ENOTDIR})


class TooManyEntries(InvalidOrder):
    """The order's data holds more entries than one settle look reads."""

    def __init__(self, limit: int, path: Path) -> None:
        super().__init__(
            f"Too many files to check for changes (more than {limit:,}; settle_max_entries):"
            f" {short(str(path))}"
        )


@dataclass(frozen=True)
class Look:
    """What one look saw; two equal looks ``settle_seconds`` apart mean nothing changed."""

    newest: float  # the newest st_mtime/st_ctime, the file server's clock
    size: int  # bytes of every file seen
    entries: int  # files, folders and links seen
    path: Path  # where the newest time stamp is, to name it

    def same(self, other: Look) -> bool:
        return (self.newest, self.size, self.entries) == (other.newest, other.size, other.entries)


class _Tally:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.newest = float("-inf")
        self.size = 0
        self.entries = 0
        self.path = Path("/")

    def add(self, path: Path, info: os.stat_result) -> None:
        self.entries += 1
        if self.entries > self.limit:
            raise TooManyEntries(self.limit, path)
        stamp = max(info.st_mtime, info.st_ctime)
        if stamp > self.newest:
            self.newest, self.path = stamp, path
        if stat.S_ISREG(info.st_mode):
            self.size += info.st_size


def look(
    checked: Iterable[Path],
    area: paths.Area,
    watch: Callable[[str], None],
    limit: int,
) -> Look:
    """One look at ``checked`` (an order's validated, resolved paths) and all below them.

    ``watch`` hears each path before it is read (named if storage hangs). Raises OSError
    for a path or folder storage cannot read, PathRefused for a link that now leads out of
    ``area``, and TooManyEntries past ``limit`` entries."""
    tally = _Tally(limit)
    for top in checked:
        watch(str(top))
        info = os.stat(top)
        tally.add(top, info)
        if not stat.S_ISDIR(info.st_mode):
            continue
        for entry in paths.entries(top, area):
            path = Path(entry.path)
            watch(entry.path)
            try:
                try:
                    # the data behind a link is what gets imported
                    info = entry.stat(follow_symlinks=True)
                except OSError as exc:
                    if not entry.is_symlink() or paths.transient(exc):
                        raise
                    # a link that cannot be followed (dangling, a loop): its own times
                    info = entry.stat(follow_symlinks=False)
            except OSError as exc:
                if exc.errno in VANISHED:
                    continue
                raise
            tally.add(path, info)
    return Look(tally.newest, tally.size, tally.entries, tally.path)
