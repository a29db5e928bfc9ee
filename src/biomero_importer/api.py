"""The public Python API of the original importer (``biomero_importer.api``), for callers
that probe it: OMERO.biomero, OMERO.Analysis, biomero-scripts.

``submit_import_order`` checks an order up front and writes it through the same writer as
``log_ingestion_step``. ``get_importer_capabilities`` says what this importer runs: ImportOptions
schemas 1 and 2, external preprocessing, and no lifecycle operation (upstream's opt-in
``biomero.shallow-zarr`` is not implemented here).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from copy import deepcopy
from typing import Any

from biomero_importer.options import (
    MISSING_SCHEMA,
    SUPPORTED_OPERATIONS,
    InvalidImportOptions,
    UnsupportedOperation,
    can_parse,
    check_operations,
    envelope,
)
from biomero_importer.utils.ingest_tracker import STAGE_NEW_ORDER, log_ingestion_step

__all__ = [
    "IMPORTER_API_SCHEMA",
    "UnsupportedImportOperation",
    "get_importer_capabilities",
    "submit_import_order",
    "supports_import_options",
]

IMPORTER_API_SCHEMA = 1
REQUIRED_ORDER_FIELDS = ("Group", "Username", "UUID", "DestinationID", "DestinationType", "Files")
# upstream's switch for its shallow-zarr operation; read only to report that it has no effect
SHALLOW_ZARR_FLAG = "BIOMERO_SHALLOW_ZARR"


class UnsupportedImportOperation(ValueError):
    """The order asks for a lifecycle operation this importer does not run."""


def get_importer_capabilities() -> dict[str, Any]:
    """What this importer supports, without a running importer process."""
    errors = [] if can_parse() else [MISSING_SCHEMA]
    if os.getenv(SHALLOW_ZARR_FLAG, "").strip().lower() == "true":
        errors.append(
            f"{SHALLOW_ZARR_FLAG} is set, but this importer does not run biomero.shallow-zarr"
        )
    return {
        "schema": IMPORTER_API_SCHEMA,
        "importOptionsSchemas": [1, 2],
        "lifecycleOperations": list(SUPPORTED_OPERATIONS),
        "externalPreprocessing": True,
        "isccBioIdentity": False,
        "configurationErrors": errors,
    }


def _options_mapping(value: Any) -> Mapping[str, Any]:
    if value is None:
        return {}
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if not isinstance(value, Mapping):
        raise InvalidImportOptions("ImportOptions must be a mapping")
    return value


def supports_import_options(value: Any) -> bool:
    """Whether this importer can run every operation the options ask for (ValueError when
    they are malformed)."""
    raw = _options_mapping(value)
    try:
        check_operations(raw)
    except UnsupportedOperation:
        return False
    return not envelope(raw).operations


def submit_import_order(
    order: Mapping[str, Any],
    *,
    log_order: Callable[[dict[str, Any], str], Any] = log_ingestion_step,
) -> str:
    """Check an order and queue it as 'Import Pending'; returns its UUID.

    Raises ValueError for missing fields or malformed ImportOptions and
    UnsupportedImportOperation for an operation this importer does not run. The options are
    written as the caller gave them (the stored column is JSON, ``{}`` stored as NULL).
    """
    missing = [name for name in REQUIRED_ORDER_FIELDS if name not in order]
    if missing:
        raise ValueError("Missing required import order fields: " + ", ".join(missing))
    normalized = deepcopy(dict(order))
    raw = _options_mapping(normalized.get("ImportOptions"))
    try:
        check_operations(raw)
    except UnsupportedOperation as exc:
        raise UnsupportedImportOperation(str(exc)) from None
    envelope(raw)
    log_order(normalized, STAGE_NEW_ORDER)
    return str(normalized["UUID"])
