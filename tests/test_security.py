"""Security checks: no order escapes the import roots, runs an image it may not, or injects a
container flag; no secret reaches a log, a command's output or an error; order logs are private.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from biomero_importer.model import Order, PreprocessingSpec
from biomero_importer.omero.port import Target
from biomero_importer.preprocessing import PreprocessingError, plan_jobs
from tests.conftest import PgServer
from tests.reliability.harness import Replica, free_port
from tests.support import (
    insert_order,
    make_settings,
    make_tiffs,
    running_service,
    wait_for_stage,
    write_config,
)

# --- files outside the import roots ---------------------------------------------------------


def _imported_paths(simulator_dir: Path) -> list[Path]:
    """Every file the simulated OMERO holds, symlinks resolved."""
    db_path = simulator_dir / "omero.sqlite"
    if not db_path.exists():
        return []
    db = sqlite3.connect(db_path)
    try:
        rows = db.execute("SELECT client_path FROM objects").fetchall()
    finally:
        db.close()
    return [Path(row[0]).resolve() for row in rows]


def _linked_dir(root: Path, outside: Path) -> Path:
    link = root / "shared"
    link.symlink_to(outside, target_is_directory=True)
    return link


def _folder_with_link_out(root: Path, outside: Path) -> Path:
    folder = root / "plate"
    make_tiffs(folder, 1, prefix="well")
    (folder / "evil.tif").symlink_to(outside / "secret0.tif")
    return folder


def _folder_linking_to_a_folder_with_link_out(root: Path, outside: Path) -> Path:
    """The link out sits in a folder inside the roots that the order reaches by a symlink."""
    _folder_with_link_out(root, outside)
    folder = root / "order"
    folder.mkdir()
    (folder / "alias").symlink_to(root / "plate", target_is_directory=True)
    return folder


ESCAPES: dict[str, Any] = {
    # a file reached through a symlinked folder inside the root
    "file-in-symlinked-dir": lambda r, o: [f"{_linked_dir(r, o)}/secret0.tif"],
    # the symlinked folder itself (a folder import would take everything in it)
    "symlinked-dir": lambda r, o: [str(_linked_dir(r, o))],
    # trailing '/..': the root's parent, which holds the outside folder
    "trailing-dotdot": lambda r, o: [f"{r}/.."],
    # lexically the root again, physically the parent of the symlink's target
    "dotdot-after-symlinked-dir": lambda r, o: [f"{_linked_dir(r, o)}/.."],
    # a folder inside the root, one of whose files links outside
    "folder-holding-link-out": lambda r, o: [str(_folder_with_link_out(r, o))],
    # ... or inside a folder inside the roots that the ordered folder links to
    "folder-linking-to-a-folder-holding-link-out": lambda r, o: [
        str(_folder_linking_to_a_folder_with_link_out(r, o))
    ],
}


@pytest.mark.parametrize("name", list(ESCAPES))
async def test_no_order_reads_a_file_outside_the_import_roots(
    name: str, migrated_url: str, tmp_path: Path, import_root: Path
) -> None:
    outside = tmp_path / "outside"
    make_tiffs(outside, 1, prefix="secret")
    files = ESCAPES[name](import_root, outside)
    settings = make_settings(tmp_path, migrated_url, [import_root], poll_interval=0.5)
    async with running_service(settings, migrated_url):
        order = await insert_order(migrated_url, files)
        row = await wait_for_stage(migrated_url, order)
    leaked = [p for p in _imported_paths(settings.simulator_dir) if outside in p.parents]
    assert leaked == []
    assert row["stage"] == "Import Failed"
    assert "outside the import roots" in row["description"]


async def test_a_folder_with_links_inside_the_roots_is_imported(
    migrated_url: str, tmp_path: Path, import_root: Path
) -> None:
    """Links that stay inside the roots, even a cycle, do not refuse a folder order."""
    folder = import_root / "plate"
    make_tiffs(folder, 2, prefix="well")
    (folder / "again.tif").symlink_to(folder / "well0.tif")
    (folder / "loop").symlink_to(folder, target_is_directory=True)
    (folder / "sibling").symlink_to(import_root, target_is_directory=True)
    settings = make_settings(tmp_path, migrated_url, [import_root], poll_interval=0.5)
    async with running_service(settings, migrated_url):
        order = await insert_order(migrated_url, [folder])
        row = await wait_for_stage(migrated_url, order)
    assert (row["stage"], row["description"]) == ("Import Completed", None)


# --- container images and flags ---------------------------------------------------------------

_FAKE_RUNTIME = """#!{python}
import json, sys
with open({record!r}, "a") as out:
    out.write(json.dumps(sys.argv[1:]) + "\\n")
