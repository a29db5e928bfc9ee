"""Real containers through real podman: every outcome of the contract, cancel and memory."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import structlog

from biomero_importer.preprocessing import (
    PreprocessingError,
    PreprocessResult,
    run_preprocessing,
)
from biomero_importer.settings import Settings

from .conftest import REPO, TEST_IMAGE, OrderFactory, container_running, leftover_containers

pytestmark = [pytest.mark.podman, pytest.mark.usefixtures("real_podman")]

PROBE = Path(__file__).with_name("probe.py")


async def run(
    order_factory: OrderFactory, settings: Settings, *names: str, **params: object
) -> PreprocessResult:
    order = order_factory(*names, **params)
    return await run_preprocessing(order, settings, log=structlog.get_logger())


async def fails(order_factory: OrderFactory, settings: Settings, **params: object) -> str:
    with pytest.raises(PreprocessingError) as info:
        await run(order_factory, settings, **params)
    return info.value.reason


async def test_ok_converts_into_both_folders(
    make_order: OrderFactory, settings: Settings, data_dir: Path
) -> None:
    order = make_order("scan.tif", mode="ok", image_uuid="{UUID}", note="{Files}")
    started = time.monotonic()
    result = await run_preprocessing(order, settings, log=structlog.get_logger())
    elapsed = time.monotonic() - started
    temp = settings.omero_inplace_dir / order.uuid
    assert result.temp_dir == temp
    (item,) = result.items
    assert item.source == data_dir / "scan.tif"
    assert item.name == "scan.ome.tiff"
    assert item.import_path == temp / "1" / "scan.ome.tiff"
    assert item.final_path == data_dir / ".processed" / "scan.ome.tiff"
    assert (
        item.import_path.read_text()
        == item.final_path.read_text()
        == ("converted from /data/scan.tif\n")
    )
    assert item.keyvalues == [
        ("mode", "ok"),
        ("inputfile", "/data/scan.tif"),
        ("image_uuid", order.uuid),
        ("note", "/data/scan.tif"),
    ]
    logfile = settings.order_log_dir / f"preprocessing.{order.uuid}.log"
    assert oct(logfile.stat().st_mode & 0o777) == "0o600"
    text = logfile.read_text()
    assert "stdout: converting /data/scan.tif" in text
    assert "stderr: progress: starting" in text
    assert "exit code 0" in text
    print(f"one container run took {elapsed:.2f} s")  # noqa: T201


async def test_multi_returns_every_item_with_names_and_keyvalues(
    make_order: OrderFactory, settings: Settings, data_dir: Path
) -> None:
    result = await run(make_order, settings, "plate.lif", mode="multi")
    temp = result.temp_dir / "1"
    assert [(i.name, i.import_path, i.final_path, i.keyvalues) for i in result.items] == [
        (
            "Series 1",
            temp / "plate-s1.ome.tiff",
            data_dir / ".processed" / "plate-s1.ome.tiff",
            [("series", "1"), ("channels", "3")],
        ),
        (
            "Series 2",
            temp / "plate-s2.ome.tiff",
            data_dir / ".processed" / "plate-s2.ome.tiff",
            [("series", "2"), ("channels", "1")],
        ),
    ]
    assert all(item.final_path.is_file() for item in result.items)


async def test_files_of_one_order_convert_in_parallel(
    make_order: OrderFactory, settings: Settings
) -> None:
    settings.preprocessing_parallel = 3
    started = time.monotonic()
    result = await run(make_order, settings, "a.tif", "b.tif", "c.tif", mode="ok")
    elapsed = time.monotonic() - started
    assert [item.name for item in result.items] == ["a.ome.tiff", "b.ome.tiff", "c.ome.tiff"]
    assert [item.import_path.parent.name for item in result.items] == ["1", "2", "3"]
    print(f"three containers, three at once, took {elapsed:.2f} s")  # noqa: T201


async def test_exit_1_names_the_code_and_last_stderr_line(
    make_order: OrderFactory, settings: Settings
) -> None:
    reason = await fails(make_order, settings, mode="exit1")
    assert reason == (
        "Converter exited with code 1 for image.tif: ValueError: unsupported pixel type"
    )


async def test_failure_removes_the_temporary_folder(
    make_order: OrderFactory, settings: Settings
) -> None:
    order = make_order(mode="exit1")
    with pytest.raises(PreprocessingError):
        await run_preprocessing(order, settings, log=structlog.get_logger())
    assert not (settings.omero_inplace_dir / order.uuid).exists()


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("badjson", "Converter output for image.tif is not valid JSON"),
        ("outside", "path outside the container's mounts: /etc/passwd"),
        ("empty", "Converter reported no output for image.tif"),
    ],
)
async def test_bad_results_fail_with_their_own_reason(
    make_order: OrderFactory, settings: Settings, mode: str, expected: str
) -> None:
    assert expected in await fails(make_order, settings, mode=mode)


async def test_legacy_converter_without_json_imports_its_alt_folder(
    make_order: OrderFactory, settings: Settings, data_dir: Path
) -> None:
    result = await run(make_order, settings, mode="legacy")
    (item,) = result.items
    assert item.import_path == result.temp_dir / "1"
    assert item.final_path == data_dir / ".processed"
    assert (item.import_path / "sub" / "image.tif").is_file()
    assert (item.final_path / "sub" / "image.tif").is_file()


async def test_a_converter_linking_its_output_to_etc_fails_naming_the_link(
    make_order: OrderFactory, settings: Settings
) -> None:
    """Issue 14: the legacy alt folder is walked like an order folder; nothing is imported."""
    order = make_order(mode="linketc")
    with pytest.raises(PreprocessingError) as info:
        await run_preprocessing(order, settings, log=structlog.get_logger())
    link = settings.omero_inplace_dir / order.uuid / "1" / "sub" / "etc"
    assert info.value.reason == f"Folder links outside the container's mounts: {link}"
    assert not (settings.omero_inplace_dir / order.uuid).exists()


async def test_the_data_folder_is_read_only_for_the_converter(
    make_order: OrderFactory, settings: Settings, data_dir: Path
) -> None:
    """Issue 14: only the output folders are writable; the input's folder is mounted ro."""
    reason = await fails(make_order, settings, mode="writedata")
    assert reason.startswith("Converter exited with code 3 for image.tif")
    assert not (data_dir / "stray.txt").exists()


