"""A FUSE filesystem that mirrors a folder read-only and misbehaves as a file server does: a
real slow, failing or wrongly clocked NFS/SMB mount for tests, since the kernel hands every
stat() and readdir() on it to this process.

* slow: every lookup of an entry called NAME takes SECONDS (the kernel blocks the caller);
* failing: ``--fail NAME:OP:ERRNO[:AFTER[:TIMES]]`` answers OP (``getattr`` or ``readdir``)
  on an entry called NAME with ERRNO (a name, ``EACCES``) after AFTER calls that succeed (so
  validation passes and a later walk meets it), TIMES times (default: from then on);
* clocked wrong: ``--skew SECONDS`` shifts every time stamp (negative: a server clock behind),
  st_ctime included, which no client can set.

Run as its own process: ``python -m tests.slowfs BACKING MOUNTPOINT NAME SECONDS [options]``.
:func:`mounted` starts and stops it. ``--fresh`` turns off the kernel's attribute and entry
caches, so each stat() sees the backing file as it is now.
"""

from __future__ import annotations

import argparse
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


class Fault:
    """``op`` on an entry called ``name`` fails with ``code`` once ``after`` calls passed,
    ``times`` times (None: every time)."""

    def __init__(self, spec: str) -> None:
        name, op, code, *counts = spec.split(":")
        if op not in ("getattr", "readdir"):
            raise ValueError(f"unknown operation {op!r}")
        self.name, self.op, self.code = name, op, getattr(errno, code)
        self.after = int(counts[0]) if counts else 0
        self.times = int(counts[1]) if len(counts) > 1 else None
        self.calls = 0

    def fails(self) -> bool:
        self.calls += 1
        failed = self.calls - self.after
        return failed > 0 and (self.times is None or failed <= self.times)


class SlowMirror:
    def __init__(
        self,
        backing: str,
        slow_name: str,
        delay: float,
        faults: list[Fault] | None = None,
        skew: float = 0.0,
    ) -> None:
        self.backing = backing
        self.slow_name = slow_name
        self.delay = delay
        self.faults = faults or []
        self.skew = skew

    def _real(self, path: str) -> str:
        return os.path.join(self.backing, path.lstrip("/"))

    def _fault(self, op: str, path: str) -> None:
        from fuse import FuseOSError

        for fault in self.faults:
            if fault.op == op and os.path.basename(path) == fault.name and fault.fails():
                raise FuseOSError(fault.code)

    def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
        from fuse import FuseOSError

        if os.path.basename(path) == self.slow_name:
            time.sleep(self.delay)
        self._fault("getattr", path)
        try:
            st = os.lstat(self._real(path))
        except OSError as exc:
            raise FuseOSError(exc.errno or errno.EIO) from None
        keys = ("st_mode", "st_nlink", "st_size", "st_uid", "st_gid")
        found: dict[str, Any] = {key: getattr(st, key) for key in keys}
        for key in ("st_atime", "st_mtime", "st_ctime"):
            found[key] = getattr(st, key) + self.skew
        return found

    def readdir(self, path: str, fh: Any) -> list[str]:
        self._fault("readdir", path)
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

    parser = argparse.ArgumentParser()
    for name in ("backing", "mountpoint", "name"):
        parser.add_argument(name)
    parser.add_argument("delay", type=float)
    parser.add_argument("--fail", action="append", default=[], type=Fault)
    parser.add_argument("--skew", type=float, default=0.0)
    parser.add_argument("--fresh", action="store_true")
    args = parser.parse_args()
    ops = type("Ops", (SlowMirror, Operations), {})(
        args.backing, args.name, args.delay, args.fail, args.skew
    )
    # fusepy passes keyword arguments on as mount options (-o attr_timeout=0, ...)
    cache: dict[str, Any] = {"attr_timeout": 0, "entry_timeout": 0} if args.fresh else {}
    FUSE(
        ops,
        args.mountpoint,
        foreground=True,
        nothreads=False,
        ro=True,
        allow_other=False,
        **cache,
    )


@contextmanager
def mounted(
    backing: Path,
    mountpoint: Path,
    slow_name: str = "",
    delay: float = 0.0,
    *,
    faults: tuple[str, ...] = (),
    skew: float = 0.0,
    fresh: bool = False,
) -> Iterator[Path]:
    """``backing`` mirrored at ``mountpoint`` (or a skip where FUSE cannot mount here);
    ``faults`` are ``--fail`` specs (NAME:OP:ERRNO[:AFTER[:TIMES]])."""
    if shutil.which("fusermount") is None or not Path("/dev/fuse").exists():
        pytest.skip("FUSE is not available on this machine")
    try:
        import fuse  # noqa: F401
    except (ImportError, OSError) as exc:
        pytest.skip(f"fusepy cannot load libfuse: {exc}")
    for spec in faults:
        Fault(spec)  # a mistyped spec fails the test here, not as a mount that did not start
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
            *(f"--fail={spec}" for spec in faults),
            f"--skew={skew}",
            *(["--fresh"] if fresh else []),
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
