"""``biomero-importer demo``: the whole importer at work in one command, nothing to set up.

An embedded PostgreSQL and the simulated OMERO in one folder, a few generated images, the
service running in this process, and three orders written exactly as ``submit`` writes them:
a plain one, one with preprocessing (when the container runtime works here) and one the
service refuses for a visible reason.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from biomero_importer.cli.common import EXIT_FAILED, error_text, fail, table, truncate
from biomero_importer.cli.orders import _order_info, _validate, _write
from biomero_importer.db.embedded import EmbeddedPostgres
from biomero_importer.model import (
    STAGE_IMPORTED,
    STAGE_INGEST_FAILED,
    STAGE_NEW_ORDER,
    TERMINAL_STAGES,
    OrderEvent,
)
from biomero_importer.observability.logging import configure_logging, reset_logging
from biomero_importer.omero.simulator import DB_NAME
from biomero_importer.service import StartupError, open_service, prepare_schema
from biomero_importer.settings import Settings, default_data_dir
from biomero_importer.store import OrderStore

DEMO_IMAGE = "localhost/biomero-test-converter:latest"
# The converter image's recipe and this machine's podman settings live in a source checkout.
REPO = Path(__file__).resolve().parents[3]
BUILD_SCRIPT = REPO / "containers" / "test-image" / "build.sh"
PODMAN_CONF = REPO / "config" / "podman" / "containers.conf"
GROUP, USER, DATASET = "Demo", "researcher", 1
ORDER_TIMEOUT = 20.0
POLL_INTERVAL = 0.1
PROBE_TIMEOUT = 30.0
SKIPPED = "skipped"
# in the log folder; the settings the demo writes (settings.yml) log there too
SERVICE_LOG = "importer.log"

DirOption = Annotated[
    Path | None,
    typer.Option(
        "--dir",
        help="Folder for the demo's database, images and simulated OMERO; reused when it"
        " exists. Default: <user data dir>/biomero-importer/demo.",
        show_default=False,
        file_okay=False,
    ),
]


@dataclass
class DemoOrder:
    label: str
    expected: str
    info: dict[str, Any]
    stage: str = STAGE_NEW_ORDER
    description: str | None = None
    objects: list[dict[str, Any]] = field(default_factory=list)
    last_id: int = 0

    @property
    def uuid(self) -> str:
        return str(self.info["UUID"])


def _say(text: str = "") -> None:
    typer.echo(text)


def _demo_settings(folder: Path) -> Settings:
    return Settings(
        ingest_tracking_db=None,
        embedded_db_dir=folder / "postgres",
        omero_backend="simulator",
        omero_simulator_dir=folder / "omero-simulator",
        import_roots=[folder / "data"],
        order_log_dir=folder / "logs",
        log_file_path=None,
        log_level="INFO",
        omero_inplace_dir=folder / "inplace",
        allowed_containers=["localhost/biomero-test-converter:*"],
        preprocessing_timeout=20.0,
        poll_interval=0.5,
        lease_seconds=30.0,
        max_workers=4,
        shutdown_timeout=5.0,
    )


def _write_config(folder: Path, settings: Settings) -> Path:
    """Settings for looking around afterwards (status, show, run) with the same folder."""
    data = json.loads(settings.model_dump_json(exclude={"worker_id"}))
    data.update(log_level="INFO", log_file_path=str(settings.order_log_dir / SERVICE_LOG))
    path = folder / "settings.yml"
    path.write_text(
        "# Written by `biomero-importer demo`: use it with --config to look at the demo's data.\n"
        + yaml.safe_dump(data, sort_keys=False)
    )
    return path


def _sample_images(folder: Path, prefix: str, count: int) -> list[Path]:
    """Small gradient images, a different pattern each, rewritten on every run."""
    # only the demo writes images: the service and the other commands never load these
    try:
        import numpy as np  # noqa: PLC0415
        import tifffile  # noqa: PLC0415
    except ImportError:
        raise fail(
            "the demo needs numpy and tifffile: pip install 'biomero-importer[demo]'"
        ) from None
    folder.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:64, 0:64]
    paths = []
    for n in range(count):
        pixels = ((x * (n + 1) + y * 3) % 256).astype(np.uint8)
        path = folder / f"{prefix}{n + 1}.tif"
        tifffile.imwrite(path, pixels)
        paths.append(path)
    return paths


# --- container runtime ----------------------------------------------------------------------


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=PROBE_TIMEOUT, check=False)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else "no output"


def _try_run(runtime: str) -> str | None:
    """None when a container from the demo image runs here, else why not."""
    run = _run([runtime, "run", "--rm", "--pull=never", "--entrypoint", "true", DEMO_IMAGE])
    return None if run.returncode == 0 else _last_line(run.stderr or run.stdout)


def _preprocessing_image(settings: Settings) -> tuple[str | None, str]:
    """(image, note) when preprocessing can be shown here, else (None, why it is skipped)."""
    runtime = shutil.which(settings.container_runtime)
    if runtime is None:
        return None, f"{settings.container_runtime} is not installed"
    if not BUILD_SCRIPT.exists():
        return None, (
            f"the demo converter image is built from containers/test-image, which is only in a"
            f" source checkout (not found at {BUILD_SCRIPT.parent})"
        )
    try:
        info = _run([runtime, "info"])
        if info.returncode != 0:
            return None, f"'{runtime} info' fails: {_last_line(info.stderr)}"
        build = _run([str(BUILD_SCRIPT), DEMO_IMAGE])
        if build.returncode != 0:
            return None, f"building {DEMO_IMAGE} failed: {_last_line(build.stderr)}"
        problem = _try_run(runtime)
        note = f"{runtime} runs {DEMO_IMAGE}"
        if problem is not None and "CONTAINERS_CONF" not in os.environ and PODMAN_CONF.exists():
            # The checkout's podman settings for machines where the defaults cannot run one.
            os.environ["CONTAINERS_CONF"] = str(PODMAN_CONF)
            if _try_run(runtime) is None:
                return DEMO_IMAGE, f"{note} (with CONTAINERS_CONF={PODMAN_CONF})"
            del os.environ["CONTAINERS_CONF"]
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{type(exc).__name__} running {runtime}"
    if problem is not None:
        return None, f"{runtime} cannot run a container here: {problem}"
    return DEMO_IMAGE, note


# --- orders ---------------------------------------------------------------------------------


def _order(label: str, expected: str, files: list[Path], image: str | None = None) -> DemoOrder:
    info = _order_info(
        order_uuid=str(uuidlib.uuid4()),
        group=GROUP,
        user=USER,
        target=("Dataset", DATASET),
        files=[str(f) for f in files],
        image=image,
        params={},
    )
    return DemoOrder(label, expected, info)


def _objects_text(objects: list[dict[str, Any]]) -> str:
    if not objects:
        return "-"
    return ", ".join(f"{o.get('type', '?')} {o.get('id', '?')}" for o in objects)


class _Progress:
    """One line per stage change, with the time since the first order was submitted."""

    def __init__(self, orders: list[DemoOrder]) -> None:
        self.started = time.monotonic()
        self.width = max(len(o.label) for o in orders)

    def event(self, order: DemoOrder, event: OrderEvent) -> None:
        line = (
            f"  {time.monotonic() - self.started:5.1f}s  {order.label.ljust(self.width)}"
            f"  {order.uuid[:8]}  {event.stage}"
        )
        if event.description:
            line += f": {truncate(event.description, 100)}"
        _say(line)


async def _follow(
    store: OrderStore, orders: list[DemoOrder], progress: _Progress, timeout: float
) -> None:
    """Print the orders' new rows, oldest first, until all are finished or time is up."""
    deadline = time.monotonic() + timeout
    while True:
        new: list[tuple[int, DemoOrder, OrderEvent]] = []
        waiting = False
        for order in orders:
            events = await store.order_events(order.uuid, order.last_id)
            new.extend((event.id, order, event) for event in events)
            if events:
                order.last_id = events[-1].id
            detail = await store.order_detail(order.uuid)
            if detail is None:
                waiting = True
                continue
            order.stage, order.description = detail.summary.stage, detail.summary.description
            order.objects = detail.objects
            if order.stage not in TERMINAL_STAGES or detail.latest_id > order.last_id:
                waiting = True
        for _, order, event in sorted(new, key=lambda item: item[0]):
            progress.event(order, event)
        if not waiting or time.monotonic() > deadline:
            return
        await asyncio.sleep(POLL_INTERVAL)


