"""biomero-importer: the package root re-exports the original importer's public names.

Loaded on first use (PEP 562), so commands that never touch them do not import SQLAlchemy's
writer or biomero-schema.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "get_ingest_tracker": "biomero_importer.utils.ingest_tracker",
    "IngestTracker": "biomero_importer.utils.ingest_tracker",
    "IngestionTracking": "biomero_importer.utils.ingest_tracker",
    "load_settings": "biomero_importer.utils.initialize",
    "IMPORTER_API_SCHEMA": "biomero_importer.api",
    "UnsupportedImportOperation": "biomero_importer.api",
    "get_importer_capabilities": "biomero_importer.api",
    "submit_import_order": "biomero_importer.api",
    "supports_import_options": "biomero_importer.api",
}

__all__ = [
    "IMPORTER_API_SCHEMA",
    "IngestTracker",
    "IngestionTracking",
    "UnsupportedImportOperation",
    "get_importer_capabilities",
    "get_ingest_tracker",
    "load_settings",
    "submit_import_order",
    "supports_import_options",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'biomero_importer' has no attribute {name!r}")
    return getattr(import_module(module), name)
