"""Pure checks: the command line, image names, the allowlist and extra params."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from biomero_importer.preprocessing import (
    PreprocessingError,
    allowlist_warning,
    checked_image,
    normalise_image,
    plan_jobs,
    validate_preprocessing,
)
from biomero_importer.settings import Settings

from .conftest import TEST_IMAGE, OrderFactory


def test_command_has_upstreams_shape(
    make_order: OrderFactory, settings: Settings, data_dir: Path
) -> None:
    order = make_order("a.lif", mode="ok", image_uuid="abc", saveoption="single")
    settings.container_runtime_args = ["--log-level", "error"]
    settings.podman_userns_mode = "keep-id"
    settings.processed_folder_name = ".converted"
    (job,) = plan_jobs(order, settings)
    temp = settings.omero_inplace_dir / order.uuid / "1"
    assert list(job.argv) == [
        "podman",
        "--log-level",
        "error",
        "run",
        "--rm",
        "--name",
        f"biomero-{order.uuid}-1",
        "--userns=keep-id",
        # The data folder read-only; the converter writes only to its two output folders.
        "-v",
        f"{data_dir}:/data:ro",
        "-v",
        f"{data_dir / '.converted'}:/data/.converted",
        "-v",
        f"{temp}:/out",
        TEST_IMAGE,
        "--inputfile",
        "/data/a.lif",
        "--mode",
        "ok",
        "--image_uuid",
        "abc",
        "--saveoption",
        "single",
        "--outputfolder",
        "/data/.converted",
        "--altoutputfolder",
        "/out",
    ]
    assert job.processed_dir == data_dir / ".converted"
    assert job.source == data_dir / "a.lif"


@pytest.mark.unit
def test_the_resolved_folder_is_mounted_and_the_file_named_as_resolved(
    make_order: OrderFactory, settings: Settings, data_dir: Path, tmp_path: Path
) -> None:
    """Issue 14: the mount is the folder the file was found in at validation, not the path
    as written (whose symlinked parts could be swapped before the container starts)."""
    order = make_order("a.lif")
    real = tmp_path / "real"
    real.mkdir()
    (real / "b.lif").write_bytes(b"raw")
    checked = dataclasses.replace(order, checked={order.files[0]: real / "b.lif"})
    (job,) = plan_jobs(checked, settings)
    assert job.data_mount.option == f"{real}:/data:ro"
    assert job.processed_dir == real / ".processed"
    assert job.argv[job.argv.index("--inputfile") + 1] == "/data/b.lif"
    assert job.source == data_dir / "a.lif" and job.checked == real / "b.lif"


def test_one_container_per_file_with_its_own_temp_folder(
    make_order: OrderFactory, settings: Settings
) -> None:
    order = make_order("a.tif", "b.tif")
    jobs = plan_jobs(order, settings)
    assert [job.name for job in jobs] == [f"biomero-{order.uuid}-{n}" for n in (1, 2)]
    assert [job.alt_mount.host.name for job in jobs if job.alt_mount] == ["1", "2"]
    assert [job.argv[job.argv.index("--inputfile") + 1] for job in jobs] == [
        "/data/a.tif",
        "/data/b.tif",
    ]


def test_no_userns_without_the_setting_and_no_alt_mount_without_alt_folder(
    make_order: OrderFactory, settings: Settings
) -> None:
    (job,) = plan_jobs(make_order(alt_output_folder=None), settings)
    assert not any(arg.startswith("--userns") for arg in job.argv)
    assert job.argv.count("-v") == 2
    assert "--altoutputfolder" not in job.argv
    assert job.alt_mount is None


def test_files_and_uuid_are_substituted_in_every_parameter(
    make_order: OrderFactory, settings: Settings
) -> None:
    order = make_order(
        "x.tif",
        input_file="{Files}",
        note="{UUID}:{Files}",
        image_uuid="{UUID}",
        count=3,
        ratio=-0.5,
        show_progress=True,
    )
    (job,) = plan_jobs(order, settings)
    args = list(job.argv[job.argv.index(TEST_IMAGE) + 1 :])
    assert args[:12] == [
        "--inputfile",
        "/data/x.tif",
        "--note",
        f"{order.uuid}:/data/x.tif",
        "--image_uuid",
        order.uuid,
        "--count",
        "3",
        "--ratio",
        "-0.5",
        "--show_progress",
        "true",
    ]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("ubuntu", "docker.io/ubuntu"),
        (
            "cellularimagingcf/convertleica-docker:v1.2.0",
            "docker.io/cellularimagingcf/convertleica-docker:v1.2.0",
        ),
        ("docker.io/library/busybox:1.36", "docker.io/library/busybox:1.36"),
        ("localhost/biomero-test-converter:latest", "localhost/biomero-test-converter:latest"),
        ("ghcr.io/org/conv", "ghcr.io/org/conv"),
        ("registry:5000/conv:1", "registry:5000/conv:1"),
        ("my.registry.example/team/conv@sha256:" + "a" * 64, None),
    ],
)
def test_docker_io_is_added_only_without_a_registry(name: str, expected: str | None) -> None:
    assert normalise_image(name) == (expected or name)


@pytest.mark.parametrize(
    "name",
    ["", "--privileged", "-v", "Upper/Case", "a b", "conv:", "a//b", "x@sha256:zz", "a" * 300],
)
def test_malformed_image_names_are_refused(name: str) -> None:
    with pytest.raises(PreprocessingError, match="is not a valid image name"):
        normalise_image(name)


def test_allowlist_matches_normalised_and_written_names(settings: Settings) -> None:
    settings.allowed_containers = ["docker.io/cellularimagingcf/*", "trusted/conv:v1.*"]
    assert checked_image("cellularimagingcf/convertleica-docker:v1.2.0", settings).startswith(
        "docker.io/cellularimagingcf/"
    )
    assert checked_image("trusted/conv:v1.4", settings) == "docker.io/trusted/conv:v1.4"
    assert checked_image("docker.io/trusted/conv:v1.4", settings) == "docker.io/trusted/conv:v1.4"
    for refused in ("trusted/conv:v2", "ghcr.io/cellularimagingcf/x", "evil/cellularimagingcf"):
        with pytest.raises(PreprocessingError) as info:
            checked_image(refused, settings)
        assert info.value.reason == f"Container image '{refused}' is not allowed"


def test_empty_allowlist_allows_nothing_and_absent_allows_all(settings: Settings) -> None:
    settings.allowed_containers = []
    with pytest.raises(PreprocessingError, match="not allowed"):
        checked_image("ubuntu", settings)
    assert allowlist_warning(settings) is None
    settings.allowed_containers = None
    assert checked_image("ubuntu", settings) == "docker.io/ubuntu"
    warning = allowlist_warning(settings)
    assert warning is not None and "allowed_containers" in warning
    settings.allowed_containers = ["*"]
    assert checked_image("ghcr.io/anyone/anything:1", settings) == "ghcr.io/anyone/anything:1"


def test_disallowed_image_fails_validation(make_order: OrderFactory, settings: Settings) -> None:
    order = make_order(container="docker.io/someone/miner:latest")
    with pytest.raises(PreprocessingError) as info:
        validate_preprocessing(order, settings)
    assert info.value.reason == "Container image 'docker.io/someone/miner:latest' is not allowed"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"1abc": "x"}, "is not allowed"),
        ({"in put": "x"}, "is not allowed"),
        ({"a=b": "x"}, "is not allowed"),
        ({"-privileged": "x"}, "is not allowed"),
        ({"": "x"}, "is not allowed"),
        ({"k" * 65: "x"}, "is not allowed"),
        ({"inputfile": "/data/other"}, "is reserved"),
        ({"outputfolder": "/x"}, "is reserved"),
        ({"altoutputfolder": "/x"}, "is reserved"),
        ({"inputf": "/data/other"}, "is reserved"),
        ({"OutputFolder": "/x"}, "is reserved"),
        ({"opts": {"a": 1}}, "must be text or a number, not an object"),
        ({"opts": [1, 2]}, "must be text or a number, not a list"),
        ({"opts": None}, "must be text or a number, not empty"),
        ({"opts": "--privileged"}, "must not start with '-'"),
        ({"opts": "-v"}, "must not start with '-'"),
        ({"opts": "a\x00b"}, "NUL"),
        ({"opts": "x" * 5000}, "too long"),
    ],
)
def test_bad_extra_params_fail_before_anything_runs(
    make_order: OrderFactory, settings: Settings, params: dict[str, object], message: str
) -> None:
    order = make_order(**params)
    with pytest.raises(PreprocessingError, match=message):
        validate_preprocessing(order, settings)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"output_folder": "data"}, "preprocessing_outputfolder must be an absolute path"),
        ({"output_folder": "/"}, "must not be the container's root"),
        ({"output_folder": "/da:ta"}, "must not contain ':'"),
        ({"output_folder": ""}, "preprocessing_outputfolder is missing"),
        ({"alt_output_folder": "/data"}, "must be separate folders"),
        ({"alt_output_folder": "/data/out"}, "must be separate folders"),
        ({"input_file": " "}, "preprocessing_inputfile is missing"),
        ({"input_file": "--help"}, "must not start with '-'"),
        ({"order_uuid": "../escape"}, "Order UUID"),
    ],
)
def test_bad_folders_fail_validation(
    make_order: OrderFactory, settings: Settings, fields: dict[str, str], message: str
) -> None:
    with pytest.raises(PreprocessingError, match=message):
        validate_preprocessing(make_order(**fields), settings)


def test_folder_with_colon_cannot_be_mounted(
    make_order: OrderFactory, settings: Settings, tmp_path: Path
) -> None:
    settings.omero_inplace_dir = tmp_path / "in:place"
    with pytest.raises(PreprocessingError, match="contains ':'"):
        validate_preprocessing(make_order(), settings)