async def _run_orders(settings: Settings, url: str, orders: list[DemoOrder]) -> None:
    async with open_service(settings, url) as service:
        task = asyncio.create_task(service.dispatcher.run(), name="dispatcher")
        try:
            progress = _Progress(orders)
            for order in orders:
                # what `submit` does: the order written through OMERO.biomero's own API
                await asyncio.to_thread(_write, url, order.info)
            await _follow(service.store, orders, progress, ORDER_TIMEOUT)
        finally:
            service.dispatcher.request_stop()
            await asyncio.wait_for(task, timeout=settings.shutdown_timeout + 10)


# --- the command ----------------------------------------------------------------------------


def _start_database(settings: Settings) -> tuple[EmbeddedPostgres, str]:
    embedded = EmbeddedPostgres(settings.embedded_db_dir)
    try:
        url = embedded.start()
    except Exception as exc:
        embedded.stop()
        raise fail(
            f"cannot start the embedded database in {settings.embedded_db_dir}:"
            f" {error_text(exc, settings)}",
            EXIT_FAILED,
        ) from None
    try:
        prepare_schema(settings, url, force=True)
    except StartupError as exc:
        embedded.stop()
        raise fail(str(exc), EXIT_FAILED) from None
    return embedded, url


def _summary(orders: list[DemoOrder], skipped: str | None) -> list[list[str]]:
    rows = [
        [o.uuid, o.label, o.stage, truncate(o.description, 70) or "-", _objects_text(o.objects)]
        for o in orders
    ]
    if skipped is not None:
        rows.append(["-", "preprocessing", SKIPPED, truncate(skipped, 70), "-"])
    return rows


