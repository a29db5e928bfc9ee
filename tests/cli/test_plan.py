"""``plan`` (and ``submit --dry-run``): what an order would do, and nothing written.

Run as real processes against a migrated database; every test compares the row counts of
the three tables before and after, and the files under the test's folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from tests.cli.conftest import CliSetup, execute, run_cli
from tests.support import insert_order, make_tiffs, running_service

SECRET = "Plan-Secret-4b1d9c"
COUNTS = (
    "SELECT (SELECT count(*) FROM imports) AS imports,"
    " (SELECT count(*) FROM imports_preprocessing) AS preprocessing,"
    " (SELECT count(*) FROM importer_orders) AS orders"
)


async def _rows(url: str) -> tuple[int, int, int]:
    (row,) = await execute(url, COUNTS)
    return row["imports"], row["preprocessing"], row["orders"]


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(path): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in folder.rglob("*")
        if path.is_file()
    }


def _folder_order(root: Path) -> tuple[Path, list[Path]]:
    folder = root / "plate-scan"
    files = make_tiffs(folder, 2) + make_tiffs(folder / "well-B2", 1, prefix="field")
    return folder, files


def _new_order_args(folder: Path, setup: CliSetup, *extra: str) -> list[str | Path]:
    return [
        folder,
        "--group",
        "Demo",
        "--user",
        "researcher",
        "--dataset",
        "151",
        *extra,
        "--config",
        setup.config,
    ]


async def test_plan_of_a_folder_order_prints_units_and_both_commands_and_writes_nothing(
    cli_setup: CliSetup, tmp_path: Path
) -> None:
    folder, files = _folder_order(cli_setup.root)
    image = "localhost/biomero-test-converter:latest"
    setup = cli_setup.with_config(omero_password=SecretStr(SECRET), omero_host="omero.example.org")
    before, tree = await _rows(setup.url), _tree(tmp_path)

    args = _new_order_args(folder, setup, "--preprocess", image, "--param", f"token={SECRET}")
    shown = await run_cli("plan", *args)
    as_json = await run_cli("plan", *args, "--json")

    assert shown.exit_code == 0, shown.stderr
    text = shown.stdout
    assert "verdict  valid" in text
    assert "target   Dataset 151" in text
    assert f"input {folder}" in text
    for path in files:
        assert str(path) in text
    assert '"podman", "run", "--rm"' in text
    assert '"omero", "import", "-s", "omero.example.org"' in text
    assert SECRET not in text and '"--token", "***"' in text

    assert as_json.exit_code == 0, as_json.stderr
    plan: dict[str, Any] = json.loads(as_json.stdout)
    assert plan["valid"] is True
    (container,) = plan["containers"]
    assert container["argv"][:3] == ["podman", "run", "--rm"]
    assert image in container["argv"]
    assert f"{folder.parent}:/data:ro" in container["argv"]
    (unit,) = plan["units"]
    assert unit["file_count"] == 3
    assert sorted(unit["files"]) == sorted(str(path) for path in files)
    assert unit["import_argv"][:2] == ["omero", "import"]
    assert "--exclude=clientpath" not in unit["import_argv"]

    assert await _rows(setup.url) == before
    assert _tree(tmp_path) == tree


async def test_plan_of_a_plain_folder_order_imports_the_folder_as_one_unit(
    cli_setup: CliSetup,
) -> None:
    folder, files = _folder_order(cli_setup.root)
    (extra,) = make_tiffs(cli_setup.root, 1, prefix="single")
    before = await _rows(cli_setup.url)
    done = await run_cli("plan", *_new_order_args(folder, cli_setup), extra, "--json")
    assert done.exit_code == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["containers"] == []
    folder_unit, file_unit = plan["units"]
    assert folder_unit["path"] == str(folder)
    assert folder_unit["import_argv"][-1] == str(folder)
    assert sorted(folder_unit["files"]) == sorted(str(path) for path in files)
    assert file_unit["files"] == [str(extra)]
    # The simulator runs no `omero import`: the plan says so and shows what blitz would run.
    assert any("simulator" in note for note in plan["notes"])
    assert await _rows(cli_setup.url) == before


async def test_plan_and_dry_run_of_an_invalid_order_give_the_verdict(cli_setup: CliSetup) -> None:
    missing = cli_setup.root / "not-there.tif"
    before = await _rows(cli_setup.url)
    for command in (["plan"], ["submit", "--dry-run"]):
        done = await run_cli(*command, *_new_order_args(missing, cli_setup))
        assert done.exit_code == 1, done.stderr
        assert f"verdict  File not found: {missing}" in done.stdout
        assert "nothing would run" in done.stdout
    assert await _rows(cli_setup.url) == before


async def test_submit_dry_run_prints_the_plan_and_writes_nothing(cli_setup: CliSetup) -> None:
    folder, _ = _folder_order(cli_setup.root)
    before = await _rows(cli_setup.url)
    done = await run_cli("submit", "--dry-run", "--json", *_new_order_args(folder, cli_setup))
    assert done.exit_code == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["valid"] is True
    assert [unit["path"] for unit in plan["units"]] == [str(folder)]
    assert await _rows(cli_setup.url) == before


async def test_plan_of_a_queued_order_shows_what_a_rerun_skips(cli_setup: CliSetup) -> None:
    files = make_tiffs(cli_setup.root, 2)
    async with running_service(cli_setup.settings, cli_setup.url):
        done = await run_cli(
            "submit", *_new_order_args(files[0], cli_setup)[1:-2], "--wait", *files,
            "--config", cli_setup.config,
        )  # fmt: skip
    assert done.exit_code == 0, done.stderr
    order = done.stdout.splitlines()[-1]
    requeued = await run_cli("retry", order, "--config", cli_setup.config)
    assert requeued.exit_code == 0, requeued.stderr

    before = await _rows(cli_setup.url)
    shown = await run_cli("plan", order, "--config", cli_setup.config)
    planned = await run_cli("plan", order, "--json", "--config", cli_setup.config)
    assert await _rows(cli_setup.url) == before

    assert shown.exit_code == 0, shown.stderr
    assert f"order    {order}  (Import Pending)" in shown.stdout
    assert shown.stdout.count("a re-run skips it: already imported as Image:") == 2
    plan = json.loads(planned.stdout)
    assert plan["uuid"] == order and plan["stage"] == "Import Pending"
    for unit in plan["units"]:
        assert unit["skipped_because"].startswith("already imported as Image:")
        assert "--exclude=clientpath" in unit["import_argv"]


async def test_plan_of_an_unknown_uuid_fails(cli_setup: CliSetup) -> None:
    done = await run_cli(
        "plan", "0b6f2f63-3f5e-4a53-9f57-1c6e0f9d2a11", "--config", cli_setup.config
    )
    assert done.exit_code == 1
    assert "no order with uuid 0b6f2f63-3f5e-4a53-9f57-1c6e0f9d2a11" in done.stderr


async def test_plan_of_a_queued_order_judges_its_preprocessing_row_as_a_claim_would(
    cli_setup: CliSetup,
) -> None:
    """A SQL writer's extra_params that is not a JSON object fails the order when claimed;
    the plan of that queued order says so instead of planning a container."""
    (image,) = make_tiffs(cli_setup.root, 1)
    order = await insert_order(
        cli_setup.url,
        [image],
        preprocessing={
            "container": "localhost/biomero-test-converter:latest",
            "extra_params": ["not", "an", "object"],
        },
    )
    before = await _rows(cli_setup.url)
    done = await run_cli("plan", order, "--json", "--config", cli_setup.config)
    assert done.exit_code == 1, done.stderr
    plan = json.loads(done.stdout)
    assert plan["verdict"] == "Preprocessing extra_params must be a JSON object"
    assert plan["containers"] == [] and plan["units"] == []
    assert await _rows(cli_setup.url) == before
