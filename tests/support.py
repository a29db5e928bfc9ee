"""Shared helpers: settings for a test service, writing orders, waiting for stages."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid as uuidlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import tifffile
import yaml
from pydantic import SecretStr
from typer.testing import CliRunner, Result

from biomero_importer.cli.app import app
from biomero_importer.observability.logging import reset_logging
from biomero_importer.service import Service, open_service
from biomero_importer.settings import Settings

TERMINAL = ("Import Completed", "Import Failed")
PICKED_UP = ("Import Started", "Import Preprocessing", *TERMINAL)


def make_settings(tmp_path: Path, url: str, roots: Sequence[Path], **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "ingest_tracking_db": url,
        "omero_backend": "simulator",
        "omero_simulator_dir": tmp_path / "omero-sim",
        "embedded_db_dir": tmp_path / "embedded",
        "import_roots": list(roots),
        "order_log_dir": tmp_path / "logs",
        "log_file_path": None,
        "poll_interval": 2.0,
        "lease_seconds": 5.0,
        "max_workers": 4,
        "shutdown_timeout": 5.0,
        "omero_inplace_dir": tmp_path / "inplace",
        "allowed_containers": ["localhost/*"],
    }
    values.update(overrides)
    return Settings(**values)


def write_config(path: Path, settings: Settings, **extra: Any) -> Path:
    """A YAML file a subprocess replica can load (worker ids stay unique per process)."""
    data = json.loads(settings.model_dump_json(exclude={"worker_id"}))
    for key in Settings.model_fields:  # secrets dump masked: write their values
        value = getattr(settings, key)
        if isinstance(value, SecretStr):
            data[key] = value.get_secret_value()
    data.update(extra)
    path.write_text(yaml.safe_dump(data))
    return path


def make_tiffs(folder: Path, count: int, prefix: str = "image") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n in range(count):
        path = folder / f"{prefix}{n}.tif"
        tifffile.imwrite(path, np.full((8, 8), n, dtype=np.uint8))
        paths.append(path)
    return paths


def non_utf8_folder(root: Path, name: str = "smb-share") -> Path:
    """A folder holding one TIFF and a symlink whose name is not UTF-8 (as old Windows/SMB
    shares have them), pointing out of the import roots."""
    folder = root / name
    folder.mkdir()
    make_tiffs(folder, 1)
    os.symlink(b"/etc/passwd", os.path.join(os.fsencode(folder), b"r\xe9sum\xe9-link"))
    return folder


async def explain_nodes(
    conn: asyncpg.Connection, query: str, *args: object
) -> list[dict[str, Any]]:
    """Every node of ``EXPLAIN ANALYZE`` of ``query`` (it runs: call it in a transaction that
    is rolled back when the query writes)."""
    text = await conn.fetchval(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {query}", *args)

    def walk(node: dict[str, Any]) -> list[dict[str, Any]]:
        return [node, *(n for child in node.get("Plans", []) for n in walk(child))]

    return walk(json.loads(text)[0]["Plan"])


def rows_read(node: dict[str, Any]) -> int:
    """Rows a plan node touched: those it returned plus those its filter removed."""
    return int(node.get("Actual Rows", 0)) + int(node.get("Rows Removed by Filter", 0))


async def insert_order(
    url: str,
    files: Sequence[str | Path] | str,
    *,
    uuid: str | None = None,
    group: str = "Demo",
    user: str = "researcher",
    destination_id: str = "151",
    destination_type: str = "Dataset",
    preprocessing: dict[str, Any] | None = None,
    import_options: str | None = None,
) -> str:
    """Write an order the way SQL clients do: one 'Import Pending' row."""
    order_uuid = uuid or str(uuidlib.uuid4())
    files_text = files if isinstance(files, str) else json.dumps([str(f) for f in files])
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            pre_id = None
            if preprocessing is not None:
                pre_id = await conn.fetchval(
                    "INSERT INTO imports_preprocessing (container, input_file, output_folder,"
                    " alt_output_folder, extra_params) VALUES ($1, $2, $3, $4, $5) RETURNING id",
                    preprocessing["container"],
                    preprocessing.get("input_file", "{Files}"),
                    preprocessing.get("output_folder", "/data"),
                    preprocessing.get("alt_output_folder", "/out"),
                    json.dumps(preprocessing.get("extra_params", {})),
                )
            await conn.execute(
                "INSERT INTO imports (group_name, user_name, destination_id, destination_type,"
                " stage, uuid, files, preprocessing_id, import_options)"
                " VALUES ($1, $2, $3, $4, 'Import Pending', $5, $6, $7, $8)",
                group,
                user,
                destination_id,
                destination_type,
                order_uuid,
                files_text,
                pre_id,
                import_options,
            )
    finally:
        await conn.close()
    return order_uuid


async def history(url: str, order_uuid: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return list(
            await conn.fetch("SELECT * FROM imports WHERE uuid = $1 ORDER BY id", order_uuid)
        )
    finally:
        await conn.close()


async def latest(url: str, order_uuid: str) -> asyncpg.Record | None:
    rows = await history(url, order_uuid)
    return rows[-1] if rows else None


async def wait_for_stage(
    url: str, order_uuid: str, stages: Sequence[str] = TERMINAL, timeout: float = 20.0
) -> asyncpg.Record:
    deadline = time.monotonic() + timeout
    conn = await asyncpg.connect(url)
    try:
        while True:
            row = await conn.fetchrow(
                "SELECT * FROM imports WHERE uuid = $1 ORDER BY id DESC LIMIT 1", order_uuid
            )
            if row is not None and row["stage"] in stages:
                return row
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"order {order_uuid} did not reach {stages} in {timeout}s"
                    f" (latest: {row['stage'] if row else None})"
                )
            await asyncio.sleep(0.01)
    finally:
        await conn.close()


@asynccontextmanager
async def running_service(settings: Settings, url: str) -> AsyncIterator[Service]:
    """An in-process replica, stopped gracefully when the block ends."""
    async with open_service(settings, url) as service:
        task = asyncio.create_task(service.dispatcher.run())
        try:
            yield service
        finally:
            service.dispatcher.request_stop()
            await asyncio.wait_for(task, timeout=60)


def start_replica(config: Path, *, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """A replica as its own OS process, running the real command line.

    Its output goes to ``<config>.log`` (appended): a pipe nobody reads would fill up and
    stall the replica.
    """
    with config.with_suffix(".log").open("ab") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "biomero_importer", "run", "--config", str(config)],
            env={**os.environ, **(env or {})},
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_replica(
    proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 60
) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    return proc.wait(timeout=timeout)


def invoke(*args: str | Path) -> Result:
    """One command in this process; logging is reset at once because it pointed at the
    runner's captured stderr, which is closed when the command returns."""
    try:
        return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    finally:
        reset_logging()


async def ainvoke(*args: str | Path) -> Result:
    """invoke from a test's event loop: the command runs its own loop, in a thread."""
    return await asyncio.to_thread(invoke, *args)
