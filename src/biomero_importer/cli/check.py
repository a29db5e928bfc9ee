"""``biomero-importer check``: everything the service needs, tested before it is needed."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import typer

from biomero_importer.cli.common import (
    CONNECT_TIMEOUT,
    EXIT_FAILED,
    ConfigOption,
    JsonOption,
    echo_json,
    error_text,
    load_quietly,
    schema_problem,
)
from biomero_importer.db.migrate import head_revision
from biomero_importer.db.urls import asyncpg_dsn
from biomero_importer.notify import channel_skew, check_channels
from biomero_importer.omero import OmeroConfigError, create_gateway
from biomero_importer.omero.port import OmeroError
from biomero_importer.omero.selftest import run_import_test
from biomero_importer.service import database
from biomero_importer.settings import Settings
from biomero_importer.store import PostgresStore, ReplicaChannels, StoreUnavailable

RUNTIME_TIMEOUT = 30.0
# The exit code of a container that started but whose image has no `true`: the runtime works.
# (126 is not accepted: podman also returns it when the OCI runtime is refused permission.)
COMMAND_NOT_FOUND = 127
# Where a source checkout keeps the podman settings for machines whose OCI runtime may not set
# podman's default ulimits (root in some VMs and containers); ./dev test points podman at it.
PODMAN_CONF = Path(__file__).resolve().parents[3] / "config" / "podman" / "containers.conf"


@dataclass
class Line:
    check: str
    ok: bool
    detail: str
    hint: str = ""
    # how long the step took (the OMERO import test's steps)
    seconds: float | None = None


def _database_lines(settings: Settings) -> list[Line]:
    where = settings.masked_db_url()
    db_hint = (
        "set ingest_tracking_db (or INGEST_TRACKING_DB_URL) to a reachable PostgreSQL"
        if not settings.uses_embedded_db
        else f"make {settings.embedded_db_dir} writable, or set ingest_tracking_db"
    )
    try:
        with database(settings) as url:

            async def ping() -> None:
                store = PostgresStore(
                    asyncpg_dsn(url), pool_size=2, retry=False, connect_timeout=CONNECT_TIMEOUT
                )
                await store.open()
                try:
                    if not await store.ping():
                        raise StoreUnavailable("no answer")
                finally:
                    await store.close(timeout=CONNECT_TIMEOUT)

            try:
                asyncio.run(ping())
            except Exception as exc:
                detail = f"{where}: {error_text(exc, settings)}"
                return [Line("database reachable", False, detail, db_hint)]
            problem = schema_problem(settings, url)
    except Exception as exc:
        return [Line("database reachable", False, f"{where}: {type(exc).__name__}", db_hint)]
    lines = [Line("database reachable", True, where)]
    if problem is None:
        lines.append(Line("database schema at head", True, f"revision {head_revision()}"))
    else:
        lines.append(
            Line("database schema at head", False, problem, "run: biomero-importer migrate")
        )
    return lines


def _omero_line(settings: Settings) -> Line:
    name = "OMERO simulator active" if settings.omero_backend == "simulator" else "OMERO login"
    hint = (
        f"make {settings.simulator_dir} writable (omero_simulator_dir)"
        if settings.omero_backend == "simulator"
        else "set omero_host, omero_port, omero_user and omero_password (an admin account"
        " that can act for other users), or omero_backend: simulator to try things out"
    )
    try:
        gateway = create_gateway(settings)
    except (OmeroConfigError, OmeroError) as exc:
        return Line(name, False, str(exc), hint)
    try:
        gateway.check()
        return Line(name, True, gateway.describe())
    except OmeroError as exc:
        return Line(name, False, exc.reason, hint)
    except Exception as exc:
        return Line(name, False, type(exc).__name__, hint)
    finally:
        gateway.close()


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=RUNTIME_TIMEOUT, check=False
    )


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else "no output"


def _runtime_line(settings: Settings) -> Line:
    runtime = settings.container_runtime
    name = f"container runtime ({runtime})"
    found = shutil.which(runtime)
    if found is None:
        return Line(
            name,
            False,
            "not found on PATH",
            f"install {runtime}, or set container_runtime (only preprocessing orders need it)",
        )
    hint = f"'{runtime} info' must work for the importer's user (rootless setup, storage)"
    try:
        info = _run([found, "info"])
        if info.returncode != 0:
            return Line(name, False, _last_line(info.stderr or info.stdout), hint)
        images = _run([found, "images", "--format", "{{.Repository}}:{{.Tag}}"])
        local = [i for i in images.stdout.split() if "<none>" not in i]
        if not local:
            return Line(name, True, f"{found}: works (no local image to test a run with)")
        # A local image only, never pulled: quick, and works offline.
        run = _run([found, "run", "--rm", "--pull=never", "--entrypoint", "true", local[0]])
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Line(name, False, f"{type(exc).__name__} running {runtime}", hint)
    if run.returncode in (0, COMMAND_NOT_FOUND):
        return Line(name, True, f"{found}: ran a container from {local[0]}")
    if "rlimit" in run.stderr.lower():
        return Line(
            name,
            False,
            f"the OCI runtime may not set the container's rlimits here ({local[0]}:"
            f" {_last_line(run.stderr)})",
            _rlimit_hint(),
        )
    return Line(name, False, f"cannot run {local[0]}: {_last_line(run.stderr)}", hint)


def _rlimit_hint() -> str:
    """The fix for runc/crun refused setrlimit: no default ulimits, from a containers.conf."""
    fix = "a containers.conf with default_ulimits = [] under [containers]"
    current = os.environ.get("CONTAINERS_CONF")
    if current:
        return (
            f"CONTAINERS_CONF={current} still lets podman set ulimits: add"
            " default_ulimits = [] under [containers] in it"
        )
    if PODMAN_CONF.is_file():
        return f"use {fix}, as ./dev test does: export CONTAINERS_CONF={PODMAN_CONF}"
    return f"use {fix} (point CONTAINERS_CONF at it, or put it in /etc/containers/)"


def _folder_problem(path: Path, access: int) -> str | None:
    if not path.exists():
        return "does not exist"
    if not path.is_dir():
        return "is not a folder"
    if not os.access(path, access):
        return "permission denied"
    return None


def _folder_lines(settings: Settings) -> list[Line]:
    lines = []
    for root in settings.effective_import_roots:
        problem = _folder_problem(root, os.R_OK | os.X_OK)
        lines.append(
            Line(
                "import root readable",
                problem is None,
                f"{root}: {problem}" if problem else str(root),
                "" if problem is None else "create or mount it, or fix import_roots / base_dir",
            )
        )
    writable = os.W_OK | os.X_OK
    inplace, managed = settings.omero_inplace_dir, settings.omero_managed_repository
    targets = [("omero_inplace_dir", inplace)]
    if settings.omero_backend == "simulator":
        lines.append(
            Line(
                "omero_managed_repository writable",
                True,
                f"not used: the simulator keeps its files in {settings.simulator_dir}",
            )
        )
    else:
        targets.append(("omero_managed_repository", managed))
    for key, path in targets:
        problem = _folder_problem(path, writable)
        lines.append(
            Line(
                f"{key} writable",
                problem is None,
                f"{path}: {problem}" if problem else str(path),
                ""
                if problem is None
                else f"create it (mkdir -p {path}) writable for the importer, or set {key}",
            )
        )
    if len(targets) == 2 and inplace.is_dir() and managed.is_dir():
        same = inplace.stat().st_dev == managed.stat().st_dev
        lines.append(
            Line(
                "in-place and managed folders on one filesystem",
                same,
                "same device" if same else "different devices",
                ""
                if same
                else "in-place imports hard-link (ln) preprocessed files into the"
                " ManagedRepository: put omero_inplace_dir on the same volume",
            )
        )
    return lines


_CHANNEL_HINTS = {
    "webhook": "the receiver must accept connections from this host (notify_webhook_url)",
    "email": "check notify_email_host, notify_email_port, notify_email_starttls and the"
    " login (notify_email_user, notify_email_password)",
}


def _notification_lines(settings: Settings) -> list[Line]:
    """One line per configured channel: connected (and logged in), nothing sent."""
    return [
        Line(
            f"notifications: {channel} reachable", ok, detail, "" if ok else _CHANNEL_HINTS[channel]
        )
        for channel, ok, detail in asyncio.run(check_channels(settings))
    ]


def _channel_skew_lines(settings: Settings) -> list[Line]:
    """Whether every running replica has the channels this configuration has: an outcome
    owes every channel any replica has, and only a replica with it delivers it. Nothing to
    say when the database is not reachable (its own line says so)."""
    try:
        with database(settings) as url:

            async def read() -> list[ReplicaChannels]:
                store = PostgresStore(
                    asyncpg_dsn(url), pool_size=2, retry=False, connect_timeout=CONNECT_TIMEOUT
                )
                await store.open()
                try:
                    return await store.channel_replicas()
                finally:
                    await store.close(timeout=CONNECT_TIMEOUT)

            replicas = asyncio.run(read())
    except Exception:
        return []
    agree, detail = channel_skew(settings, replicas)
    hint = (
        ""
        if agree
        else "give every replica the same notify_* settings: each outcome owes every channel"
        " any replica has, and waits for a replica that has it"
    )
    return [Line("notifications: replicas agree on channels", agree, detail, hint)]


def run_checks(settings: Settings) -> list[Line]:
    return [
        *_database_lines(settings),
        _omero_line(settings),
        _runtime_line(settings),
        *_folder_lines(settings),
        *_notification_lines(settings),
        *_channel_skew_lines(settings),
    ]


def _import_test_lines(
    settings: Settings, dataset: int, user: str, group: str, folder: Path | None
) -> list[Line]:
    try:
        gateway = create_gateway(settings)
    except (OmeroConfigError, OmeroError) as exc:
        return [Line("OMERO import test", False, str(exc), "fix the OMERO settings above")]
    try:
        steps = run_import_test(
            gateway, settings, dataset=dataset, user=user, group=group, folder=folder
        )
    finally:
        gateway.close()
    return [
        Line(f"import test: {step.name}", step.ok, step.detail, step.hint, round(step.seconds, 3))
        for step in steps
    ]


ImportTestOption = Annotated[
    bool,
    typer.Option(
        "--omero-import-test",
        help="Also import a tiny image into --scratch-dataset, register a tiny OME-Zarr and"
        " read a tile back, then delete both: the production path on this server.",
        show_default=False,
    ),
]
ScratchDatasetOption = Annotated[
    int | None,
    typer.Option("--scratch-dataset", help="The Dataset id the import test may use.", min=1),
]
TestUserOption = Annotated[
    str | None,
    typer.Option("--user", help="The import test's OMERO user (default: omero_user)."),
]
TestGroupOption = Annotated[
    str | None, typer.Option("--group", help="The group of the scratch Dataset.")
]
ScratchFolderOption = Annotated[
    Path | None,
    typer.Option(
        "--scratch-folder",
        help="Where the test files are written (default: the first import root); the OMERO"
        " server must see it at the same path.",
    ),
]


def check(
    *,
    as_json: JsonOption = False,
    config: ConfigOption = None,
    omero_import_test: ImportTestOption = False,
    scratch_dataset: ScratchDatasetOption = None,
    user: TestUserOption = None,
    group: TestGroupOption = None,
    scratch_folder: ScratchFolderOption = None,
) -> None:
    """Preflight: database, OMERO, container runtime and folders, each with a fix if it fails."""
    if omero_import_test and (scratch_dataset is None or group is None):
        raise typer.BadParameter("--omero-import-test needs --scratch-dataset and --group")
    settings = load_quietly(config)
    lines = run_checks(settings)
    if omero_import_test:
        assert scratch_dataset is not None and group is not None
        test_user = user or settings.omero_user or "root"
        lines += _import_test_lines(settings, scratch_dataset, test_user, group, scratch_folder)
    failed = [line for line in lines if not line.ok]
    if as_json:
        echo_json([asdict(line) for line in lines])
    else:
        width = max(len(line.check) for line in lines)
        for line in lines:
            mark = "✓" if line.ok else "✗"
            took = "" if line.seconds is None else f"  ({line.seconds:.1f} s)"
            typer.echo(f"{mark} {line.check.ljust(width)}  {line.detail}{took}")
            if line.hint:
                typer.echo(f"  {' ' * width}  fix: {line.hint}")
        typer.echo(
            f"\n{len(failed)} of {len(lines)} checks failed" if failed else "\nall checks passed"
        )
    if failed:
        raise typer.Exit(EXIT_FAILED)