sys.stderr.write("fake runtime: nothing runs here\\n")
sys.exit(1)
"""


def _fake_runtime(folder: Path) -> tuple[Path, Path]:
    """A container runtime that only records each command line it is given."""
    record = folder / "runtime-calls.jsonl"
    script = folder / "fake-podman"
    script.write_text(_FAKE_RUNTIME.format(python=sys.executable, record=str(record)))
    script.chmod(0o700)
    return script, record


def _calls(record: Path) -> list[list[str]]:
    if not record.exists():
        return []
    return [json.loads(line) for line in record.read_text().splitlines()]


def _order(files: list[Path], container: str, extra: dict[str, Any]) -> Order:
    return Order(
        uuid="0f0e0d0c-0000-4000-8000-000000000001",
        group="Demo",
        user="researcher",
        target=Target(type="Dataset", id=1),
        files=files,
        file_names=[f.name for f in files],
        preprocessing=PreprocessingSpec(
            id=1,
            container=container,
            input_file="{Files}",
            output_folder="/data",
            alt_output_folder="/out",
            extra_params=extra,
        ),
        attempt=1,
        run=1,
    )


HOSTILE_VALUES = [
    "--privileged",
    "-v /:/host",
    "-v",
    "/:/host",
    "--volume=/:/host",
    "--rm; rm -rf /",
    "x --privileged",
    "$(reboot)",
    "`id`",
    "{Files} --network=host",
    "--inputfile=/etc/shadow",
    "\n--privileged",
]


@pytest.mark.parametrize("value", HOSTILE_VALUES)
def test_extra_param_values_never_become_runtime_flags(tmp_path: Path, value: str) -> None:
    files = make_tiffs(tmp_path / "data", 2)
    settings = make_settings(tmp_path, "postgresql://x@/y", [tmp_path / "data"])
    baseline = plan_jobs(_order(files, "localhost/conv", {"mode": "fast"}), settings)
    try:
        jobs = plan_jobs(_order(files, "localhost/conv", {"mode": value}), settings)
    except PreprocessingError as exc:
        assert "mode" in exc.reason
        return
    for job, plain in zip(jobs, baseline, strict=True):
        at = job.argv.index(job.image)
        # everything up to the image is what the service built, whatever the order said
        assert job.argv[: at + 1] == plain.argv[: at + 1]
        converter = job.argv[at + 1 :]
        position = converter.index("--mode")
        # the value is one argument of the converter, right after its own flag
        assert value.replace("{Files}", "/data/" + job.source.name) == converter[position + 1]
        assert len(converter) == len(plain.argv) - at - 1


@pytest.mark.parametrize(
    "image",
    [
        "docker.io/library/alpine",
        "alpine",
        "evil.example.com/localhost/conv",
        "localhost/conv --privileged",
        "localhost/../conv",
        "-v/:/host",
    ],
)
def test_images_outside_the_allowlist_are_refused_before_anything_runs(
    tmp_path: Path, image: str
) -> None:
    files = make_tiffs(tmp_path / "data", 1)
    settings = make_settings(tmp_path, "postgresql://x@/y", [tmp_path / "data"])
    with pytest.raises(PreprocessingError) as caught:
        plan_jobs(_order(files, image, {}), settings)
    assert "not allowed" in caught.value.reason or "not a valid image" in caught.value.reason


async def test_the_runtime_sees_only_the_command_the_service_built(
    migrated_url: str, tmp_path: Path, import_root: Path
) -> None:
    """Through the running service: a refused image never reaches the runtime; a hostile
    value reaches it as one converter argument after the image; the order log is private."""
    runtime, record = _fake_runtime(tmp_path)
    files = make_tiffs(import_root, 1)
    settings = make_settings(
        tmp_path, migrated_url, [import_root], poll_interval=0.5, container_runtime=str(runtime)
    )
    async with running_service(settings, migrated_url):
        refused = await insert_order(
            migrated_url, files, preprocessing={"container": "docker.io/evil/miner"}
        )
        refused_row = await wait_for_stage(migrated_url, refused)
        hostile = await insert_order(
            migrated_url,
            files,
            preprocessing={
                "container": "localhost/conv",
                "extra_params": {"mode": "x --privileged -v /:/host"},
            },
        )
        hostile_row = await wait_for_stage(migrated_url, hostile)
    assert refused_row["stage"] == "Import Failed"
    assert "not allowed" in refused_row["description"]
    assert hostile_row["stage"] == "Import Failed"  # the fake runtime converts nothing

    calls = _calls(record)
    assert not [c for c in calls if any("evil" in arg for arg in c)]
    runs = [c for c in calls if c and c[0] == "run"]
    assert len(runs) == 1
    run = runs[0]
    at = run.index("localhost/conv")
    before = run[:at]
    assert before == [
        "run",
        "--rm",
        "--name",
        f"biomero-{hostile}-1",
        # The data read-only; only the two output folders are writable.
        "-v",
        f"{import_root}:/data:ro",
        "-v",
        f"{import_root / '.processed'}:/data/.processed",
        "-v",
        f"{Path(os.path.abspath(settings.omero_inplace_dir))}/{hostile}/1:/out",
    ]
    assert "--privileged" not in run
    assert run[run.index("--mode") + 1] == "x --privileged -v /:/host"

    logs = [p for p in Path(settings.order_log_dir).iterdir() if hostile in p.name]
    assert logs, "no per-order preprocessing log was written"
    for path in logs:
        assert stat.S_IMODE(path.stat().st_mode) & 0o007 == 0, (path, oct(path.stat().st_mode))


# --- secrets ----------------------------------------------------------------------------------

DB_SECRET = "Db5ecretPassw0rdZq"
OMERO_SECRET = "0meroS3cretPassXk"


def _cli(args: list[str], env: dict[str, str], timeout: float = 60) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "biomero_importer", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **env},
        check=False,
    )
    return result.stdout + result.stderr


def _assert_no_secret(text: str, where: str) -> None:
    for secret in (DB_SECRET, OMERO_SECRET):
        assert secret not in text, f"{where} shows a password"


def test_commands_never_show_passwords_for_an_unreachable_database(tmp_path: Path) -> None:
    env = {
        "INGEST_TRACKING_DB_URL": f"postgresql://importer:{DB_SECRET}@db.invalid:5432/biomero",
        "OMERO_HOST": "omero.invalid",
        "OMERO_USER": "root",
        "OMERO_PASSWORD": OMERO_SECRET,
        "BIOMERO_IMPORTER_LOG_FILE_PATH": str(tmp_path / "app.log"),
        "BIOMERO_IMPORTER_ORDER_LOG_DIR": str(tmp_path / "logs"),
        "BIOMERO_IMPORTER_DATABASE_WAIT": "1",
    }
    for args in (
        ["check"],
        ["check", "--json"],
        ["status"],
        ["show", "0f0e0d0c-0000-4000-8000-000000000001"],
        ["migrate"],
        ["run"],
    ):
        output = _cli(args, env)
        assert output.strip(), f"{args} printed nothing"
        _assert_no_secret(output, f"biomero-importer {' '.join(args)}")
    if (tmp_path / "app.log").exists():
        _assert_no_secret((tmp_path / "app.log").read_text(), "the log file")


async def test_a_running_replica_never_logs_or_serves_passwords(
    pg_server: PgServer, migrated_url: str, tmp_path: Path, import_root: Path
) -> None:
    # A login role with a password: the embedded server trusts local connections, but the
    # password still travels in the database URL the service is given.
    role = "secretive"
    pg_server.execute(
        f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN"
        f" CREATE ROLE {role} LOGIN SUPERUSER PASSWORD '{DB_SECRET}'; END IF; END $$"
    )
    url = migrated_url.replace("postgres:@", f"{role}:{DB_SECRET}@", 1)
    assert DB_SECRET in url
    port = free_port()
    settings = make_settings(
        tmp_path,
        migrated_url,
        [import_root],
        run_migrations=False,
        poll_interval=0.5,
        log_format="json",
        log_file_path=tmp_path / "app.log",
        metrics_port=port,
    )
    config = write_config(tmp_path / "replica.yml", settings)
    env_backup = dict(os.environ)
    os.environ.update(
        {"INGEST_TRACKING_DB_URL": url, "OMERO_PASSWORD": OMERO_SECRET, "OMERO_USER": "root"}
    )
    try:
        replica = Replica(config, tmp_path / "replica.out")
    finally:
        os.environ.clear()
        os.environ.update(env_backup)
    try:
        good = await insert_order(migrated_url, make_tiffs(import_root, 1))
        bad = await insert_order(migrated_url, [f"{import_root}/missing.tif"])
        for order in (good, bad):
            await wait_for_stage(migrated_url, order, timeout=30)
        served = ""
        for path in ("/metrics", "/healthz", "/readyz"):
            served += await asyncio.to_thread(_get, port, path)
    finally:
        assert replica.stop(timeout=30) == 0
    _assert_no_secret(served, "the HTTP endpoints")
    _assert_no_secret((tmp_path / "replica.out").read_text(), "the replica's output")
    _assert_no_secret((tmp_path / "app.log").read_text(), "the log file")
    assert stat.S_IMODE((tmp_path / "app.log").stat().st_mode) & 0o077 == 0
    conn = await asyncpg.connect(migrated_url)
    try:
        descriptions = await conn.fetch("SELECT description FROM imports")
    finally:
        await conn.close()
    _assert_no_secret(json.dumps([r["description"] for r in descriptions]), "order descriptions")
    env = {"INGEST_TRACKING_DB_URL": url, "OMERO_PASSWORD": OMERO_SECRET}
    for args in (["status"], ["status", "--json"], ["show", good], ["show", bad, "--json"]):
        output = _cli([*args, "--config", str(config)], env)
        assert good[:8] in output or bad[:8] in output, output
        _assert_no_secret(output, f"biomero-importer {' '.join(args)}")


def _get(port: int, path: str) -> str:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + 10
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as resp:
                return resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
