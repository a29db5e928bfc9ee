"""The converter's answer: the JSON list on its last stdout line, mapped back to host paths.

Each item is ``{"name", "full_path", "alt_path", "keyvalues"}``. ``alt_path`` is the fast local
copy that gets imported, ``full_path`` the copy on shared storage the ManagedRepository links
end up pointing to. Relative paths are read against the folder they belong to
(``full_path`` against the output folder, ``alt_path`` against the alt output folder). Every
path must lie inside a mount, also after resolving symlinks on the host, and a folder is
walked the way an order's folder is (:func:`biomero_importer.paths.contained`): a converter
cannot hand the importer a file it was not given, nor a link to one. Items carry the resolved
paths; the pipeline checks them again right before importing them.

A converter that prints no JSON but leaves files in the alt output folder is the legacy mode
upstream kept: that whole folder is imported, after the same walk.
"""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from biomero_importer import paths
from biomero_importer.preprocessing.command import ContainerJob, Mount
from biomero_importer.preprocessing.errors import PreprocessingError
from biomero_importer.text import short


@dataclass(frozen=True)
class ProcessedItem:
    """One output of a converter, ready for import: its paths resolved and contained in
    ``area`` (the container's mounts), where they must still lie when imported."""

    source: Path
    name: str
    import_path: Path
    final_path: Path
    area: paths.Area
    keyvalues: list[tuple[str, str]] = field(default_factory=list)


def output_area(job: ContainerJob) -> paths.Area:
    """Where a converter's outputs may lie: the folders it had mounted."""
    return paths.Area.of("the container's mounts", [mount.host for mount in job.mounts])


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def parse_keyvalues(raw: Any, where: str) -> list[tuple[str, str]]:
    """A dict, or a list of (usually one-key) dicts, as ordered (key, text) pairs."""
    if raw is None:
        return []
    if isinstance(raw, dict):
        return [(str(key), _text(value)) for key, value in raw.items()]
    if isinstance(raw, list):
        pairs: list[tuple[str, str]] = []
        for entry in raw:
            if not isinstance(entry, dict):
                raise PreprocessingError(f"{where}: keyvalues must hold objects only")
            pairs.extend((str(key), _text(value)) for key, value in entry.items())
        return pairs
    raise PreprocessingError(f"{where}: keyvalues must be a list or an object")


def contained_output(job: ContainerJob, host: Path, where: str) -> Path:
    """``host`` resolved, once it is known to lie (and link) only inside the job's mounts."""
    try:
        return paths.contained(host, output_area(job), f"{where}: reported file")
    except paths.PathRefused as exc:
        raise PreprocessingError(exc.reason) from None


def to_host(
    job: ContainerJob, text: str, base: PurePosixPath, where: str
) -> tuple[Path, Mount, Path]:
    """A container path (relative ones against ``base``) on the host: its resolved path, the
    mount it is in and its path as mapped, before resolving."""
    inside = PurePosixPath(posixpath.normpath(posixpath.join(str(base), text)))
    candidates = sorted(job.mounts, key=lambda m: len(m.container.parts), reverse=True)
    for mount in candidates:
        if inside.is_relative_to(mount.container):
            host = mount.host.joinpath(*inside.relative_to(mount.container).parts)
            break
    else:
        raise PreprocessingError(f"{where}: path outside the container's mounts: {short(text)}")
    return contained_output(job, host, where), mount, host


def _optional_path(item: dict[str, Any], key: str, where: str) -> str | None:
    value = item.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise PreprocessingError(f"{where}: {key} must be a path")
    return value


def _item(job: ContainerJob, raw: Any, where: str) -> ProcessedItem:
    if not isinstance(raw, dict):
        raise PreprocessingError(f"{where}: expected an object")
    full_text = _optional_path(raw, "full_path", where)
    alt_text = _optional_path(raw, "alt_path", where)
    final: Path | None = None
    if full_text is not None:
        final, _, _ = to_host(job, full_text, job.data_mount.container, where)
    if alt_text is None:
        if final is None:
            raise PreprocessingError(f"{where}: has neither full_path nor alt_path")
        local = final
    else:
        alt_base = job.alt_mount.container if job.alt_mount else job.data_mount.container
        local, mount, mapped = to_host(job, alt_text, alt_base, where)
        if final is None and mount is job.alt_mount:
            # Without full_path the shared-storage copy sits at the same place under the
            # processed folder as the local copy does under the alt folder.
            mirror = job.processed_dir / mapped.relative_to(mount.host)
            # It may not exist (yet): redirecting links to it then fails the order.
            final = contained_output(job, mirror, where) if os.path.lexists(mirror) else mirror
        elif final is None:
            final = local
    name = raw.get("name")
    return ProcessedItem(
        source=job.source,
        name="" if name is None else str(name),
        import_path=local,
        final_path=final,
        area=output_area(job),
        keyvalues=parse_keyvalues(raw.get("keyvalues"), where),
    )


def _has_files(folder: Path) -> bool:
    return folder.is_dir() and any(p.is_file() for p in folder.rglob("*"))


def parse_result(
    job: ContainerJob, last_line: str | None, line_complete: bool
) -> list[ProcessedItem]:
    """The items of one successful container run (exit code 0)."""
    label = job.source.name
    text = (last_line or "").strip()
    if not text.startswith(("[", "{")):
        if job.alt_mount is not None and _has_files(job.alt_mount.host):
            where = f"Converter output folder for {label}"
            return [
                ProcessedItem(
                    source=job.source,
                    name="",
                    import_path=contained_output(job, job.alt_mount.host, where),
                    final_path=contained_output(job, job.processed_dir, where),
                    area=output_area(job),
                )
            ]
        raise PreprocessingError(f"Converter printed no JSON result and wrote no files for {label}")
    if not line_complete:
        raise PreprocessingError(f"Converter result for {label} is too long to be read")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PreprocessingError(
            f"Converter output for {label} is not valid JSON ({exc.msg} at character {exc.pos})"
        ) from None
    if not isinstance(data, list):
        raise PreprocessingError(f"Converter output for {label} is not a JSON list")
    if not data:
        raise PreprocessingError(f"Converter reported no output for {label}")
    return [_item(job, raw, f"Converter output {n} for {label}") for n, raw in enumerate(data, 1)]
