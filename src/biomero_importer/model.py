"""The order model: stage names, orders as stored and as validated, and their outcomes.

This module is the bottom of the package: it imports nothing from ``biomero_importer``, so the
store, the pipeline, the adapters and the CLI can all share these types without cycles.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

# Stage strings are a public interface: OMERO.biomero, Metabase and SQL clients match on them.
STAGE_NEW_ORDER = "Import Pending"
STAGE_IMPORTING = "Import Started"
STAGE_PREPROCESSING = "Import Preprocessing"
STAGE_IMPORTED = "Import Completed"
STAGE_INGEST_FAILED = "Import Failed"

TERMINAL_STAGES = (STAGE_IMPORTED, STAGE_INGEST_FAILED)
RUNNING_STAGES = (STAGE_IMPORTING, STAGE_PREPROCESSING)
ALL_STAGES = (STAGE_NEW_ORDER, *RUNNING_STAGES, *TERMINAL_STAGES)

CANCELLED = "Cancelled"

TargetType = Literal["Dataset", "Screen"]
ObjectType = Literal["Image", "Plate"]
PlatePixelSource = Literal["source", "label"]


@dataclass(frozen=True)
class Target:
    """Where an order's data goes: a Dataset receives Images, a Screen receives Plates."""

    type: TargetType
    id: int


@dataclass(frozen=True)
class ImportedObject:
    """One Image or Plate that an import created (or that an earlier attempt created)."""

    type: ObjectType
    id: int
    name: str
    client_path: str
    fileset_id: int | None = None


@dataclass(frozen=True)
class PreprocessingSpec:
    """One ``imports_preprocessing`` row, as written by OMERO.biomero or SQL clients."""

    id: int
    container: str
    input_file: str
    output_folder: str
    alt_output_folder: str | None
    extra_params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RegistrationOptions:
    """How an OME-Zarr is registered (the ``registration`` part of an order's ImportOptions).

    ``label``: a Plate's images show the label image ``plate_label_name`` of each field
    instead of its source pixels (a label-backed preview).
    """

    plate_pixel_source: PlatePixelSource = "source"
    plate_label_name: str | None = None


@dataclass(frozen=True)
class ClaimedOrder:
    """The raw columns of an order's latest row, exactly as stored (not yet validated)."""

    uuid: str
    group_name: str
    user_name: str
    destination_id: str
    destination_type: str
    files: str
    file_names: str | None
    preprocessing_id: int | None
    preprocessing: PreprocessingSpec | None
    attempt: int
    runs: int
    queued_at: float
    recorded_objects: list[dict[str, Any]] = field(default_factory=list)
    preprocessing_problem: str | None = None
    # ``imports.import_options``: the order's ImportOptions as JSON text, NULL for none
    import_options: str | None = None
    #: automatic retries of transient failures used so far (reset when the order ends)
    retries: int = 0
    #: epoch seconds its current stretch of settle waits began, None if it is not in one
    waiting_since: float | None = None
    #: epoch seconds it was not to be claimed before (None: it did not wait)
    not_before: float | None = None


@dataclass(frozen=True)
class Order:
    """A validated order: every file exists, is readable and lies inside an import root."""

    uuid: str
    group: str
    user: str
    target: Target
    files: list[Path]
    file_names: list[str]
    preprocessing: PreprocessingSpec | None
    attempt: int
    #: the claim's run number (``ClaimedOrder.runs``): every write for this run is fenced by it
    run: int
    registration: RegistrationOptions = field(default_factory=RegistrationOptions)
    # Each file as validated, symlinks resolved: imports and mounts use these, after checking
    # again that the file still resolves there (a file swapped meanwhile fails the order).
    checked: dict[Path, Path] = field(default_factory=dict)
    # Each plain file's size when it was validated (None: a folder): import progress in bytes.
    sizes: dict[Path, int | None] = field(default_factory=dict)


#: Failures that pass: OMERO unreachable, shared storage not answering, the container runtime
#: not available. Orders failing so are retried automatically (``transient_retries``).
TransientKind = Literal["omero", "storage", "container_runtime"]
TRANSIENT_KINDS: tuple[TransientKind, ...] = ("omero", "storage", "container_runtime")
TRANSIENT_PHRASES: dict[TransientKind, str] = {
    "omero": "OMERO unavailable",
    "storage": "Storage not answering",
    "container_runtime": "Container runtime unavailable",
}


@dataclass
class Outcome:
    """How a run of an order ended: a terminal stage, or 'Import Pending' for a hand-back."""

    stage: str
    description: str | None
    file_names: list[str] | None = None
    objects: list[dict[str, Any]] = field(default_factory=list)
    #: set on an 'Import Failed' whose cause passes: the dispatcher may turn it into a wait
    transient: TransientKind | None = None
    #: a hand-back that waits: seconds before the order may be claimed again
    wait_seconds: float | None = None
    #: the wait is for the order's files to stop changing (bounded by ``settle_max_wait``)
    settling: bool = False


