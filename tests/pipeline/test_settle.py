"""Settle that cannot be fooled, and storage that fails: a real FUSE file server (tests/slowfs)
that answers with chosen errors or runs its clock behind, around the real dispatcher,
pipeline and simulator with the in-memory store (issue 20, item 3)."""

from __future__ import annotations

import asyncio
import errno
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from biomero_importer import paths
from biomero_importer.model import STAGE_IMPORTED, STAGE_INGEST_FAILED, STAGE_NEW_ORDER
from biomero_importer.pipeline.settle import look
from biomero_importer.pipeline.storage import failure
from biomero_importer.settings import Settings
from biomero_importer.store import MemoryStore
from tests import slowfs
from tests.support import make_tiffs
from tests.unit.conftest import finished, memory_replica, order, unit_settings

INTERNAL = "Internal error in the importer; see its logs"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    return folder


def acquisition(backing: Path) -> Path:
    """backing/acq with a file and a subfolder holding one: the order's folder."""
    make_tiffs(backing / "acq", 1)
    make_tiffs(backing / "acq" / "sub", 1, prefix="deep")
    return backing / "acq"


@pytest.fixture
def backing(tmp_path: Path) -> Path:
    return tmp_path / "backing"


def new_store(settings: Settings) -> MemoryStore:
    return MemoryStore(worker_id=settings.worker_id, lease_seconds=settings.lease_seconds)


async def history(store: MemoryStore, uuid: str) -> list[tuple[str, str | None, datetime]]:
    return [
        (e.stage, e.description, e.timestamp or datetime.min.replace(tzinfo=timezone.utc))
        for e in await store.order_events(uuid)
    ]


# Where the error meets the order: validation's walk of the folder (the first listing), or
# the settle look (the listing after validation's).
PHASES = {"validation": 0, "settle": 1}


# ENOENT from a listing cannot reach a caller (glibc's readdir reads it as the folder's end):
# ENOENT is a lookup's answer, tested below.
@pytest.mark.parametrize("code", ["EACCES", "ENOTDIR"])
@pytest.mark.parametrize("phase", list(PHASES))
async def test_a_folder_storage_refuses_fails_the_order_naming_it(
    tmp_path: Path, root: Path, backing: Path, code: str, phase: str
) -> None:
    """Before: validation's os.walk skipped a folder it could not list (the order went on
    without it), and the settle walk's PermissionError ended the order 'Internal error'."""
    acquisition(backing)
    settings = unit_settings(
        tmp_path, root, settle_seconds=0.2 if phase == "settle" else 0.0, poll_interval=60.0
    )
    store = new_store(settings)
    with slowfs.mounted(
        backing, root / "share", faults=(f"sub:readdir:{code}:{PHASES[phase]}",)
    ) as share:
        placed = order([share / "acq"])
        async with memory_replica(settings, store):
            await store.submit(placed)
            stage, description = await finished(store, placed.uuid)
            rows = await history(store, placed.uuid)
    reason = os.strerror(getattr(errno, code))
    assert (stage, description) == (
        STAGE_INGEST_FAILED,
        f"Cannot read ({reason}): {share / 'acq' / 'sub'}",
    )
    # a permanent failure: no automatic retry
    assert not [d for s, d, _ in rows if s == STAGE_NEW_ORDER and d and "retrying" in d]


async def test_a_file_storage_says_is_not_there_fails_the_order_naming_it(
    tmp_path: Path, root: Path, backing: Path
) -> None:
    acquisition(backing)
    settings = unit_settings(tmp_path, root, settle_seconds=0.2, poll_interval=60.0)
    store = new_store(settings)
    with slowfs.mounted(backing, root / "share", faults=("image0.tif:getattr:ENOENT",)) as share:
        placed = order([share / "acq" / "image0.tif"])
        async with memory_replica(settings, store):
            await store.submit(placed)
            stage, description = await finished(store, placed.uuid)
    missing = share / "acq" / "image0.tif"
    assert (stage, description) == (STAGE_INGEST_FAILED, f"File not found: {missing}")


def test_a_look_at_a_path_storage_says_is_gone_ends_the_order_naming_it(
    root: Path, backing: Path
) -> None:
    """The order's own path gone when the settle look reads it (after validation): a
    permanent failure naming it; an entry inside a folder that vanishes between the listing
    and its stat (rsync renaming its temporary file) is a change the folder's times show."""
    acquisition(backing)
    with slowfs.mounted(backing, root / "share", faults=("image0.tif:getattr:ENOENT",)) as share:
        gone = share / "acq" / "image0.tif"
        area = paths.import_area([root])
        with pytest.raises(FileNotFoundError) as info:
            look([gone], area, lambda _: None, 100)
        # a listed entry whose lookup says ENOENT is skipped: the rest is seen
        seen = look([share / "acq"], area, lambda _: None, 100)
    assert failure(info.value, "?").reason == f"Cannot read (No such file or directory): {gone}"
    assert seen.entries == 3  # acq, acq/sub, acq/sub/deep0.tif


