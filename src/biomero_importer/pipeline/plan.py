"""What an order would do, worked out without doing any of it (``biomero-importer plan``).

The plan runs the pipeline's own checks and command builders: :func:`validate`,
:func:`plan_jobs` for the container commands and :func:`import_argv` for ``omero import``, so
what it prints is what a run would execute. It reads the order's files (validation stats and
resolves them; folders are listed) and writes nothing: no row, no folder, no log file.

Blocking (filesystem walks): callers in an event loop run it in a thread.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from biomero_importer import paths
from biomero_importer.model import ClaimedOrder, OrderDetail
from biomero_importer.observability.logging import Redactor
from biomero_importer.omero.importcli import import_argv, log_paths
from biomero_importer.pipeline.storage import failure
from biomero_importer.pipeline.validate import InvalidOrder, validate
from biomero_importer.preprocessing import ContainerJob, PreprocessingError, plan_jobs
from biomero_importer.settings import Settings

# A folder of a million files would print a million lines: the plan lists this many per unit
# and counts the rest.
MAX_LISTED_FILES = 1000
# Stands for what only the run can know: the converter's output, or an unset OMERO host.
CONTAINER_OUTPUT = "<each item container {name} writes>"
UNSET_HOST = "<omero_host>"


@dataclass(frozen=True)
class PlannedContainer:
    """One container run of a preprocessing order."""

    source: str
    name: str
    argv: list[str]


@dataclass(frozen=True)
class PlannedUnit:
    """One ``omero import``: a file or folder of the order, or a container's output."""

    path: str
    files: list[str]
    file_count: int
    import_argv: list[str]
    #: set when a re-run would not import this unit again (the objects an earlier run made)
    skipped_because: str | None = None


@dataclass
class Plan:
    uuid: str
    valid: bool
    #: "valid", or the reason the order would end 'Import Failed' at validation
    verdict: str
    user: str
    group: str
    target: str
    stage: str | None = None
    containers: list[PlannedContainer] = field(default_factory=list)
    units: list[PlannedUnit] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def claimed_from_detail(detail: OrderDetail) -> ClaimedOrder:
    """A stored order as its next claim would hand it to the pipeline (for planning only):
    one attempt and one run more, and a malformed extra_params judged as the claim does."""
    summary = detail.summary
    problem = None
    if detail.preprocessing is not None and not isinstance(detail.raw_extra_params or {}, dict):
        problem = "Preprocessing extra_params must be a JSON object"
    return ClaimedOrder(
        uuid=summary.uuid,
        group_name=summary.group_name,
        user_name=summary.user_name,
        destination_id=summary.destination_id,
        destination_type=summary.destination_type,
        files=summary.files,
        file_names=detail.file_names,
        preprocessing_id=detail.preprocessing.id if detail.preprocessing else None,
        preprocessing=detail.preprocessing,
        attempt=detail.attempts + 1,
        runs=detail.runs + 1,
        queued_at=detail.queued_at.timestamp(),
        recorded_objects=list(detail.objects),
        preprocessing_problem=problem,
        import_options=detail.import_options,
    )


def _listing(path: Path) -> tuple[list[str], int]:
    """The files a unit imports: itself, or everything below a folder (sorted, capped)."""
    if not path.is_dir():
        return [str(path)], 1
    found: list[str] = []
    count = 0
    for folder, dirs, names in os.walk(path):
        dirs.sort()
        for name in sorted(names):
            count += 1
            if len(found) < MAX_LISTED_FILES:
                found.append(str(Path(folder) / name))
    return found, count


