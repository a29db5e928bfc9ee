"""What an order is once the dispatcher has claimed it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from biomero_importer.omero.port import Target


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
