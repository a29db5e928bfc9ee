"""One minimal, deterministic reproduction per defect the hostile-input fuzz suite found.

Each test drives a real in-process replica on PostgreSQL: the hostile order, then a plain
order that must still complete (the replica keeps claiming), then a shutdown that must end
within ``shutdown_timeout`` + 10 s. Tests marked xfail fail on the code they were written
against; the fix removes the mark (strict: a fixed defect turns the xfail into a failure).
A race the suite found is reproduced where its timing can be held still: an ending that
waited for a client's write to its order is
tests/store/test_store.py::test_an_ending_that_waited_for_a_clients_write_is_still_recorded.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from biomero_importer.service import Service, open_service
from biomero_importer.settings import Settings
from tests.support import TERMINAL, history, insert_order, make_settings, wait_for_stage

SHUTDOWN_TIMEOUT = 3.0
SHUTDOWN_BOUND = SHUTDOWN_TIMEOUT + 10.0
BAD_ORDER_BOUND = 6.0  # validation failures end in milliseconds


@asynccontextmanager
async def replica(settings: Settings, url: str) -> AsyncIterator[Service]:
    """Like tests.support.running_service, but the whole shutdown (dispatcher and store)
    must end within SHUTDOWN_BOUND; a hung one is cancelled and fails the test."""
    stopped = asyncio.Event()
    box: dict[str, Service] = {}

    async def serve() -> None:
        async with open_service(settings, url) as service:
            box["service"] = service
            run = asyncio.create_task(service.dispatcher.run(), name="dispatcher")
            stopped.set()
            await run

    main = asyncio.create_task(serve())
    waiter = asyncio.create_task(stopped.wait())
    await asyncio.wait([main, waiter], return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if main.done():
        main.result()  # the replica failed to start: raise why
    service = box["service"]
    try:
        yield service
    finally:
        try:
            service.dispatcher.request_stop()
            started = time.monotonic()
            done, _ = await asyncio.wait([main], timeout=SHUTDOWN_BOUND)
            if not done:
                # each cancel ends one await; a shutdown that awaits again needs another
                for _ in range(60):
                    main.cancel()
                    done, _ = await asyncio.wait([main], timeout=0.5)
                    if done:
                        break
                pytest.fail(f"the replica did not shut down within {SHUTDOWN_BOUND}s")
            assert time.monotonic() - started <= SHUTDOWN_BOUND
        finally:
            # unretrieved exceptions of the defects are logged from __del__: let that happen
            # now, not inside pytest's ast.parse while it formats a report (CPython 3.11
            # then raises "AST constructor recursion depth mismatch", python/cpython#106905)
            gc.collect()


def _settings(tmp_path: Path, url: str, root: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "shutdown_timeout": SHUTDOWN_TIMEOUT,
        "poll_interval": 1.0,
        "max_attempts": 1,
        **overrides,
    }
    return make_settings(tmp_path, url, [root], **values)


def _plain_file(root: Path) -> Path:
    path = root / "plain.tif"
    path.write_bytes(b"plain\n")
    return path


async def _assert_still_claiming(url: str, root: Path) -> None:
    plain = await insert_order(url, [_plain_file(root)])
    row = await wait_for_stage(url, plain, timeout=10)
    assert row["stage"] == "Import Completed", row["description"]


def _readable(text: str | None) -> bool:
    """Text a user can read: encodable as UTF-8 and without NUL."""
    if not text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


# --- 1. surrogate-escaped (non-UTF-8) names in a failure description ----------------------


def _folder_with_non_utf8_symlink(root: Path, outside: Path) -> list[str]:
    """The issue's case: a folder order whose folder holds a symlink with a Latin-1 name
    pointing outside the import roots (validation must fail it, naming the link)."""
    folder = root / "plate"
    folder.mkdir()
    (folder / "a.tif").write_bytes(b"a\n")
    (outside / "secret.tif").write_bytes(b"secret\n")
    link = os.path.join(os.fsencode(folder), b"caf\xe9.tif")
    os.symlink(os.fsencode(outside / "secret.tif"), link)
    return [str(folder)]


def _missing_non_utf8_file(root: Path, outside: Path) -> list[str]:
    """A path with a Latin-1 name, written in JSON by surrogate escape ("\\udcff")."""
    return [os.fsdecode(os.path.join(os.fsencode(root), b"gone-\xff.tif"))]


@pytest.mark.parametrize(
    "make_files",
    [_folder_with_non_utf8_symlink, _missing_non_utf8_file],
    ids=["folder-symlink-out", "missing-file"],
)
async def test_non_utf8_name_in_description_fails_only_its_order(
    migrated_url: str, tmp_path: Path, make_files: object
) -> None:
    root, outside = tmp_path / "data", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    files = make_files(root, outside)  # type: ignore[operator]
    async with replica(_settings(tmp_path, migrated_url, root), migrated_url):
        bad = await insert_order(migrated_url, files)
        row = await wait_for_stage(migrated_url, bad, timeout=BAD_ORDER_BOUND)
        assert row["stage"] == "Import Failed"
        assert _readable(row["description"]), row["description"]
        await _assert_still_claiming(migrated_url, root)


@pytest.mark.podman
async def test_converter_failure_naming_a_non_utf8_file_fails_only_its_order(
    podman_image: str, migrated_url: str, tmp_path: Path
) -> None:
    root = tmp_path / "data"
    root.mkdir()
    path = os.path.join(os.fsencode(root), b"caf\xe9.tif")
    with open(path, "wb") as handle:
        handle.write(b"raw pixels\n")
    settings = _settings(
        tmp_path, migrated_url, root, allowed_containers=[podman_image], preprocessing_timeout=60
    )
    async with replica(settings, migrated_url):
        bad = await insert_order(
            migrated_url,
            [os.fsdecode(path)],
            preprocessing={"container": podman_image, "extra_params": {"mode": "exit1"}},
        )
        row = await wait_for_stage(migrated_url, bad, timeout=20)
        assert row["stage"] == "Import Failed"
        assert _readable(row["description"]), row["description"]
        await _assert_still_claiming(migrated_url, root)


@pytest.mark.podman
async def test_converter_key_values_with_a_surrogate_do_not_crash_the_order(
    podman_image: str, migrated_url: str, tmp_path: Path
) -> None:
    root = tmp_path / "data"
    root.mkdir()
    settings = _settings(
        tmp_path, migrated_url, root, allowed_containers=[podman_image], preprocessing_timeout=60
    )
    async with replica(settings, migrated_url):
        order = await insert_order(
            migrated_url,
            [_plain_file(root)],
            preprocessing={
                "container": podman_image,
                "extra_params": {"mode": "ok", "x": "\udcff"},
            },
        )
        row = await wait_for_stage(migrated_url, order, timeout=20)
        assert _readable(row["description"]) or row["description"] is None, row["description"]
        assert "Internal error" not in (row["description"] or ""), row["description"]
        await _assert_still_claiming(migrated_url, root)


# --- 2. deeply nested JSON in extra_params ---------------------------------------------------


async def test_deeply_nested_extra_params_fail_only_their_order(
    migrated_url: str, tmp_path: Path
) -> None:
    root = tmp_path / "data"
    root.mkdir()
    good = root / "a.tif"
    good.write_bytes(b"a\n")
    depth = 5000  # PostgreSQL's json type accepts it; Python's json module recurses per level
    bad = await insert_order(
        migrated_url, [good], preprocessing={"container": "localhost/x:1", "extra_params": {}}
    )
    # before any replica runs: the json column as an SQL client can fill it
    conn = await asyncpg.connect(migrated_url)
    try:
        await conn.execute(
            "UPDATE imports_preprocessing SET extra_params = $1::json"
            " WHERE id = (SELECT preprocessing_id FROM imports WHERE uuid = $2 LIMIT 1)",
            "[" * depth + "]" * depth,
            bad,
        )
    finally:
        await conn.close()
    async with replica(_settings(tmp_path, migrated_url, root), migrated_url):
        row = await wait_for_stage(migrated_url, bad, timeout=BAD_ORDER_BOUND)
        assert row["stage"] == "Import Failed"
        assert _readable(row["description"]), row["description"]
        await _assert_still_claiming(migrated_url, root)


# --- 3. input that makes validation itself raise -------------------------------------------


async def test_deeply_nested_files_json_is_invalid_json(migrated_url: str, tmp_path: Path) -> None:
    await _fails_with(migrated_url, tmp_path, "[" * 100_000 + "]" * 100_000, "Files")


async def test_path_with_a_lone_high_surrogate_fails_with_a_reason(
    migrated_url: str, tmp_path: Path
) -> None:
    root = tmp_path / "data"
    files = json.dumps([f"{root}/\ud800.tif"])
    await _fails_with(migrated_url, tmp_path, files, "Path")


async def test_destination_id_beyond_64_bits_fails_with_a_reason(
    migrated_url: str, tmp_path: Path
) -> None:
    root = tmp_path / "data"
    await _fails_with(
        migrated_url, tmp_path, json.dumps([str(root / "plain.tif")]), "DestinationID", "9" * 40
    )


async def _fails_with(
    url: str, tmp_path: Path, files: str, named: str, destination_id: str = "151"
) -> None:
    root = tmp_path / "data"
    root.mkdir(exist_ok=True)
    _plain_file(root)
    async with replica(_settings(tmp_path, url, root), url):
        bad = await insert_order(url, files, destination_id=destination_id)
        row = await wait_for_stage(url, bad, timeout=BAD_ORDER_BOUND)
        assert row["stage"] == "Import Failed"
        assert _readable(row["description"]), row["description"]
        assert named in row["description"], row["description"]
        await _assert_still_claiming(url, root)


# --- 4. a valid order with non-UTF-8 file names ----------------------------------------------


@pytest.mark.parametrize("kind", ["file", "folder"])
async def test_valid_non_utf8_names_are_imported(
    migrated_url: str, tmp_path: Path, kind: str
) -> None:
    root = tmp_path / "data"
    root.mkdir()
    if kind == "file":
        path = os.path.join(os.fsencode(root), b"caf\xe9.tif")
        with open(path, "wb") as handle:
            handle.write(b"x\n")
    else:
        path = os.path.join(os.fsencode(root), b"plate-\xe9")
        os.mkdir(path)
        with open(os.path.join(path, b"\xff.tif"), "wb") as handle:
            handle.write(b"x\n")
    async with replica(_settings(tmp_path, migrated_url, root), migrated_url):
        order = await insert_order(migrated_url, [os.fsdecode(path)])
        row = await wait_for_stage(migrated_url, order, timeout=BAD_ORDER_BOUND)
        assert row["stage"] == "Import Completed", row["description"]
        await _assert_still_claiming(migrated_url, root)


# --- 5. the documented SQL retry on a running order ------------------------------------------


async def test_sql_retry_of_a_running_order_is_not_silently_dropped(
    migrated_url: str, tmp_path: Path
) -> None:
    root = tmp_path / "data"
    root.mkdir()
    settings = _settings(tmp_path, migrated_url, root, omero_simulator_import_delay=2.0)
    async with replica(settings, migrated_url):
        order = await insert_order(migrated_url, [_plain_file(root)])
        started = await wait_for_stage(migrated_url, order, ("Import Started",), timeout=10)
        conn = await asyncpg.connect(migrated_url)
        try:
            await conn.execute(
                "UPDATE imports SET stage = 'Import Pending' WHERE id = $1", started["id"]
            )
        finally:
            await conn.close()
        await wait_for_stage(migrated_url, order, timeout=15)
        # a re-run needs a fresh claim: give it a moment, then look at what happened
        await asyncio.sleep(1.0)
        await wait_for_stage(migrated_url, order, timeout=15)
        later = [r for r in await history(migrated_url, order) if r["id"] > started["id"]]
        ran_again = any(r["stage"] == "Import Started" for r in later)
        refused = any("retry" in (r["description"] or "").lower() for r in later)
        assert ran_again or refused, [(r["id"], r["stage"], r["description"]) for r in later]


# --- 6. cancelling a running import ----------------------------------------------------------


async def test_cancelling_a_running_import_logs_no_error(
    migrated_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "data"
    root.mkdir()
    settings = _settings(tmp_path, migrated_url, root, omero_simulator_import_delay=2.0)
    async with replica(settings, migrated_url):
        order = await insert_order(migrated_url, [_plain_file(root)])
        await wait_for_stage(migrated_url, order, ("Import Started",), timeout=10)
        await asyncio.sleep(0.5)  # inside the simulated import
        conn = await asyncpg.connect(migrated_url)
        try:
            await conn.execute(
                "UPDATE importer_orders SET cancel_requested = true WHERE uuid = $1", order
            )
        finally:
            await conn.close()
        row = await wait_for_stage(migrated_url, order, timeout=10)
        assert (row["stage"], row["description"]) == ("Import Failed", "Cancelled")
        await asyncio.sleep(2.0)  # the import thread notices the abort
        gc.collect()  # asyncio reports unretrieved exceptions when the future is collected
        await _assert_still_claiming(migrated_url, root)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []


# --- 7. a cancel that arrives between the claim and the order's first step ------------------


async def test_cancel_right_after_the_claim_ends_the_order(
    migrated_url: str, tmp_path: Path
) -> None:
    """The fuzz suite met this with real timing (a cancel UPDATE right after the insert; the
    listener delivered it while the claim loop was still starting tasks). Here the cancel
    notification is delivered at exactly that point, through the listener's own callback."""
    root = tmp_path / "data"
    root.mkdir()
    async with replica(_settings(tmp_path, migrated_url, root), migrated_url) as service:
        dispatcher = service.dispatcher
        start = dispatcher._start
        victims: list[str] = []

        def start_then_cancel(order: Any) -> None:
            start(order)
            if not victims:  # only the first order: the plain one afterwards runs normally
                victims.append(order.uuid)
                dispatcher.notify_cancel(order.uuid)

        dispatcher._start = start_then_cancel  # type: ignore[method-assign]
        order = await insert_order(migrated_url, [_plain_file(root)])
        await wait_for_stage(migrated_url, order, ("Import Started", *TERMINAL), timeout=10)
        conn = await asyncpg.connect(migrated_url)
        try:  # what the cancel notification stood for
            await conn.execute(
                "UPDATE importer_orders SET cancel_requested = true WHERE uuid = $1", order
            )
        finally:
            await conn.close()
        row = await wait_for_stage(migrated_url, order, timeout=10)
        assert (row["stage"], row["description"]) == ("Import Failed", "Cancelled")
        await _assert_still_claiming(migrated_url, root)
        assert dispatcher.running_count == 0
