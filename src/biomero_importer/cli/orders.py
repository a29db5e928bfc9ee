"""Order commands: submit, plan, status, show, retry, cancel."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
import uuid as uuidlib
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.progress import Progress as ProgressBar

from biomero_importer.cli import progress as shown
from biomero_importer.cli.common import (
    EXIT_FAILED,
    ConfigOption,
    JsonOption,
    echo_json,
    fail,
    file_list,
    iso,
    load_quietly,
    local_time,
    parse_duration,
    parse_json,
    parse_stage,
    ready_database,
    run_with_store,
    table,
    truncate,
)
from biomero_importer.model import (
    CANCELLED,
    RUNNING_STAGES,
    STAGE_IMPORTED,
    STAGE_NEW_ORDER,
    TERMINAL_STAGES,
    ClaimedOrder,
    OrderDetail,
    OrderEvent,
    OrderSummary,
    PreprocessingSpec,
    Progress,
)
from biomero_importer.options import to_column
from biomero_importer.pipeline.plan import Plan, claimed_from_detail, plan_order, render_text
from biomero_importer.pipeline.validate import InvalidOrder, validate
from biomero_importer.preprocessing import PreprocessingError, validate_preprocessing
from biomero_importer.settings import Settings
from biomero_importer.store import ChannelState, OrderBusy, OrderNotFound, OrderStore
from biomero_importer.text import duration
from biomero_importer.utils.ingest_tracker import (
    get_ingest_tracker,
    initialize_ingest_tracker,
    log_ingestion_step,
)

FOLLOW_INTERVAL = 0.1
RETRY_NOTE = "Queued again with biomero-importer retry"
# What OMERO.biomero writes for a preprocessing order: the container reads the order's files
# mounted at /data and writes results to /out.
PREPROCESSING_DEFAULTS = {
    "preprocessing_inputfile": "{Files}",
    "preprocessing_outputfolder": "/data",
    "preprocessing_altoutputfolder": "/out",
}
RESERVED_PARAMS = frozenset({"container", "inputfile", "outputfolder", "altoutputfolder"})
_PARAM_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")

UuidArgument = Annotated[str, typer.Argument(help="The order's uuid.", show_default=False)]
DatasetOption = Annotated[
    int | None, typer.Option("--dataset", help="Import into this Dataset id.", min=1)
]
ScreenOption = Annotated[
    int | None, typer.Option("--screen", help="Import plates into this Screen id.", min=1)
]
PreprocessOption = Annotated[
    str | None,
    typer.Option(
        "--preprocess",
        metavar="IMAGE",
        help="Run this container image on the files first (as OMERO.biomero does).",
    ),
]
ParamOption = Annotated[
    list[str] | None,
    typer.Option(
        "--param",
        metavar="KEY=VALUE",
        help="Extra preprocessing parameter, passed as --KEY VALUE (repeatable).",
    ),
]
ImportOptionsOption = Annotated[
    str | None,
    typer.Option(
        "--options",
        metavar="JSON",
        help="ImportOptions as a JSON object (schema 1 or 2), e.g."
        ' \'{"schema": 1, "platePixelSource": "label", "plateLabelName": "nuclei"}\'.',
    ),
]


# --- submit ---------------------------------------------------------------------------------


def _parse_params(params: Sequence[str]) -> dict[str, str]:
    parsed: dict[str, str] = {}
    for item in params:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not _PARAM_KEY.fullmatch(key):
            raise typer.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--param")
        if key in RESERVED_PARAMS:
            raise typer.BadParameter(f"{key!r} is set by the importer", param_hint="--param")
        if key in parsed:
            raise typer.BadParameter(f"{key!r} is given twice", param_hint="--param")
        parsed[key] = value
    return parsed


def _parse_options(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        raise typer.BadParameter("not valid JSON", param_hint="--options") from None
    if not isinstance(value, dict):
        raise typer.BadParameter("must be a JSON object", param_hint="--options")
    return value


def _order_info(
    *,
    order_uuid: str,
    group: str,
    user: str,
    target: tuple[str, int],
    files: list[str],
    image: str | None,
    params: dict[str, str],
) -> dict[str, Any]:
    """The dict OMERO.biomero hands to ``log_ingestion_step`` (same keys, same defaults)."""
    info: dict[str, Any] = {
        "Group": group,
        "Username": user,
        "DestinationID": target[1],
        "DestinationType": target[0],
        "UUID": order_uuid,
        "Files": files,
    }
    if image is not None:
        info["preprocessing_container"] = image
        info.update(PREPROCESSING_DEFAULTS)
        if params:
            info["extra_params"] = params
    return info


def _claimed(info: dict[str, Any]) -> ClaimedOrder:
    """The order as the service would claim it (the columns ``_write`` stores)."""
    preprocessing = None
    if "preprocessing_container" in info:
        preprocessing = PreprocessingSpec(
            id=0,
            container=info["preprocessing_container"],
            input_file=info["preprocessing_inputfile"],
            output_folder=info["preprocessing_outputfolder"],
            alt_output_folder=info["preprocessing_altoutputfolder"],
            extra_params=dict(info.get("extra_params", {})),
        )
    return ClaimedOrder(
        uuid=info["UUID"],
        group_name=info["Group"],
        user_name=info["Username"],
        destination_id=str(info["DestinationID"]),
        destination_type=info["DestinationType"],
        files=json.dumps(info["Files"]),
        file_names=None,
        preprocessing_id=None,
        preprocessing=preprocessing,
        attempt=0,
        runs=0,
        queued_at=time.time(),
        import_options=to_column(info.get("ImportOptions")),
    )


def _validate(settings: Settings, info: dict[str, Any]) -> None:
    """The service's own checks, so a bad order fails here instead of ending 'Import Failed'."""
    claimed = _claimed(info)
    try:
        order = validate(claimed, settings.effective_import_roots)
        if order.preprocessing is not None:
            validate_preprocessing(order, settings)
    except (InvalidOrder, PreprocessingError) as exc:
        raise fail(f"order not submitted: {exc.reason}") from None


