"""Preprocessing: an order's files converted by containers before import.

The pipeline calls :func:`validate_preprocessing` while validating an order (nothing runs
for a bad one) and :func:`run_preprocessing` before importing every item it returns.
"""

from biomero_importer.preprocessing.command import (
    RESERVED_FLAGS,
    ContainerJob,
    Mount,
    plan_jobs,
    validate_preprocessing,
)
from biomero_importer.preprocessing.contract import (
    ProcessedItem,
    output_area,
    parse_keyvalues,
    parse_result,
)
from biomero_importer.preprocessing.errors import PreprocessingError
from biomero_importer.preprocessing.images import (
    allowlist_warning,
    checked_image,
    normalise_image,
)
from biomero_importer.preprocessing.runner import (
    PreprocessResult,
    remove_container,
    run_preprocessing,
)

__all__ = [
    "RESERVED_FLAGS",
    "ContainerJob",
    "Mount",
    "PreprocessResult",
    "PreprocessingError",
    "ProcessedItem",
    "allowlist_warning",
    "checked_image",
    "normalise_image",
    "output_area",
    "parse_keyvalues",
    "parse_result",
    "plan_jobs",
    "remove_container",
    "run_preprocessing",
    "validate_preprocessing",
]
