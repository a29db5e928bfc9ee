"""The converter's JSON answer, parsed without a container: items, keyvalues, path mapping."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path

import pytest
import structlog

from biomero_importer.preprocessing import (
    ContainerJob,
    PreprocessingError,
    ProcessedItem,
    output_area,
    parse_keyvalues,
    parse_result,
    plan_jobs,
)
from biomero_importer.preprocessing.output import (
    LINE_LOG_LIMIT,
    TRUNCATED_MARK,
    OrderLogFile,
    OutputLog,
    pump,
)
from biomero_importer.settings import Settings

from .conftest import OrderFactory


@pytest.fixture
def job(make_order: OrderFactory, settings: Settings) -> ContainerJob:
    (planned,) = plan_jobs(make_order("scan.lif"), settings)
    assert planned.alt_mount is not None
    planned.alt_mount.host.mkdir(parents=True)
    planned.processed_dir.mkdir()
    return planned


def write(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("converted")
    return path


def answer(*items: dict[str, object]) -> str:
    return json.dumps(list(items))


def test_item_maps_both_paths_back_to_the_host(job: ContainerJob) -> None:
    assert job.alt_mount is not None
    local = write(job.alt_mount.host / "scan.ome.tiff")
    final = write(job.processed_dir / "scan.ome.tiff")
    line = answer(
        {
            "name": "scan",
            "full_path": "/data/.processed/scan.ome.tiff",
            "alt_path": "/out/scan.ome.tiff",
            "keyvalues": [{"method": "conversion"}, {"channels": 3, "stats": {"min": 0}}],
        }
    )
    assert parse_result(job, line, True) == [
        ProcessedItem(
            source=job.source,
            name="scan",
            import_path=local,
            final_path=final,
            area=output_area(job),
            keyvalues=[("method", "conversion"), ("channels", "3"), ("stats", '{"min": 0}')],
        )
    ]


def test_without_full_path_the_final_copy_mirrors_the_alt_folder(job: ContainerJob) -> None:
    assert job.alt_mount is not None
    local = write(job.alt_mount.host / "plate" / "a.ome.zarr" / "0")
    item = parse_result(
        job, answer({"alt_path": "plate/a.ome.zarr", "keyvalues": {"k": "v"}}), True
    )
    assert item == [
        ProcessedItem(
            source=job.source,
            name="",
            import_path=local.parent,
            final_path=job.processed_dir / "plate" / "a.ome.zarr",
            area=output_area(job),
            keyvalues=[("k", "v")],
        )
    ]


def test_without_alt_path_the_shared_copy_is_imported(job: ContainerJob) -> None:
    final = write(job.processed_dir / "scan.ome.tiff")
    (item,) = parse_result(job, answer({"name": 5, "full_path": ".processed/scan.ome.tiff"}), True)
    assert (item.name, item.import_path, item.final_path) == ("5", final, final)


@pytest.mark.parametrize(
    ("raw", "pairs"),
    [
        (None, []),
        ({"a": "1", "b": 2}, [("a", "1"), ("b", "2")]),
        ([{"a": "1"}, {"b": True}], [("a", "1"), ("b", "true")]),
        ([{"a": "1", "b": None}], [("a", "1"), ("b", "null")]),
        ([], []),
    ],
)
def test_keyvalues_as_dict_or_list_of_dicts(raw: object, pairs: list[tuple[str, str]]) -> None:
    assert parse_keyvalues(raw, "item") == pairs


@pytest.mark.parametrize("raw", ["text", 3, [["a", "b"]], ["a"]])
def test_malformed_keyvalues_are_refused(raw: object) -> None:
    with pytest.raises(PreprocessingError, match="keyvalues must"):
        parse_keyvalues(raw, "item")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('[{"name": "x", "alt_path": ', "is not valid JSON"),
        ("{}", "is not a JSON list"),
        ("[]", "reported no output"),
        ('["just a string"]', "expected an object"),
        ('[{"name": "x"}]', "has neither full_path nor alt_path"),
        ('[{"alt_path": 5}]', "alt_path must be a path"),
        ('[{"alt_path": "/etc/passwd"}]', "path outside the container's mounts: /etc/passwd"),
        ('[{"alt_path": "/out/../../etc/passwd"}]', "outside the container's mounts"),
        ('[{"alt_path": "../etc/passwd"}]', "outside the container's mounts"),
        ('[{"alt_path": "//out/x"}]', "outside the container's mounts"),
        ('[{"alt_path": "/out/missing.tif"}]', "reported file not found"),
    ],
)
def test_bad_answers_fail_with_their_own_reason(job: ContainerJob, line: str, message: str) -> None:
    with pytest.raises(PreprocessingError, match=message) as info:
        parse_result(job, line, True)
    assert "scan.lif" in info.value.reason


def test_symlink_out_of_a_mount_is_refused(job: ContainerJob, tmp_path: Path) -> None:
    assert job.alt_mount is not None
    secret = write(tmp_path / "secret.txt")
    (job.alt_mount.host / "link.tif").symlink_to(secret)
    with pytest.raises(PreprocessingError, match="links outside"):
        parse_result(job, answer({"alt_path": "/out/link.tif"}), True)


def test_cut_result_line_is_refused(job: ContainerJob) -> None:
    with pytest.raises(PreprocessingError, match="too long"):
        parse_result(job, '[{"alt_path": "/out/x"', False)


def test_legacy_mode_imports_the_alt_folder(job: ContainerJob) -> None:
    assert job.alt_mount is not None
    write(job.alt_mount.host / "sub" / "scan.tif")
    assert parse_result(job, "done, no JSON", True) == [
        ProcessedItem(
            source=job.source,
            name="",
            import_path=job.alt_mount.host,
            final_path=job.processed_dir,
            area=output_area(job),
        )
    ]


@pytest.mark.unit
def test_legacy_output_folder_with_a_link_out_is_refused(job: ContainerJob) -> None:
    """Issue 14: the legacy alt folder gets the walk an order's folder gets."""
    assert job.alt_mount is not None
    write(job.alt_mount.host / "sub" / "scan.tif")
    (job.alt_mount.host / "sub" / "etc").symlink_to("/etc", target_is_directory=True)
    with pytest.raises(PreprocessingError) as info:
        parse_result(job, "done, no JSON", True)
    assert info.value.reason == (
        f"Folder links outside the container's mounts: {job.alt_mount.host / 'sub' / 'etc'}"
    )


