"""Is an order's data still being written? The most recent change among its files, its
folders and everything inside them.

An acquisition PC copying a dataset onto the share, or an rsync still running, changes size
and modification time of the files it writes and the folders it adds to. ``st_ctime`` is taken
too: ``rsync -t`` and ``cp -p`` set the modification time back to the source's at the end of a
copy, but the inode change time records the copy itself. Runs in a storage thread (the walk
of a large folder on NFS/SMB can take long), never on the event loop.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

# A time stamp this far ahead of our clock comes from a wrong clock (a camera PC, an NFS
# server), not from a write: it is not judged, or such a file would wait until it is reached.
FUTURE_TOLERANCE = 60.0


@dataclass(frozen=True)
class LastChange:
    at: float  # epoch seconds, never later than ``now``
    path: Path


def last_change(
    files: Sequence[Path], now: float, watch: Callable[[str], None]
) -> LastChange | None:
    """The latest change among ``files`` and (for folders) everything below them; a file that
    vanished during the walk counts as a change at ``now``. None when nothing has a usable
    time stamp. ``watch`` is told each path as it is read (named if storage hangs)."""
    latest: LastChange | None = None

    def seen(path: Path, info: os.stat_result) -> None:
        nonlocal latest
        stamp = max(info.st_mtime, info.st_ctime)
        if stamp > now + FUTURE_TOLERANCE:
            return
        stamp = min(stamp, now)
        if latest is None or stamp > latest.at:
            latest = LastChange(stamp, path)

    pending: list[Path] = []
    for file in files:
        watch(str(file))
        try:
            info = os.stat(file)
        except FileNotFoundError:
            return LastChange(now, file)
        seen(file, info)
        if stat.S_ISDIR(info.st_mode):
            pending.append(file)
    while pending:
        folder = pending.pop()
        watch(str(folder))
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            return LastChange(now, folder)
        for entry in entries:
            path = Path(entry.path)
            try:
                # the data behind a symlink is what gets imported; a folder link is not walked
                is_dir = entry.is_dir(follow_symlinks=False)
                try:
                    info = entry.stat(follow_symlinks=True)
                except OSError:
                    # a link that cannot be followed (dangling, a loop): its own times
                    info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                return LastChange(now, path)
            seen(path, info)
            if is_dir:
                pending.append(path)
    return latest
