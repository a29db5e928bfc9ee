"""``biomero-importer demo`` as a newcomer runs it: a real process, a fresh folder, < 30 s."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from tests.cli.conftest import invoke

# Issue 6 acceptance: the demo finishes in under 30 s on this (2-core) machine.
DEMO_BUDGET = 30.0
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


def _demo(folder: Path, env: dict[str, str] | None = None) -> tuple[int, str, str, float]:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "biomero_importer", "demo", "--dir", str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
        stdin=subprocess.DEVNULL,
        check=False,
    )
    return result.returncode, result.stdout, result.stderr, time.monotonic() - started


def _images(text: str) -> int:
    return len(re.findall(r"\bImage \d+", text))


def _result_rows(stdout: str) -> dict[str, tuple[str, str, str]]:
    """The final table: order label -> (uuid, stage, the rest of the line)."""
    table = stdout.split("\nResult:\n", 1)[1].split("\n\n", 1)[0]
    lines = table.splitlines()
    assert re.match(r"UUID\s+ORDER\s+STAGE\s+DESCRIPTION\s+OMERO OBJECTS", lines[0]), table
    rows = {}
    for line in lines[2:]:
        match = re.match(rf"({UUID}|-)\s+(\S+)\s+(Import \w+|skipped)\s*(.*)", line)
        assert match, line
        rows[match.group(2)] = (match.group(1), match.group(3), match.group(4))
    return rows


def test_demo_runs_end_to_end_in_under_30_seconds(tmp_path: Path) -> None:
    folder = tmp_path / "demo"
    code, out, err, elapsed = _demo(folder)
    assert code == 0, f"stdout:\n{out}\nstderr:\n{err}"
    assert elapsed < DEMO_BUDGET, f"the demo took {elapsed:.1f}s"

    rows = _result_rows(out)
    plain_uuid, plain_stage, plain_rest = rows["plain"]
    assert plain_stage == "Import Completed"
    assert _images(plain_rest) == 3, plain_rest
    assert rows["failing"][1] == "Import Failed"
    assert "File is outside the import roots" in rows["failing"][2]
    pre_stage = rows["preprocessing"][1]
    if pre_stage == "skipped":
        assert "preprocessing order SKIPPED: " in out
    else:
        assert pre_stage == "Import Completed", rows["preprocessing"]
    # live progress: stage changes as lines, before the table
    progress = out.split("\nResult:\n", 1)[0]
    short = plain_uuid[:8]
    assert re.search(rf"plain\s+{short}\s+Import Pending", progress), progress
    assert re.search(rf"plain\s+{short}\s+Import Completed", progress), progress
    assert re.search(r"failing\s+\w{8}\s+Import Failed: File is outside the import roots", out)

    # how to look inside, and that the hints point at real things
    assert f"psql -h {folder / 'postgres'} -U postgres biomero" in out
    sim_db = folder / "omero-simulator" / "omero.sqlite"
    assert f"sqlite3 {sim_db} " in out
    assert f"biomero-importer status --config {folder / 'settings.yml'}" in out
    db = sqlite3.connect(sim_db)
    try:
        names = db.execute(
            "SELECT name FROM objects WHERE order_uuid = ? ORDER BY id", (plain_uuid,)
        ).fetchall()
    finally:
        db.close()
    assert names == [("cells1.tif",), ("cells2.tif",), ("cells3.tif",)]
    # the console stays readable: the service logs warnings only
    assert '"level": "info"' not in err, err
    assert "Traceback" not in out + err


def test_demo_reuses_its_folder_and_skips_preprocessing_without_a_runtime(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "demo"
    code, out, err, _ = _demo(folder)
    assert code == 0, f"stdout:\n{out}\nstderr:\n{err}"
    first = _result_rows(out)["plain"][0]
    # A second run on the same folder, with no container runtime to be found: the database
    # and the simulator are reused, the preprocessing order is skipped, saying why.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    code, out, err, elapsed = _demo(folder, {"PATH": str(bindir)})
    assert code == 0, f"stdout:\n{out}\nstderr:\n{err}"
    assert elapsed < DEMO_BUDGET
    assert "preprocessing order SKIPPED: podman is not installed" in out
    rows = _result_rows(out)
    assert rows["preprocessing"][:2] == ("-", "skipped")
    assert rows["plain"][0] != first
    assert rows["plain"][1] == "Import Completed"
    assert _images(rows["plain"][2]) == 3, rows["plain"]
    assert rows["failing"][1] == "Import Failed"


def test_demo_folder_that_cannot_be_created_is_a_usage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, _, err, _ = _demo(blocker / "demo")
    assert code == 2
    assert "cannot create the demo folder" in err


def test_help() -> None:
    result = invoke("demo", "--help")
    assert result.exit_code == 0, result.output
    assert "--dir" in result.stdout
    assert "demo" in invoke("--help").stdout
