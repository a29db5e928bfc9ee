"""One order, start to finish: validate, preprocess, import, annotate.

The pipeline never touches omero-py itself: it talks to the OMERO port, and every port call
(blocking by nature) goes through the replica's bounded thread executor. Hand-offs to threads
are few: validation, the settle look and the re-check of the first file before its import
are one storage job; on a port whose calls return at once (``one_job``: the simulator and
null backends), a one-file order's OMERO work (session, import, annotation) is one executor
job too. The blitz port keeps one job per call, so a cancel is heard between calls.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar

import structlog

from biomero_importer import paths
from biomero_importer.model import (
    STAGE_IMPORTED,
    STAGE_INGEST_FAILED,
    STAGE_NEW_ORDER,
    STAGE_PREPROCESSING,
    ClaimedOrder,
    Order,
    Outcome,
    Progress,
    TransientKind,
)
from biomero_importer.observability.metrics import Step
from biomero_importer.omero.metadata import build_annotation_pairs
from biomero_importer.omero.port import (
    SESSION_TTL_MARGIN_SECONDS,
    ImportAborted,
    ImportedObject,
    ImportFailed,
    OmeroError,
    OmeroGateway,
    OmeroSession,
    OmeroUnavailable,
)
from biomero_importer.pipeline.progress import PROGRESS_DELAY, ProgressReporter, file_sizes
from biomero_importer.pipeline.settle import Look, look
from biomero_importer.pipeline.storage import StorageError, StorageTimeout, failure
from biomero_importer.pipeline.threads import in_thread
from biomero_importer.pipeline.validate import InvalidOrder, validate
from biomero_importer.preprocessing import (
    PreprocessingError,
    ProcessedItem,
    run_preprocessing,
    validate_preprocessing,
)
from biomero_importer.settings import Settings
from biomero_importer.text import duration, safe_text, short

log = structlog.get_logger(__name__)

T = TypeVar("T")

# Seconds a cancelled order waits for its aborted OMERO call to return (shutdown is bounded).
ABORT_WAIT = 3.0
# Seconds a registration step waits for its object to be recorded before it gives up.
RECORD_WAIT = 60.0
# Settle looks a replica keeps for orders that wait (the oldest go first; such an order looks
# once more): about 200 bytes each.
LOOKS_KEPT = 10_000


Failure = (
    InvalidOrder
    | PreprocessingError
    | OmeroError
    | paths.PathRefused
    | StorageTimeout
    | StorageError
)


def transient_kind(exc: Failure) -> TransientKind | None:
    """Which failures pass: OMERO unreachable, storage not answering, the container runtime
    not available. Everything else (bad input, not allowed, a converter or an import that
    failed) is permanent and never retried automatically."""
    if isinstance(exc, OmeroUnavailable):
        return "omero"
    if isinstance(exc, StorageTimeout | StorageError):
        return "storage"
    if isinstance(exc, PreprocessingError) and exc.transient:
        return "container_runtime"
    return None


class _PathWatch:
    """The path a storage thread is working on, to name it if storage stops answering, and
    when it got there: a job that keeps moving on (a long walk) is not a hung mount."""

    def __init__(self, fallback: str) -> None:
        self.current = fallback
        self.heard = time.monotonic()

    def __call__(self, path: str) -> None:
        self.current = path
        self.heard = time.monotonic()


class StageSink(Protocol):
    """What the pipeline needs from the database while an order runs."""

    async def append_stage(
        self, uuid: str, stage: str, description: str | None = None, *, run: int
    ) -> bool: ...

    async def record_objects(
        self, uuid: str, objects: list[dict[str, Any]], *, run: int
    ) -> None: ...

    async def record_progress(self, uuid: str, progress: Progress, *, run: int) -> bool: ...


@dataclass(frozen=True)
class ImportUnit:
    """One thing to import: an order file, or one item a preprocessing container produced.

    ``checked`` is ``path`` as validated (symlinks resolved) and ``area`` where it must
    still lie when it is imported; ``size`` its bytes for the progress (None: a folder, or
    not known).
    """

    path: Path
    annotation_path: Path
    checked: Path | None
    area: paths.Area
    item: ProcessedItem | None = None
    size: int | None = None


class ObjectLedger:
    """The OMERO objects an order created, kept in the database between runs; each object at
    most once.

    Registered OME-Zarr objects are saved one by one as they are created. Imports and
    annotation progress are saved at most once per ``flush_interval`` while an order runs, and
    always at its end, on a cancel and on a hand-back: an object imported after the last save
    still carries the order's comment annotation, which ``find_imported`` finds on a second
    run, and an annotation made after it is found by ``annotate`` itself; saving after every
    file of a 10,000-file order would buy nothing but write load.
    """

    def __init__(self, records: list[dict[str, Any]], flush_interval: float = 1.0) -> None:
        self.records = list(records)
        self.flush_interval = flush_interval
        self._by_key: dict[str, list[dict[str, Any]]] = {}
        self._by_object: dict[tuple[str, int], dict[str, Any]] = {}
        for record in self.records:
            self._index(record)
        self._dirty = False
        self._saved_at = time.monotonic()

    def _index(self, record: dict[str, Any]) -> None:
        self._by_key.setdefault(str(record.get("key")), []).append(record)
        self._by_object[(str(record["type"]), int(record["id"]))] = record

    def known(self, key: str) -> list[ImportedObject]:
        return [
            ImportedObject(
                type=r["type"],
                id=int(r["id"]),
                name=str(r.get("name", "")),
                client_path=str(r.get("client_path", "")),
                fileset_id=r.get("fileset_id"),
            )
            for r in self._by_key.get(key, [])
        ]

    def add(self, key: str, objects: list[ImportedObject]) -> None:
        for obj in objects:
            if (obj.type, obj.id) in self._by_object:
                continue  # found again on a re-run: the ledger lists each object once
            record = {
                "type": obj.type,
                "id": obj.id,
                "name": obj.name,
                "client_path": obj.client_path,
                "fileset_id": obj.fileset_id,
                "key": key,
                "annotated": False,
                # set by complete() once an import run of the unit succeeded
                "unit_complete": False,
            }
            self.records.append(record)
            self._index(record)
        self._dirty = True

    def complete(self, key: str) -> bool:
        """An import run of the unit succeeded: what it recorded is all of it. Objects found
        in OMERO after an interrupted or partly failed run are recorded, but not complete.
        Records written before this marker existed count as complete."""
        records = self._by_key.get(key, [])
        return bool(records) and all(r.get("unit_complete", True) for r in records)

    def mark_complete(self, key: str) -> None:
        for record in self._by_key.get(key, []):
            if not record.get("unit_complete", True):
                record["unit_complete"] = True
                self._dirty = True

    def annotated(self, obj: ImportedObject) -> bool:
        record = self._by_object.get((obj.type, obj.id))
        return bool(record and record.get("annotated"))

    def mark_annotated(self, obj: ImportedObject) -> None:
        record = self._by_object.get((obj.type, obj.id))
        if record is not None:
            record["annotated"] = True
            self._dirty = True

    async def save_if_due(self, sink: StageSink, uuid: str, run: int) -> None:
        if self._dirty and time.monotonic() - self._saved_at >= self.flush_interval:
            await self.save(sink, uuid, run)

    async def save(self, sink: StageSink, uuid: str, run: int) -> None:
        """Save under the order's claim ``run``: a run that lost the order saves nothing."""
        self._dirty = False
        self._saved_at = time.monotonic()
        await sink.record_objects(uuid, self.records, run=run)

    @property
    def dirty(self) -> bool:
        return self._dirty