def _write(url: str, info: dict[str, Any]) -> None:
    if not initialize_ingest_tracker({"ingest_tracking_db": url}):
        raise fail("cannot open the order table (see the log above)", EXIT_FAILED)
    tracker = get_ingest_tracker()
    try:
        if log_ingestion_step(info, STAGE_NEW_ORDER) is None:
            raise fail("the order could not be written (see the log above)", EXIT_FAILED)
    finally:
        if tracker is not None:
            tracker.dispose()


class _Follower:
    """Shows an order's new rows and its progress: a live bar on a terminal (rich), plain
    lines otherwise, one per change of the progress (step or units), never one per poll."""

    def __init__(self, order_uuid: str) -> None:
        self.order_uuid = order_uuid
        self.console = Console(stderr=True, highlight=False)
        self.stage = STAGE_NEW_ORDER
        self.progress: Progress | None = None
        self.bar: ProgressBar | None = None
        self.task = TaskID(0)
        if self.console.is_terminal:
            self.bar = ProgressBar(
                SpinnerColumn(),
                TextColumn("{task.description}", markup=False),
                BarColumn(),
                TimeElapsedColumn(),
                console=self.console,
            )
            self.task = self.bar.add_task(self._label(), total=None)

    def _label(self) -> str:
        label = f"{self.order_uuid}  {self.stage}"
        if self.progress is not None:
            label += f"  {shown.line(self.progress)}"
        return label

    def __enter__(self) -> _Follower:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def event(self, event: OrderEvent) -> None:
        self.stage = event.stage
        if event.stage not in RUNNING_STAGES:
            self.progress = None  # what the stage trigger does to the stored progress
        line = f"{local_time(event.timestamp)}  {event.stage}"
        if event.description:
            line += f"  {event.description}"
        if self.bar is None:
            typer.echo(line, err=True)
        else:
            self.console.print(line, markup=False)
            self.tick()

    def update(self, progress: Progress | None) -> None:
        """The progress last read (None once the order is not running)."""
        before, self.progress = self.progress, progress
        if self.bar is None:
            if progress is not None and (
                before is None
                or (before.step, before.units_done, before.units_total)
                != (progress.step, progress.units_done, progress.units_total)
            ):
                typer.echo(f"  progress: {shown.line(progress)}", err=True)
            return
        self.tick()

    def tick(self) -> None:
        if self.bar is None:
            return
        progress = self.progress
        total = progress.units_total if progress is not None and progress.units_total else None
        done = progress.units_done if progress is not None else 0
        self.bar.update(self.task, description=self._label(), total=total, completed=done)


