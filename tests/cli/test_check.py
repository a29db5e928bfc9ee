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
