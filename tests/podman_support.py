"""Real podman for tests, with a converter image built locally (shared by the preprocessing
and acceptance tests; the ``podman_image`` fixture lives in ``tests/conftest.py``).

The image comes from ``containers/test-image`` (static busybox + a contract-following shell
script) via ``podman import``: no registry needed. Tests using it are skipped, with the
reason, when podman does not work here.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONTAINERS_CONF = REPO / "config" / "podman" / "containers.conf"
BUILD_SCRIPT = REPO / "containers" / "test-image" / "build.sh"
CONVERTER = REPO / "containers" / "test-image" / "rootfs" / "convert"
# Tagged with the converter script's hash: test sessions of different checkouts on one machine
# share podman's image store, and with one tag each would rebuild it under the other's feet.
TEST_IMAGE = (
    "localhost/biomero-test-converter:" + hashlib.sha256(CONVERTER.read_bytes()).hexdigest()[:12]
)


def podman(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def leftover_containers(prefix: str = "biomero-") -> list[str]:
    """Containers (running or not) whose name starts with ``prefix``.

    Other test sessions may run concurrently: tests that can should pass their own
    ``biomero-<uuid>-`` prefix rather than look at every biomero container.
    """
    result = podman("ps", "-a", "--filter", f"name={prefix}", "--format", "{{.Names}}")
    return [name for name in result.stdout.split() if name and name.startswith(prefix)]


def container_running(name: str) -> bool:
    result = podman("ps", "--filter", f"name=^{name}$", "--format", "{{.Names}}")
    return name in result.stdout.split()


def build_test_image() -> Iterator[str]:
    """Podman configured for this machine (CONTAINERS_CONF) and the test image built."""
    with pytest.MonkeyPatch.context() as patch:
        if "CONTAINERS_CONF" not in os.environ:
            patch.setenv("CONTAINERS_CONF", str(CONTAINERS_CONF))
        try:
            info = podman("info")
        except (OSError, subprocess.TimeoutExpired) as exc:
            pytest.skip(f"podman unavailable: {exc}")
        if info.returncode != 0:
            last = (info.stderr.strip().splitlines() or ["no output"])[-1]
            pytest.skip(f"`podman info` failed: {last}")
        build = subprocess.run(
            [str(BUILD_SCRIPT), TEST_IMAGE], capture_output=True, text=True, check=False
        )
        if build.returncode != 0:
            pytest.fail(f"building {TEST_IMAGE} failed: {build.stderr.strip()}")
        yield TEST_IMAGE