def _recorded(records: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Objects an earlier run recorded, by the unit (order path) that made them."""
    by_key: dict[str, list[str]] = {}
    for record in records:
        if not record.get("unit_complete", True):
            continue  # found after an unfinished run: a re-run imports what is missing
        by_key.setdefault(str(record.get("key")), []).append(f"{record['type']}:{record['id']}")
    return by_key


def plan_order(claimed: ClaimedOrder, settings: Settings, *, stage: str | None = None) -> Plan:
    """The plan of ``claimed`` under ``settings``; an invalid order is a plan too (its verdict
    says why), so a caller never needs to catch anything."""
    plan = Plan(
        uuid=claimed.uuid,
        valid=False,
        verdict="",
        user=claimed.user_name,
        group=claimed.group_name,
        target=f"{claimed.destination_type} {claimed.destination_id}",
        stage=stage,
    )
    try:
        order = validate(claimed, settings.effective_import_roots)
        jobs = plan_jobs(order, settings) if order.preprocessing is not None else []
    except (InvalidOrder, PreprocessingError, paths.PathRefused) as exc:
        plan.verdict = exc.reason
        return plan
    except OSError as exc:  # storage that fails in a way that passes (ESTALE, EIO)
        plan.verdict = failure(exc, claimed.files).reason
        return plan
    plan.valid, plan.verdict = True, "valid"
    plan.target = f"{order.target.type} {order.target.id}"

    mask = Redactor.from_settings(settings)
    if settings.omero_backend == "simulator":
        plan.notes.append(
            "omero_backend is simulator: no omero import runs; the import commands are what"
            " the blitz backend would run"
        )
    if settings.omero_host is None:
        settings = settings.model_copy(update={"omero_host": UNSET_HOST})
    records = _recorded(claimed.recorded_objects)
    # As the pipeline decides: a second run looks for what the first one already imported.
    exclude_existing = claimed.runs > 1 or bool(claimed.recorded_objects)
    if exclude_existing:
        plan.notes.append(
            "a re-run: files OMERO already holds for this order are excluded (--exclude=clientpath)"
        )

    def argv_for(index: int, path: Path) -> list[str]:
        logs = log_paths(settings, order.uuid, index)
        argv = import_argv(
            settings,
            path,
            order.target,
            logs=logs,
            exclude_existing=exclude_existing,
            order_uuid=order.uuid,
        )
        return [mask(arg) for arg in argv]

    if jobs:
        plan.units = _preprocessed_units(jobs, plan, mask, argv_for)
        return plan
    for index, path in enumerate(order.files):
        checked = order.checked.get(path, path)
        files, count = _listing(checked)
        known = records.get(str(path))
        plan.units.append(
            PlannedUnit(
                path=str(path),
                files=files,
                file_count=count,
                import_argv=argv_for(index, checked),
                skipped_because=f"already imported as {', '.join(known)}" if known else None,
            )
        )
    return plan


def _preprocessed_units(
    jobs: list[ContainerJob],
    plan: Plan,
    mask: Redactor,
    argv_for: Callable[[int, Path], list[str]],
) -> list[PlannedUnit]:
    """A preprocessing order imports what its containers write: one unit per container here,
    each imported item's path known only once the container has run."""
    units = []
    for index, job in enumerate(jobs):
        plan.containers.append(
            PlannedContainer(str(job.source), job.name, [mask(a) for a in job.argv])
        )
        files, count = _listing(job.checked or job.source)
        output = CONTAINER_OUTPUT.format(name=job.name)
        folder = job.alt_mount.host if job.alt_mount is not None else job.processed_dir
        argv = argv_for(index, folder / output)
        units.append(PlannedUnit(output, files, count, argv))
    plan.notes.append(
        "preprocessing: each container's output items are imported one by one; their paths"
        " are known once the container has run"
    )
    return units


def render_text(plan: Plan) -> str:
    """The plan for a terminal: verdict, target, containers, units with files, notes."""
    lines = [f"order    {plan.uuid}" + (f"  ({plan.stage})" if plan.stage else "")]
    lines.append(f"verdict  {plan.verdict}")
    lines.append(f"user     {plan.user} (group {plan.group})")
    lines.append(f"target   {plan.target}")
    if not plan.valid:
        lines.append("nothing would run: the order would end 'Import Failed'")
        return "\n".join(lines)
    for number, container in enumerate(plan.containers, start=1):
        lines.append(f"\ncontainer {number}: {container.name}  (input {container.source})")
        lines.append(f"  argv: {json.dumps(container.argv)}")
    for number, unit in enumerate(plan.units, start=1):
        lines.append(f"\nimport unit {number}: {unit.path}  ({unit.file_count} files)")
        for name in unit.files:
            lines.append(f"  {name}")
        if unit.file_count > len(unit.files):
            lines.append(f"  ... and {unit.file_count - len(unit.files)} more")
        if unit.skipped_because:
            lines.append(f"  a re-run skips it: {unit.skipped_because}")
        lines.append(f"  omero import argv: {json.dumps(unit.import_argv)}")
    if plan.notes:
        lines.append("")
        lines.extend(f"note: {note}" for note in plan.notes)
    return "\n".join(lines)
