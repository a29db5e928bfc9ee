"""The first run: the quickstart as ``./dev start`` prepares it, with real commands as their own
processes, the way a new user (or a container without a login session) runs them.

Each command here starts the embedded PostgreSQL in a folder of the test's own, so nothing is
shared with the user's real quickstart data.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "config" / "quickstart.yml"
DEV = ROOT / "dev"
COMMAND_TIMEOUT = 180


def _dev_start_folders() -> list[str]:
    """The folders ``./dev start`` creates before it runs the service."""
    text = DEV.read_text(encoding="utf-8")
    start = text.split("    start)", 1)[1].split(";;", 1)[0]
    folders: list[str] = []
    for match in re.finditer(r"mkdir -p ([^\n]+)", start):
        folders.extend(match.group(1).split())
    return folders


def _quickstart(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A copy of the quickstart in a fresh folder, prepared as ``./dev start`` prepares it,
    and the environment of a container: no XDG_RUNTIME_DIR, private data folders."""
    home = tmp_path / "quickstart"
    (home / "config").mkdir(parents=True)
    shutil.copy(QUICKSTART, home / "config" / "quickstart.yml")
    for folder in _dev_start_folders():
        (home / folder).mkdir(parents=True, exist_ok=True)
    env = {
        key: value
        for key, value in os.environ.items()
        if key != "XDG_RUNTIME_DIR" and not key.startswith("BIOMERO_IMPORTER_")
    }
    env["BIOMERO_IMPORTER_EMBEDDED_DB_DIR"] = str(tmp_path / "embedded")
    env["COLUMNS"] = "200"
    return home, env


def _cli(home: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "biomero_importer", *args],
        cwd=home,
        env=env,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )


def _no_library_warning(stderr: str) -> None:
    assert "Warning" not in stderr, stderr
    assert "XDG_RUNTIME_DIR" not in stderr, stderr


def test_dev_start_creates_every_folder_the_quickstart_names() -> None:
    config = yaml.safe_load(QUICKSTART.read_text(encoding="utf-8"))
    created = {Path(folder) for folder in _dev_start_folders()}
    named = [Path(root) for root in config["import_roots"]]
    named.append(Path(config["omero_inplace_dir"]))
    missing = [str(path) for path in named if path not in created]
    assert not missing, f"./dev start does not create {missing}"


def test_fresh_quickstart_checks_green_without_library_warnings(tmp_path: Path) -> None:
    home, env = _quickstart(tmp_path)
    config = "config/quickstart.yml"

    helped = _cli(home, env, "--help")
    assert helped.returncode == 0, helped.stderr
    _no_library_warning(helped.stderr)

    # `./dev start` runs the service, whose start migrates the embedded database.
    migrated = _cli(home, env, "migrate", "--config", config)
    assert migrated.returncode == 0, migrated.stderr
    _no_library_warning(migrated.stderr)

    status = _cli(home, env, "status", "--config", config)
    assert status.returncode == 0, status.stderr
    _no_library_warning(status.stderr)

    checked = _cli(home, env, "check", "--json", "--config", config)
    _no_library_warning(checked.stderr)
    lines = json.loads(checked.stdout)
    # The quickstart configures no container runtime: only preprocessing orders need one,
    # and whether this machine can run containers is not the quickstart's business.
    configured = [line for line in lines if not line["check"].startswith("container runtime")]
    assert [line for line in configured if not line["ok"]] == []
    names = {line["check"] for line in configured}
    assert {"database schema at head", "omero_inplace_dir writable"} <= names
