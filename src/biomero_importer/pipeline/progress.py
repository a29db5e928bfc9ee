"""Progress of one running order, written to its queue row as it goes, at a bounded rate.

The pipeline reports with plain calls that never wait (:meth:`ProgressReporter.start_step`,
:meth:`~ProgressReporter.advance`, :meth:`~ProgressReporter.end_step`); one writer task per
order, a child of the order's task, writes the latest state. So a 10,000-file order writes
about one row a second, not 10,000, and a database that answers slowly or not at all costs
progress writes, never the order's time: states that arrive while a write is in flight are
merged into the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import structlog

from biomero_importer.model import Progress, ProgressStep
from biomero_importer.text import safe_text

log = structlog.get_logger(__name__)

# At most one write per order in this many seconds, but a step's first and last state at once.
PROGRESS_INTERVAL = 1.0
# Nothing is written for an order before it has run this long: most orders end sooner, and
# their progress would be cleared before anyone could read it, at the cost of a statement per
# step on a path that runs hundreds of orders a second.
PROGRESS_DELAY = 0.5
# Seconds an ending order waits for its cancelled writer; one still in a database call after
# that is left to end on its own (see _stopping).
STOP_WAIT = 0.5
# current_file is a name to show, not a path to act on
NAME_LIMIT = 160

# Writers cancelled in the middle of a database call that did not end within STOP_WAIT (asyncpg
# hands the connection back to its pool first): kept referenced until they end, or the event
# loop would destroy them half way ("Task was destroyed but it is pending").
_stopping: set[asyncio.Task[None]] = set()


class ProgressSink(Protocol):
    async def record_progress(self, uuid: str, progress: Progress, *, run: int) -> bool: ...


def file_sizes(paths: Sequence[Path], watch: Callable[[str], None]) -> list[int | None]:
    """The size of each plain file, None for a folder or a file that cannot be read now
    (its import re-checks it and fails properly). Blocking: run it in a storage thread."""
    sizes: list[int | None] = []
    for path in paths:
        watch(str(path))
        try:
            info = os.stat(path)
        except OSError:
            sizes.append(None)
            continue
        sizes.append(info.st_size if stat.S_ISREG(info.st_mode) else None)
    return sizes


class ProgressReporter:
    """The latest state of one order, and the task that writes it.

    Nothing happens before the order has run ``delay`` seconds (no task, no write, no
    metric): then the writer starts, and ``observe`` (the replica's metrics) hears the latest
    state, every later one at once, and None when the order ends. Writes follow the state at
    most once per ``interval``; the first state of a step and the state it ends with are
    written without waiting for the interval.
    """

    def __init__(
        self,
        uuid: str,
        sink: ProgressSink,
        *,
        run: int,
        interval: float = PROGRESS_INTERVAL,
        delay: float = PROGRESS_DELAY,
        observe: Callable[[Progress | None], None] | None = None,
        stop_wait: float = STOP_WAIT,
    ) -> None:
        self.uuid = uuid
        self.run = run
        self.stop_wait = stop_wait
        self.sink = sink
        self.interval = interval
        self.delay = delay
        self.observe = observe
        self.latest: Progress | None = None
        self._written: Progress | None = None
        self._changed = asyncio.Event()
        self._urgent = asyncio.Event()
        self._last_write = -math.inf
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    # --- what the pipeline calls ---------------------------------------------------------
    def start_step(
        self,
        step: ProgressStep,
        units_total: int = 0,
        *,
        bytes_total: int | None = None,
    ) -> None:
        self._set(
            Progress(
                step=step,
                units_total=units_total,
                bytes_done=None if bytes_total is None else 0,
                bytes_total=bytes_total,
            ),
            urgent=True,
        )

    def advance(
        self,
        *,
        units_done: int | None = None,
        current_file: str | None = None,
        bytes_done: int | None = None,
    ) -> None:
        """Move the current step on; ``current_file`` replaces the name shown (None clears it)."""
        last = self.latest
        if last is None:
            return
        # built field by field: dataclasses.replace costs several times more, once per unit
        progress = Progress(
            last.step,
            last.units_done if units_done is None else units_done,
            last.units_total,
            None if current_file is None else safe_text(current_file, NAME_LIMIT),
            last.bytes_done if bytes_done is None else bytes_done,
            last.bytes_total,
        )
        self._set(progress, urgent=False)

    def end_step(self) -> None:
        """The step is over: its last state is written without waiting for the interval."""
        last = self.latest
        if last is not None:
            self._set(
                Progress(
                    last.step,
                    last.units_done,
                    last.units_total,
                    None,
                    last.bytes_done,
                    last.bytes_total,
                ),
                urgent=True,
            )

    def _set(self, progress: Progress, *, urgent: bool) -> None:
        self.latest = progress
        if self.observe is not None and self._task is not None:
            self.observe(progress)
        self._changed.set()
        if urgent:
            self._urgent.set()

    # --- the writer ----------------------------------------------------------------------
    def start(self) -> None:
        """Start the writer after the delay: call it from the order's task, which must
        :meth:`stop` it. (A timer, not a sleeping task: most orders end before it fires.)"""
        self._timer = asyncio.get_running_loop().call_later(self.delay, self._spawn)

    def _spawn(self) -> None:
        self._timer = None
        self._task = asyncio.create_task(self._run(), name=f"progress-{self.uuid}")
        self._task.add_done_callback(_log_failure)
        if self.observe is not None and self.latest is not None:
            self.observe(self.latest)

    async def stop(self) -> None:
        """Stop writing (the order is ending: its end clears the progress) and forget it."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        task, self._task = self._task, None
        if task is None:
            return
        if self.observe is not None:
            self.observe(None)
        task.cancel()
        await asyncio.wait([task], timeout=self.stop_wait)
        if not task.done():
            log.info("progress_writer_still_stopping", waited=self.stop_wait)
            _stopping.add(task)
            task.add_done_callback(_stopping.discard)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._changed.wait()
            # a step's first or last state is written at once, the rest an interval after the
            # last write; an urgent state arriving meanwhile cuts the interval short
            due = self._last_write + self.interval
            if not self._urgent.is_set() and due > loop.time():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._urgent.wait(), due - loop.time())
            self._changed.clear()
            self._urgent.clear()
            progress = self.latest
            if progress is None or progress == self._written:
                continue
            self._last_write = loop.time()
            await self._write(progress)

    async def _write(self, progress: Progress) -> None:
        try:
            await self.sink.record_progress(self.uuid, progress, run=self.run)
        except Exception:
            # The store answers False for what it expects; anything else is a bug, logged
            # once per order, and the order goes on (progress is for people watching).
            if not self._failing:
                self._failing = True
                log.exception("progress_write_failed")
            return
        self._written = progress


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("progress_writer_failed", task=task.get_name(), exc_info=task.exception())
