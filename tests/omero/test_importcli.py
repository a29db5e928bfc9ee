"""The omero import command line, and verdicts on recorded-format output."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from biomero_importer.omero.importcli import (
    ImportVerdict,
    fetch_jars_argv,
    import_argv,
    import_env,
    log_paths,
    omero_java_jars,
    parse_import_result,
    session_not_joined,
    write_session_store,
)
from biomero_importer.omero.port import Target

from . import omero_output as out
from .conftest import make_settings

UUID = "6f1c1d7e-1111-4222-8333-444455556666"


def test_argv_for_a_dataset_with_every_option(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path,
        omero_backend="blitz",
        omero_host="omero.example",
        omero_port=4064,
        omero_cli="/opt/omero/bin/omero",
        parallel_upload_per_worker=4,
        parallel_filesets_per_worker=3,
        skip_checksum=True,
        skip_thumbnails=True,
        import_depth=6,
    )
    logs = log_paths(settings, UUID)
    argv = import_argv(
        settings,
        Path("/data/a b.tif"),
        Target("Dataset", 51),
        logs=logs,
        exclude_existing=True,
        order_uuid=UUID,
    )
    assert argv == [
        "/opt/omero/bin/omero",
        "import",
        "-s",
        "omero.example",
        "-p",
        "4064",
        "--transfer=ln_s",
        "-d",
        "51",
        "--parallel-upload",
        "4",
        "--parallel-fileset",
        "3",
        "--skip",
        "checksum",
        "--skip",
        "thumbnails",
        "--depth",
        "6",
        "--file",
        str(tmp_path / "logs" / f"cli.{UUID}.logs"),
        "--errs",
        str(tmp_path / "logs" / f"cli.{UUID}.errs"),
        "--output",
        "yaml",
        "--annotation-ns",
        "biomero.import.order",
        "--annotation-text",
        UUID,
        "--exclude=clientpath",
        "/data/a b.tif",
    ]


def test_argv_for_a_screen_with_skip_all_and_no_exclude(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, omero_host="h", skip_all=True, skip_minmax=True)
    argv = import_argv(
        settings,
        Path("/data/plate"),
        Target("Screen", 9),
        logs=log_paths(settings, UUID),
        exclude_existing=False,
        order_uuid=UUID,
    )
    assert argv[argv.index("-r") + 1] == "9"
    assert "-d" not in argv
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--skip"] == ["all"]
    assert "--exclude=clientpath" not in argv


def test_relative_paths_are_refused(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, omero_host="h")
    with pytest.raises(ValueError, match="absolute"):
        import_argv(
            settings,
            Path("rel.tif"),
            Target("Dataset", 1),
            logs=log_paths(settings, UUID),
            exclude_existing=False,
            order_uuid=UUID,
        )


@pytest.mark.unit
def test_the_session_key_is_in_a_private_session_store_not_on_the_command_line(
    tmp_path: Path,
) -> None:
    settings = make_settings(tmp_path, omero_host="omero.example:4064/x", omero_port=4064)
    argv = import_argv(
        settings,
        Path("/data/a.tif"),
        Target("Dataset", 1),
        logs=log_paths(settings, UUID),
        exclude_existing=False,
        order_uuid=UUID,
    )
    key = "0f0e0d0c-aaaa-bbbb-cccc-123456789abc"
    assert "-k" not in argv and key not in " ".join(argv)
    store = tmp_path / "sessions"
    store.mkdir(mode=0o700)
    write_session_store(store, settings, "alice", key)
    host = store / "omero.example%3A4064%2Fx"
    assert (store / "._LASTHOST_").read_text() == "omero.example:4064/x"
    assert (store / "._LASTPORT_").read_text() == "4064"
    assert (host / "._LASTUSER_").read_text() == "alice"
    assert (host / "alice" / "._LASTSESS_").read_text() == key
    assert (host / "alice" / key).read_text().splitlines() == [
        "omero.host=omero.example:4064/x",
        "omero.port=4064",
        "omero.user=alice",
        f"omero.sess={key}",
    ]
    files = [p for p in store.rglob("*") if p.is_file()]
    assert len(files) == 5 and {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o600}


@pytest.mark.unit
@pytest.mark.parametrize("user", ["", "a/b", "..", ".hidden"])
def test_a_user_name_that_is_no_folder_name_is_refused(tmp_path: Path, user: str) -> None:
    settings = make_settings(tmp_path, omero_host="h")
    with pytest.raises(ValueError, match="cannot be a session folder"):
        write_session_store(tmp_path, settings, user, "k")


def test_fetch_jars_is_its_own_command(tmp_path: Path) -> None:
    assert fetch_jars_argv(make_settings(tmp_path)) is None
    settings = make_settings(tmp_path, fetch_jars="5.9.2", omero_cli="python -m omero")
    assert fetch_jars_argv(settings) == ["python", "-m", "omero", "import", "--fetch-jars", "5.9.2"]


def test_environment_has_its_own_session_dir_and_java_opts(tmp_path: Path) -> None:
    base = {"PATH": "/bin", "OMERO_SESSIONDIR": "/shared"}
    env = import_env(make_settings(tmp_path), tmp_path / "s1", base)
    assert env == {"PATH": "/bin", "OMERO_SESSIONDIR": str(tmp_path / "s1")}
    env = import_env(make_settings(tmp_path, java_opts="-Xmx8g"), tmp_path / "s2", base)
    assert env["JAVA_OPTS"] == "-Xmx8g"


def _judge(run: out.Run, name: str = "a.tif") -> ImportVerdict:
    return parse_import_result(run.exit_code, run.stdout, run.stderr, name=name)


@pytest.mark.unit
def test_an_image_import_without_plates_is_a_success() -> None:
    """Issue 19: the real summary of an image import has no ``, N plates`` part
    (``LoggingImportMonitor.report()`` prints it only when plates were created); before, the
    verdict said "no import summary found" and every Dataset order failed."""
    run = out.imported([{"Image": [351, 352]}], first_fileset=301)
    assert "1 fileset created, 2 images imported, 0 errors in 00:00:03.210" in run.stderr
    verdict = _judge(run, "a.lif")
    assert verdict.ok, verdict.reason
    assert (verdict.images, verdict.filesets, verdict.errors) == ([351, 352], [301], 0)
    assert verdict.fileset_of == {351: 301, 352: 301}


@pytest.mark.unit
def test_several_filesets_and_a_plate_are_all_read() -> None:
    run = out.imported([{"Image": [10]}, {"Image": [11, 12]}, {"Plate": [5], "Image": [13]}])
    assert "3 filesets, 1 plate created, 4 images imported" in run.stderr
    verdict = _judge(run, "folder")
    assert verdict.ok, verdict.reason
    assert verdict.images == [10, 11, 12, 13]
    assert verdict.plates == [5]
    assert verdict.filesets == [1, 2, 3]
    assert verdict.fileset_of[12] == 2 and verdict.fileset_of[5] == 3


@pytest.mark.unit
def test_everything_excluded_is_nothing_imported_not_success() -> None:
    verdict = _judge(out.excluded())
    assert not verdict.ok
    assert verdict.nothing_imported
    assert verdict.reason == "OMERO import of a.tif created nothing"


@pytest.mark.unit
def test_a_fileset_without_ids_is_not_success() -> None:
    run = out.imported([{"Image": [3]}, {}])
    verdict = _judge(run, "f")
    assert not verdict.ok
    assert "fileset 2 reported no Image or Plate ids" in verdict.reason


@pytest.mark.unit
def test_a_partial_import_fails_naming_the_file_but_reports_what_was_committed() -> None:
    """Without -c the importer stops after the first failed fileset (exit 2); the filesets
    before it are committed and printed."""
    run = out.partial([{"Image": [3]}, {"Image": [4]}], failed="/data/run/bad.tif")
    verdict = _judge(run, "run")
    assert not verdict.ok
    assert verdict.reason.startswith("OMERO import of run failed (exit 2): ")
    assert "FILE_EXCEPTION: /data/run/bad.tif" in verdict.reason
    assert verdict.errors == 1


@pytest.mark.unit
def test_no_imports_due_to_errors_exits_zero_and_fails() -> None:
    verdict = _judge(out.no_imports_due_to_errors("/data/b.czi"), "b.czi")
    assert not verdict.ok and not verdict.nothing_imported
    assert verdict.reason.startswith("OMERO import of b.czi failed with errors: ")
    assert verdict.reason.endswith("FILE_EXCEPTION: /data/b.czi")


@pytest.mark.unit
def test_ids_without_summary_are_not_trusted() -> None:
    run = out.imported([{"Image": [3]}])
    verdict = parse_import_result(0, run.stdout, "", name="c.tif")
    assert not verdict.ok and "no import summary" in verdict.reason


@pytest.mark.unit
def test_unreadable_yaml() -> None:
    run = out.imported([{"Image": [1, 2]}])
    verdict = parse_import_result(0, "- Fileset: [1\n", run.stderr, name="d.tif")
    assert not verdict.ok and "unreadable YAML" in verdict.reason


@pytest.mark.unit
def test_ids_output_instead_of_yaml_is_refused() -> None:
    # ``outputImageIds``, the default ``--output``: "Image:1,2"
    run = out.imported([{"Image": [1, 2]}])
    verdict = parse_import_result(0, "Image:1,2\n", run.stderr, name="d.tif")
    assert not verdict.ok and "unexpected YAML item" in verdict.reason


@pytest.mark.unit
@pytest.mark.parametrize(
    ("run", "expected"),
    [
        (out.no_imports_found(), "OMERO import of x.tif failed: no importable files found"),
        (out.Run(1, "", "usage: omero import\n"), "refused (exit 1)"),
        (out.wrapper_exit(103), "no OMERO.java jars"),
        (out.wrapper_exit(105), "PyYAML missing"),
        (out.wrapper_exit(108), "OMERO.java.zip was malformed"),
        (out.cleanup_failed(), "cleanup of the transferred files failed"),
        (out.Run(-9), "was killed (signal 9)"),
    ],
)
def test_nonzero_exit_codes(run: out.Run, expected: str) -> None:
    verdict = _judge(run, "x.tif")
    assert not verdict.ok
    assert expected in verdict.reason
    assert "x.tif" in verdict.reason
    assert verdict.images == []


@pytest.mark.unit
def test_encrypted_imports_and_the_files_a_re_run_still_imports(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, omero_host="h", omero_import_encrypted=True)
    files = [Path("/data/run/b.tif"), Path("/data/run/sub/c.tif")]
    argv = import_argv(
        settings,
        files,
        Target("Dataset", 3),
        logs=log_paths(settings, UUID),
        exclude_existing=False,
        order_uuid=UUID,
    )
    assert argv[-3:] == ["--encrypted=true", "/data/run/b.tif", "/data/run/sub/c.tif"]
    plain = import_argv(
        make_settings(tmp_path, omero_host="h"),
        Path("/data/a.tif"),
        Target("Dataset", 3),
        logs=log_paths(settings, UUID),
        exclude_existing=False,
        order_uuid=UUID,
    )
    assert not any(a.startswith("--encrypted") for a in plain)
    with pytest.raises(ValueError, match="at least one path"):
        import_argv(
            settings,
            [],
            Target("Dataset", 3),
            logs=log_paths(settings, UUID),
            exclude_existing=False,
            order_uuid=UUID,
        )


@pytest.mark.unit
def test_where_omero_import_would_find_its_jars(tmp_path: Path) -> None:
    """omero-py import.py: $OMERODIR/lib/client when it exists, else what --fetch-jars left
    in the user cache (OMERO.java.txt names the folder), else nothing: it would download."""
    home = tmp_path / "home"
    assert omero_java_jars({"HOME": str(home)}) is None
    cache = home / ".cache" / "OMERO.py" / "5" / "jars"
    (cache / "OMERO.java-5.9.2-ice36" / "libs").mkdir(parents=True)
    (cache / "OMERO.java.txt").write_text("OMERO.java-5.9.2-ice36\n")
    assert omero_java_jars({"HOME": str(home)}) is None  # named, but no jar in it
    (cache / "OMERO.java-5.9.2-ice36" / "libs" / "omero-blitz.jar").write_bytes(b"")
    assert omero_java_jars({"HOME": str(home)}) == cache / "OMERO.java-5.9.2-ice36" / "libs"
    userdir = tmp_path / "userdir"
    assert omero_java_jars({"HOME": str(home), "OMERO_USERDIR": str(userdir)}) is None
    omerodir = tmp_path / "omero"
    (omerodir / "lib" / "client").mkdir(parents=True)
    # an empty lib/client is what omero-py uses, and dies on (exit 103): no jars
    assert omero_java_jars({"HOME": str(home), "OMERODIR": str(omerodir)}) is None
    (omerodir / "lib" / "client" / "omero-blitz.jar").write_bytes(b"")
    assert omero_java_jars({"OMERODIR": str(omerodir)}) == omerodir / "lib" / "client"


@pytest.mark.unit
def test_offline_jars_and_fetch_jars_exclude_each_other(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="omero_jars_offline"):
        make_settings(tmp_path, omero_jars_offline=True, fetch_jars="5.9.2")


@pytest.mark.unit
@pytest.mark.parametrize(
    ("run", "expected"),
    [
        (out.session_not_joined("alice", "h", 4064), True),
        (out.Run(52, "", "stdin is not a terminal: cannot request username\n"), True),
        (out.imported([{"Image": [1]}]), False),
        (out.Run(1), False),
    ],
)
def test_a_session_the_cli_could_not_join_is_recognised(run: out.Run, expected: bool) -> None:
    assert session_not_joined(run.exit_code, run.stdout, run.stderr) is expected