async def test_a_processed_folder_that_is_a_symlink_is_refused(
    make_order: OrderFactory, settings: Settings, data_dir: Path, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (data_dir / ".processed").symlink_to(elsewhere, target_is_directory=True)
    reason = await fails(make_order, settings, mode="ok")
    assert reason == f"Processed folder links outside the import roots: {data_dir / '.processed'}"
    assert list(elsewhere.iterdir()) == []


async def test_a_file_swapped_while_the_order_waits_fails_the_order(
    make_order: OrderFactory, settings: Settings, data_dir: Path, tmp_path: Path
) -> None:
    """Issue 14: the second file is swapped for a symlink out of the roots while the first
    converts; the mount check right before its container fails the order."""
    secret = tmp_path / "secret.tif"
    secret.write_bytes(b"another group's pixels")
    order = make_order("a.tif", "b.tif", mode="waitgo")
    order = dataclasses.replace(order, checked={path: path for path in order.files})
    task = asyncio.ensure_future(run_preprocessing(order, settings, log=structlog.get_logger()))
    deadline = time.monotonic() + 30
    while not container_running(f"biomero-{order.uuid}-1"):
        assert time.monotonic() < deadline, "first container did not start"
        await asyncio.sleep(0.1)
    (data_dir / "b.tif").unlink()
    (data_dir / "b.tif").symlink_to(secret)
    (data_dir / "go").touch()
    with pytest.raises(PreprocessingError) as info:
        await task
    assert info.value.reason == f"Files changed while the order waited: {data_dir / 'b.tif'}"


async def test_unknown_image_is_a_runtime_failure(
    make_order: OrderFactory, settings: Settings
) -> None:
    settings.allowed_containers = None
    reason = await fails(make_order, settings, container="localhost/no-such-image:1")
    assert reason.startswith("Container runtime exited with code 125 for image.tif")


async def test_disallowed_image_runs_nothing(make_order: OrderFactory, settings: Settings) -> None:
    order = make_order(container="docker.io/library/busybox:latest", mode="ok")
    with pytest.raises(PreprocessingError) as info:
        await run_preprocessing(order, settings, log=structlog.get_logger())
    assert info.value.reason == "Container image 'docker.io/library/busybox:latest' is not allowed"
    assert not settings.omero_inplace_dir.exists()


async def test_timeout_kills_and_removes_the_container(
    make_order: OrderFactory, settings: Settings
) -> None:
    settings.preprocessing_timeout = 1.5
    started = time.monotonic()
    reason = await fails(make_order, settings, mode="sleep")
    elapsed = time.monotonic() - started
    assert reason == "Preprocessing of image.tif timed out after 1.5 s"
    assert elapsed < 1.5 + 2.5
    assert leftover_containers() == []
    print(f"timeout run ended after {elapsed:.2f} s (timeout 1.5 s)")  # noqa: T201


async def wait_until_running(name: str, limit: float = 15) -> None:
    deadline = time.monotonic() + limit
    while not container_running(name):
        assert time.monotonic() < deadline, f"{name} never started"
        await asyncio.sleep(0.1)


async def test_cancel_kills_and_removes_the_container_within_2_s(
    make_order: OrderFactory, settings: Settings
) -> None:
    settings.preprocessing_parallel = 2
    order = make_order("a.tif", "b.tif", mode="sleep")
    task = asyncio.ensure_future(run_preprocessing(order, settings, log=structlog.get_logger()))
    for n in (1, 2):
        await wait_until_running(f"biomero-{order.uuid}-{n}")
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    elapsed = time.monotonic() - started
    assert leftover_containers() == []
    assert not (settings.omero_inplace_dir / order.uuid).exists()
    assert elapsed < 2.0
    print(f"cancel: two containers killed and removed in {elapsed:.2f} s")  # noqa: T201


async def test_one_failure_stops_the_other_containers(
    make_order: OrderFactory, settings: Settings, data_dir: Path
) -> None:
    settings.preprocessing_parallel = 2
    order = make_order("slow.tif", "bad.tif", mode="sleep")
    # Killing the second container from outside makes it fail while the first still runs.
    task = asyncio.ensure_future(run_preprocessing(order, settings, log=structlog.get_logger()))
    await wait_until_running(f"biomero-{order.uuid}-1")
    await wait_until_running(f"biomero-{order.uuid}-2")
    subprocess.run(["podman", "kill", f"biomero-{order.uuid}-2"], check=True, capture_output=True)
    with pytest.raises(PreprocessingError, match=r"exited with code 137 for bad\.tif"):
        await asyncio.wait_for(task, 15)
    assert leftover_containers() == []


async def test_stale_container_of_a_crashed_attempt_is_replaced(
    make_order: OrderFactory, settings: Settings
) -> None:
    order = make_order(mode="ok")
    assert order.preprocessing is not None
    name = f"biomero-{order.uuid}-1"
    subprocess.run(
        [
            "podman",
            "run",
            "-d",
            "--name",
            name,
            TEST_IMAGE,
            "--inputfile",
            "/x",
            "--mode",
            "sleep",
        ],
        check=True,
        capture_output=True,
    )
    result = await run_preprocessing(order, settings, log=structlog.get_logger())
    assert [item.name for item in result.items] == ["image.ome.tiff"]


def probe(mode: str, workdir: Path) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    return subprocess.Popen(
        [sys.executable, str(PROBE), mode, str(workdir), TEST_IMAGE],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


async def test_sigterm_during_conversion_removes_the_container(tmp_path: Path) -> None:
    proc = probe("sigterm", tmp_path)
    deadline = time.monotonic() + 20
    while not leftover_containers():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "container never started"
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.3)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=10)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["cancelled"] == 1
    assert leftover_containers() == []
    assert elapsed < 2.0
    print(f"SIGTERM: container removed and process exited in {elapsed:.2f} s ({result})")  # noqa: T201


def test_log_flood_does_not_grow_memory(tmp_path: Path) -> None:
    proc = probe("memory", tmp_path)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["items"] == 2
    assert result["flood_growth_kib"] < 20 * 1024
    assert result["bigline_growth_kib"] < 20 * 1024
    logs = list((tmp_path / "logs").iterdir())
    assert max(path.stat().st_size for path in logs) < 4 * 1024 * 1024
    print(f"50 MB flood / 20 MB line: {result}")  # noqa: T201
