"""A FUSE filesystem that mirrors a folder and answers slowly for chosen names: a real slow
NFS/SMB mount for tests, since the kernel blocks every caller of stat() or readdir() on it.

Run as its own process: ``python -m tests.slowfs BACKING MOUNTPOINT NAME SECONDS``; every
lookup of an entry called NAME then takes SECONDS. :func:`mounted` starts and stops it.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest


class SlowMirror:
    def __init__(self, backing: str, slow_name: str, delay: float) -> None:
        self.backing = backing
        self.slow_name = slow_name
        self.delay = delay

    def _real(self, path: str) -> str:
        return os.path.join(self.backing, path.lstrip("/"))

    def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
        from fuse import FuseOSError

        if os.path.basename(path) == self.slow_name:
            time.sleep(self.delay)
        try:
            st = os.lstat(self._real(path))
        except OSError as exc:
            raise FuseOSError(exc.errno or errno.EIO) from None
        keys = ("st_mode", "st_nlink", "st_size", "st_uid", "st_gid", "st_atime", "st_mtime")
        return {key: getattr(st, key) for key in (*keys, "st_ctime")}

    def readdir(self, path: str, fh: Any) -> list[str]:
        return [".", "..", *os.listdir(self._real(path))]

    def readlink(self, path: str) -> str:
        return os.readlink(self._real(path))

    def access(self, path: str, mode: int) -> None:
        from fuse import FuseOSError

        if not os.access(self._real(path), mode):
            raise FuseOSError(errno.EACCES)

    def open(self, path: str, flags: int) -> int:
        return os.open(self._real(path), flags)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        os.lseek(fh, offset, os.SEEK_SET)
        return os.read(fh, size)

    def release(self, path: str, fh: int) -> None:
        os.close(fh)


def main() -> None:
    from fuse import FUSE, Operations

    backing, mountpoint, name, delay = sys.argv[1:5]
    ops = type("Ops", (SlowMirror, Operations), {})(backing, name, float(delay))
    FUSE(ops, mountpoint, foreground=True, nothreads=False, ro=True, allow_other=False)


@contextmanager
def mounted(backing: Path, mountpoint: Path, slow_name: str, delay: float) -> Iterator[Path]:
    """``backing`` mirrored at ``mountpoint`` (or a skip where FUSE cannot mount here)."""
    if shutil.which("fusermount") is None or not Path("/dev/fuse").exists():
        pytest.skip("FUSE is not available on this machine")
    try:
        import fuse  # noqa: F401
    except (ImportError, OSError) as exc:
        pytest.skip(f"fusepy cannot load libfuse: {exc}")
    mountpoint.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.slowfs",
            str(backing),
            str(mountpoint),
            slow_name,
            str(delay),
        ],
        cwd=Path(__file__).parent.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 10
    while not os.path.ismount(mountpoint):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            pytest.skip(f"FUSE mount failed here: {err.strip()[:200]}")
        time.sleep(0.05)
    try:
        yield mountpoint
    finally:
        subprocess.run(["fusermount", "-u", "-z", str(mountpoint)], check=False)
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    main()