async def _follow(
    store: OrderStore, order_uuid: str, timeout: float | None
) -> tuple[str, str | None]:
    """Print every new row until the order is finished; returns (stage, description)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    last_id = 0
    last: OrderEvent | None = None
    with _Follower(order_uuid) as follower:
        while True:
            for event in await store.order_events(order_uuid, last_id):
                follower.event(event)
                last_id, last = event.id, event
            # the detail, not the state: it carries the progress of a running order
            detail = await store.order_detail(order_uuid)
            assert detail is not None, "the order was just written"
            stage = detail.summary.stage
            done = stage in TERMINAL_STAGES and detail.latest_id <= last_id
            if done and last is not None:
                return last.stage, last.description
            if deadline is not None and time.monotonic() > deadline:
                raise fail(f"order {order_uuid} is still {stage} after {timeout:g}s", EXIT_FAILED)
            follower.update(detail.progress)
            await asyncio.sleep(FOLLOW_INTERVAL)


def _new_order(
    *,
    files: Sequence[str | Path],
    group: str,
    user: str,
    dataset: int | None,
    screen: int | None,
    preprocess: str | None,
    param: list[str] | None,
    options: str | None,
) -> dict[str, Any]:
    """The order ``submit`` would write, from its arguments (usage errors raised here)."""
    if dataset is not None and screen is not None:
        raise typer.BadParameter("give --dataset or --screen, not both")
    if dataset is not None:
        target = ("Dataset", dataset)
    elif screen is not None:
        target = ("Screen", screen)
    else:
        raise typer.BadParameter("give --dataset ID or --screen ID")
    params = _parse_params(param or [])
    if params and preprocess is None:
        raise typer.BadParameter("--param needs --preprocess", param_hint="--param")
    import_options = _parse_options(options)
    info = _order_info(
        order_uuid=str(uuidlib.uuid4()),
        group=group,
        user=user,
        target=target,
        files=[os.path.abspath(f) for f in files],
        image=preprocess,
        params=params,
    )
    if import_options:
        info["ImportOptions"] = import_options
    return info


def _show_plan(order_plan: Plan, as_json: bool) -> None:
    """Print a plan; exit 1 when the order would fail validation."""
    if as_json:
        echo_json(order_plan.as_dict())
    else:
        typer.echo(render_text(order_plan))
    if not order_plan.valid:
        raise typer.Exit(EXIT_FAILED)


def submit(
    *,
    files: Annotated[
        list[Path],
        typer.Argument(
            help="Files or folders to import (relative paths start from the current folder).",
            metavar="FILE...",
            show_default=False,
        ),
    ],
    group: Annotated[str, typer.Option("--group", "-g", help="OMERO group.", show_default=False)],
    user: Annotated[str, typer.Option("--user", "-u", help="OMERO user who will own the data.")],
    dataset: DatasetOption = None,
    screen: ScreenOption = None,
    preprocess: PreprocessOption = None,
    param: ParamOption = None,
    options: ImportOptionsOption = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Follow the order until it finishes.")
    ] = False,
    timeout: Annotated[
        float | None,
        typer.Option("--timeout", help="With --wait: give up after this many seconds.", min=0),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Print the order's plan (as `plan` does); write nothing."),
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="With --dry-run: print the plan as JSON.")
    ] = False,
    config: ConfigOption = None,
) -> None:
    """Queue an import order, written exactly as OMERO.biomero writes it.

    Prints the order's uuid as the last line on stdout. With --wait, follows it (on stderr)
    and exits 0 when it completes, 1 when it fails.
    """
    info = _new_order(
        files=files,
        group=group,
        user=user,
        dataset=dataset,
        screen=screen,
        preprocess=preprocess,
        param=param,
        options=options,
    )
    settings = load_quietly(config)
    if dry_run:
        _show_plan(plan_order(_claimed(info), settings), as_json)
        return
    order_uuid = info["UUID"]
    _validate(settings, info)
    with ready_database(settings) as url:
        _write(url, info)
        typer.echo(order_uuid)
        if not wait:
            return

        async def follow(store: OrderStore) -> tuple[str, str | None]:
            return await _follow(store, order_uuid, timeout)

        stage, description = run_with_store(settings, url, follow)
    if stage != STAGE_IMPORTED:
        typer.echo(f"{stage}: {description or 'no description'}", err=True)
        raise typer.Exit(EXIT_FAILED)
    typer.echo(stage, err=True)


# --- plan -----------------------------------------------------------------------------------


def _order_uuid(arguments: Sequence[str]) -> str | None:
    """The uuid when the only argument is one (and not a file of that name)."""
    if len(arguments) != 1 or os.path.exists(arguments[0]):
        return None
    try:
        return str(uuidlib.UUID(arguments[0]))
    except ValueError:
        return None


def plan(
    *,
    order: Annotated[
        list[str],
        typer.Argument(
            help="The files or folders of a new order (as for submit), or one order's uuid.",
            metavar="FILE...|UUID",
            show_default=False,
        ),
    ],
    group: Annotated[
        str | None, typer.Option("--group", "-g", help="OMERO group (new order).")
    ] = None,
    user: Annotated[
        str | None, typer.Option("--user", "-u", help="OMERO user (new order).")
    ] = None,
    dataset: DatasetOption = None,
    screen: ScreenOption = None,
    preprocess: PreprocessOption = None,
    param: ParamOption = None,
    options: ImportOptionsOption = None,
    as_json: JsonOption = False,
    config: ConfigOption = None,
) -> None:
    """What an order would do, without doing or writing anything.

    Prints the validation verdict, the target, the import units and their files, the exact
    container and omero import commands (secrets masked), and what a re-run would skip.
    Exits 1 when the order would fail validation.
    """
    order_uuid = _order_uuid(order)
    new_order = group is not None or user is not None or dataset is not None or screen is not None
    if order_uuid is not None and not new_order:
        settings = load_quietly(config)
        with ready_database(settings) as url:

            async def read(store: OrderStore) -> OrderDetail | None:
                return await store.order_detail(order_uuid)

            detail = run_with_store(settings, url, read)
        if detail is None:
            raise fail(f"no order with uuid {order_uuid}", EXIT_FAILED)
        claimed = claimed_from_detail(detail)
        _show_plan(plan_order(claimed, settings, stage=detail.summary.stage), as_json)
        return
    if group is None or user is None:
        raise typer.BadParameter("a new order needs --group and --user (or give one order's uuid)")
    info = _new_order(
        files=order,
        group=group,
        user=user,
        dataset=dataset,
        screen=screen,
        preprocess=preprocess,
        param=param,
        options=options,
    )
    _show_plan(plan_order(_claimed(info), load_quietly(config)), as_json)


# --- status ---------------------------------------------------------------------------------


def _status_record(row: OrderSummary) -> dict[str, Any]:
    return {
        "uuid": row.uuid,
        "stage": row.stage,
        "user": row.user_name,
        "group": row.group_name,
        "destination_type": row.destination_type,
        "destination_id": row.destination_id,
        "files": len(file_list(row.files)),
        "updated_at": iso(row.updated_at),
        "worker_id": row.worker_id,
        "description": row.description,
        "progress": shown.record(row.progress),
    }


def status(
    *,
    user: Annotated[str | None, typer.Option("--user", "-u", help="Only this user's.")] = None,
    group: Annotated[str | None, typer.Option("--group", "-g", help="Only this group's.")] = None,
    stage: Annotated[
        str | None,
        typer.Option(
            "--stage",
            "-s",
            help="Only this stage: pending, started, preprocessing, completed, failed.",
        ),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option("--since", help="Only orders updated this recently: 30m, 2h, 7d, 1w."),
    ] = None,
    limit: Annotated[
        int, typer.Option("--limit", "-n", help="At most this many orders.", min=1)
    ] = 50,
    as_json: JsonOption = False,
    config: ConfigOption = None,
) -> None:
    """The latest state of each order, newest first."""
    stage_name = parse_stage(stage)
    max_age = parse_duration(since)
    settings = load_quietly(config)
    with ready_database(settings) as url:

        async def read(store: OrderStore) -> list[OrderSummary]:
            return await store.list_orders(
                user=user,
                group=group,
                stage=stage_name,
                max_age_seconds=None if max_age is None else max_age.total_seconds(),
                limit=limit,
            )

        rows = run_with_store(settings, url, read)
    records = [_status_record(row) for row in rows]
    if as_json:
        echo_json(records)
        return
    if not records:
        typer.echo("no orders match", err=True)
        return
    typer.echo(
        table(
            [
                "UUID",
                "STAGE",
                "PROGRESS",
                "USER",
                "GROUP",
                "DESTINATION",
                "FILES",
                "UPDATED",
                "DESCRIPTION",
            ],
            [
                [
                    r["uuid"],
                    r["stage"],
                    shown.compact(row.progress),
                    r["user"],
                    r["group"],
                    f"{r['destination_type']} {r['destination_id']}",
                    str(r["files"]),
                    local_time(row.updated_at),
                    truncate(r["description"], 60),
                ]
                for r, row in zip(records, rows, strict=True)
            ],
        )
    )


# --- show -----------------------------------------------------------------------------------


def _channel_state(state: ChannelState) -> str:
    if state.delivered_at is not None:
        return "delivered"
    if state.given_up_at is not None:
        return "given up"
    return "owed"


def _notification_records(channels: list[ChannelState]) -> list[dict[str, Any]]:
    """Each channel the order's latest outcome owes: owed, delivered or given up."""
    return [
        {
            "channel": c.channel,
            "event_id": c.event_id,
            "stage": c.stage,
            "state": _channel_state(c),
            "owed": c.delivered_at is None and c.given_up_at is None,
            "queued_at": iso(c.queued_at),
            "delivered_at": iso(c.delivered_at),
            "given_up_at": iso(c.given_up_at),
            "given_up": c.given_up_at is not None,
            "attempts": c.attempts,
            "next_attempt_at": iso(c.due_at)
            if c.delivered_at is None and c.given_up_at is None
            else None,
            "last_error": c.last_error,
        }
        for c in channels
    ]


