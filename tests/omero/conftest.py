from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from biomero_importer.settings import Settings


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "omero_backend": "simulator",
        "omero_simulator_dir": tmp_path / "omero-sim",
        "embedded_db_dir": tmp_path / "pg",
        "order_log_dir": tmp_path / "logs",
        "log_file_path": None,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    return folder


def write_files(folder: Path, *names: str) -> list[Path]:
    paths = []
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"II*\x00" + name.encode())
        paths.append(path)
    return paths