@pytest.mark.parametrize("code", ["ESTALE", "EIO", "ETIMEDOUT"])
@pytest.mark.parametrize("phase", list(PHASES))
async def test_a_storage_error_that_passes_waits_and_the_retry_completes(
    tmp_path: Path, root: Path, backing: Path, code: str, phase: str
) -> None:
    """Before: the error ended the order 'Internal error' (settle) or as a permanent
    'cannot be resolved' (validation), never retried."""
    acquisition(backing)
    settings = unit_settings(
        tmp_path,
        root,
        settle_seconds=0.2 if phase == "settle" else 0.0,
        transient_backoff=0.05,
        transient_retries=3,
        poll_interval=60.0,
    )
    store = new_store(settings)
    # the file server answers with the error once, then recovers
    fault = f"sub:readdir:{code}:{PHASES[phase]}:1"
    with slowfs.mounted(backing, root / "share", faults=(fault,)) as share:
        placed = order([share / "acq"])
        async with memory_replica(settings, store) as (service, _):
            await store.submit(placed)
            stage, description = await finished(store, placed.uuid)
            rows = await history(store, placed.uuid)
            waits = service.metrics.order_waits.labels(reason="storage")._value.get()
    assert (stage, description) == (STAGE_IMPORTED, None)
    retries = [d for s, d, _ in rows if s == STAGE_NEW_ORDER and d and "retrying" in d]
    assert len(retries) == 1 and retries[0].startswith("Storage not answering; retrying in")
    assert waits == 1


async def test_a_storage_error_that_never_passes_fails_with_the_path_and_reason(
    tmp_path: Path, root: Path, backing: Path
) -> None:
    acquisition(backing)
    settings = unit_settings(
        tmp_path, root, transient_backoff=0.05, transient_retries=2, poll_interval=60.0
    )
    store = new_store(settings)
    with slowfs.mounted(backing, root / "share", faults=("sub:readdir:ESTALE",)) as share:
        placed = order([share / "acq"])
        async with memory_replica(settings, store):
            await store.submit(placed)
            stage, description = await finished(store, placed.uuid)
    assert stage == STAGE_INGEST_FAILED and description != INTERNAL
    assert description == (
        f"Storage error (Stale file handle): {share / 'acq' / 'sub'}"
        " (gave up after 2 automatic retries)"
    )


async def test_a_file_server_whose_clock_is_behind_still_waits_until_writes_stop(
    tmp_path: Path, root: Path, backing: Path
) -> None:
    """The file server's clock runs 10 minutes behind ours (every time stamp it reports,
    st_ctime included, and the writer sets mtime into the past too) while the file grows.
    Before: the file looked 10 minutes quiet, and the order imported half-written data."""
    settle = 0.4
    backing.mkdir()
    growing = backing / "growing.tif"
    growing.write_bytes(b"II*\x00")
    settings = unit_settings(tmp_path, root, settle_seconds=settle, poll_interval=60.0)
    store = new_store(settings)
    stopped: datetime | None = None

    async def write_for(seconds: float) -> None:
        nonlocal stopped
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            with growing.open("ab") as out:
                out.write(b"\x00" * 4096)
            past = time.time() - 600
            os.utime(growing, (past, past))
            await asyncio.sleep(0.05)
        stopped = datetime.now(timezone.utc)

    with slowfs.mounted(backing, root / "share", skew=-600.0, fresh=True) as share:
        assert time.time() - (share / "growing.tif").stat().st_ctime > 590
        placed = order([share / "growing.tif"])
        async with memory_replica(settings, store):
            writer = asyncio.create_task(write_for(2.0))
            await store.submit(placed)
            stage, description = await finished(store, placed.uuid, timeout=20)
            await writer
            rows = await history(store, placed.uuid)
    assert (stage, description) == (STAGE_IMPORTED, None)
    assert stopped is not None
    (completed,) = [at for s, _, at in rows if s == STAGE_IMPORTED]
    # two equal looks settle seconds apart, the first after the last write
    assert (completed - stopped).total_seconds() >= settle
    changed = [d for s, d, _ in rows if s == STAGE_NEW_ORDER and d and "changed in the last" in d]
    assert changed, rows


async def test_a_symlinked_folder_the_import_follows_is_watched_too(
    tmp_path: Path, root: Path
) -> None:
    """Before: the settle walk did not follow a symlinked folder, which the import does."""
    settle = 0.4
    make_tiffs(root / "acq", 1)
    (elsewhere,) = make_tiffs(root / "elsewhere", 1, prefix="linked")
    (root / "acq" / "more").symlink_to(root / "elsewhere", target_is_directory=True)
    settings = unit_settings(tmp_path, root, settle_seconds=settle, poll_interval=60.0)
    store = new_store(settings)
    stopped: datetime | None = None

    async def write_for(seconds: float) -> None:
        nonlocal stopped
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            with elsewhere.open("ab") as out:
                out.write(b"\x00" * 4096)
            await asyncio.sleep(0.05)
        stopped = datetime.now(timezone.utc)

    placed = order([root / "acq"])
    async with memory_replica(settings, store):
        writer = asyncio.create_task(write_for(1.5))
        await store.submit(placed)
        stage, _ = await finished(store, placed.uuid, timeout=20)
        await writer
        rows = await history(store, placed.uuid)
    assert stage == STAGE_IMPORTED and stopped is not None
    (completed,) = [at for s, _, at in rows if s == STAGE_IMPORTED]
    assert (completed - stopped).total_seconds() >= settle


async def test_an_order_with_more_entries_than_a_look_reads_fails_saying_so(
    tmp_path: Path, root: Path
) -> None:
    make_tiffs(root / "big", 5)
    settings = unit_settings(tmp_path, root, settle_seconds=0.2, settle_max_entries=3)
    store = new_store(settings)
    placed = order([root / "big"])
    async with memory_replica(settings, store):
        await store.submit(placed)
        stage, description = await finished(store, placed.uuid)
    assert stage == STAGE_INGEST_FAILED
    assert description is not None and description.startswith(
        "Too many files to check for changes (more than 3; settle_max_entries): "
    )
