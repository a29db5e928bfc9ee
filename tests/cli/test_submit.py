"""submit writes the order exactly as OMERO.biomero does; --wait follows it to the end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli.conftest import CliSetup, ainvoke, execute, run_cli
from tests.support import history, make_tiffs, running_service


async def test_submit_wait_completes(cli_setup: CliSetup) -> None:
    files = make_tiffs(cli_setup.root, 2)
    async with running_service(cli_setup.settings, cli_setup.url):
        done = await run_cli(
            "submit",
            "--group",
            "Demo",
            "--user",
            "researcher",
            "--dataset",
            "151",
            "--wait",
            *files,
            "--config",
            cli_setup.config,
        )
    assert done.exit_code == 0, done.stderr
    order = done.stdout.splitlines()[-1]
    stages = [row["stage"] for row in await history(cli_setup.url, order)]
    assert stages[0] == "Import Pending"
    assert stages[-1] == "Import Completed"
    assert "Import Started" in done.stderr
    assert done.stderr.rstrip().endswith("Import Completed")


async def test_submit_wait_fails_with_the_description(cli_setup: CliSetup) -> None:
    files = make_tiffs(cli_setup.root, 1, prefix="broken")
    failing = cli_setup.with_config(omero_simulator_fail_pattern="broken")
    async with running_service(failing.settings, failing.url):
        done = await run_cli(
            "submit",
            "-g",
            "Demo",
            "-u",
            "researcher",
            "--dataset",
            "151",
            "--wait",
            "--timeout",
            "30",
            files[0],
            "--config",
            failing.config,
        )
    assert done.exit_code == 1, done.stderr
    order = done.stdout.splitlines()[-1]
    last = (await history(failing.url, order))[-1]
    assert last["stage"] == "Import Failed"
    assert last["description"]
    assert f"Import Failed: {last['description']}" in done.stderr


async def test_submit_writes_what_omero_biomero_writes(cli_setup: CliSetup) -> None:
    files = make_tiffs(cli_setup.root, 2)
    result = await ainvoke(
        "submit",
        "--group",
        "Lab",
        "--user",
        "alice",
        "--screen",
        "9",
        "--preprocess",
        "localhost/convert:1",
        "--param",
        "saveoption=single",
        "--param",
        "image_uuid=abc=1",
        *files,
        "--config",
        cli_setup.config,
    )
    assert result.exit_code == 0, result.output
    order = result.stdout.splitlines()[-1]
    rows = await execute(
        cli_setup.url,
        "SELECT i.*, p.container, p.input_file, p.output_folder, p.alt_output_folder,"
        " p.extra_params::text AS extra FROM imports i"
        " JOIN imports_preprocessing p ON p.id = i.preprocessing_id WHERE i.uuid = $1",
        order,
    )
    assert len(rows) == 1
    row = rows[0]
    assert (row["group_name"], row["user_name"]) == ("Lab", "alice")
    assert (row["destination_type"], row["destination_id"]) == ("Screen", "9")
    assert row["stage"] == "Import Pending"
    assert json.loads(row["files"]) == [str(f) for f in files]
    assert (row["container"], row["input_file"], row["output_folder"]) == (
        "localhost/convert:1",
        "{Files}",
        "/data",
    )
    assert row["alt_output_folder"] == "/out"
    assert json.loads(row["extra"]) == {"saveoption": "single", "image_uuid": "abc=1"}


async def test_submit_preprocess_without_params_stores_no_extra_params(
    cli_setup: CliSetup,
) -> None:
    """SQL NULL, not the JSON value null: the service refuses a non-object extra_params."""
    (image,) = make_tiffs(cli_setup.root, 1)
    result = await ainvoke(
        "submit", "-g", "Lab", "-u", "alice", "--dataset", "1", "--preprocess",
        "localhost/convert:1", image, "--config", cli_setup.config,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    order = result.stdout.splitlines()[-1]
    rows = await execute(
        cli_setup.url,
        "SELECT p.extra_params IS NULL AS missing FROM imports i"
        " JOIN imports_preprocessing p ON p.id = i.preprocessing_id WHERE i.uuid = $1",
        order,
    )
    assert [row["missing"] for row in rows] == [True]


async def test_submit_takes_relative_paths(
    cli_setup: CliSetup, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = make_tiffs(cli_setup.root, 1)
    monkeypatch.chdir(cli_setup.root)
    result = await ainvoke(
        "submit", "-g", "G", "-u", "u", "--dataset", "1", files[0].name, "-c", cli_setup.config
    )
    assert result.exit_code == 0, result.output
    rows = await execute(cli_setup.url, "SELECT files FROM imports")
    assert json.loads(rows[0]["files"]) == [str(files[0])]


async def test_submit_rejects_what_the_service_would_fail(
    cli_setup: CliSetup, tmp_path: Path
) -> None:
    inside = make_tiffs(cli_setup.root, 1)[0]
    outside = make_tiffs(tmp_path / "elsewhere", 1)[0]
    base = ["submit", "-g", "G", "-u", "u", "--config", str(cli_setup.config)]
    cases = {
        "outside the import roots": [*base, "--dataset", "1", str(outside)],
        "File not found": [*base, "--dataset", "1", str(cli_setup.root / "missing.tif")],
        "--dataset": [*base, str(inside)],
        "not both": [*base, "--dataset", "1", "--screen", "2", str(inside)],
        "--param needs --preprocess": [*base, "--dataset", "1", "--param", "a=b", str(inside)],
        "KEY=VALUE": [
            *base,
            "--dataset",
            "1",
            "--preprocess",
            "localhost/x",
            "--param",
            "ab",
            str(inside),
        ],
    }
    for message, args in cases.items():
        result = await ainvoke(*args)
        assert result.exit_code == 2, (message, result.output)
        assert message in result.output, result.output
    assert await execute(cli_setup.url, "SELECT id FROM imports") == []


async def test_submit_checks_the_container_allowlist(cli_setup: CliSetup) -> None:
    inside = make_tiffs(cli_setup.root, 1)[0]
    result = await ainvoke(
        "submit",
        "-g",
        "G",
        "-u",
        "u",
        "--dataset",
        "1",
        "--preprocess",
        "docker.io/someone/unknown:latest",
        inside,
        "--config",
        cli_setup.config,
    )
    assert result.exit_code == 2, result.output
    assert "order not submitted" in result.stderr
    assert await execute(cli_setup.url, "SELECT id FROM imports") == []


async def test_submit_stores_import_options(cli_setup: CliSetup) -> None:
    """--options: the order's ImportOptions, stored as upstream's writer stores them."""
    (image,) = make_tiffs(cli_setup.root, 1)
    options = {"schema": 1, "platePixelSource": "label", "plateLabelName": "nuclei"}
    result = await ainvoke(
        "submit", "-g", "Lab", "-u", "alice", "--screen", "3", "--options",
        json.dumps(options), image, "--config", cli_setup.config,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    order = result.stdout.splitlines()[-1]
    rows = await execute(cli_setup.url, "SELECT import_options FROM imports WHERE uuid = $1", order)
    assert [json.loads(row["import_options"]) for row in rows] == [options]
    shown = await ainvoke("show", order, "--json", "--config", cli_setup.config)
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["import_options"] == options
    shown = await ainvoke("show", order, "--config", cli_setup.config)
    assert '"plateLabelName": "nuclei"' in shown.stdout


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1]", "must be a JSON object"),
        ('{"schema": 1, "platePixelSource": "label"}', "plateLabelName is required"),
        (
            '{"schema": 2, "operations": [{"kind": "biomero.shallow-zarr"}]}',
            "Operation 'biomero.shallow-zarr' is not supported by this importer",
        ),
    ],
)
async def test_submit_rejects_unusable_import_options(
    cli_setup: CliSetup, options: str, message: str
) -> None:
    (image,) = make_tiffs(cli_setup.root, 1)
    result = await ainvoke(
        "submit", "-g", "G", "-u", "u", "--dataset", "1", "--options", options, image,
        "--config", cli_setup.config,
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert message in result.output, result.output
    assert await execute(cli_setup.url, "SELECT id FROM imports") == []