def _print_notifications(records: list[dict[str, Any]]) -> None:
    typer.echo(f"\nNotifications of the outcome ({len(records)} channels)")
    if not records:
        return
    rows = []
    for r in records:
        when = {
            "delivered": r["delivered_at"],
            "given up": r["given_up_at"],
            "owed": r["next_attempt_at"],
        }[r["state"]]
        rows.append(
            [
                r["channel"],
                r["state"],
                local_time(datetime.fromisoformat(when)) if when else "-",
                str(r["attempts"]),
                r["last_error"] or "",
            ]
        )
    typer.echo(table(["CHANNEL", "STATE", "AT / NEXT TRY", "ATTEMPTS", "LAST ERROR"], rows))


def _detail_record(order: OrderDetail, events: list[OrderEvent]) -> dict[str, Any]:
    preprocessing = None
    spec = order.preprocessing
    if spec is not None:
        preprocessing = {
            "id": spec.id,
            "container": spec.container,
            "input_file": spec.input_file,
            "output_folder": spec.output_folder,
            "alt_output_folder": spec.alt_output_folder,
            "extra_params": order.raw_extra_params,
        }
    summary = order.summary
    return {
        "uuid": summary.uuid,
        "stage": summary.stage,
        "description": summary.description,
        "user": summary.user_name,
        "group": summary.group_name,
        "destination_type": summary.destination_type,
        "destination_id": summary.destination_id,
        "files": file_list(summary.files),
        "file_names": file_list(order.file_names),
        "queued_at": iso(order.queued_at),
        "updated_at": iso(summary.updated_at),
        "attempts": order.attempts,
        "runs": order.runs,
        "worker_id": summary.worker_id,
        "last_worker_id": order.last_worker_id,
        "lease_expires_at": iso(order.lease_expires_at),
        "cancel_requested": order.cancel_requested,
        "progress": shown.record(order.progress),
        "not_before": iso(order.not_before),
        "waiting_since": iso(order.waiting_since),
        "wait_cause": order.wait_cause,
        "retries": order.retries,
        "preprocessing": preprocessing,
        "import_options": parse_json(order.import_options),
        "objects": order.objects,
        "history": [
            {
                "id": e.id,
                "timestamp": iso(e.timestamp),
                "stage": e.stage,
                "description": e.description,
            }
            for e in events
        ],
    }


