"""check reports every broken setting with a fix, and passes on a good simulator setup."""

from __future__ import annotations

import json
from pathlib import Path

from biomero_importer.db.urls import asyncpg_dsn
from biomero_importer.store import PostgresStore
from tests.cli.conftest import CliSetup, invoke
from tests.notify_support import SmtpReceiver, WebhookReceiver, new_secret, notify_settings
from tests.support import ainvoke, make_settings, write_config


def _lines(result_stdout: str) -> list[dict[str, object]]:
    lines: list[dict[str, object]] = json.loads(result_stdout)
    return lines


def test_check_passes_with_a_good_simulator_config(cli_setup: CliSetup) -> None:
    result = invoke("check", "--json", "--config", cli_setup.config)
    lines = _lines(result.stdout)
    by_name = {str(line["check"]): line for line in lines}
    runtime = next(line for name, line in by_name.items() if name.startswith("container runtime"))
    others = [line for line in lines if line is not runtime]
    assert all(line["ok"] for line in others), others
    assert by_name["database schema at head"]["ok"]
    assert by_name["OMERO simulator active"]["ok"]
    assert result.exit_code == (0 if runtime["ok"] else 1)

    table = invoke("check", "--config", cli_setup.config)
    assert "✓ database reachable" in table.stdout
    assert "✓ OMERO simulator active" in table.stdout


def test_check_reports_a_missing_import_root_with_its_fix(
    cli_setup: CliSetup, tmp_path: Path
) -> None:
    missing = tmp_path / "not-mounted"
    broken = cli_setup.with_config(import_roots=[missing])
    result = invoke("check", "--config", broken.config)
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    index = next(i for i, line in enumerate(lines) if str(missing) in line)
    assert lines[index].startswith("✗ import root readable")
    assert f"{missing}: does not exist" in lines[index]
    assert "fix: create or mount it" in lines[index + 1]
    assert "checks failed" in lines[-1]


def test_check_reports_missing_omero_folders(cli_setup: CliSetup, tmp_path: Path) -> None:
    broken = cli_setup.with_config(omero_inplace_dir=tmp_path / "nowhere")
    result = invoke("check", "--json", "--config", broken.config)
    assert result.exit_code == 1
    failed = {str(line["check"]): line for line in _lines(result.stdout) if not line["ok"]}
    line = failed["omero_inplace_dir writable"]
    assert line["detail"] == f"{tmp_path / 'nowhere'}: does not exist"
    assert f"mkdir -p {tmp_path / 'nowhere'}" in str(line["hint"])


def test_check_reports_an_unmigrated_database(
    database_url: str, tmp_path: Path, import_root: Path
) -> None:
    settings = make_settings(tmp_path, database_url, [import_root])
    result = invoke("check", "--json", "--config", write_config(tmp_path / "s.yml", settings))
    assert result.exit_code == 1
    by_name = {str(line["check"]): line for line in _lines(result.stdout)}
    assert by_name["database reachable"]["ok"]
    assert not by_name["database schema at head"]["ok"]
    assert by_name["database schema at head"]["hint"] == "run: biomero-importer migrate"


def test_check_never_shows_the_database_password(tmp_path: Path, import_root: Path) -> None:
    secret = "Sup3rSecretPw"
    url = f"postgresql://importer:{secret}@127.0.0.1:1/biomero"
    settings = make_settings(tmp_path, url, [import_root])
    result = invoke("check", "--config", write_config(tmp_path / "s.yml", settings))
    assert result.exit_code == 1
    assert "✗ database reachable" in result.stdout
    assert "importer:***@127.0.0.1" in result.stdout
    assert secret not in result.output


async def test_check_reports_each_notification_channel(cli_setup: CliSetup) -> None:
    webhook, smtp = WebhookReceiver(new_secret()), SmtpReceiver()
    await webhook.start()
    smtp.start()
    try:
        setup = cli_setup.with_config(**notify_settings(webhook, smtp))
        by_name = {
            str(line["check"]): line
            for line in _lines((await ainvoke("check", "--json", "--config", setup.config)).stdout)
        }
        assert by_name["notifications: webhook reachable"]["ok"]
        assert by_name["notifications: webhook reachable"]["detail"] == (
            f"http://127.0.0.1:{webhook.port}"
        )
        assert by_name["notifications: email reachable"]["ok"]
        assert webhook.requests == 0 and smtp.messages == {}  # nothing is sent
        await webhook.stop()
        smtp.stop()
        down = await ainvoke("check", "--config", setup.config)
    finally:
        await webhook.stop()
        smtp.stop()
    assert down.exit_code == 1
    assert "✗ notifications: webhook reachable" in down.stdout
    assert "✗ notifications: email reachable" in down.stdout
    assert "pw-in-url" not in down.stdout and "t0k3n" not in down.stdout


