"""Running an order's converter containers: bounded, observable, and never left behind.

Each container runs as ``<runtime> run --rm --name biomero-<uuid>-<n> ...`` through
``asyncio.create_subprocess_exec`` in a session of its own. ``--rm`` removes it after a normal
exit. On timeout, cancel or shutdown the runtime client is killed first (so it cannot go on
to create the container), then the container is killed and removed by name; a name left by a
crashed earlier attempt is removed and the run retried once.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import shlex
import shutil
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from structlog.typing import FilteringBoundLogger

from biomero_importer import paths
from biomero_importer.cpus import children_on_every_cpu
from biomero_importer.model import Order
from biomero_importer.preprocessing.command import (
    ContainerJob,
    plan_jobs,
    runtime_prefix,
    temp_root,
)
from biomero_importer.preprocessing.contract import ProcessedItem, parse_result
from biomero_importer.preprocessing.errors import PreprocessingError
from biomero_importer.preprocessing.output import (
    LINE_LOG_LIMIT,
    READ_CHUNK,
    RESULT_LINE_LIMIT,
    LastLine,
    OrderLogFile,
    OutputLog,
    order_log_path,
    pump,
)
from biomero_importer.settings import Settings
from biomero_importer.text import short

T = TypeVar("T")

# Each runtime command that kills or removes a container gets this long.
REMOVE_TIMEOUT = 10.0
# After the client is killed its pipes close at once; a straggler holding them is not waited for.
DRAIN_TIMEOUT = 2.0
# Exit codes of the runtime itself (podman and docker): the converter never ran.
RUNTIME_EXIT_CODES = (125, 126, 127)
DESCRIPTION_LIMIT = 300
# podman's last line when statfs on a bind-mount source fails with EBUSY
BUSY_BIND_SOURCE = re.compile(r"^Error: statfs .*: device or resource busy$", re.IGNORECASE)
# What the runtime itself prints (exit 125, the converter never ran) when it is not available
# for a while: its daemon or socket not answering (docker, podman --remote), its state
# database locked by another podman process. Only these are retried automatically; a missing
# image, a refused mount or a converter that failed are permanent.
RUNTIME_UNAVAILABLE = re.compile(
    r"cannot connect to (the )?(docker daemon|podman)|is the docker daemon running"
    r"|connection refused|database is locked|resource temporarily unavailable",
    re.IGNORECASE,
)
# Errors of starting the runtime client that pass (the host short of processes or memory).
TRANSIENT_SPAWN_ERRNOS = frozenset({errno.EAGAIN, errno.ENOMEM, errno.EMFILE, errno.ENFILE})


@dataclass(frozen=True)
class PreprocessResult:
    """Every item the order's containers produced, in file order, and their temporary folder."""

    items: list[ProcessedItem]
    temp_dir: Path


@dataclass(frozen=True)
class _Run:
    returncode: int
    stdout: LastLine
    stderr: LastLine


async def _settle(future: asyncio.Future[T]) -> T:
    """Await ``future`` to its end even when cancelled meanwhile; then re-raise the cancel."""
    cancelled = False
    while not future.done():
        try:
            await asyncio.wait([future])
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return future.result()


async def _stop_tasks(tasks: Sequence[asyncio.Future[Any]]) -> None:
    for task in tasks:
        task.cancel()
    if tasks:
        await _settle(asyncio.ensure_future(asyncio.wait(tasks)))
    for task in tasks:
        if not task.cancelled():
            task.exception()