# What a wait tied to a cause waits for (its replica probes it and wakes the order the moment
# it answers; the next try shown is only the latest it runs)
_CAUSES = {
    "omero": "OMERO",
    "storage": "the shared storage",
    "container_runtime": "the container runtime",
}


def _wait_fields(order: OrderDetail) -> list[tuple[str, str]]:
    """When a waiting order is tried again, and the automatic retries it used."""
    fields = []
    due = order.not_before
    if order.summary.stage == STAGE_NEW_ORDER and due is not None:
        left = (due - datetime.now(timezone.utc)).total_seconds()
        when = f"in {duration(left)}" if left > 0 else "due now"
        cause = _CAUSES.get(order.wait_cause or "")
        if cause is not None:
            fields.append(("Waiting for", f"{cause} to answer; tried the moment it does"))
            when = f"at the latest, {when}"
        fields.append(("Next try", f"{local_time(due)} ({when})"))
    if order.waiting_since is not None:
        fields.append(("Waiting for files since", local_time(order.waiting_since)))
    if order.retries:
        fields.append(("Automatic retries", f"{order.retries} used"))
    return fields


def _print_detail(record: dict[str, Any], order: OrderDetail, events: list[OrderEvent]) -> None:
    if record["worker_id"]:
        worker = record["worker_id"]
        if order.lease_expires_at is not None:
            worker += f", lease until {local_time(order.lease_expires_at)}"
    elif record["last_worker_id"]:
        worker = f"{record['last_worker_id']} (last run; not running now)"
    else:
        worker = "none (never started)"
    fields = [
        ("Order", record["uuid"]),
        ("Stage", record["stage"]),
        ("Progress", shown.detail(order.progress)),
        ("Description", record["description"] or "-"),
        ("User", record["user"]),
        ("Group", record["group"]),
        ("Destination", f"{record['destination_type']} {record['destination_id']}"),
        ("Import options", order.import_options or "-"),
        ("Queued", local_time(order.queued_at)),
        ("Updated", local_time(order.summary.updated_at)),
        ("Attempts", f"{record['attempts']} (runs, including handed-back ones: {record['runs']})"),
        ("Worker", worker),
        ("Cancel requested", "yes" if record["cancel_requested"] else "no"),
        *_wait_fields(order),
    ]
    pre = record["preprocessing"]
    if pre is None:
        fields.append(("Preprocessing", "none"))
    else:
        fields += [
            ("Preprocessing", pre["container"]),
            ("  input file", pre["input_file"]),
            ("  output folder", pre["output_folder"]),
            ("  alt output", pre["alt_output_folder"] or "-"),
            ("  extra params", json.dumps(pre["extra_params"] or {})),
        ]
    width = max(len(name) for name, _ in fields)
    for name, value in fields:
        typer.echo(f"{name.ljust(width)}  {value}")
    typer.echo(f"\nFiles ({len(record['files'])})")
    for path in record["files"]:
        typer.echo(f"  {path}")
    typer.echo(f"\nHistory ({len(events)} rows)")
    typer.echo(
        table(
            ["ID", "TIME", "STAGE", "DESCRIPTION"],
            [[str(e.id), local_time(e.timestamp), e.stage, e.description or ""] for e in events],
        )
    )
    objects = record["objects"]
    typer.echo(f"\nOMERO objects ({len(objects)})")
    if objects:
        typer.echo(
            table(
                ["TYPE", "ID", "NAME", "FILESET", "ANNOTATED"],
                [
                    [
                        str(o.get("type", "")),
                        str(o.get("id", "")),
                        str(o.get("name", "")),
                        str(o.get("fileset_id") or "-"),
                        "yes" if o.get("annotated") else "no",
                    ]
                    for o in objects
                    if isinstance(o, dict)
                ],
            )
        )


