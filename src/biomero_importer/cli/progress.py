"""How the command line shows a running order's progress: compact (``status``), in full
(``show``), as a record (``--json``) and as a line for ``submit --wait`` off a terminal."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from biomero_importer.cli.common import iso
from biomero_importer.model import Progress

_UNITS = ("B", "kB", "MB", "GB", "TB", "PB")


def size(count: int) -> str:
    """Bytes the way ``ls -h --si`` shows them: 812 B, 1.2 MB, 3.4 GB."""
    if count < 1000:
        return f"{count} B"
    value, unit = count / 1000, 1
    while value >= 1000 and unit < len(_UNITS) - 1:
        value, unit = value / 1000, unit + 1
    return f"{value:.1f} {_UNITS[unit]}"


def compact(progress: Progress | None) -> str:
    """``import 12/50`` (the step alone while it has no units, '-' for no progress)."""
    if progress is None:
        return "-"
    if not progress.units_total:
        return progress.step
    return f"{progress.step} {progress.units_done}/{progress.units_total}"


def _bytes(progress: Progress) -> str | None:
    if progress.bytes_total is None:
        return None
    return f"{size(progress.bytes_done or 0)} of {size(progress.bytes_total)}"


def line(progress: Progress) -> str:
    """One line: step, units, bytes and the file being worked on."""
    parts = [compact(progress)]
    amount = _bytes(progress)
    if amount is not None:
        parts.append(amount)
    if progress.current_file:
        parts.append(progress.current_file)
    return ", ".join(parts)


def detail(progress: Progress | None, now: datetime | None = None) -> str:
    """``show``'s line: everything, and how long ago the replica recorded it."""
    if progress is None:
        return "-"
    text = line(progress)
    if progress.recorded_at is not None:
        now = now or datetime.now(timezone.utc)
        age = max(0.0, (now - progress.recorded_at).total_seconds())
        text += f" (recorded {age:.0f} s ago)"
    return text


def record(progress: Progress | None) -> dict[str, Any] | None:
    """The ``--json`` form."""
    if progress is None:
        return None
    return {**progress.as_json(), "recorded_at": iso(progress.recorded_at)}
