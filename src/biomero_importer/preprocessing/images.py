"""Container image names: syntax, the implicit ``docker.io/`` registry, and the allowlist.

Upstream prefixed ``docker.io/`` to every name, so ``localhost/x`` or ``ghcr.io/x`` could never
run. Here the prefix is added only when the name has no registry part, the way podman and
docker read a name: the first path component is a registry when it contains '.' or ':' or is
``localhost`` (and more components follow).

Allowlist patterns (``allowed_containers``, ``fnmatch`` globs, case-sensitive) are read the
way image names are: a pattern without a registry part means ``docker.io``. An image is
allowed when its normalised name matches a normalised pattern, or when the name as the order
wrote it matches a pattern as the admin wrote it (so ``*`` still means every image, and
``cellularimagingcf/*`` allows both ``cellularimagingcf/x`` and ``docker.io/cellularimagingcf/x``
but never ``ghcr.io/cellularimagingcf/x``). A tag or digest is part of the name, so
``cellularimagingcf/convertleica-docker:v1.*`` pins tags.
"""

from __future__ import annotations

import re
from fnmatch import fnmatchcase

from biomero_importer.preprocessing.errors import PreprocessingError
from biomero_importer.settings import Settings

DEFAULT_REGISTRY = "docker.io"
MAX_IMAGE_LENGTH = 255

# The reference grammar of the OCI distribution spec, without the optional parts podman also
# rejects. A name can never start with '-', so it can never be read as a runtime option.
_DOMAIN_PART = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_DOMAIN = rf"{_DOMAIN_PART}(?:\.{_DOMAIN_PART})*(?::[0-9]+)?"
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
_REFERENCE = re.compile(
    rf"(?:{_DOMAIN}/)?{_COMPONENT}(?:/{_COMPONENT})*(?::{_TAG})?(?:@{_DIGEST})?"
)


def has_registry(name: str) -> bool:
    first, sep, _ = name.partition("/")
    return bool(sep) and ("." in first or ":" in first or first == "localhost")


def normalise_image(name: str) -> str:
    """The full image name the runtime is given, or PreprocessingError for a malformed name."""
    if not name or len(name) > MAX_IMAGE_LENGTH or not _REFERENCE.fullmatch(name):
        raise PreprocessingError(f"Container image {name[:80]!r} is not a valid image name")
    return name if has_registry(name) else f"{DEFAULT_REGISTRY}/{name}"


def is_allowed(name: str, normalised: str, patterns: list[str] | None) -> bool:
    if patterns is None:
        return True
    return any(
        fnmatchcase(name, pattern)
        or fnmatchcase(
            normalised, pattern if has_registry(pattern) else f"{DEFAULT_REGISTRY}/{pattern}"
        )
        for pattern in patterns
    )


def checked_image(name: str, settings: Settings) -> str:
    """Normalise ``name`` and check it against ``allowed_containers``."""
    normalised = normalise_image(name)
    if not is_allowed(name, normalised, settings.allowed_containers):
        raise PreprocessingError(
            f"Container image '{name}' is not allowed",
            detail=f"{normalised} matches no pattern of allowed_containers",
        )
    return normalised


def allowlist_warning(settings: Settings) -> str | None:
    """The startup warning for a service that runs whatever image an order names."""
    if settings.allowed_containers is not None:
        return None
    return (
        "allowed_containers is not set: orders may run any container image."
        " Set it to a list of image patterns, e.g. ['docker.io/cellularimagingcf/*']."
    )
