"""Issue 15 acceptance: "A 50-file order with a slow simulated import: `status` shows `12/50`
while it runs." The real service on a real PostgreSQL, the simulator taking 0.2 s per file,
and the real ``biomero-importer status`` command as its own process, polled while it runs."""

from __future__ import annotations

import re
import time
from pathlib import Path

from tests.cli.conftest import run_cli
from tests.support import (
    insert_order,
    make_settings,
    make_tiffs,
    running_service,
    wait_for_stage,
    write_config,
)

from .conftest import sim_objects

FILES = 50
DELAY = 0.2  # simulated seconds per file: the import step takes about 10 s


async def test_status_shows_the_progress_of_a_running_50_file_order(
    migrated_url: str, tmp_path: Path, import_root: Path
) -> None:
    settings = make_settings(
        tmp_path, migrated_url, [import_root], omero_simulator_import_delay=DELAY
    )
    config = write_config(tmp_path / "settings.yml", settings)
    files = make_tiffs(import_root / "plate-scan", FILES)
    async with running_service(settings, migrated_url):
        order = await insert_order(migrated_url, files)
        assert len(files) == FILES
        seen: list[str] = []
        deadline = time.monotonic() + 60
        middle = None
        while middle is None:
            assert time.monotonic() < deadline, f"status never showed the middle: {seen}"
            status = await run_cli("status", "--config", config)
            assert status.exit_code == 0, status.stderr
            (line,) = [line for line in status.stdout.splitlines() if line.startswith(order)]
            assert "Import Completed" not in line, f"the order ended before status saw it: {seen}"
            seen.append(line)
            found = re.search(rf"\bimport (\d+)/{FILES}\b", line)
            if found and 0 < int(found[1]) < FILES:
                middle = int(found[1])
        # show tells the same, with the file being imported
        shown = await run_cli("show", order, "--config", config)
        (progress,) = [line for line in shown.stdout.splitlines() if line.startswith("Progress")]
        assert re.search(rf"import \d+/{FILES}, .* of .*, image\d+\.tif \(recorded", progress), (
            progress
        )
        last = await wait_for_stage(migrated_url, order, timeout=60)
    assert last["stage"] == "Import Completed", last["description"]
    assert len(sim_objects(settings.omero_simulator_dir, order)) == FILES
    # once it ended, the progress is gone from status
    status = await run_cli("status", "--config", config)
    (line,) = [line for line in status.stdout.splitlines() if line.startswith(order)]
    assert line.split()[1:4] == ["Import", "Completed", "-"], line
    print(f"status showed import {middle}/{FILES} while it ran ({len(seen)} polls)")  # noqa: T201