def _look_inside(
    folder: Path, config: Path, psql: str, orders: list[DemoOrder], service_log: Path
) -> None:
    sim_db = folder / "omero-simulator" / DB_NAME
    first = orders[0].uuid
    _say("\nLook inside:")
    _say(f"  orders, with the CLI:   biomero-importer status --config {config}")
    _say(f"                          biomero-importer show {first} --config {config}")
    _say(f"  orders, with psql:      {psql}")
    _say("                          SELECT id, uuid, stage, description FROM imports ORDER BY id;")
    _say("    (the demo's PostgreSQL stops when the demo ends; keep it up with")
    _say(f"     biomero-importer run --config {config}  in another terminal)")
    _say(f"  simulated OMERO:        {sim_db}")
    _say(
        f'                          sqlite3 {sim_db} "SELECT id, type, name, order_uuid'
        f" FROM objects WHERE order_uuid = '{first}'\""
    )
    _say(f"  per-order logs:         {folder / 'logs'}")
    _say(f"  service log:            {service_log}")
    _say(f"  sample images:          {folder / 'data'}")


def demo(directory: DirOption = None) -> None:
    """See the importer at work: embedded PostgreSQL, simulated OMERO, sample orders.

    Runs the service in this process and submits a plain order, a preprocessing order (when
    the container runtime works here) and one that fails on purpose; shows their progress,
    a summary and how to look at the results. Exits 0 when every order ended as expected.
    """
    started = time.monotonic()
    folder = (directory or default_data_dir() / "demo").expanduser().resolve()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise fail(f"cannot create the demo folder {folder}: {exc.strerror or exc}") from None
    settings = _demo_settings(folder)
    service_log = settings.order_log_dir / SERVICE_LOG
    try:
        service_log.parent.mkdir(parents=True, exist_ok=True)
        stream = service_log.open("a", encoding="utf-8")
    except OSError as exc:
        raise fail(f"cannot write the demo's log {service_log}: {exc.strerror or exc}") from None
    # The demo's own lines are the story: the service's (a failing order's warning among
    # them) would break into it and its table, so they go to the log folder.
    with stream:
        configure_logging(settings, stream=stream)
        try:
            _show(folder, settings, service_log, started)
        finally:
            reset_logging()


def _show(folder: Path, settings: Settings, service_log: Path, started: float) -> None:
    _say(f"biomero-importer demo in {folder}")

    data = folder / "data"
    plain_files = _sample_images(data / "plain", "cells", 3)
    (pre_source,) = _sample_images(data / "to-convert", "scan", 1)
    outside = _sample_images(folder / "outside-the-roots", "private", 1)

    _say("  starting the embedded PostgreSQL ...")
    embedded, url = _start_database(settings)
    try:
        config = _write_config(folder, settings)
        psql = embedded.psql_command()
        _say("  checking the container runtime for the preprocessing order ...")
        image, note = _preprocessing_image(settings)
        skipped = None if image is not None else note
        _say(f"    {note}" if image is not None else f"    preprocessing order SKIPPED: {note}")

        orders = [_order("plain", STAGE_IMPORTED, plain_files)]
        if image is not None:
            orders.append(_order("preprocessing", STAGE_IMPORTED, [pre_source], image))
        for order in orders:
            _validate(settings, order.info)  # as `submit` checks, before writing
        # Written as OMERO.biomero would write it (no up-front checks), so the service itself
        # refuses it: the file is outside the import roots.
        orders.append(_order("failing", STAGE_INGEST_FAILED, outside))

        _say(f"\nSubmitting {len(orders)} orders (group {GROUP}, user {USER}, Dataset {DATASET}):")
        asyncio.run(_run_orders(settings, url, orders))
    finally:
        embedded.stop()

    _say("\nResult:")
    _say(
        table(["UUID", "ORDER", "STAGE", "DESCRIPTION", "OMERO OBJECTS"], _summary(orders, skipped))
    )
    _look_inside(folder, config, psql, orders, service_log)
    unexpected = [o for o in orders if o.stage != o.expected]
    elapsed = time.monotonic() - started
    if unexpected:
        for order in unexpected:
            _say(
                f"\nUNEXPECTED: the {order.label} order is {order.stage}, expected {order.expected}"
            )
        _say(f"Demo finished in {elapsed:.1f}s with unexpected results.")
        raise typer.Exit(EXIT_FAILED)
    _say(f"\nDemo finished in {elapsed:.1f}s: every order ended as expected.")
