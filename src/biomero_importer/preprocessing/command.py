"""From an order to the exact container commands, checked before anything runs.

Every check here is pure (no filesystem, no processes), so the pipeline can reject a bad
order while validating it, before any work starts. The command keeps upstream's shape, which
converters already rely on::

    <runtime> [runtime args] run --rm --name biomero-<uuid>-<n> [--userns=<mode>]
      -v <dir of file>:<outputfolder>:ro -v <dir of file>/<processed>:<outputfolder>/<processed>
      -v <inplace>/<uuid>/<n>:<altoutputfolder> <image>
      --inputfile <value> [--<key> <value> ...] --outputfolder <outputfolder>/<processed>
      --altoutputfolder <altoutputfolder>

Deliberate differences from upstream, none visible to a converter (it sees the same
container paths):

* ``<dir of file>`` is the folder the file was found in at validation, symlinks resolved, and
  it is mounted read-only: a converter writes only to ``<processed>`` and the alt folder,
  each mounted read-write on its own. The runner checks every mount again right before the
  container starts (:func:`biomero_importer.paths.recheck`).
* Each file's temporary output gets its own folder ``<inplace>/<uuid>/<n>`` (upstream shared
  ``<inplace>/<uuid>``), so two files converting at once cannot overwrite each other's
  outputs and the legacy no-JSON mode knows which outputs belong to which file.
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from biomero_importer.model import Order, PreprocessingSpec
from biomero_importer.preprocessing.errors import PreprocessingError
from biomero_importer.preprocessing.images import checked_image
from biomero_importer.settings import Settings

# The flags the importer itself passes; extra params may not set them.
RESERVED_FLAGS = ("inputfile", "outputfolder", "altoutputfolder")
FILES_PLACEHOLDER = "{Files}"
UUID_PLACEHOLDER = "{UUID}"

_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
MAX_KEY_LENGTH = 64
MAX_VALUE_LENGTH = 4096
_NUMBER = re.compile(r"-(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
# The order UUID becomes a folder name and part of a container name.
_ORDER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class Mount:
    """A host folder and where the container sees it."""

    host: Path
    container: PurePosixPath
    read_only: bool = False

    @property
    def option(self) -> str:
        return f"{self.host}:{self.container}" + (":ro" if self.read_only else "")


@dataclass(frozen=True)
class ContainerJob:
    """One container run: one input file of the order."""

    index: int
    source: Path
    # The source as validated (symlinks resolved); None for an order that was not validated.
    checked: Path | None
    name: str
    image: str
    data_mount: Mount
    processed_mount: Mount
    alt_mount: Mount | None
    argv: tuple[str, ...]

    @property
    def processed_dir(self) -> Path:
        return self.processed_mount.host

    @property
    def mounts(self) -> list[Mount]:
        extra = [] if self.alt_mount is None else [self.alt_mount]
        return [self.data_mount, self.processed_mount, *extra]


def runtime_prefix(settings: Settings) -> list[str]:
    return [settings.container_runtime, *settings.container_runtime_args]


def temp_root(order: Order, settings: Settings) -> Path:
    """``<omero_inplace_dir>/<UUID>``: every temporary output of the order, deleted after import."""
    return Path(os.path.abspath(settings.omero_inplace_dir)) / order.uuid


def _container_folder(label: str, raw: str | None) -> PurePosixPath:
    text = (raw or "").strip()
    if not text:
        raise PreprocessingError(f"{label} is missing")
    if not text.startswith("/"):
        raise PreprocessingError(f"{label} must be an absolute path in the container: {text!r}")
    if ":" in text or "\x00" in text:
        raise PreprocessingError(f"{label} must not contain ':' or NUL: {text!r}")
    normal = posixpath.normpath(text)
    if normal == "/" or normal.startswith("//"):
        raise PreprocessingError(f"{label} must not be the container's root folder")
    return PurePosixPath(normal)


def _host_folder(path: Path) -> Path:
    # podman splits -v on ':'; such a folder cannot be mounted unambiguously.
    if ":" in str(path):
        raise PreprocessingError(f"Folder name contains ':' and cannot be mounted: {path}")
    return path


def _kind(value: object) -> str:
    if value is None:
        return "empty (null)"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def _checked_key(key: object) -> str:
    if not isinstance(key, str) or len(key) > MAX_KEY_LENGTH or not _KEY.fullmatch(key):
        raise PreprocessingError(
            f"Preprocessing parameter name {str(key)[:60]!r} is not allowed"
            " (letters, digits, '_' and '-', starting with a letter)"
        )
    lowered = key.lower()
    # A prefix counts too: argparse accepts abbreviated flags, so --inputf would replace
    # --inputfile.
    if any(flag.startswith(lowered) for flag in RESERVED_FLAGS):
        raise PreprocessingError(
            f"Preprocessing parameter '{key}' is reserved"
            " (the importer sets --inputfile, --outputfolder and --altoutputfolder)"
        )
    return key


def _scalar_text(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value)
    raise PreprocessingError(
        f"Preprocessing parameter '{key}' must be text or a number, not {_kind(value)}"
    )


def _checked_value(key: str, text: str) -> str:
    if "\x00" in text:
        raise PreprocessingError(f"Preprocessing parameter '{key}' contains a NUL byte")
    if len(text) > MAX_VALUE_LENGTH:
        raise PreprocessingError(
            f"Preprocessing parameter '{key}' is too long ({len(text)} characters)"
        )
    # A value like '--privileged' or '--inputfile=/x' would be read as a flag of its own.
    if text.startswith("-") and not _NUMBER.fullmatch(text):
        raise PreprocessingError(f"Preprocessing parameter '{key}' must not start with '-'")
    return text


def extra_params(spec: PreprocessingSpec) -> list[tuple[str, str]]:
    """The extra params as (key, unsubstituted text), in the order the row stores them."""
    params: object = spec.extra_params
    if params is None:
        return []
    if not isinstance(params, dict):
        raise PreprocessingError(f"extra_params must be a JSON object, not {_kind(params)}")
    return [(_checked_key(key), _scalar_text(str(key), value)) for key, value in params.items()]


def _substitute(text: str, inside: PurePosixPath, order_uuid: str) -> str:
    return text.replace(FILES_PLACEHOLDER, str(inside)).replace(UUID_PLACEHOLDER, order_uuid)


def plan_jobs(order: Order, settings: Settings) -> list[ContainerJob]:
    """Every container the order needs, or PreprocessingError for the first problem."""
    spec = order.preprocessing
    if spec is None:
        raise ValueError(f"order {order.uuid} has no preprocessing")
    if not _ORDER_ID.fullmatch(order.uuid):
        raise PreprocessingError("Order UUID is not usable as a folder name")
    image = checked_image(spec.container.strip(), settings)
    output = _container_folder("preprocessing_outputfolder", spec.output_folder)
    alt: PurePosixPath | None = None
    if spec.alt_output_folder is not None and spec.alt_output_folder.strip():
        alt = _container_folder("preprocessing_altoutputfolder", spec.alt_output_folder)
        if alt == output or alt.is_relative_to(output) or output.is_relative_to(alt):
            raise PreprocessingError(
                "preprocessing_altoutputfolder and preprocessing_outputfolder must be"
                " separate folders"
            )
    if not spec.input_file or not spec.input_file.strip():
        raise PreprocessingError("preprocessing_inputfile is missing")
    extras = extra_params(spec)
    temp = _host_folder(temp_root(order, settings))

    prefix = runtime_prefix(settings)
    userns = [f"--userns={settings.podman_userns_mode}"] if settings.podman_userns_mode else []
    jobs: list[ContainerJob] = []
    for index, source in enumerate(order.files, start=1):
        name = f"biomero-{order.uuid}-{index}"
        checked = order.checked.get(source)
        real = checked or source
        data_mount = Mount(_host_folder(real.parent), output, read_only=True)
        processed_mount = Mount(
            _host_folder(real.parent / settings.processed_folder_name),
            output / settings.processed_folder_name,
        )
        alt_mount = Mount(temp / str(index), alt) if alt is not None else None
        inside = output / real.name
        converter = [
            "--inputfile",
            _checked_value(
                "preprocessing_inputfile", _substitute(spec.input_file, inside, order.uuid)
            ),
        ]
        for key, text in extras:
            converter += [f"--{key}", _checked_value(key, _substitute(text, inside, order.uuid))]
        converter += ["--outputfolder", str(output / settings.processed_folder_name)]
        if alt is not None:
            converter += ["--altoutputfolder", str(alt)]
        volumes = [
            arg
            for mount in (data_mount, processed_mount, alt_mount)
            if mount
            for arg in ("-v", mount.option)
        ]
        argv = [*prefix, "run", "--rm", "--name", name, *userns, *volumes, image, *converter]
        jobs.append(
            ContainerJob(
                index=index,
                source=source,
                checked=checked,
                name=name,
                image=image,
                data_mount=data_mount,
                processed_mount=processed_mount,
                alt_mount=alt_mount,
                argv=tuple(argv),
            )
        )
    return jobs


def validate_preprocessing(order: Order, settings: Settings) -> None:
    """Raise PreprocessingError when the order's preprocessing can never run."""
    plan_jobs(order, settings)