# --- check --omero-import-test (against the simulator; the blitz steps through a stub of the
# server's answers in tests/omero/test_selftest.py) ------------------------------------------


def _import_test(setup: CliSetup, *extra: str) -> tuple[int, list[dict[str, object]]]:
    args = ["check", "--json", "--config", str(setup.config), "--omero-import-test"]
    result = invoke(*args, "--scratch-dataset", "5", "--group", "lab", *extra)
    lines = [line for line in _lines(result.stdout) if str(line["check"]).startswith("import test")]
    return result.exit_code, lines


def _simulated_objects(setup: CliSetup) -> int:
    import sqlite3

    assert setup.settings.omero_simulator_dir is not None
    with sqlite3.connect(setup.settings.omero_simulator_dir / "omero.sqlite") as db:
        (count,) = db.execute("SELECT count(*) FROM objects").fetchone()
    return int(count)


def test_the_import_test_runs_every_step_with_its_time_and_leaves_nothing(
    cli_setup: CliSetup,
) -> None:
    _, lines = _import_test(cli_setup)
    assert [line["check"] for line in lines] == [
        "import test: OMERO admin login",
        "import test: session as root in lab",
        "import test: import a tiny image in place into Dataset 5",
        "import test: find it by the order comment",
        "import test: annotate it",
        "import test: register a tiny OME-Zarr and read a tile back",
        "import test: delete what the test created",
    ]
    assert all(line["ok"] for line in lines), lines
    assert all(isinstance(line["seconds"], float) for line in lines)
    assert "2 resolution levels" in str(lines[5]["detail"])
    # everything it created is gone: objects and files
    assert _simulated_objects(cli_setup) == 0
    assert not [p for p in cli_setup.root.iterdir() if "selftest" in p.name]

    table = invoke(
        "check",
        "--config",
        cli_setup.config,
        "--omero-import-test",
        "--scratch-dataset",
        "5",
        "--group",
        "lab",
    )
    assert "✓ import test: annotate it" in table.stdout
    assert " s)" in table.stdout


def test_a_failing_import_step_says_how_to_fix_it_and_still_cleans_up(
    cli_setup: CliSetup,
) -> None:
    failing = cli_setup.with_config(omero_simulator_fail_pattern=r"\.zarr$")
    code, lines = _import_test(failing)
    assert code == 1
    by_name = {str(line["check"]): line for line in lines}
    register = by_name["import test: register a tiny OME-Zarr and read a tile back"]
    assert not register["ok"]
    assert "omero-zarr-pixel-buffer" in str(register["hint"])
    # the image imported before is deleted all the same
    assert by_name["import test: delete what the test created"]["ok"]
    assert _simulated_objects(failing) == 0


def test_an_unknown_user_stops_the_import_test_at_the_session(cli_setup: CliSetup) -> None:
    strict = cli_setup.with_config(omero_simulator_users={"alice": ["lab"]})
    code, lines = _import_test(strict, "--user", "bob")
    assert code == 1
    assert [line["check"] for line in lines][-1] == "import test: session as bob in lab"
    assert "must exist and be a member of group 'lab'" in str(lines[-1]["hint"])


def test_the_import_test_needs_a_scratch_dataset(cli_setup: CliSetup) -> None:
    result = invoke("check", "--config", cli_setup.config, "--omero-import-test")
    assert result.exit_code == 2
    assert "--scratch-dataset" in result.output


async def test_check_reports_replicas_with_other_notification_channels(
    cli_setup: CliSetup,
) -> None:
    """An outcome owes every channel any replica has: a replica without one of them is
    reported, naming its channels and where they point (never a secret)."""
    webhook = WebhookReceiver(new_secret())
    setup = cli_setup.with_config(**notify_settings(webhook, None))
    store = PostgresStore(asyncpg_dsn(cli_setup.url), worker_id="replica-b", pool_size=2)
    await store.open()
    try:
        # a replica with this configuration's webhook: they agree
        await store.record_channels(["webhook"], {"webhook": f"http://127.0.0.1:{webhook.port}"})
        agree = _by_name((await ainvoke("check", "--json", "--config", setup.config)).stdout)
        # the same replica restarted with email too
        await store.record_channels(
            ["email", "webhook"],
            {"email": "smtp://mail.lab.example:587", "webhook": f"http://127.0.0.1:{webhook.port}"},
        )
        differ = await ainvoke("check", "--config", setup.config)
    finally:
        await store.close()
    assert agree["notifications: replicas agree on channels"]["ok"]
    assert differ.exit_code == 1
    assert "✗ notifications: replicas agree on channels" in differ.stdout
    assert "replica-b: email, webhook" in differ.stdout
    assert "smtp://mail.lab.example:587" in differ.stdout
    assert "pw-in-url" not in differ.stdout and "t0k3n" not in differ.stdout


def _by_name(stdout: str) -> dict[str, dict[str, object]]:
    return {str(line["check"]): line for line in _lines(stdout)}
