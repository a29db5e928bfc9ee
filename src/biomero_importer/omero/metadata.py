"""The key/value pairs of the MapAnnotation written on every imported Image or Plate.

The keys are the original importer's, kept so that searches and dashboards built on them
keep working: order fields, preprocessing settings, converter output, ``metadata.csv`` rows
and the import time.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

import structlog

from biomero_importer import paths
from biomero_importer.model import Order

log = structlog.get_logger(__name__)

METADATA_CSV = "metadata.csv"
# An order may list thousands of files; each annotation repeats the order's file list, so
# past this length the list is cut and says how many entries it had.
MAX_LIST_TEXT = 4000


def list_text(items: Iterable[str], total: int) -> str:
    """Python list notation, as the original wrote it, cut after MAX_LIST_TEXT characters."""
    shown: list[str] = []
    length = 2
    for item in items:
        length += len(repr(item)) + 2
        if length > MAX_LIST_TEXT:
            return f"{str(shown)[:-1]}, ...] ({total} in all)"
        shown.append(item)
    return str(shown)


def _text(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    return str(value)


def normalise_keyvalues(raw: object) -> list[tuple[str, str]]:
    """Converter ``keyvalues`` (a dict, a list of one-key dicts, or pairs) as string pairs."""
    if raw is None:
        return []
    if isinstance(raw, dict):
        return [(str(k), _text(v)) for k, v in raw.items()]
    pairs: list[tuple[str, str]] = []
    if isinstance(raw, (list, tuple)):
        for entry in raw:
            if isinstance(entry, dict):
                pairs.extend((str(k), _text(v)) for k, v in entry.items())
            elif isinstance(entry, (list, tuple)) and len(entry) == 2:
                pairs.append((str(entry[0]), _text(entry[1])))
            else:
                log.warning("keyvalue_entry_skipped", entry_type=type(entry).__name__)
        return pairs
    log.warning("keyvalues_ignored", value_type=type(raw).__name__)
    return pairs


def _csv_candidates(client_path: Path, processed_folder_name: str) -> list[Path]:
    folder = client_path.parent
    candidates = [folder / METADATA_CSV, folder / processed_folder_name / METADATA_CSV]
    # A processed item lives in the .processed folder itself: its original sits one level up.
    if folder.name == processed_folder_name:
        candidates.insert(0, folder.parent / METADATA_CSV)
    unique: list[Path] = []
    for candidate in candidates:
        if candidate not in unique:
            unique.append(candidate)
    return unique


def read_metadata_csv(path: Path) -> list[tuple[str, str]]:
    """(key, value) rows of a two-column CSV; an optional ``key,value`` header is skipped."""
    pairs: list[tuple[str, str]] = []
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            for number, row in enumerate(csv.reader(handle), start=1):
                if not row or all(not cell.strip() for cell in row):
                    continue
                if len(row) != 2 or not row[0].strip():
                    log.warning("metadata_csv_row_skipped", file=str(path), line=number)
                    continue
                key, value = row[0].strip(), row[1].strip()
                if number == 1 and (key.lower(), value.lower()) == ("key", "value"):
                    continue
                pairs.append((key, value))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        log.warning("metadata_csv_unreadable", file=str(path), error=str(exc))
    return pairs


def build_annotation_pairs(
    order: Order,
    client_path: Path,
    *,
    preprocessing_keyvalues: Iterable[tuple[str, str]] | None,
    processed_folder_name: str,
    imported_at: datetime,
    import_roots: paths.Area,
    notes: list[str],
) -> list[tuple[str, str]]:
    """Every key of the import annotation, in a stable order, each key once.

    A ``metadata.csv`` is read only when it resolves inside ``import_roots``: one linked
    elsewhere (another group's, say) is skipped with a warning, and why is appended to
    ``notes`` for the order's description.
    """
    values: dict[str, str] = {
        "UUID": order.uuid,
        "Filepath": str(client_path),
        "Group": order.group,
        "Username": order.user,
        "DestinationID": str(order.target.id),
        "DestinationType": order.target.type,
        # Python list notation, as the original importer wrote these two.
        "Files": list_text((str(path) for path in order.files), len(order.files)),
        "FileNames": list_text(order.file_names, len(order.file_names)),
    }
    spec = order.preprocessing
    if spec is not None:
        # The names OMERO.biomero gives these fields in an order.
        values["preprocessing_container"] = spec.container
        values["preprocessing_inputfile"] = spec.input_file
        values["preprocessing_outputfolder"] = spec.output_folder
        if spec.alt_output_folder is not None:
            values["preprocessing_altoutputfolder"] = spec.alt_output_folder
        for key, value in spec.extra_params.items():
            values[f"preprocessing_{key}"] = _text(value)
        values["preprocessing_id"] = str(spec.id)
    for key, value in preprocessing_keyvalues or ():
        values[f"processing_output_{key}"] = value
    values["Import_Timestamp"] = imported_at.isoformat()
    for candidate in _csv_candidates(client_path, processed_folder_name):
        if not os.path.lexists(candidate):
            continue
        try:
            csv_path = paths.contained(candidate, import_roots, METADATA_CSV)
        except paths.PathRefused as exc:
            log.warning("metadata_csv_skipped", file=str(candidate), reason=exc.reason)
            notes.append(f"skipped {exc.reason}")
            continue
        if csv_path.is_file():
            for key, value in read_metadata_csv(csv_path):
                values[f"csv_{key}"] = value
    return list(values.items())
