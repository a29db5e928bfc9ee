"""Container image names: syntax, the implicit ``docker.io/`` registry, and the allowlist.

Upstream prefixed ``docker.io/`` to every name, so ``localhost/x`` or ``ghcr.io/x`` could never
run. Here the prefix is added only when the name has no registry part, the way podman and
docker read a name: the first path component is a registry when it contains '.' or ':' or is
``localhost`` (and more components follow).

Allowlist patterns (``allowed_containers``, globs, case-sensitive) are matched against full
references. The image and each pattern are both read the way the runtime reads a name:
without a registry it is ``docker.io``, a single name on docker.io is ``library/<name>``, and
an image without tag or digest is ``:latest``. Registry, repository path, tag and digest are
then matched part by part, and ``*``, ``?`` and ``[...]`` never match a '/'; so a ``*`` never
crosses a path component or the registry boundary unless the pattern writes that '/' itself:
``*/convertleica-docker:*`` allows ``docker.io/<anyone>/convertleica-docker`` but not
``evil.com/convertleica-docker``, and ``cellularimagingcf*`` (``docker.io/library/...``) never
allows ``cellularimagingcf.evil.com/x``. A pattern without a tag or digest allows every tag
and digest of the repositories it matches; ``cellularimagingcf/convertleica-docker:v1.*``
pins tags. The pattern ``*`` on its own allows every image.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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


# The single pattern that allows every image, kept from the first allowlist's documentation.
ALLOW_ALL = "*"


@dataclass(frozen=True)
class Reference:
    """An image name or an allowlist pattern, split the way the runtime reads a name."""

    registry: str
    path: str
    tag: str | None
    digest: str | None

    @classmethod
    def parse(cls, text: str) -> Reference:
        rest, _, digest = text.partition("@")
        colon = rest.rfind(":")
        tag: str | None = None
        # A ':' after the last '/' starts the tag; before it, it is a registry's port.
        if colon > rest.rfind("/"):
            rest, tag = rest[:colon], rest[colon + 1 :]
        registry = DEFAULT_REGISTRY
        if has_registry(rest):
            registry, _, rest = rest.partition("/")
        if registry == DEFAULT_REGISTRY and "/" not in rest:
            rest = f"library/{rest}"
        return cls(registry, rest, tag, digest or None)

    def full(self) -> str:
        tag = f":{self.tag}" if self.tag is not None else ""
        digest = f"@{self.digest}" if self.digest is not None else ""
        return f"{self.registry}/{self.path}{tag}{digest}"


def image_reference(name: str) -> Reference:
    """The full reference of an image the runtime would pull (``:latest`` when unpinned)."""
    reference = Reference.parse(name)
    if reference.tag is None and reference.digest is None:
        return Reference(reference.registry, reference.path, "latest", None)
    return reference


def _glob(pattern: str) -> re.Pattern[str]:
    """``pattern`` as a regular expression whose wildcards never match a '/'."""
    parts: list[str] = []
    index = 0
    while index < len(pattern):
        char = pattern[index]
        close = pattern.find("]", index + 2) if char == "[" else -1
        if char == "*":
            parts.append("[^/]*")
        elif char == "?":
            parts.append("[^/]")
        elif close != -1:
            body = pattern[index + 1 : close]
            negated = body.startswith("!")
            members = (body[1:] if negated else body).replace("\\", "\\\\")
            if negated:
                parts.append(f"[^/{members}]")
            else:
                # A leading '^' negates a regular expression's class, not a glob's.
                parts.append(f"[\\{members}]" if members.startswith("^") else f"[{members}]")
            index = close
        else:
            parts.append(re.escape(char))
        index += 1
    return re.compile("".join(parts))


def _part_matches(pattern: str | None, value: str | None) -> bool:
    if pattern is None:
        return True
    return value is not None and _glob(pattern).fullmatch(value) is not None


def pattern_allows(pattern: str, image: Reference) -> bool:
    """Whether one allowlist pattern allows the full reference ``image``."""
    if pattern == ALLOW_ALL:
        return True
    wanted = Reference.parse(pattern)
    return (
        _part_matches(wanted.registry, image.registry)
        and _part_matches(wanted.path, image.path)
        and _part_matches(wanted.tag, image.tag)
        and _part_matches(wanted.digest, image.digest)
    )


def is_allowed(name: str, patterns: list[str] | None) -> bool:
    if patterns is None:
        return True
    image = image_reference(name)
    return any(pattern_allows(pattern, image) for pattern in patterns)


def checked_image(name: str, settings: Settings) -> str:
    """Normalise ``name`` and check it against ``allowed_containers``."""
    normalised = normalise_image(name)
    if not is_allowed(name, settings.allowed_containers):
        raise PreprocessingError(
            f"Container image '{name}' is not allowed",
            detail=f"{image_reference(name).full()} matches no pattern of allowed_containers",
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