def show(
    order_uuid: UuidArgument, as_json: JsonOption = False, config: ConfigOption = None
) -> None:
    """Everything known about one order: its full history, settings, worker and results."""
    settings = load_quietly(config)
    with ready_database(settings) as url:

        async def read(
            store: OrderStore,
        ) -> tuple[OrderDetail | None, list[OrderEvent], list[ChannelState]]:
            return (
                await store.order_detail(order_uuid),
                await store.order_events(order_uuid),
                await store.order_deliveries(order_uuid),
            )

        order, events, channels = run_with_store(settings, url, read)
    if order is None:
        raise fail(f"no order with uuid {order_uuid}", EXIT_FAILED)
    record = _detail_record(order, events)
    record["notifications"] = _notification_records(channels)
    if as_json:
        echo_json(record)
    else:
        _print_detail(record, order, events)
        _print_notifications(record["notifications"])


# --- retry ----------------------------------------------------------------------------------


def retry(order_uuid: UuidArgument, config: ConfigOption = None) -> None:
    """Queue a finished order again, or start a waiting one now (it keeps its place),
    appending an 'Import Pending' row (history is kept)."""
    settings = load_quietly(config)
    with ready_database(settings) as url:

        async def requeue(store: OrderStore) -> str:
            try:
                return await store.retry(order_uuid, RETRY_NOTE)
            except OrderNotFound:
                raise fail(f"no order with uuid {order_uuid}", EXIT_FAILED) from None
            except OrderBusy as exc:
                raise fail(
                    f"order {order_uuid} is {exc.stage}: only finished orders"
                    " (Import Completed or Import Failed) and waiting ones can be retried",
                    EXIT_FAILED,
                ) from None

        previous = run_with_store(settings, url, requeue)
    typer.echo(f"order {order_uuid} queued again (it was {previous})")


