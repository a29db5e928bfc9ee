"""Every settings rule: sources, env names, booleans, unknown keys, URLs and secrets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from biomero_importer.settings import (
    LEGACY_ENV,
    Settings,
    SettingsError,
    SimulatorUser,
    load_settings,
    mask_db_url,
    normalise_db_url,
)

SECRET = "S3cr3t-P@ss-xyz"


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "settings.yml"
    path.write_text(text)
    return path


def test_defaults_without_any_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    loaded = load_settings(None, environ={})
    settings = loaded.settings
    assert loaded.source is None
    assert settings.ingest_tracking_db is None and settings.uses_embedded_db
    assert settings.max_workers == 4
    assert settings.effective_import_roots == [Path("/data")]
    assert settings.omero_backend == "blitz"
    assert settings.annotation_namespace == "biomero.import"


def test_upstream_settings_file_keeps_its_meaning(tmp_path: Path) -> None:
    config = _yaml(
        tmp_path,
        """
ingest_tracking_db: "postgresql://user:pw@db:5432/biomero"
base_dir: /srv/data
max_workers: 6
log_level: DEBUG
log_file_path: logs/app.logs
parallel_upload_per_worker: 3
parallel_filesets_per_worker: 5
skip_all: false
skip_checksum: true
skip_minmax: false
skip_thumbnails: true
skip_upgrade: false
ttl_for_user_conn: 7200000
use_register_zarr: true
annotation_namespace: "facility.import"
""",
    )
    settings = load_settings(config, environ={}).settings
    assert settings.base_dir == Path("/srv/data")
    assert settings.effective_import_roots == [Path("/srv/data")]
    assert settings.max_workers == 6 and settings.log_level == "DEBUG"
    assert settings.parallel_upload_per_worker == 3
    assert settings.parallel_filesets_per_worker == 5
    assert settings.skip_flags() == ["checksum", "thumbnails"]
    assert settings.ttl_for_user_conn == 7_200_000
    assert settings.use_register_zarr is True
    assert settings.annotation_namespace == "facility.import"


def test_skip_all_wins(tmp_path: Path) -> None:
    config = _yaml(tmp_path, "skip_all: true\nskip_checksum: true\n")
    assert load_settings(config, environ={}).settings.skip_flags() == ["all"]


def test_legacy_keys_are_ignored_with_one_notice_each(tmp_path: Path) -> None:
    config = _yaml(
        tmp_path,
        "group_list: groups.yml\ndata_dir_name: data\nupload_orders_dir_name: orders\n"
        "failed_uploads_directory_name: failed\nsample_image: /x.tif\nsample_user: bob\n"
        "preprocessing: true\nmax_workers: 2\n",
    )
    loaded = load_settings(config, environ={})
    assert loaded.settings.max_workers == 2
    assert len(loaded.notices) == 7
    assert all("no longer used" in notice for notice in loaded.notices)


def test_unknown_key_names_it_and_suggests(tmp_path: Path) -> None:
    config = _yaml(tmp_path, "max_wokers: 3\n")
    with pytest.raises(SettingsError) as err:
        load_settings(config, environ={})
    assert (
        str(err.value) == f"unknown setting 'max_wokers' in {config} (did you mean 'max_workers'?)"
    )


def test_unknown_environment_variable_is_refused() -> None:
    expected = r"BIOMERO_IMPORTER_POLL_INTERVALL .*did you mean .poll_interval."
    with pytest.raises(SettingsError, match=expected):
        load_settings(None, environ={"BIOMERO_IMPORTER_POLL_INTERVALL": "1"})


def test_the_test_database_variable_does_not_stop_the_cli() -> None:
    """Before: exporting the suite's BIOMERO_IMPORTER_TEST_DATABASE_URL made every command
    exit with "unknown environment variable"."""
    env = {"BIOMERO_IMPORTER_TEST_DATABASE_URL": "postgresql://u@h/db"}
    assert load_settings(None, environ=env).settings.max_workers == 4


def test_invalid_value_names_the_key_and_source(tmp_path: Path) -> None:
    config = _yaml(tmp_path, "max_workers: lots\n")
    with pytest.raises(SettingsError, match=r"invalid setting 'max_workers' in .*settings.yml"):
        load_settings(config, environ={})
    with pytest.raises(SettingsError, match="invalid setting OMERO_PORT"):
        load_settings(None, environ={"OMERO_PORT": "not-a-port"})


@pytest.mark.parametrize(
    ("env_name", "key", "raw", "expected"),
    [
        (
            "INGEST_TRACKING_DB_URL",
            "ingest_tracking_db",
            "postgres://u:p@h/d",
            "postgresql://u:p@h/d",
        ),
        ("OMERO_HOST", "omero_host", "omeroserver", "omeroserver"),
        ("OMERO_USER", "omero_user", "root", "root"),
        ("OMERO_PORT", "omero_port", "4064", 4064),
        ("PODMAN_USERNS_MODE", "podman_userns_mode", "keep-id", "keep-id"),
        ("USE_REGISTER_ZARR", "use_register_zarr", "false", False),
        ("USE_REGISTER_ZARR", "use_register_zarr", "true", True),
        ("ADI_RUN_MIGRATIONS", "run_migrations", "0", False),
        ("ADI_RUN_MIGRATIONS", "run_migrations", "1", True),
        ("PROCESSED_DATA_FOLDER", "processed_folder_name", ".converted", ".converted"),
    ],
)
def test_legacy_environment_names(env_name: str, key: str, raw: str, expected: object) -> None:
    assert LEGACY_ENV[env_name] == key
    settings = load_settings(None, environ={env_name: raw}).settings
    assert getattr(settings, key) == expected


def test_omero_password_from_legacy_env_stays_secret() -> None:
    settings = load_settings(None, environ={"OMERO_PASSWORD": SECRET}).settings
    assert settings.omero_password is not None
    assert settings.omero_password.get_secret_value() == SECRET
    assert SECRET not in repr(settings) and SECRET not in str(settings.model_dump())


@pytest.mark.parametrize("key", sorted(Settings.model_fields))
def test_every_key_has_a_prefixed_environment_name(key: str) -> None:
    """Each key can be set as BIOMERO_IMPORTER_<KEY>; a value that parses for it is accepted."""
    samples: dict[str, str] = {
        "ingest_tracking_db": "postgresql://u@h/d",
        "omero_backend": "simulator",
        "log_level": "DEBUG",
        "log_format": "json",
        "notify_channel": "chan",
        "omero_simulator_users": '{"alice": ["lab"]}',
        "omero_simulator_fail_pattern": "fail",
        "omero_simulator_failure": "orphan_fileset",
        "omero_simulator_exclusion": "target",
        "processed_folder_name": ".p",
        "omero_password": "pw",
        "metrics_port": "9464",
        "ttl_for_user_conn": "120000",
        "notify_webhook_url": "https://hooks.example/biomero",
        "notify_webhook_secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    }
    # keys that are only valid together with another one
    companions = {"notify_email_host": {"BIOMERO_IMPORTER_NOTIFY_EMAIL_SENDER": "i@lab.example"}}
    field = Settings.model_fields[key]
    annotation = str(field.annotation)
    if key in samples:
        raw = samples[key]
    elif "bool" in annotation:
        raw = "false" if field.default is True else "true"
    elif "list" in annotation:
        raw = "/a,/b"
    elif "int" in annotation:
        raw = "4096" if "bytes" in key else "7"
    elif "float" in annotation:
        raw = "7.5"
    else:
        raw = "/x/y"
    environ = {f"BIOMERO_IMPORTER_{key.upper()}": raw, **companions.get(key, {})}
    settings = load_settings(None, environ=environ).settings
    assert getattr(settings, key) != field.get_default(call_default_factory=True) or key in {
        "worker_id"
    }


def test_booleans_parse_as_booleans_in_yaml_and_env(tmp_path: Path) -> None:
    config = _yaml(tmp_path, 'use_register_zarr: "false"\nskip_all: "yes"\n')
    settings = load_settings(config, environ={}).settings
    assert settings.use_register_zarr is False and settings.skip_all is True
    env = {"BIOMERO_IMPORTER_SKIP_MINMAX": "False", "BIOMERO_IMPORTER_RUN_MIGRATIONS": "off"}
    settings = load_settings(None, environ=env).settings
    assert settings.skip_minmax is False and settings.run_migrations is False


def test_environment_wins_over_file_and_prefixed_wins_over_legacy(tmp_path: Path) -> None:
    config = _yaml(tmp_path, "max_workers: 2\nomero_host: from-file\n")
    env = {
        "BIOMERO_IMPORTER_MAX_WORKERS": "9",
        "OMERO_HOST": "legacy",
        "BIOMERO_IMPORTER_OMERO_HOST": "prefixed",
    }
    settings = load_settings(config, environ=env).settings
    assert settings.max_workers == 9 and settings.omero_host == "prefixed"


def test_empty_environment_values_count_as_unset() -> None:
    settings = load_settings(None, environ={"ADI_RUN_MIGRATIONS": "", "OMERO_PORT": " "}).settings
    assert settings.run_migrations is True and settings.omero_port == 4064


def test_config_path_from_environment(tmp_path: Path) -> None:
    config = _yaml(tmp_path, "max_workers: 11\n")
    loaded = load_settings(None, environ={"BIOMERO_IMPORTER_CONFIG": str(config)})
    assert loaded.source == config and loaded.settings.max_workers == 11
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(None, environ={"BIOMERO_IMPORTER_CONFIG": str(tmp_path / "nope.yml")})


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:pw@h:5432/db",
        "postgres://u:pw@h:5432/db",
        "postgresql+psycopg2://u:pw@h:5432/db",
        "postgresql+asyncpg://u:pw@h:5432/db",
    ],
)
def test_database_url_schemes_are_normalised(url: str) -> None:
    assert normalise_db_url(url) == "postgresql://u:pw@h:5432/db"


def test_other_url_schemes_are_refused() -> None:
    with pytest.raises(SettingsError, match="unsupported database URL scheme 'mysql'"):
        load_settings(None, environ={"INGEST_TRACKING_DB_URL": "mysql://u:p@h/d"})


def test_database_url_is_masked_and_never_in_errors() -> None:
    assert mask_db_url(f"postgresql://user:{SECRET}@db:5432/x") == "postgresql://user:***@db:5432/x"
    assert mask_db_url("postgresql://user@db/x") == "postgresql://user@db/x"
    settings = Settings(ingest_tracking_db=f"postgres://user:{SECRET}@db/x")
    assert SECRET not in settings.masked_db_url()
    with pytest.raises(SettingsError) as err:
        load_settings(None, environ={"OMERO_PASSWORD": SECRET, "OMERO_PORT": SECRET})
    assert SECRET not in str(err.value)


def test_relative_import_roots_become_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    settings = Settings(import_roots=[Path("data")])
    assert settings.effective_import_roots == [tmp_path / "data"]


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "biomero_importer", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


def test_cli_bad_setting_is_one_line_and_exit_2(tmp_path: Path) -> None:
    config = _yaml(tmp_path, "max_wokers: 3\n")
    result = _cli("migrate", "--config", str(config))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f"error: unknown setting 'max_wokers' in {config} (did you mean 'max_workers'?)"
    ]


def test_cli_blitz_without_omero_settings_refuses_to_run(tmp_path: Path, migrated_url: str) -> None:
    config = _yaml(tmp_path, f"ingest_tracking_db: '{migrated_url}'\nomero_backend: blitz\n")
    result = _cli("run", "--config", str(config), env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert "OMERO" in result.stderr


def test_notification_settings_are_checked_without_echoing_them() -> None:
    with pytest.raises(SettingsError, match="notify_email_sender must be set"):
        load_settings(None, environ={"BIOMERO_IMPORTER_NOTIFY_EMAIL_HOST": "smtp.lab.example"})
    with pytest.raises(SettingsError) as caught:
        load_settings(None, environ={"BIOMERO_IMPORTER_NOTIFY_WEBHOOK_URL": "ftp://tok3n@x/y"})
    assert "http:// or https://" in str(caught.value) and "tok3n" not in str(caught.value)
    env = {
        "BIOMERO_IMPORTER_NOTIFY_WEBHOOK_URL": " ",
        "BIOMERO_IMPORTER_NOTIFY_EMAIL_PASSWORD": "s3cret",
        "BIOMERO_IMPORTER_NOTIFY_WEBHOOK_SECRET": "whsec_aG00Yy1zZWNyZXQtMTYtYnl0ZXM=",
    }
    settings = load_settings(None, environ=env).settings
    assert settings.notify_webhook_url is None
    assert "s3cret" not in repr(settings) and "aG00Yy" not in repr(settings)
    # a secret not in the Standard Webhooks form is refused without being echoed
    with pytest.raises(SettingsError, match="whsec_") as caught:
        load_settings(None, environ={**env, "BIOMERO_IMPORTER_NOTIFY_WEBHOOK_SECRET": "hm4c"})
    assert "hm4c" not in str(caught.value)
    with pytest.raises(SettingsError, match="https://") as caught:
        load_settings(
            None, environ={"BIOMERO_IMPORTER_NOTIFY_WEBHOOK_URL": "http://u:pw@hooks.example/t0k"}
        )
    assert "pw" not in str(caught.value) and "t0k" not in str(caught.value)


def test_a_simulated_user_may_carry_an_email_address() -> None:
    users = '{"alice": ["lab"], "bob": {"groups": ["lab", "x"], "email": "bob@lab.example"}}'
    settings = load_settings(
        None, environ={"BIOMERO_IMPORTER_OMERO_SIMULATOR_USERS": users}
    ).settings
    assert settings.omero_simulator_users is not None
    assert settings.omero_simulator_users["alice"] == ["lab"]
    bob = settings.omero_simulator_users["bob"]
    assert isinstance(bob, SimulatorUser) and bob.email == "bob@lab.example"
    assert bob.groups == ["lab", "x"]
    with pytest.raises(SettingsError, match="OMERO_SIMULATOR_USERS"):
        load_settings(
            None,
            environ={"BIOMERO_IMPORTER_OMERO_SIMULATOR_USERS": '{"c": {"group": ["lab"]}}'},
        )