async def _runtime_command(settings: Settings, args: list[str], log: FilteringBoundLogger) -> None:
    with children_on_every_cpu():
        proc = await asyncio.create_subprocess_exec(
            *runtime_prefix(settings),
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        await asyncio.wait_for(proc.wait(), REMOVE_TIMEOUT)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        log.error("container_runtime_command_timeout", command=args[0], seconds=REMOVE_TIMEOUT)


async def remove_container(name: str, settings: Settings, log: FilteringBoundLogger) -> None:
    """Kill and remove a container by name; a name that does not exist is fine."""
    # `rm -f` alone first asks the container to stop and waits up to 10 s; a converter
    # running as PID 1 ignores SIGTERM, so it is killed outright.
    await _runtime_command(settings, ["kill", name], log)
    await _runtime_command(settings, ["rm", "-f", name], log)


def _kill_client(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


async def _stop_container(
    job: ContainerJob,
    settings: Settings,
    proc: asyncio.subprocess.Process,
    tasks: list[asyncio.Future[Any]],
    log: FilteringBoundLogger,
) -> None:
    started = time.monotonic()
    _kill_client(proc)
    await remove_container(job.name, settings, log)
    _, pending = await asyncio.wait(tasks, timeout=DRAIN_TIMEOUT)
    await _stop_tasks(list(pending))
    log.info("preprocessing_container_removed", seconds=round(time.monotonic() - started, 3))


async def _run_container(
    job: ContainerJob, settings: Settings, output: OutputLog, log: FilteringBoundLogger
) -> _Run:
    output.note(f"command: {shlex.join(job.argv)}")
    log.info("preprocessing_container_started", image=job.image, source=str(job.source))
    started = time.monotonic()
    try:
        with children_on_every_cpu():  # the converter's work is not the replica's
            proc = await asyncio.create_subprocess_exec(
                *job.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                # Its own session: a Ctrl-C to the service must not reach the runtime client
                # (podman would forward it to the converter), and the kill reaches all of it.
                start_new_session=True,
                limit=READ_CHUNK,
            )
    except OSError as exc:
        raise PreprocessingError(
            f"Container runtime '{settings.container_runtime}' cannot be started",
            detail=str(exc),
            transient=exc.errno in TRANSIENT_SPAWN_ERRNOS,
        ) from None
    if proc.stdout is None or proc.stderr is None:
        raise RuntimeError("subprocess pipes missing")
    stdout_task = asyncio.ensure_future(pump(proc.stdout, "stdout", RESULT_LINE_LIMIT, output))
    stderr_task = asyncio.ensure_future(pump(proc.stderr, "stderr", LINE_LOG_LIMIT, output))
    wait_task = asyncio.ensure_future(proc.wait())
    tasks: list[asyncio.Future[Any]] = [stdout_task, stderr_task, wait_task]
    try:
        _, pending = await asyncio.wait(tasks, timeout=settings.preprocessing_timeout)
    except asyncio.CancelledError:
        log.warning("preprocessing_cancelled")
        output.note("cancelled: container killed")
        await _settle(asyncio.ensure_future(_stop_container(job, settings, proc, tasks, log)))
        raise
    if pending:
        log.warning("preprocessing_timeout", timeout_seconds=settings.preprocessing_timeout)
        output.note(f"timed out after {settings.preprocessing_timeout:g} s: container killed")
        await _settle(asyncio.ensure_future(_stop_container(job, settings, proc, tasks, log)))
        raise PreprocessingError(
            f"Preprocessing of {short(job.source.name, 80)} timed out"
            f" after {settings.preprocessing_timeout:g} s"
        )
    run = _Run(wait_task.result(), stdout_task.result(), stderr_task.result())
    output.note(f"exit code {run.returncode}")
    log.info(
        "preprocessing_container_finished",
        exit_code=run.returncode,
        seconds=round(time.monotonic() - started, 3),
        lines_not_logged=output.dropped_lines,
    )
    return run


async def _retry_busy_bind(
    run: _Run, job: ContainerJob, settings: Settings, output: OutputLog, log: FilteringBoundLogger
) -> _Run:
    """Run again, as the original does, while the runtime reports a busy bind source (a
    CIFS/DFS referral reconnecting); the same mount works a moment later. Only that exact
    error: converter, image and permission failures stay immediate."""
    delay = settings.podman_bind_retry_delay_seconds
    attempt = 1
    while (
        run.returncode != 0
        and BUSY_BIND_SOURCE.match(run.stderr.text())
        and attempt < settings.podman_bind_retry_attempts
    ):
        attempt += 1
        log.warning(
            "preprocessing_bind_source_busy",
            attempt=attempt,
            attempts=settings.podman_bind_retry_attempts,
            retry_in=delay,
        )
        output.note(f"bind source busy: run again in {delay:g} s (attempt {attempt})")
        await asyncio.sleep(delay)
        delay *= 2
        run = await _run_container(job, settings, output, log)
    return run


def _failure(job: ContainerJob, run: _Run) -> PreprocessingError:
    code = run.returncode
    what = "Container runtime" if code in RUNTIME_EXIT_CODES else "Converter"
    how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
    last = run.stderr.text() or run.stdout.text()
    reason = f"{what} {how} for {short(job.source.name, 80)}" + (f": {last}" if last else "")
    unavailable = code in RUNTIME_EXIT_CODES and bool(RUNTIME_UNAVAILABLE.search(last))
    return PreprocessingError(short(reason, DESCRIPTION_LIMIT), detail=last, transient=unavailable)


def check_mounts(job: ContainerJob, roots: paths.Area) -> None:
    """Right before the container starts: the input still resolves where it did at
    validation, and each folder mounted from the import roots is still its own real path
    inside them (podman would follow a symlink swapped in meanwhile)."""
    try:
        paths.recheck(job.source, job.checked, roots)
        for mount in (job.data_mount, job.processed_mount):
            paths.recheck(mount.host, mount.host, roots, "Folder", walk=False)
    except paths.PathRefused as exc:
        raise PreprocessingError(exc.reason) from None


async def _run_job(
    job: ContainerJob,
    settings: Settings,
    logfile: OrderLogFile | None,
    slots: asyncio.Semaphore,
    log: FilteringBoundLogger,
) -> list[ProcessedItem]:
    async with slots:
        roots = paths.import_area(settings.effective_import_roots)
        await asyncio.to_thread(check_mounts, job, roots)
        clog = log.bind(container=job.name)
        output = OutputLog(clog, logfile, job.name)
        run = await _run_container(job, settings, output, clog)
        if run.returncode == 125 and "already in use" in run.stderr.text():
            clog.warning("preprocessing_stale_container_removed")
            await remove_container(job.name, settings, clog)
            run = await _run_container(job, settings, output, clog)
        run = await _retry_busy_bind(run, job, settings, output, clog)
        if run.returncode != 0:
            raise _failure(job, run)
        items = await asyncio.to_thread(
            parse_result, job, run.stdout.text() or None, run.stdout.complete
        )
        clog.info("preprocessing_items", items=[str(item.import_path) for item in items])
        return items


def _prepare_folders(jobs: list[ContainerJob], temp: Path, roots: paths.Area) -> None:
    # Outputs of an earlier, interrupted attempt must not be imported now.
    shutil.rmtree(temp, ignore_errors=True)
    for job in jobs:
        for folder in (job.processed_dir, job.alt_mount.host if job.alt_mount else None):
            if folder is None:
                continue
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise PreprocessingError(
                    f"Cannot create folder {short(str(folder))}", detail=str(exc)
                ) from None
        # The converter writes here: a processed folder that is a symlink would send its
        # output (written with the importer's rights) wherever the link points.
        try:
            real = paths.contained(job.processed_dir, roots, "Processed folder", walk=False)
        except paths.PathRefused as exc:
            raise PreprocessingError(exc.reason) from None
        if real != job.processed_dir:
            raise PreprocessingError(
                f"Processed folder is a symlink: {short(str(job.processed_dir))}"
            )


def _open_log_file(path: Path, log: FilteringBoundLogger) -> OrderLogFile | None:
    try:
        return OrderLogFile(path)
    except OSError as exc:
        log.warning("preprocessing_log_file_unavailable", path=str(path), error=str(exc))
        return None


async def _run_jobs(
    jobs: list[ContainerJob],
    settings: Settings,
    logfile: OrderLogFile | None,
    log: FilteringBoundLogger,
) -> list[ProcessedItem]:
    slots = asyncio.Semaphore(settings.preprocessing_parallel)
    tasks = [asyncio.ensure_future(_run_job(j, settings, logfile, slots, log)) for j in jobs]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    except asyncio.CancelledError:
        await _stop_tasks(tasks)
        raise
    failed = [t for t in tasks if t.done() and not t.cancelled() and t.exception() is not None]
    if failed:
        await _stop_tasks(tasks)
        error = failed[0].exception()
        assert error is not None
        raise error
    return [item for task in tasks for item in task.result()]


async def run_preprocessing(
    order: Order, settings: Settings, *, log: FilteringBoundLogger
) -> PreprocessResult:
    """Convert every file of ``order``; PreprocessingError names what went wrong.

    Cancellation kills and removes the running containers before it propagates. On any
    failure the temporary folder is deleted; on success the caller deletes it after import.
    """
    jobs = plan_jobs(order, settings)
    temp = temp_root(order, settings)
    started = time.monotonic()
    log.info(
        "preprocessing_started",
        image=jobs[0].image if jobs else None,
        files=len(jobs),
        parallel=settings.preprocessing_parallel,
    )
    logfile = _open_log_file(order_log_path(settings.order_log_dir, order.uuid), log)
    try:
        roots = paths.import_area(settings.effective_import_roots)
        await asyncio.to_thread(_prepare_folders, jobs, temp, roots)
        items = await _run_jobs(jobs, settings, logfile, log)
    except BaseException:
        await _settle(
            asyncio.ensure_future(asyncio.to_thread(shutil.rmtree, temp, ignore_errors=True))
        )
        raise
    finally:
        if logfile is not None:
            logfile.close()
    log.info(
        "preprocessing_finished",
        items=len(items),
        seconds=round(time.monotonic() - started, 3),
    )
    return PreprocessResult(items=items, temp_dir=temp)