@dataclass(frozen=True)
class NewOrder:
    """An order as a writer queues it (OMERO.biomero, SQL, ``submit``, the demo)."""

    uuid: str
    group: str
    user: str
    destination_type: str
    destination_id: str
    files: str  # JSON text, stored as given: validation is the service's job
    preprocessing: PreprocessingSpec | None = None
    #: ImportOptions as JSON text (NULL when none), stored as given
    import_options: str | None = None


@dataclass(frozen=True)
class OrderEvent:
    """One row of an order's history."""

    id: int
    timestamp: datetime | None
    stage: str
    description: str | None


@dataclass(frozen=True)
class OrderState:
    stage: str
    latest_id: int
    worker_id: str | None
    cancel_requested: bool


ProgressStep = Literal["validate", "preprocess", "import", "annotate"]
PROGRESS_STEPS: tuple[ProgressStep, ...] = ("validate", "preprocess", "import", "annotate")


@dataclass(frozen=True)
class Progress:
    """Where a running order is, as its replica last recorded it (``importer_orders.progress``).

    ``units_done`` of ``units_total`` import units (files, folders or converter outputs) are
    through the step; ``current_file`` is the name being worked on. Bytes are known only when
    every unit is a plain file (``None`` otherwise). ``recorded_at`` is when it was written,
    filled in by the store when it reads the row.
    """

    step: ProgressStep
    units_done: int = 0
    units_total: int = 0
    current_file: str | None = None
    bytes_done: int | None = None
    bytes_total: int | None = None
    recorded_at: datetime | None = None

    def as_json(self) -> dict[str, Any]:
        """The stored form (``recorded_at`` is a column of its own)."""
        return {
            "step": self.step,
            "units_done": self.units_done,
            "units_total": self.units_total,
            "current_file": self.current_file,
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
        }

    @classmethod
    def from_json(cls, value: Any, recorded_at: datetime | None = None) -> Progress | None:
        """The stored form back, or None for anything else: the column is writable by any SQL
        client, and a bad value must never break ``status``."""
        if not isinstance(value, dict) or value.get("step") not in PROGRESS_STEPS:
            return None

        def count(key: str) -> int | None:
            number = value.get(key)
            # bool is an int to Python, not a count
            if isinstance(number, int) and not isinstance(number, bool) and number >= 0:
                return number
            return None

        current = value.get("current_file")
        return cls(
            step=value["step"],
            units_done=count("units_done") or 0,
            units_total=count("units_total") or 0,
            current_file=current if isinstance(current, str) else None,
            bytes_done=count("bytes_done"),
            bytes_total=count("bytes_total"),
            recorded_at=recorded_at,
        )


@dataclass(frozen=True)
class OrderSummary:
    """The latest state of one order, as ``status`` lists it."""

    uuid: str
    stage: str
    updated_at: datetime
    worker_id: str | None
    user_name: str
    group_name: str
    destination_type: str
    destination_id: str
    files: str
    description: str | None
    #: what a running order's replica last recorded; None when not running (or not yet)
    progress: Progress | None = None


@dataclass(frozen=True)
class OrderDetail:
    """Everything known about one order but its history."""

    summary: OrderSummary
    latest_id: int
    queued_at: datetime
    last_worker_id: str | None
    lease_expires_at: datetime | None
    attempts: int
    runs: int
    cancel_requested: bool
    objects: list[dict[str, Any]]
    file_names: str | None
    preprocessing: PreprocessingSpec | None
    #: extra_params exactly as stored (may be anything a SQL writer put there)
    raw_extra_params: Any = None
    import_options: str | None = None
    #: a pending order that waits is not claimed before this
    not_before: datetime | None = None
    #: when its current stretch of waits for its files to settle began
    waiting_since: datetime | None = None
    #: automatic retries of transient failures used (0 again once the order ends)
    retries: int = 0
    #: handed back to wait and not yet due (its time has not come, its cause is still down)
    waiting: bool = False
    #: what a waiting order waits for, when a probe can tell it is back
    wait_cause: str | None = None

    @property
    def progress(self) -> Progress | None:
        return self.summary.progress


@dataclass(frozen=True)
class Notification:
    """One order outcome to notify (an ``importer_outbox`` row), with what its messages say.

    ``attempts`` counts the attempts of the channel it was claimed for, this one included.
    The order's fields come from the outcome's own history row, so a later retry of the order
    does not change what this outcome says.
    """

    id: int
    uuid: str
    event_id: int
    stage: str
    attempts: int
    #: seconds since the outcome was queued for notification
    age_seconds: float
    user: str | None
    group: str | None
    destination_type: str | None
    destination_id: str | None
    description: str | None
    objects: list[dict[str, Any]]
    #: when the order was first queued and first started (None if the history lost it)
    queued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
