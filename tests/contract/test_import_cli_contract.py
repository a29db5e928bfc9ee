"""The ``omero import`` half of the blitz backend against the real omero-py (issue 19): the
argv of a re-run and of an encrypted import as omero-py's parser reads it, and the OMERO.java
jars a worker needs before its first import (a stand-in ``omero`` plays the CLI)."""

from __future__ import annotations

import socket
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("omero")

import omero.cli

from biomero_importer.omero.blitz import BlitzBackend, BlitzSession
from biomero_importer.omero.importcli import import_argv, log_paths
from biomero_importer.omero.importrun import SessionState
from biomero_importer.omero.port import ImportedObject, ImportFailed, Target
from biomero_importer.settings import Settings
from tests.omero import omero_output as out

UUID = "9d7c7c1e-2a2b-4c4d-8e8f-000000000019"


def _settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "omero_backend": "blitz",
        "omero_host": "127.0.0.1",
        "omero_user": "root",
        "omero_password": "not-a-real-password",
        "order_log_dir": tmp_path / "logs",
        "embedded_db_dir": tmp_path / "pg",
        "log_file_path": None,
    }
    values.update(overrides)
    return Settings(**values)


def test_a_re_run_s_file_list_and_encryption_are_read_by_the_real_parser(tmp_path: Path) -> None:
    settings = _settings(tmp_path, omero_import_encrypted=True)
    files = [tmp_path / "run" / "b.tif", tmp_path / "run" / "sub dir" / "c.tif"]
    argv = import_argv(
        settings,
        files,
        Target("Dataset", 5),
        logs=log_paths(settings, UUID),
        exclude_existing=False,
        order_uuid=UUID,
    )
    cli = omero.cli.CLI()
    cli.loadplugins()
    args = cli.parser.parse_args(argv[1:])
    assert args.path == [str(f) for f in files]
    assert args.encrypted == "true"


def _session(backend: BlitzBackend) -> BlitzSession:
    # run_cli and the jars need no connection: none is opened
    conn: Any = None
    return BlitzSession(backend, conn, UUID, "alice", "lab")


def _stand_in(tmp_path: Path) -> tuple[str, Path]:
    program = tmp_path / "omero.py"
    program.write_text(out.fake_omero_script([out.Run(0)]))
    return f"{sys.executable} {program}", program.with_suffix(".argv")


@pytest.fixture
def no_jars(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A host where omero import would find no OMERO.java jars."""
    monkeypatch.delenv("OMERODIR", raising=False)
    monkeypatch.delenv("OMERO_USERDIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


def test_offline_without_jars_refuses_before_any_download(no_jars: Path) -> None:
    cli, calls = _stand_in(no_jars)
    backend = BlitzBackend(_settings(no_jars, omero_cli=cli, omero_jars_offline=True))
    with pytest.raises(ImportFailed, match=r"omero_jars_offline forbids downloading"):
        backend.ensure_jars(_session(backend))
    assert not calls.exists()


def test_missing_jars_are_fetched_once_by_concurrent_workers(no_jars: Path) -> None:
    """Before: each worker's first ``omero import`` downloaded OMERO.java itself, unlocked."""
    cli, calls = _stand_in(no_jars)
    backend = BlitzBackend(_settings(no_jars, omero_cli=cli))
    threads = [
        threading.Thread(target=backend.ensure_jars, args=(_session(backend),)) for _ in "ab"
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls.read_text().splitlines() == ['["import", "--fetch-jars", "latest"]']


def test_jars_in_omerodir_are_used_as_they_are(
    no_jars: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = no_jars / "omero" / "lib" / "client"
    client.mkdir(parents=True)
    (client / "omero-blitz.jar").write_bytes(b"")
    monkeypatch.setenv("OMERODIR", str(no_jars / "omero"))
    cli, calls = _stand_in(no_jars)
    backend = BlitzBackend(_settings(no_jars, omero_cli=cli, omero_jars_offline=True))
    backend.ensure_jars(_session(backend))
    assert not calls.exists()


def test_a_re_run_with_nothing_missing_runs_no_import(no_jars: Path) -> None:
    (no_jars / "a.tif").write_bytes(b"x")
    cli, calls = _stand_in(no_jars)
    backend = BlitzBackend(_settings(no_jars, omero_cli=cli))
    done = ImportedObject("Image", 3, "a.tif", str(no_jars / "a.tif"))
    session = _session(backend)
    made = session.import_path(
        no_jars / "a.tif",
        Target("Dataset", 5),
        order_uuid=UUID,
        exclude_existing=False,
        already=[done],
    )
    assert made == [] and not calls.exists()


def test_a_session_the_cli_could_not_join_on_a_server_that_is_down_is_a_wait(
    tmp_path: Path,
) -> None:
    """The CLI reports every failed join alike ("Previous session expired", exit 564): the
    backend asks the server itself, and a closed port means the server is down."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    backend = BlitzBackend(_settings(tmp_path, omero_port=port, omero_retries=0))
    try:
        assert _session(backend)._rejoin() is SessionState.UNREACHABLE
    finally:
        backend.close()
