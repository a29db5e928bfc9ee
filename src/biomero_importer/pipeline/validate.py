"""Checks every order before any work: bad input fails fast with a reason to act on."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Sequence
from pathlib import Path

from biomero_importer import paths
from biomero_importer.model import ClaimedOrder, Order, Target
from biomero_importer.options import InvalidImportOptions, parse_column
from biomero_importer.text import safe_text, short

MAX_NAME_LENGTH = 255
MAX_OMERO_ID = 2**63 - 1  # OMERO ids are Java longs
MAX_PATH_LENGTH = 4096
DESTINATION_TYPES = ("Dataset", "Screen")


class InvalidOrder(Exception):
    """``reason`` becomes the order's 'Import Failed' description."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _required_name(label: str, value: str | None) -> str:
    if value is None or not value.strip():
        raise InvalidOrder(f"{label} is missing")
    if len(value) > MAX_NAME_LENGTH:
        raise InvalidOrder(
            f"{label} is too long ({len(value)} characters, at most {MAX_NAME_LENGTH})"
        )
    if "\x00" in value:
        raise InvalidOrder(f"{label} contains a NUL byte")
    return value


def _target(destination_type: str, destination_id: str) -> Target:
    if destination_type not in DESTINATION_TYPES:
        raise InvalidOrder(
            f"DestinationType {short(destination_type, 40)!r} is not one of Dataset, Screen"
        )
    text = (destination_id or "").strip()
    if not text:
        raise InvalidOrder("DestinationID is missing")
    try:
        number = int(text)
    except ValueError:
        raise InvalidOrder(f"DestinationID {short(text, 40)!r} is not an integer") from None
    if number <= 0:
        raise InvalidOrder(f"DestinationID {short(text, 40)} is not a positive integer")
    if number > MAX_OMERO_ID:
        raise InvalidOrder(f"DestinationID {short(text, 40)} is out of range")
    return Target(type=destination_type, id=number)  # type: ignore[arg-type]


def _file_list(raw: str) -> list[str]:
    try:
        files = json.loads(raw)
    # RecursionError: nesting deeper than the parser follows (PostgreSQL's text takes any)
    except (json.JSONDecodeError, TypeError, RecursionError):
        raise InvalidOrder("Files is not valid JSON (expected a list of paths)") from None
    if not isinstance(files, list):
        kind = "an object" if isinstance(files, dict) else "a single value"
        raise InvalidOrder(f"Files must be a JSON list of paths, not {kind}")
    if not files:
        raise InvalidOrder("Files is empty: nothing to import")
    for item in files:
        if not isinstance(item, str) or not item:
            raise InvalidOrder("Files contains an entry that is not a path")
    return files


def check_file(raw: str, path: Path, roots: paths.Area) -> tuple[Path, int | None]:
    """One file of an order (``raw`` as written, ``path`` made of it): absolute, readable, and
    contained in the import roots (:func:`biomero_importer.paths.contained`); returns its
    resolved path and, for a plain file, its size (the progress of its import counts it)."""
    if "\x00" in raw:
        printable = raw.replace("\x00", "\\0")
        raise InvalidOrder(f"Path contains a NUL byte: {short(printable)}")
    if len(raw) > MAX_PATH_LENGTH:
        raise InvalidOrder(f"Path is too long ({len(raw)} characters)")
    try:
        resolved = paths.contained(path, roots)
    except paths.PathRefused as exc:
        raise InvalidOrder(exc.reason) from None
    # OMERO reads the file in place too: a file nobody may read fails even for a root importer.
    try:
        info = resolved.stat()
    except OSError as exc:
        if paths.transient(exc):
            raise  # the pipeline makes it a wait (a file server restarting)
        raise InvalidOrder(f"Cannot read ({paths.why(exc)}): {short(raw)}") from None
    mode = info.st_mode
    wanted = os.R_OK | (os.X_OK if stat.S_ISDIR(mode) else 0)
    if not os.access(resolved, wanted) or not stat.S_IMODE(mode) & 0o444:
        raise InvalidOrder(f"File is not readable: {short(raw)}")
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise InvalidOrder(f"Not a regular file or folder: {short(raw)}")
    return resolved, info.st_size if stat.S_ISREG(mode) else None


def validate(
    claimed: ClaimedOrder,
    roots: Sequence[Path] | paths.Area,
    watch: Callable[[str], None] | None = None,
) -> Order:
    """Turn the stored columns into an Order, or raise InvalidOrder with the first problem.

    ``roots`` are the import roots, or their Area resolved once by the caller. Blocking
    (stat, resolve, folder walks): the service runs it in a storage thread, and ``watch``
    hears each path before it is checked, so a hung mount can be named. An error of storage
    that passes (ESTALE, EIO, ETIMEDOUT) propagates as OSError."""
    group = _required_name("Group", claimed.group_name)
    user = _required_name("Username", claimed.user_name)
    target = _target(claimed.destination_type, claimed.destination_id)
    area = roots if isinstance(roots, paths.Area) else paths.import_area(roots)
    raws = _file_list(claimed.files)
    # Checked before Path() sees them: it would hide a trailing '/' or a NUL's position.
    checked = {}
    sizes = {}
    written = []
    for raw in raws:
        if watch is not None:
            watch(raw)
        path = Path(raw)
        try:
            checked[path], sizes[path] = check_file(raw, path, area)
        except UnicodeEncodeError:
            # a lone surrogate that did not come from a file name: no file can have it
            raise InvalidOrder(f"Path is not a valid file name: {safe_text(raw, 160)}") from None
        written.append(path)
    if claimed.preprocessing_problem is not None:
        raise InvalidOrder(claimed.preprocessing_problem)
    if claimed.preprocessing is not None and not claimed.preprocessing.container.strip():
        raise InvalidOrder("Preprocessing has no container image")
    try:
        registration = parse_column(claimed.import_options)
    except InvalidImportOptions as exc:
        raise InvalidOrder(str(exc)) from None
    return Order(
        uuid=claimed.uuid,
        group=group,
        user=user,
        target=target,
        files=written,
        file_names=[path.name for path in written],
        preprocessing=claimed.preprocessing,
        attempt=claimed.attempt,
        run=claimed.runs,
        registration=registration,
        checked=checked,
        sizes=sizes,
    )