class _Flag:
    """Raised once by the event loop, read by a worker thread (a bool store is atomic)."""

    __slots__ = ("up",)

    def __init__(self) -> None:
        self.up = False


class _Sessions:
    """The order's OMERO session, replaced by a fresh one when it cannot outlive the next
    import: a session's time-to-live is a hard lifetime that keep-alives never extend."""

    def __init__(self, session: OmeroSession) -> None:
        self.current = session


@dataclass(frozen=True)
class _Seen:
    """A settle look and when it ended (this replica's monotonic clock)."""

    look: Look
    at: float


@dataclass
class _Prepared:
    """What the order's first storage job found."""

    order: Order
    #: the settle look (None: settle is off) and whether it matched one settle_seconds older
    seen: _Seen | None = None
    settled: bool = True
    #: the one unit of a one-job order, re-checked after the look, and its annotation
    unit: ImportUnit | None = None
    source: Path | None = None
    pairs: list[tuple[str, str]] | None = None
    #: what reading its metadata.csv skipped on purpose, for the completed order's description
    notes: list[str] = field(default_factory=list)


class _OneJob:
    """A one-file order's OMERO work in one executor thread: open a session, find or import
    the file, annotate what it brought, close. For ports whose calls return at once; a cancel
    is heard between the calls (``cancelled``) and stops the running one (``abort``)."""

    def __init__(
        self,
        gateway: OmeroGateway,
        order: Order,
        unit: ImportUnit,
        source: Path,
        *,
        check_existing: bool,
        known: list[ImportedObject],
        complete: bool,
        namespace: str,
        pairs: list[tuple[str, str]],
        annotated: Callable[[ImportedObject], bool],
    ) -> None:
        self.gateway = gateway
        self.order = order
        self.unit = unit
        self.source = source
        self.check_existing = check_existing
        self.known = known
        #: an import run of the unit succeeded before (what is known is all there is)
        self.complete = complete
        self.namespace = namespace
        self.pairs = pairs
        self.is_annotated = annotated
        self._lock = threading.Lock()
        self._cancelled = False
        self._session: OmeroSession | None = None
        # what the thread did, read by the event loop once the thread has ended
        self.objects: list[ImportedObject] = []
        self.new = False  # the objects are new to the ledger
        self.annotated: list[ImportedObject] = []
        self.import_seconds = 0.0
        self.annotate_seconds = 0.0

    def cancel(self) -> OmeroSession | None:
        """Called on the event loop: no further call starts; returns the open session (to
        abort), None if none is open yet (the thread closes the one it may still get)."""
        with self._lock:
            self._cancelled = True
            return self._session

    def _go_on(self) -> None:
        if self._cancelled:
            raise ImportAborted("cancelled between calls")

    def run(self) -> None:
        order = self.order
        session = self.gateway.open_session(order.user, order.group, order_uuid=order.uuid)
        try:
            with self._lock:
                self._session = session
            start = time.perf_counter()
            self._import(session)
            self.import_seconds = time.perf_counter() - start
            start = time.perf_counter()
            for obj in self.objects:
                if self.is_annotated(obj):
                    continue
                self._go_on()
                session.annotate(obj, self.namespace, self.pairs)
                self.annotated.append(obj)
            self.annotate_seconds = time.perf_counter() - start
        finally:
            session.close()

    def _import(self, session: OmeroSession) -> None:
        key = str(self.unit.path)
        if self.known and self.complete:
            log.info("import_skipped_already_done", path=key, objects=len(self.known))
            self.objects = self.known
            return
        order = self.order
        known = list(self.known)
        if self.check_existing:
            self._go_on()
            found = session.find_imported(self.source, order.target, order_uuid=order.uuid)
            seen = {(o.type, o.id) for o in known}
            known = [*known, *(o for o in found if (o.type, o.id) not in seen)]
            if found:
                # found is not done: the run that made them may have stopped half way (no -c:
                # the importer stops at the first failed fileset), so the import below brings
                # in only the files none of their filesets holds
                log.info("import_resumed_found_in_omero", path=key, objects=len(found))
        self._go_on()
        objects = session.import_path(
            self.source, order.target, order_uuid=order.uuid, exclude_existing=False, already=known
        )
        log.info("imported", path=key, objects=[f"{o.type}:{o.id}" for o in objects])
        # what an earlier run left, and what this one added; the unit is complete now
        self.objects, self.new = [*known, *objects], True


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        gateway: OmeroGateway,
        executor: Executor,
        sink: StageSink,
        observe_step: Callable[[Step, float], None] | None = None,
        *,
        storage: Executor | None = None,
        observe_progress: Callable[[str, Progress | None], None] | None = None,
        progress_delay: float = PROGRESS_DELAY,
    ) -> None:
        self.settings = settings
        self.gateway = gateway
        self.executor = executor
        self.storage = storage or executor
        self.sink = sink
        self.observe_step = observe_step
        #: hears every progress state of every order, and (uuid, None) when one ends
        self.observe_progress = observe_progress
        #: seconds an order runs before its progress is first written (tests shorten it)
        self.progress_delay = progress_delay
        # resolved once: every order's paths are checked against it
        self.area = paths.import_area(settings.effective_import_roots)
        # each waiting order's last settle look, compared with its next one
        self._looks: OrderedDict[str, _Seen] = OrderedDict()

    async def run(self, claimed: ClaimedOrder) -> Outcome:
        """Run one claimed order; always returns the terminal outcome (cancellation propagates)."""
        observe = self.observe_progress
        progress = ProgressReporter(
            claimed.uuid,
            self.sink,
            run=claimed.runs,
            delay=self.progress_delay,
            observe=None if observe is None else partial(observe, claimed.uuid),
        )
        # the writer is this task's child: stopped on every way out, a cancel included
        progress.start()
        try:
            return await self._run(claimed, progress)
        finally:
            await progress.stop()

    async def _run(self, claimed: ClaimedOrder, progress: ProgressReporter) -> Outcome:
        file_names: list[str] | None = None
        ledger = ObjectLedger(claimed.recorded_objects)
        # What a completed order skipped on purpose (a metadata.csv linking elsewhere).
        notes: list[str] = []
        try:
            with self._step("validate"):
                progress.start_step("validate")
                prepared = await self._prepare(claimed)
            order = prepared.order
            file_names = order.file_names
            # before anything reads the data (preprocessing included)
            unsettled = self._settle(claimed, prepared)
            if unsettled is not None:
                unsettled.file_names = file_names
                return unsettled
            try:
                if prepared.unit is not None:
                    await self._import_in_one_job(prepared, claimed, ledger, notes, progress)
                else:
                    await self._import_order(order, claimed, ledger, notes, progress)
            except asyncio.CancelledError:
                await self._save_on_stop(claimed, ledger)
                raise
        except (
            InvalidOrder,
            PreprocessingError,
            OmeroError,
            paths.PathRefused,
            StorageTimeout,
            StorageError,
        ) as exc:
            detail = getattr(exc, "detail", "")
            transient = transient_kind(exc)
            log.warning(
                "order_failed", reason=exc.reason, detail=detail or None, transient=transient
            )
            return Outcome(
                STAGE_INGEST_FAILED, exc.reason, file_names, ledger.records, transient=transient
            )
        description = "; ".join(dict.fromkeys(notes)) or None
        return Outcome(STAGE_IMPORTED, description, file_names, ledger.records)

    def _one_job_unit(self, order: Order) -> ImportUnit | None:
        """The unit of an order whose OMERO work can be one executor job: one file, no
        preprocessing, a plain import (a registration records each object as it is created),
        on a port whose calls return at once."""
        if not self.gateway.one_job or order.preprocessing is not None or len(order.files) != 1:
            return None
        (path,) = order.files
        if self.settings.use_register_zarr and path.suffix.lower() == ".zarr":
            return None
        return ImportUnit(
            path, path, order.checked.get(path), self.area, size=order.sizes.get(path)
        )

    async def _prepare(self, claimed: ClaimedOrder) -> _Prepared:
        """Validation, the settle look and, for a one-job order that may go ahead, the
        re-check of its file and its annotation: one storage job."""
        earlier = self._looks.get(claimed.uuid)
        watch = _PathWatch(claimed.files)
        return await self._storage(watch, partial(self._prepare_job, claimed, earlier, watch))

    def _prepare_job(
        self, claimed: ClaimedOrder, earlier: _Seen | None, watch: _PathWatch
    ) -> _Prepared:
        """In a storage thread: see :meth:`_prepare`."""
        order = validate(claimed, self.area, watch)
        if order.preprocessing is not None:
            validate_preprocessing(order, self.settings)
        prepared = _Prepared(order)
        settle = self.settings.settle_seconds
        if settle > 0:
            started = time.monotonic()
            seen = look(order.checked.values(), self.area, watch, self.settings.settle_max_entries)
            prepared.seen = _Seen(seen, time.monotonic())
            # unchanged since a look that ended settle_seconds before this one began
            prepared.settled = (
                earlier is not None and earlier.look.same(seen) and started - earlier.at >= settle
            )
            if not prepared.settled:
                return prepared
        unit = self._one_job_unit(order)
        if unit is None:
            return prepared  # each unit is re-checked right before its own import
        prepared.unit = unit
        if settle > 0:
            # What is imported is what was checked, checked once more now (the look took
            # time, and a file swapped for a symlink meanwhile fails the order here).
            watch(str(unit.path))
            prepared.source = paths.recheck(unit.path, unit.checked, unit.area)
        else:
            # No look: the validation a moment ago, in this same job, is the check right
            # before use (a second one found the same, at the cost of another resolve).
            prepared.source = order.checked[unit.path]
        # reads metadata.csv beside the data
        prepared.pairs = build_annotation_pairs(
            order,
            unit.annotation_path,
            preprocessing_keyvalues=None,
            processed_folder_name=self.settings.processed_folder_name,
            imported_at=datetime.now(timezone.utc),
            import_roots=self.area,
            notes=prepared.notes,
        )
        return prepared

    def _settle(self, claimed: ClaimedOrder, prepared: _Prepared) -> Outcome | None:
        """A wait while the order's data changed between two looks ``settle_seconds`` apart
        (or has only been looked at once); 'Import Failed' once it has waited
        ``settle_max_wait``; None when it may go ahead."""
        seen = prepared.seen
        if seen is None:
            return None
        uuid = claimed.uuid
        if prepared.settled:
            self._looks.pop(uuid, None)
            return None
        settle = self.settings.settle_seconds
        earlier = self._looks.get(uuid)
        same = earlier is not None and earlier.look.same(seen.look)
        if earlier is not None and same:
            # claimed again before the time was up (a retry): the earlier look still counts
            wait = max(0.0, settle - (seen.at - earlier.at))
            description = f"Waiting for files to stop changing (looking again in {duration(wait)})"
        else:
            limit = self.settings.settle_max_wait
            if claimed.waiting_since is not None and time.time() - claimed.waiting_since >= limit:
                self._looks.pop(uuid, None)
                log.warning("order_files_never_settled", path=str(seen.look.path))
                return Outcome(
                    STAGE_INGEST_FAILED,
                    f"Files still changing after waiting {duration(limit)}:"
                    f" {short(str(seen.look.path))}",
                )
            self._looks[uuid] = seen
            self._looks.move_to_end(uuid)
            if len(self._looks) > LOOKS_KEPT:
                self._looks.popitem(last=False)
            wait = settle
            if earlier is None:
                description = (
                    f"Waiting for files to stop changing (looking again in {duration(settle)})"
                )
            else:
                since = duration(seen.at - earlier.at)
                description = f"Waiting for files to stop changing (changed in the last {since})"
        log.info(
            "order_waits_for_files",
            path=str(seen.look.path),
            changed=earlier is not None and not same,
        )
        return Outcome(STAGE_NEW_ORDER, description, wait_seconds=wait, settling=True)

    async def _save_on_stop(self, order: ClaimedOrder, ledger: ObjectLedger) -> None:
        """A cancel, shutdown or lease loss ends the run: what it created and annotated is
        saved first (bounded), or the next run would have only OMERO to ask."""
        if not ledger.dirty:
            return
        save = asyncio.ensure_future(ledger.save(self.sink, order.uuid, order.runs))
        try:
            await asyncio.wait_for(asyncio.shield(save), timeout=ABORT_WAIT)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            save.cancel()
            log.warning("ledger_not_saved_on_stop")
        except Exception as exc:  # the order is stopping anyway; recovery has OMERO to ask
            log.warning("ledger_not_saved_on_stop", error=type(exc).__name__)

    async def _storage(self, watch: _PathWatch, call: Callable[[], T]) -> T:
        """Filesystem work on shared storage, in a storage thread: storage that does not
        answer for ``storage_timeout`` (a hung NFS/SMB mount; a job that goes on from path to
        path is answered) fails this order instead of stopping the event loop (and with it
        lease renewal for every other order). An error of storage ends the order naming the
        path: a wait and retry when it passes (ESTALE, EIO, ETIMEDOUT), else 'Import Failed'."""

        def guarded() -> T:
            try:
                return call()
            except OSError as exc:
                raise failure(exc, watch.current) from None

        timeout = self.settings.storage_timeout
        watch.heard = time.monotonic()
        future = in_thread(self.storage, guarded)
        while True:
            left = watch.heard + timeout - time.monotonic()
            try:
                return await asyncio.wait_for(asyncio.shield(future), timeout=max(left, 0.0))
            except asyncio.TimeoutError:
                if time.monotonic() - watch.heard < timeout:
                    continue  # it moved on to another path meanwhile
                # the thread stays blocked in the kernel; only this order gives up on it
                raise StorageTimeout(
                    f"Storage did not answer within {timeout:g} s: {short(watch.current)}"
                ) from None

    async def _item_sizes(self, items: list[ProcessedItem]) -> list[int | None]:
        """Each converter output's size in bytes for its progress (None: a folder, or not
        known now). One stat per item in a storage thread; storage that does not answer fails
        the order here, as the re-check before the first import would a moment later."""
        watch = _PathWatch(str(items[0].import_path) if items else "")
        return await self._storage(
            watch, partial(file_sizes, [i.import_path for i in items], watch)
        )

    def _step(self, name: Step) -> _StepTimer:
        return _StepTimer(name, self.observe_step)

    async def _blocking(self, session: OmeroSession | None, call: Callable[[], T]) -> T:
        """Run a port call in the executor; on cancel, abort it and wait for the thread.

        A call still queued behind others when the order is cancelled never starts."""
        # a plain flag, not a threading.Event: one is made per call, on the hot path
        cancelled = _Flag()

        def guarded() -> T:
            if cancelled.up:
                raise ImportAborted("cancelled before the call started")
            return call()

        future = in_thread(self.executor, guarded)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            cancelled.up = True
            if session is not None:
                session.abort()
            # The thread cannot be interrupted; abort() kills its process, so it ends soon.
            await asyncio.wait([future], timeout=ABORT_WAIT)
            raise

    async def _open_session(self, order: Order) -> OmeroSession:
        """A user session; one that finishes opening after a cancel is closed at once (its
        Ice communicator with it), however long the opening took."""
        cancelled = _Flag()

        def guarded() -> OmeroSession:
            if cancelled.up:
                raise ImportAborted("cancelled before the session opened")
            return self.gateway.open_session(order.user, order.group, order_uuid=order.uuid)

        future = in_thread(self.executor, guarded)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            cancelled.up = True
            future.add_done_callback(_close_late_session)
            raise

    async def _close_session(self, session: OmeroSession) -> None:
        # closing must happen even when the order is being cancelled
        close = asyncio.get_running_loop().run_in_executor(self.executor, session.close)
        await asyncio.shield(close)

    async def _fresh_session(self, sessions: _Sessions, order: Order) -> OmeroSession:
        """The current session, or a new one if it cannot outlive one more import."""
        # Half the margin sessions are opened with: a session just opened (time-to-live
        # import_timeout plus the margin, at least) is never replaced before its first use.
        needed = self.settings.import_timeout + SESSION_TTL_MARGIN_SECONDS / 2
        current = sessions.current
        if current.remaining() >= needed:
            return current
        log.info("omero_session_renewed", remaining=round(current.remaining(), 1))
        await self._close_session(current)
        sessions.current = await self._open_session(order)
        return sessions.current

    async def _import_order(
        self,
        order: Order,
        claimed: ClaimedOrder,
        ledger: ObjectLedger,
        notes: list[str],
        progress: ProgressReporter,
    ) -> None:
        items: list[ProcessedItem] = []
        temp_dir: Path | None = None
        if order.preprocessing is not None:
            await self.sink.append_stage(order.uuid, STAGE_PREPROCESSING, run=order.run)
            structlog.contextvars.bind_contextvars(stage=STAGE_PREPROCESSING)
            with self._step("preprocess"):
                progress.start_step("preprocess")  # one container run: no units to count
                result = await run_preprocessing(order, self.settings, log=log)
            items, temp_dir = result.items, result.temp_dir
            sizes = await self._item_sizes(items)
            units = [
                ImportUnit(i.import_path, i.final_path, i.import_path, i.area, i, size)
                for i, size in zip(items, sizes, strict=True)
            ]
        else:
            # the order's own files were sized by validation's stat
            units = [
                ImportUnit(p, p, order.checked.get(p), self.area, size=order.sizes.get(p))
                for p in order.files
            ]

        sessions = _Sessions(await self._open_session(order))
        try:
            # A second run may find files an earlier run already brought into OMERO.
            check_existing = claimed.runs > 1 or bool(ledger.records)
            imported: list[tuple[ImportUnit, list[ImportedObject]]] = []
            with self._step("import"):
                # bytes only when every unit is a plain file: a total that leaves out folders
                # would make the progress wrong, not merely coarse
                sizes = [unit.size for unit in units]
                known = None if None in sizes else [size or 0 for size in sizes]
                progress.start_step(
                    "import", len(units), bytes_total=None if known is None else sum(known)
                )
                bytes_done = 0
                for done, unit in enumerate(units):
                    progress.advance(
                        units_done=done,
                        current_file=unit.path.name,
                        bytes_done=None if known is None else bytes_done,
                    )
                    session = await self._fresh_session(sessions, order)
                    objects = await self._import_unit(session, order, unit, ledger, check_existing)
                    imported.append((unit, objects))
                    if unit.item is not None:
                        await self._finish_item(session, unit.item, objects)
                    bytes_done += 0 if known is None else known[done]
                progress.advance(
                    units_done=len(units), bytes_done=None if known is None else bytes_done
                )
                progress.end_step()
            # The invariant before 'Import Completed': every unit brought at least one object.
            empty = [unit.path.name for unit, objects in imported if not objects]
            if empty:
                raise ImportFailed(
                    f"Nothing imported from {len(empty)} of {len(units)} files: "
                    + ", ".join(empty[:10])
                    + (", ..." if len(empty) > 10 else "")
                )
            with self._step("annotate"):
                await self._annotate(sessions, order, imported, ledger, notes, progress=progress)
        finally:
            await self._close_session(sessions.current)
        if temp_dir is not None:
            await asyncio.get_running_loop().run_in_executor(
                self.executor, partial(shutil.rmtree, temp_dir, ignore_errors=True)
            )

    async def _import_in_one_job(
        self,
        prepared: _Prepared,
        claimed: ClaimedOrder,
        ledger: ObjectLedger,
        notes: list[str],
        progress: ProgressReporter,
    ) -> None:
        """The OMERO work of a one-job order (see :meth:`_one_job_unit`): one executor job,
        the same steps, ledger and checks as :meth:`_import_order` takes call by call."""
        order, unit, source = prepared.order, prepared.unit, prepared.source
        assert unit is not None and source is not None and prepared.pairs is not None
        key = str(unit.path)
        job = _OneJob(
            self.gateway,
            order,
            unit,
            source,
            # a second run may find the file an earlier run already brought into OMERO
            check_existing=claimed.runs > 1 or bool(ledger.records),
            known=ledger.known(key),
            complete=ledger.complete(key),
            namespace=self.settings.annotation_namespace,
            # keys and values come from file names: made encodable
            pairs=[(safe_text(k), safe_text(v)) for k, v in prepared.pairs],
            annotated=ledger.annotated,
        )
        size = unit.size
        progress.start_step("import", 1, bytes_total=size)
        progress.advance(
            units_done=0, current_file=unit.path.name, bytes_done=None if size is None else 0
        )
        future = in_thread(self.executor, job.run)
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            session = job.cancel()
            if session is not None:
                session.abort()
                # abort() ends the running call soon; what it did goes into the ledger
                await asyncio.wait([future], timeout=ABORT_WAIT)
            raise
        finally:
            if future.done():
                if job.new:
                    ledger.add(key, job.objects)
                    ledger.mark_complete(key)
                for obj in job.annotated:
                    ledger.mark_annotated(obj)
        if self.observe_step is not None:
            self.observe_step("import", job.import_seconds)
        progress.advance(units_done=1, bytes_done=size)
        progress.end_step()
        if not job.objects:
            raise ImportFailed(f"Nothing imported from 1 of 1 files: {unit.path.name}")
        if self.observe_step is not None:
            self.observe_step("annotate", job.annotate_seconds)
        progress.start_step("annotate", 1)
        progress.advance(units_done=1)
        progress.end_step()
        notes.extend(prepared.notes)

    async def _import_unit(
        self,
        session: OmeroSession,
        order: Order,
        unit: ImportUnit,
        ledger: ObjectLedger,
        check_existing: bool,
    ) -> list[ImportedObject]:
        key = str(unit.path)
        known = ledger.known(key)
        register = self.settings.use_register_zarr and unit.path.suffix.lower() == ".zarr"
        if known and not register and ledger.complete(key):
            log.info("import_skipped_already_done", path=key, objects=len(known))
            return known
        # What is imported is what was checked, checked once more now: a file swapped for a
        # symlink while the order waited fails the order here.
        source = await self._storage(
            _PathWatch(str(unit.path)), partial(paths.recheck, unit.path, unit.checked, unit.area)
        )
        # Registration copies nothing and no symlink gets redirected: OMERO reads a store
        # where it was registered, so a converted store is registered from its copy on shared
        # storage, never from the temporary folder deleted after the import.
        client = source
        if register and unit.item is not None:
            final = unit.item.final_path
            client = await self._storage(
                _PathWatch(str(final)),
                partial(paths.recheck, final, final, unit.area, "Converter output"),
            )
        if check_existing:
            # Order-scoped: what *this order* created (its comment annotation), never what
            # any earlier import of the same file left (OMERO's --exclude=clientpath).
            found = await self._blocking(
                session,
                partial(session.find_imported, client, order.target, order_uuid=order.uuid),
            )
            seen = {(o.type, o.id) for o in known}
            known = [*known, *(o for o in found if (o.type, o.id) not in seen)]
            if found and not register:
                # Found is not done: the run that made them may have stopped half way (no -c:
                # the importer stops at the first failed fileset). The import below brings in
                # only the files none of their filesets holds.
                log.info("import_resumed_found_in_omero", path=key, objects=len(found))
                ledger.add(key, found)
        if register:
            # A registration may have stopped half way: what exists is passed on and only
            # the rest is registered; each new object is recorded as soon as it exists.
            ledger.add(key, known)
            call: Callable[[], list[ImportedObject]] = partial(
                session.register_zarr,
                client,
                order.target,
                order_uuid=order.uuid,
                options=order.registration,
                existing=known,
                on_created=self._recorder(order, key, ledger),
            )
        else:
            call = partial(
                session.import_path,
                source,
                order.target,
                order_uuid=order.uuid,
                exclude_existing=False,
                already=known,
            )
        objects = await self._blocking(session, call)
        log.info("imported", path=key, objects=[f"{o.type}:{o.id}" for o in objects])
        if not register:
            # what an earlier run left, and what this one added
            objects = [*known, *objects]
        ledger.add(key, objects)
        ledger.mark_complete(key)
        await ledger.save_if_due(self.sink, order.uuid, order.run)
        return objects

    def _recorder(
        self, order: Order, key: str, ledger: ObjectLedger
    ) -> Callable[[ImportedObject], None]:
        """``on_created`` for a registration: runs in the port's thread and returns once the
        object is in the database, before the next step starts."""
        loop = asyncio.get_running_loop()

        async def record(obj: ImportedObject) -> None:
            ledger.add(key, [obj])
            await ledger.save(self.sink, order.uuid, order.run)

        def on_created(obj: ImportedObject) -> None:
            try:
                asyncio.run_coroutine_threadsafe(record(obj), loop).result(timeout=RECORD_WAIT)
            except Exception as exc:
                # Registering on without a record would break the guarantee: stop here. A
                # re-run finds this object by the order's comment annotation.
                raise ImportFailed(
                    f"Could not record registered {obj.type} {obj.id}; retry the order",
                    f"{type(exc).__name__}: {exc}",
                ) from exc

        return on_created

    async def _finish_item(
        self, session: OmeroSession, item: ProcessedItem, objects: list[ImportedObject]
    ) -> None:
        """Rename to the converter's name and re-point ManagedRepository links to shared storage."""
        for obj in objects:
            if item.name and item.name != obj.name:
                await self._blocking(session, partial(session.rename, obj, item.name))
            managed = await self._blocking(session, partial(session.managed_files, obj))
            await asyncio.get_running_loop().run_in_executor(
                self.executor, partial(redirect_links, managed, item)
            )

    async def _annotate(
        self,
        sessions: _Sessions,
        order: Order,
        imported: list[tuple[ImportUnit, list[ImportedObject]]],
        ledger: ObjectLedger,
        notes: list[str],
        *,
        progress: ProgressReporter,
    ) -> None:
        now = datetime.now(timezone.utc)
        progress.start_step("annotate", len(imported))
        for done, (unit, objects) in enumerate(imported):
            progress.advance(units_done=done, current_file=unit.path.name)
            keyvalues = unit.item.keyvalues if unit.item is not None else None
            # reads metadata.csv beside the data: storage work
            pairs = await self._storage(
                _PathWatch(str(unit.annotation_path)),
                partial(
                    build_annotation_pairs,
                    order,
                    unit.annotation_path,
                    preprocessing_keyvalues=keyvalues,
                    processed_folder_name=self.settings.processed_folder_name,
                    imported_at=now,
                    import_roots=self.area,
                    notes=notes,
                ),
            )
            # keys and values come from file names and converter output: made encodable
            pairs = [(safe_text(key), safe_text(value)) for key, value in pairs]
            for obj in objects:
                if ledger.annotated(obj):
                    continue
                session = sessions.current
                # the port checks for an annotation in the namespace before creating one,
                # so an annotation made after the last save is not made twice
                await self._blocking(
                    session,
                    partial(session.annotate, obj, self.settings.annotation_namespace, pairs),
                )
                ledger.mark_annotated(obj)
                await ledger.save_if_due(self.sink, order.uuid, order.run)
        progress.advance(units_done=len(imported))
        progress.end_step()