# --- cancel ---------------------------------------------------------------------------------


async def _await_end(store: OrderStore, order_uuid: str, timeout: float) -> OrderDetail:
    deadline = time.monotonic() + timeout
    while True:
        order = await store.order_detail(order_uuid)
        assert order is not None, "orders are never deleted"
        if order.summary.stage in TERMINAL_STAGES or time.monotonic() > deadline:
            return order
        await asyncio.sleep(FOLLOW_INTERVAL)


def cancel(
    order_uuid: UuidArgument,
    timeout: Annotated[
        float,
        typer.Option("--timeout", help="Seconds to wait for a running order to stop.", min=0),
    ] = 5.0,
    config: ConfigOption = None,
) -> None:
    """Cancel an order: a pending one ends at once, a running one is stopped by its importer."""
    settings = load_quietly(config)
    with ready_database(settings) as url:

        async def request(store: OrderStore) -> OrderDetail | None:
            try:
                result = await store.request_cancel(order_uuid)
            except OrderNotFound:
                raise fail(f"no order with uuid {order_uuid}", EXIT_FAILED) from None
            except OrderBusy as exc:
                raise fail(
                    f"order {order_uuid} already finished ({exc.stage})", EXIT_FAILED
                ) from None
            if result.cancelled:
                return None
            typer.echo(f"cancel requested; waiting up to {timeout:g}s for the importer", err=True)
            return await _await_end(store, order_uuid, timeout)

        order = run_with_store(settings, url, request)
    if order is None:
        typer.echo(f"order {order_uuid} cancelled before it started")
        return
    stage = order.summary.stage
    if stage not in TERMINAL_STAGES:
        raise fail(
            f"order {order_uuid} is still {stage} after {timeout:g}s; the request stays"
            " recorded and its importer stops it as soon as it sees it",
            EXIT_FAILED,
        )
    description = order.summary.description
    if description != CANCELLED:
        raise fail(
            f"order {order_uuid} finished before the cancel took effect: {stage}"
            f" {description or ''}".rstrip(),
            EXIT_FAILED,
        )
    typer.echo(f"order {order_uuid} cancelled ({stage}: {description})")
