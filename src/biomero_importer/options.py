"""An order's ImportOptions (``imports.import_options``), as upstream's contract defines them.

Writers store the options as JSON text (``{}`` and none as NULL). Schema 1 is flat
(``{"schema": 1, "platePixelSource": ..., "plateLabelName": ...}``), schema 2 an envelope
(``{"schema": 2, "registration": {...}, "operations": [...]}``); both are parsed by the
field's own package, biomero-schema, which upgrades schema 1 to the envelope. This importer
runs no lifecycle operation: an order that asks for one fails, naming it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from biomero_importer.model import RegistrationOptions
from biomero_importer.text import short

# The ``import-options`` extra. Without it (biomero-schema 0.1 beside biomero 2.8, or Python
# 3.10) options are still stored, and only an order or call that carries some fails, saying so.
try:
    from biomero_schema.imports import parse_import_options
except ImportError:
    parse_import_options = None

MISSING_SCHEMA = (
    "ImportOptions need biomero-schema 0.2 or newer:"
    " pip install 'biomero-importer[import-options]' (Python 3.11+)"
)

# Lifecycle operations this importer runs (upstream's only one, biomero.shallow-zarr, is not).
SUPPORTED_OPERATIONS: tuple[str, ...] = ()


class InvalidImportOptions(ValueError):
    """The options cannot be used; the message becomes the order's 'Import Failed' reason."""


class UnsupportedOperation(InvalidImportOptions):
    def __init__(self, kind: str) -> None:
        super().__init__(f"Operation '{short(kind, 80)}' is not supported by this importer")
        self.kind = kind


def to_column(value: Any) -> str | None:
    """What a writer stores in ``import_options``: JSON text, or NULL for no options.

    A mapping (or a biomero-schema model) is stored as JSON. Text is stored as given, even
    when it is no JSON object, so the service can fail that order saying why instead of the
    writer dropping it.
    """
    if value is None:
        return None
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, str):
        try:
            decoded = json.loads(value)
        except ValueError:
            return value
        return None if decoded in ({}, None) else value
    if isinstance(value, Mapping) and not value:
        return None
    return json.dumps(value, default=str)


def requested_operations(raw: Mapping[str, Any]) -> list[str]:
    """Kinds of the lifecycle operations a schema-2 envelope asks for, read before parsing so
    a kind biomero-schema does not know is reported as unsupported, not as malformed."""
    if raw.get("schema") != 2 or not isinstance(raw.get("operations"), list):
        return []
    return [
        str(item.get("kind")) if isinstance(item, Mapping) else str(item)
        for item in raw["operations"]
    ]


def check_operations(raw: Mapping[str, Any]) -> None:
    for kind in requested_operations(raw):
        if kind not in SUPPORTED_OPERATIONS:
            raise UnsupportedOperation(kind)


def envelope(raw: Mapping[str, Any] | None) -> Any:
    """biomero-schema's ``ImportOptionsEnvelope`` for ``raw`` (schema 1 is upgraded)."""
    if parse_import_options is None:
        raise InvalidImportOptions(MISSING_SCHEMA)
    try:
        return parse_import_options(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()))
        message = str(first.get("msg", "")).removeprefix("Value error, ")
        detail = f"{where}: {message}" if where else message
        raise InvalidImportOptions(f"ImportOptions are invalid: {short(detail, 200)}") from None


def can_parse() -> bool:
    return parse_import_options is not None


def parse_column(text: str | None) -> RegistrationOptions:
    """The registration options of a stored order; raises InvalidImportOptions."""
    if text is None or not text.strip():
        return RegistrationOptions()
    try:
        raw = json.loads(text)
    except ValueError:
        raise InvalidImportOptions("ImportOptions is not valid JSON") from None
    if raw is None:
        return RegistrationOptions()
    if not isinstance(raw, dict):
        raise InvalidImportOptions("ImportOptions must be a JSON object")
    if not raw:
        return RegistrationOptions()
    check_operations(raw)
    registration = envelope(raw).registration
    return RegistrationOptions(
        plate_pixel_source=registration.plate_pixel_source,
        plate_label_name=registration.plate_label_name,
    )
