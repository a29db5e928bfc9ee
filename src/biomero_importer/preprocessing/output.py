"""Converter output: read in bounded chunks, logged line by line within a budget.

Nothing here holds a whole stream: a line is kept only up to a limit (the rest of it is
skipped as it streams by), only the last non-blank line of each stream survives, and once a
container's log budget is spent its further lines are counted but not logged.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

from structlog.typing import FilteringBoundLogger

READ_CHUNK = 64 * 1024
# Bytes of one line that reach the logs.
LINE_LOG_LIMIT = 4096
# Bytes of a stdout line kept as the possible JSON result: a result listing many series,
# each with per-channel statistics, can pass a hundred kilobytes.
RESULT_LINE_LIMIT = 1024 * 1024
# Bytes of output logged per container; past it one note says the rest was dropped.
LOG_BUDGET = 1024 * 1024
TRUNCATED_MARK = " [line truncated]"


def order_log_path(log_dir: Path, order_uuid: str) -> Path:
    return Path(os.path.abspath(log_dir)) / f"preprocessing.{order_uuid}.log"


class OrderLogFile:
    """``<order_log_dir>/preprocessing.<UUID>.log``, readable by its owner only."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        # The mode given to open() does not change a file an earlier attempt created.
        os.fchmod(fd, 0o600)
        self._file: TextIO = os.fdopen(fd, "a", encoding="utf-8", errors="replace", buffering=1)

    def write(self, container: str, text: str) -> None:
        stamp = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        self._file.write(f"{stamp} {container} {text}\n")

    def close(self) -> None:
        self._file.close()


class OutputLog:
    """One container's output lines, to structlog events and the order's log file."""

    def __init__(
        self,
        log: FilteringBoundLogger,
        file: OrderLogFile | None,
        container: str,
        budget: int = LOG_BUDGET,
    ) -> None:
        self.log = log
        self.file = file
        self.container = container
        self.budget = budget
        self.logged = 0
        self.dropped_lines = 0

    def note(self, text: str) -> None:
        if self.file is not None:
            self.file.write(self.container, text)

    def line(self, stream: str, data: bytes, cut: bool) -> None:
        if self.logged >= self.budget:
            self.dropped_lines += 1
            return
        text = data[:LINE_LOG_LIMIT].decode("utf-8", "replace").rstrip("\r")
        if cut or len(data) > LINE_LOG_LIMIT:
            text += TRUNCATED_MARK
        self.logged += len(text)
        if self.logged >= self.budget:
            self.log.warning("preprocessing_output_truncated", budget_bytes=self.budget)
            self.note(f"output truncated: more than {self.budget} bytes")
            return
        self.log.info("preprocessing_output", stream=stream, line=text)
        self.note(f"{stream}: {text}")


@dataclass(frozen=True)
class LastLine:
    """The last non-blank line of a stream, cut to the reader's limit (``complete`` if not)."""

    data: bytes = b""
    complete: bool = True

    def text(self) -> str:
        return self.data.decode("utf-8", "replace").strip()


async def pump(stream: asyncio.StreamReader, name: str, keep: int, output: OutputLog) -> LastLine:
    """Read ``stream`` to its end, logging every line; return its last non-blank line."""
    last = LastLine()
    current = bytearray()
    cut = False

    def finish() -> None:
        nonlocal last, cut
        data = bytes(current)
        output.line(name, data, cut)
        if data.strip():
            last = LastLine(data, not cut)
        current.clear()
        cut = False

    while chunk := await stream.read(READ_CHUNK):
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            stop = len(chunk) if end == -1 else end
            room = keep - len(current)
            if stop - start > room:
                cut = True
            current += chunk[start : start + min(room, stop - start)]
            if end == -1:
                break
            finish()
            start = end + 1
    if current or cut:
        finish()
    return last