@pytest.mark.unit
def test_a_folder_item_with_a_link_out_is_refused(job: ContainerJob) -> None:
    """Issue 14: a directory output (a zarr store, say) is walked too."""
    assert job.alt_mount is not None
    store = job.alt_mount.host / "a.ome.zarr"
    write(store / "0" / "chunk")
    (store / "0" / "1").symlink_to("/etc/passwd")
    with pytest.raises(PreprocessingError, match="Folder links outside the container's mounts"):
        parse_result(job, answer({"alt_path": "/out/a.ome.zarr"}), True)


@pytest.mark.unit
def test_a_mirrored_final_path_that_links_out_is_refused(job: ContainerJob, tmp_path: Path) -> None:
    assert job.alt_mount is not None
    write(job.alt_mount.host / "scan.ome.tiff")
    (job.processed_dir / "scan.ome.tiff").symlink_to(write(tmp_path / "elsewhere.tiff"))
    with pytest.raises(PreprocessingError, match="reported file links outside"):
        parse_result(job, answer({"alt_path": "/out/scan.ome.tiff"}), True)


@pytest.mark.unit
def test_links_between_the_mounts_are_followed(job: ContainerJob) -> None:
    assert job.alt_mount is not None
    final = write(job.processed_dir / "scan.ome.tiff")
    (job.alt_mount.host / "scan.ome.tiff").symlink_to(final)
    (item,) = parse_result(job, answer({"alt_path": "/out/scan.ome.tiff"}), True)
    assert item.import_path == final


def test_no_json_and_no_files_fails(job: ContainerJob) -> None:
    with pytest.raises(PreprocessingError, match="no JSON result and wrote no files"):
        parse_result(job, None, True)


async def test_reader_keeps_only_bounded_lines(tmp_path: Path) -> None:
    reader = asyncio.StreamReader(limit=64 * 1024)
    reader.feed_data(b"first\n" + b"x" * 3_000_000 + b"\nsecond line\r\n" + b"y" * 10)
    reader.feed_eof()
    logfile = OrderLogFile(tmp_path / "logs" / "preprocessing.u.log")
    with structlog.testing.capture_logs() as events:
        output = OutputLog(structlog.get_logger(), logfile, "c1", budget=100_000)
        last = await pump(reader, "stdout", 1000, output)
    logfile.close()
    assert last.data == b"y" * 10 and last.complete
    lines = [e["line"] for e in events if e["event"] == "preprocessing_output"]
    assert lines[0] == "first"
    assert lines[1] == "x" * 1000 + TRUNCATED_MARK
    assert lines[2:] == ["second line", "y" * 10]
    assert stat.S_IMODE(os.stat(tmp_path / "logs" / "preprocessing.u.log").st_mode) == 0o600
    text = (tmp_path / "logs" / "preprocessing.u.log").read_text()
    assert "c1 stdout: second line\n" in text


async def test_a_cut_last_line_is_marked_incomplete() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(b"[" + b"1," * 5000)
    reader.feed_eof()
    with structlog.testing.capture_logs():
        last = await pump(reader, "stdout", 1000, OutputLog(structlog.get_logger(), None, "c"))
    assert len(last.data) == 1000 and not last.complete


def test_log_budget_ends_with_one_note(tmp_path: Path) -> None:
    logfile = OrderLogFile(tmp_path / "preprocessing.u.log")
    with structlog.testing.capture_logs() as events:
        output = OutputLog(structlog.get_logger(), logfile, "c1", budget=10 * LINE_LOG_LIMIT)
        for _ in range(100):
            output.line("stderr", b"z" * 5000, False)
    logfile.close()
    logged = [e for e in events if e["event"] == "preprocessing_output"]
    notes = [e for e in events if e["event"] == "preprocessing_output_truncated"]
    assert len(logged) == 9 and len(notes) == 1
    assert output.dropped_lines == 90
    assert (tmp_path / "preprocessing.u.log").read_text().count("output truncated") == 1