def _close_late_session(future: asyncio.Future[OmeroSession]) -> None:
    """Close a session that finished opening after its order was cancelled."""
    if future.cancelled() or future.exception() is not None:
        return
    session = future.result()
    # never on the event loop: closing a real session talks to the server
    threading.Thread(target=session.close, name="omero-close-late", daemon=True).start()
    log.info("omero_session_closed_after_cancel")


def redirect_links(managed: list[Path], item: ProcessedItem) -> None:
    """Point ManagedRepository symlinks from the temporary copy to the copy on shared storage."""
    for link in managed:
        if not link.is_symlink():
            continue
        target = Path(os.readlink(link))
        if target == item.import_path:
            new_target = item.final_path
        elif target.is_relative_to(item.import_path):
            new_target = item.final_path / target.relative_to(item.import_path)
        else:
            continue
        if not new_target.exists():
            raise PreprocessingError(
                f"Processed file missing on shared storage: {short(str(new_target))}"
            )
        staging = link.with_name(f".{link.name}.redirect")
        staging.unlink(missing_ok=True)
        staging.symlink_to(new_target)
        staging.replace(link)
        log.debug("symlink_redirected", link=str(link), target=str(new_target))


class _StepTimer:
    def __init__(self, name: Step, observe: Callable[[Step, float], None] | None) -> None:
        self.name = name
        self.observe = observe
        self.start = 0.0

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        if self.observe is not None:
            self.observe(self.name, time.perf_counter() - self.start)
