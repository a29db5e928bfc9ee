"""Real podman for the preprocessing tests, with a converter image built locally.

The image is built by the session fixture ``podman_image`` (``tests/conftest.py``, shared
with the acceptance tests; see ``tests/podman_support.py``). Tests marked ``podman`` are
skipped, with the reason, when podman does not work here.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from biomero_importer.model import Order, PreprocessingSpec
from biomero_importer.omero.port import Target
from biomero_importer.settings import Settings
from tests.podman_support import (  # noqa: F401  (re-exported for the tests here)
    BUILD_SCRIPT,
    CONTAINERS_CONF,
    REPO,
    TEST_IMAGE,
    container_running,
    leftover_containers,
    podman,
)


@pytest.fixture
def real_podman(podman_image: str) -> Iterator[str]:
    """The image, and after the test: no biomero-* container it started may be left.

    Containers that existed before the test are another checkout's (tests of two worktrees
    share one podman): they are neither blamed nor removed."""
    before = set(leftover_containers())
    yield podman_image
    left = [name for name in leftover_containers() if name not in before]
    if left:
        podman("rm", "-f", *left)
        pytest.fail(f"containers left behind: {left}")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        omero_inplace_dir=tmp_path / "inplace",
        order_log_dir=tmp_path / "logs",
        # The data folders (data_dir) lie here: mounts are checked against it before a run.
        import_roots=[tmp_path / "data"],
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
            run=1,
        )

    return make
