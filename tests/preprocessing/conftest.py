"""Real podman for the preprocessing tests, with a converter image built locally.

The image comes from ``containers/test-image`` (static busybox + a contract-following shell
script) via ``podman import``: no registry needed. Tests marked ``podman`` are skipped, with
the reason, when podman does not work here.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from biomero_importer.omero.port import Target
from biomero_importer.pipeline.order import Order, PreprocessingSpec
from biomero_importer.settings import Settings

REPO = Path(__file__).resolve().parents[2]
CONTAINERS_CONF = REPO / "config" / "podman" / "containers.conf"
BUILD_SCRIPT = REPO / "containers" / "test-image" / "build.sh"
TEST_IMAGE = "localhost/biomero-test-converter:latest"


def podman(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def leftover_containers() -> list[str]:
    result = podman("ps", "-a", "--filter", "name=biomero-", "--format", "{{.Names}}")
    return [name for name in result.stdout.split() if name]


def container_running(name: str) -> bool:
    result = podman("ps", "--filter", f"name=^{name}$", "--format", "{{.Names}}")
    return name in result.stdout.split()


@pytest.fixture(scope="session")
def podman_image() -> Iterator[str]:
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


@pytest.fixture
def real_podman(podman_image: str) -> Iterator[str]:
    """The image, and after the test: no biomero-* container may be left."""
    yield podman_image
    left = leftover_containers()
    if left:
        podman("rm", "-f", *left)
        pytest.fail(f"containers left behind: {left}")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        omero_inplace_dir=tmp_path / "inplace",
        order_log_dir=tmp_path / "logs",
        allowed_containers=["localhost/biomero-test-converter:*"],
        preprocessing_timeout=60,
        log_file_path=None,
        embedded_db_dir=tmp_path / "pg",
    )


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "data" / "plate 1"
    folder.mkdir(parents=True)
    return folder


OrderFactory = Callable[..., Order]


@pytest.fixture
def make_order(data_dir: Path) -> OrderFactory:
    def make(
        *names: str,
        container: str = TEST_IMAGE,
        input_file: str = "{Files}",
        output_folder: str = "/data",
        alt_output_folder: str | None = "/out",
        order_uuid: str | None = None,
        **extra_params: Any,
    ) -> Order:
        files = []
        for name in names or ("image.tif",):
            path = data_dir / name
            path.write_bytes(b"raw pixels")
            files.append(path)
        return Order(
            uuid=order_uuid or str(uuid.uuid4()),
            group="Demo",
            user="researcher",
            target=Target("Dataset", 1),
            files=files,
            file_names=[f.name for f in files],
            preprocessing=PreprocessingSpec(
                id=7,
                container=container,
                input_file=input_file,
                output_folder=output_folder,
                alt_output_folder=alt_output_folder,
                extra_params=extra_params,
            ),
            attempt=1,
        )

    return make
