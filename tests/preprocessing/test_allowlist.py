"""The image allowlist, table-driven: full references on both sides, wildcards stay in place."""

from __future__ import annotations

import pytest

from biomero_importer.preprocessing import PreprocessingError, checked_image
from biomero_importer.preprocessing.images import image_reference, is_allowed
from biomero_importer.settings import Settings

DIGEST = "sha256:" + "a" * 64

# (pattern, image as an order writes it, allowed)
TABLE = [
    # The escapes issue 14 reported: a '*' must not cross the registry boundary.
    ("*/convertleica-docker:*", "evil.com/convertleica-docker:v1", False),
    ("cellularimagingcf*", "cellularimagingcf.evil.com/x", False),
    # ... while the patterns keep allowing what they were written for.
    ("*/convertleica-docker:*", "cellularimagingcf/convertleica-docker:v1", True),
    ("*/convertleica-docker:*", "docker.io/cellularimagingcf/convertleica-docker:v1", True),
    ("*/convertleica-docker:*", "a/b/convertleica-docker:v1", False),
    ("cellularimagingcf*", "cellularimagingcf-tools", True),
    ("cellularimagingcf*", "docker.io/library/cellularimagingcf-tools:2", True),
    ("cellularimagingcf*", "cellularimagingcf/x", False),
    # The documented examples.
    ("docker.io/cellularimagingcf/*", "cellularimagingcf/convertleica-docker:v1.2.0", True),
    ("docker.io/cellularimagingcf/*", "docker.io/cellularimagingcf/x", True),
    ("docker.io/cellularimagingcf/*", "ghcr.io/cellularimagingcf/x", False),
    ("docker.io/cellularimagingcf/*", "evil/cellularimagingcf", False),
    ("docker.io/cellularimagingcf/*", "cellularimagingcf/a/b", False),
    ("cellularimagingcf/*", "cellularimagingcf/x", True),
    ("cellularimagingcf/*", "docker.io/cellularimagingcf/x", True),
    ("cellularimagingcf/*", "ghcr.io/cellularimagingcf/x", False),
    (
        "cellularimagingcf/convertleica-docker:v1.*",
        "cellularimagingcf/convertleica-docker:v1.2",
        True,
    ),
    (
        "cellularimagingcf/convertleica-docker:v1.*",
        "cellularimagingcf/convertleica-docker:v2.0",
        False,
    ),
    ("cellularimagingcf/convertleica-docker:v1.*", "cellularimagingcf/convertleica-docker", False),
    ("localhost/biomero-test-converter:*", "localhost/biomero-test-converter:latest", True),
    ("localhost/biomero-test-converter:*", "localhost/biomero-test-converter", True),
    ("localhost/biomero-test-converter:*", "docker.io/localhost/biomero-test-converter:1", False),
    ("localhost/*", "localhost/anything:1", True),
    ("localhost/*", "localhost.evil.com/anything:1", False),
    # A single name on docker.io is library/<name>, written either way.
    ("busybox", "docker.io/library/busybox:1.36", True),
    ("docker.io/busybox:1.*", "busybox:1.36", True),
    ("busybox", "someone/busybox", False),
    # Registries with ports, and a '*' in the registry stays in the registry.
    ("registry:5000/conv:1", "registry:5000/conv:1", True),
    ("registry:5000/conv:1", "registry:5001/conv:1", False),
    ("*.example.org/team/*", "hub.example.org/team/conv:3", True),
    ("*.example.org/team/*", "hub.example.org.evil.com/team/conv:3", False),
    # Digests: a pattern without one allows every digest; one with one pins it.
    ("ghcr.io/org/conv", f"ghcr.io/org/conv@{DIGEST}", True),
    (f"ghcr.io/org/conv@{DIGEST}", f"ghcr.io/org/conv@{DIGEST}", True),
    (f"ghcr.io/org/conv@{DIGEST}", "ghcr.io/org/conv:latest", False),
    ("ghcr.io/org/conv@sha256:*", f"ghcr.io/org/conv:v1@{DIGEST}", True),
    # Character classes never match the '/' either.
    ("ghcr.io/org[!x]conv", "ghcr.io/org/conv", False),
    ("ghcr.io/org/conv[0-9]", "ghcr.io/org/conv7", True),
    # '*' alone is every image, as the first allowlist documented.
    ("*", "ghcr.io/anyone/anything:1", True),
]


@pytest.mark.unit
@pytest.mark.parametrize(("pattern", "image", "allowed"), TABLE)
def test_allowlist_table(pattern: str, image: str, allowed: bool) -> None:
    assert is_allowed(image, [pattern]) is allowed


@pytest.mark.unit
@pytest.mark.parametrize(
    ("image", "full"),
    [
        ("busybox", "docker.io/library/busybox:latest"),
        ("cellularimagingcf/x:v1", "docker.io/cellularimagingcf/x:v1"),
        ("localhost/conv", "localhost/conv:latest"),
        ("registry:5000/a/b", "registry:5000/a/b:latest"),
        (f"ghcr.io/o/c@{DIGEST}", f"ghcr.io/o/c@{DIGEST}"),
    ],
)
def test_images_are_matched_as_full_references(image: str, full: str) -> None:
    assert image_reference(image).full() == full


@pytest.mark.unit
def test_a_refused_image_names_its_full_reference_in_the_detail(settings: Settings) -> None:
    settings.allowed_containers = ["*/convertleica-docker:*"]
    with pytest.raises(PreprocessingError) as info:
        checked_image("evil.com/convertleica-docker:v1", settings)
    assert info.value.reason == "Container image 'evil.com/convertleica-docker:v1' is not allowed"
    assert info.value.detail.startswith("evil.com/convertleica-docker:v1 matches no pattern")
