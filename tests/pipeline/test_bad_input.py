"""Bad orders end 'Import Failed' with their own description, and the next order still runs."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support import (
    history,
    insert_order,
    make_settings,
    make_tiffs,
    running_service,
    wait_for_stage,
)


@dataclass
class Case:
    """How to build the bad order in a fresh import root, and what its description says."""

    files: Callable[[Path, Path], list[str] | str]
    expected: str
    columns: dict[str, Any] = field(default_factory=dict)


def _good(root: Path, _outside: Path) -> list[str]:
    return [str(make_tiffs(root / "ok", 1)[0])]


def _symlink_out(root: Path, outside: Path) -> list[str]:
    target = make_tiffs(outside, 1, prefix="secret")[0]
    link = root / "innocent.tif"
    link.symlink_to(target)
    return [str(link)]


def _unreadable(root: Path, _outside: Path) -> list[str]:
    path = make_tiffs(root, 1, prefix="locked")[0]
    path.chmod(0)
    return [str(path)]


CASES: dict[str, Case] = {
    "files-not-json": Case(lambda r, o: "not json at all", "Files is not valid JSON"),
    "files-json-not-list": Case(
        lambda r, o: '{"path": "/data/x.tif"}', "Files must be a JSON list of paths, not an object"
    ),
    "files-empty-list": Case(lambda r, o: "[]", "Files is empty: nothing to import"),
    "relative-path": Case(lambda r, o: ["images/a.tif"], "Path is not absolute: images/a.tif"),
    "dotdot-escape": Case(
        lambda r, o: [f"{r}/../outside/secret0.tif"], "File is outside the import roots"
    ),
    "symlink-out-of-root": Case(_symlink_out, "File links outside the import roots"),
    "missing-file": Case(lambda r, o: [f"{r}/nope.tif"], "File not found"),
    "unreadable-file": Case(_unreadable, "File is not readable"),
    "nul-byte": Case(lambda r, o: json.dumps([f"{r}/a\u0000b.tif"]), "Path contains a NUL byte"),
    "destination-id-not-integer": Case(
        _good, "DestinationID 'abc' is not an integer", {"destination_id": "abc"}
    ),
    "destination-id-negative": Case(
        _good, "DestinationID -5 is not a positive integer", {"destination_id": "-5"}
    ),
    "destination-type-unknown": Case(
        _good,
        "DestinationType 'Project' is not one of Dataset, Screen",
        {"destination_type": "Project"},
    ),
    "empty-user": Case(_good, "Username is missing", {"user": ""}),
    "empty-group": Case(_good, "Group is missing", {"group": "   "}),
    "64kb-field": Case(
        _good, "Group is too long (65536 characters, at most 255)", {"group": "g" * 65536}
    ),
    "preprocessing-without-container": Case(
        _good, "Preprocessing has no container image", {"preprocessing": {"container": ""}}
    ),
    "extra-params-inject-privileged": Case(
        _good,
        "Preprocessing parameter name '--privileged' is not allowed",
        {"preprocessing": {"container": "localhost/x", "extra_params": {"--privileged": "1"}}},
    ),
    "extra-params-inject-volume": Case(
        _good,
        "Preprocessing parameter name '-v /:/host' is not allowed",
        {"preprocessing": {"container": "localhost/x", "extra_params": {"-v /:/host": "x"}}},
    ),
    "extra-params-inject-shell": Case(
        _good,
        "Preprocessing parameter name 'rm; rm -rf /' is not allowed",
        {"preprocessing": {"container": "localhost/x", "extra_params": {"rm; rm -rf /": "x"}}},
    ),
}


@pytest.mark.parametrize("name", list(CASES))
async def test_bad_order_fails_with_its_reason_and_service_goes_on(
    name: str, migrated_url: str, tmp_path: Path, import_root: Path
) -> None:
    case = CASES[name]
    outside = tmp_path / "outside"
    outside.mkdir()
    settings = make_settings(tmp_path, migrated_url, [import_root], poll_interval=0.5)
    columns = dict(case.columns)
    files = case.files(import_root, outside)
    async with running_service(settings, migrated_url):
        bad = await insert_order(migrated_url, files, **columns)
        failed = await wait_for_stage(migrated_url, bad)
        good = await insert_order(migrated_url, _good(import_root / "next", outside))
        completed = await wait_for_stage(migrated_url, good)
    assert failed["stage"] == "Import Failed"
    assert case.expected in failed["description"]
    assert len(failed["description"]) < 300
    assert completed["stage"] == "Import Completed"


async def test_ten_thousand_files_in_one_order_complete(
    migrated_url: str, tmp_path: Path, import_root: Path
) -> None:
    folder = import_root / "many"
    folder.mkdir()
    paths = []
    for n in range(10_000):
        path = folder / f"f{n:05d}.tif"
        path.write_bytes(b"II*\x00")
        paths.append(str(path))
    settings = make_settings(tmp_path, migrated_url, [import_root], poll_interval=0.5)
    async with running_service(settings, migrated_url):
        order = await insert_order(migrated_url, paths)
        done = await wait_for_stage(migrated_url, order, timeout=240)
    assert done["stage"] == "Import Completed", done["description"]
    assert len(json.loads(done["file_names"])) == 10_000


async def test_duplicate_submission_does_not_run_again(
    migrated_url: str, tmp_path: Path, import_root: Path
) -> None:
    files = make_tiffs(import_root, 1)
    settings = make_settings(tmp_path, migrated_url, [import_root], poll_interval=0.5)
    async with running_service(settings, migrated_url):
        order = await insert_order(migrated_url, files)
        await wait_for_stage(migrated_url, order)
        await insert_order(migrated_url, files, uuid=order)
        await wait_for_stage(migrated_url, order)
        rows = await history(migrated_url, order)
    stages = [r["stage"] for r in rows]
    assert stages.count("Import Started") == 1
    assert stages[-1] == "Import Completed"
    assert "Duplicate submission ignored" in rows[-1]["description"]
