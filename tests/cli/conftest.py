"""Run the command line in-process (CliRunner) or as a real process next to a service."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from biomero_importer.settings import Settings
from tests.support import ainvoke, invoke, make_settings, write_config

__all__ = ["ainvoke", "invoke"]


@dataclass
class Completed:
    exit_code: int
    stdout: str
    stderr: str


async def run_cli(*args: str | Path, timeout: float = 60) -> Completed:
    """One command as its own OS process (``python -m biomero_importer``)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "biomero_importer",
        *[str(a) for a in args],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "COLUMNS": "200"},
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return Completed(proc.returncode, out.decode(), err.decode())


@dataclass
class CliSetup:
    url: str
    settings: Settings
    config: Path
    root: Path

    def with_config(self, **overrides: Any) -> CliSetup:
        settings = self.settings.model_copy(update=overrides)
        config = write_config(self.config.with_name(f"settings-{uuid.uuid4().hex}.yml"), settings)
        return CliSetup(self.url, settings, config, self.root)


@pytest.fixture
def cli_setup(migrated_url: str, tmp_path: Path, import_root: Path) -> CliSetup:
    """A migrated database, a simulator config for it, and an import root."""
    managed = tmp_path / "ManagedRepository"
    inplace = tmp_path / "inplace"
    managed.mkdir()
    inplace.mkdir()
    settings = make_settings(
        tmp_path,
        migrated_url,
        [import_root],
        poll_interval=0.2,
        omero_managed_repository=managed,
        omero_inplace_dir=inplace,
    )
    config = write_config(tmp_path / "settings.yml", settings)
    return CliSetup(migrated_url, settings, config, import_root)


async def append_stage(url: str, order: str, stage: str, description: str | None = None) -> None:
    """Append a copy of the order's latest row with another stage, as a replica would."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "INSERT INTO imports (group_name, user_name, destination_id, destination_type,"
            " stage, uuid, files, file_names, description, preprocessing_id)"
            " SELECT group_name, user_name, destination_id, destination_type, $2, uuid, files,"
            " file_names, $3, preprocessing_id FROM imports WHERE uuid = $1"
            " ORDER BY id DESC LIMIT 1",
            order,
            stage,
            description,
        )
    finally:
        await conn.close()


async def execute(url: str, statement: str, *args: Any) -> Any:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(statement, *args)
    finally:
        await conn.close()
