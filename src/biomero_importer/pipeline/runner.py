"""One order, start to finish: validate, preprocess, import, annotate.

The pipeline never touches omero-py itself: it talks to the OMERO port, and every port call
(blocking by nature) goes through the replica's bounded thread executor.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar

import structlog

from biomero_importer import paths
from biomero_importer.model import (
    STAGE_IMPORTED,
    STAGE_INGEST_FAILED,
    STAGE_PREPROCESSING,
    ClaimedOrder,
    Order,
    Outcome,
)
from biomero_importer.observability.metrics import Step
from biomero_importer.omero.metadata import build_annotation_pairs
from biomero_importer.omero.port import ImportedObject, OmeroError, OmeroGateway, OmeroSession
from biomero_importer.pipeline.validate import InvalidOrder, validate
from biomero_importer.preprocessing import (
    PreprocessingError,
    ProcessedItem,
    run_preprocessing,
    validate_preprocessing,
)
from biomero_importer.settings import Settings
from biomero_importer.text import short

log = structlog.get_logger(__name__)

T = TypeVar("T")

# Seconds a cancelled order waits for its aborted OMERO call to return (shutdown is bounded).
ABORT_WAIT = 3.0


def _in_thread(executor: Executor, call: Callable[[], T]) -> asyncio.Future[T]:
    """``call`` in one of the executor's threads, with this task's context: the order's log
    fields (order_uuid, stage, worker_id) stay on what it logs."""
    context = contextvars.copy_context()
    return asyncio.get_running_loop().run_in_executor(executor, context.run, call)


class _PathWatch:
    """The path a storage thread is working on, to name it if storage stops answering."""

    def __init__(self, fallback: str) -> None:
        self.current = fallback

    def __call__(self, path: str) -> None:
        self.current = path


class StageSink(Protocol):
    """What the pipeline needs from the database while an order runs."""

    async def append_stage(self, uuid: str, stage: str, description: str | None = None) -> bool: ...

    async def record_objects(self, uuid: str, objects: list[dict[str, Any]]) -> None: ...


@dataclass(frozen=True)
class ImportUnit:
    """One thing to import: an order file, or one item a preprocessing container produced.

    ``checked`` is ``path`` as validated (symlinks resolved) and ``area`` where it must
    still lie when it is imported.
    """

    path: Path
    annotation_path: Path
    checked: Path | None
    area: paths.Area
    item: ProcessedItem | None = None


class ObjectLedger:
    """The OMERO objects an order created, kept in the database between runs.

    Saved at most once per ``flush_interval`` while an order runs (and always at its end): an
    object created after the last save is still found by ``find_imported`` on a second run,
    so saving after every file of a 10,000-file order would buy nothing but write load.
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
            record = {
                "type": obj.type,
                "id": obj.id,
                "name": obj.name,
                "client_path": obj.client_path,
                "fileset_id": obj.fileset_id,
                "key": key,
                "annotated": False,
            }
            self.records.append(record)
            self._index(record)
        self._dirty = True

    def annotated(self, obj: ImportedObject) -> bool:
        record = self._by_object.get((obj.type, obj.id))
        return bool(record and record.get("annotated"))

    def mark_annotated(self, obj: ImportedObject) -> None:
        record = self._by_object.get((obj.type, obj.id))
        if record is not None:
            record["annotated"] = True

    async def save_if_due(self, sink: StageSink, uuid: str) -> None:
        if self._dirty and time.monotonic() - self._saved_at >= self.flush_interval:
            await sink.record_objects(uuid, self.records)
            self._dirty = False
            self._saved_at = time.monotonic()


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
    ) -> None:
        self.settings = settings
        self.gateway = gateway
        self.executor = executor
        self.storage = storage or executor
        self.sink = sink
        self.observe_step = observe_step

    async def run(self, claimed: ClaimedOrder) -> Outcome:
        """Run one claimed order; always returns the terminal outcome (cancellation propagates)."""
        file_names: list[str] | None = None
        ledger = ObjectLedger(claimed.recorded_objects)
        # What a completed order skipped on purpose (a metadata.csv linking elsewhere).
        notes: list[str] = []
        try:
            with self._step("validate"):
                watch = _PathWatch(claimed.files)
                order = await self._storage(
                    watch, partial(validate, claimed, self.settings.effective_import_roots, watch)
                )
                file_names = order.file_names
                if order.preprocessing is not None:
                    validate_preprocessing(order, self.settings)
            await self._import_order(order, claimed, ledger, notes)
        except (InvalidOrder, PreprocessingError, OmeroError, paths.PathRefused) as exc:
            detail = getattr(exc, "detail", "")
            log.warning("order_failed", reason=exc.reason, detail=detail or None)
            return Outcome(STAGE_INGEST_FAILED, exc.reason, file_names, ledger.records)
        description = "; ".join(dict.fromkeys(notes)) or None
        return Outcome(STAGE_IMPORTED, description, file_names, ledger.records)

    async def _storage(self, watch: _PathWatch, call: Callable[[], T]) -> T:
        """Filesystem work on shared storage, in a storage thread with ``storage_timeout``: a
        hung NFS/SMB mount fails this order instead of stopping the event loop (and with it
        lease renewal for every other order)."""
        future = _in_thread(self.storage, call)
        timeout = self.settings.storage_timeout
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout=timeout)
        except asyncio.TimeoutError:
            # the thread stays blocked in the kernel; only this order gives up on it
            raise InvalidOrder(
                f"Storage did not answer within {timeout:g} s: {short(watch.current)}"
            ) from None

    def _step(self, name: Step) -> _StepTimer:
        return _StepTimer(name, self.observe_step)

    async def _blocking(self, session: OmeroSession | None, call: Callable[[], T]) -> T:
        """Run a port call in the executor; on cancel, abort it and wait for the thread."""
        future = _in_thread(self.executor, call)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            if session is not None:
                session.abort()
            # The thread cannot be interrupted; abort() kills its process, so it ends soon.
            await asyncio.wait([future], timeout=ABORT_WAIT)
            raise

    async def _import_order(
        self, order: Order, claimed: ClaimedOrder, ledger: ObjectLedger, notes: list[str]
    ) -> None:
        items: list[ProcessedItem] = []
        temp_dir: Path | None = None
        if order.preprocessing is not None:
            await self.sink.append_stage(order.uuid, STAGE_PREPROCESSING)
            structlog.contextvars.bind_contextvars(stage=STAGE_PREPROCESSING)
            with self._step("preprocess"):
                result = await run_preprocessing(order, self.settings, log=log)
            items, temp_dir = result.items, result.temp_dir
            units = [
                ImportUnit(i.import_path, i.final_path, i.import_path, i.area, i) for i in items
            ]
        else:
            roots = paths.import_area(self.settings.effective_import_roots)
            units = [ImportUnit(p, p, order.checked.get(p), roots) for p in order.files]

        session = await self._blocking(
            None, partial(self.gateway.open_session, order.user, order.group, order_uuid=order.uuid)
        )
        try:
            # A second run may find files an earlier run already brought into OMERO.
            check_existing = claimed.runs > 1 or bool(ledger.records)
            imported: list[tuple[ImportUnit, list[ImportedObject]]] = []
            with self._step("import"):
                for unit in units:
                    objects = await self._import_unit(session, order, unit, ledger, check_existing)
                    imported.append((unit, objects))
                    if unit.item is not None:
                        await self._finish_item(session, unit.item, objects)
            with self._step("annotate"):
                await self._annotate(session, order, imported, ledger, notes)
        finally:
            await self._blocking(None, session.close)
        if temp_dir is not None:
            await asyncio.get_running_loop().run_in_executor(
                self.executor, partial(shutil.rmtree, temp_dir, ignore_errors=True)
            )

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
        if known:
            log.info("import_skipped_already_done", path=key, objects=len(known))
            return known
        register = self.settings.use_register_zarr and unit.path.suffix.lower() == ".zarr"
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
            found = await self._blocking(
                session,
                partial(session.find_imported, client, order.target, order_uuid=order.uuid),
            )
            if found:
                log.info("import_skipped_found_in_omero", path=key, objects=len(found))
                ledger.add(key, found)
                return found
        if register:
            call = partial(
                session.register_zarr,
                client,
                order.target,
                order_uuid=order.uuid,
                options=order.registration,
            )
        else:
            call = partial(
                session.import_path,
                source,
                order.target,
                order_uuid=order.uuid,
                exclude_existing=check_existing,
            )
        objects = await self._blocking(session, call)
        log.info("imported", path=key, objects=[f"{o.type}:{o.id}" for o in objects])
        ledger.add(key, objects)
        await ledger.save_if_due(self.sink, order.uuid)
        return objects

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
        session: OmeroSession,
        order: Order,
        imported: list[tuple[ImportUnit, list[ImportedObject]]],
        ledger: ObjectLedger,
        notes: list[str],
    ) -> None:
        now = datetime.now(timezone.utc)
        roots = paths.import_area(self.settings.effective_import_roots)
        for unit, objects in imported:
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
                    import_roots=roots,
                    notes=notes,
                ),
            )
            for obj in objects:
                if ledger.annotated(obj):
                    continue
                await self._blocking(
                    session,
                    partial(session.annotate, obj, self.settings.annotation_namespace, pairs),
                )
                ledger.mark_annotated(obj)
            await ledger.save_if_due(self.sink, order.uuid)


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
