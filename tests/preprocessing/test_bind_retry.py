"""A container run whose bind source is briefly busy (CIFS/DFS: ``Error: statfs ...: device
or resource busy``) runs again, as the original does (issue 13); nothing else is retried.

The runtime is a real program standing in for podman, scripted per run."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
import structlog

from biomero_importer.preprocessing import PreprocessingError, run_preprocessing
from biomero_importer.settings import Settings

from .conftest import OrderFactory

BUSY = "Error: statfs /data/plate 1: device or resource busy"
FAKE_RUNTIME = """#!{python}
import sys, time
from pathlib import Path

script = Path({script!r})
if sys.argv[1] != "run":
    sys.exit(0)  # rm, kill: nothing to clean up
counter = script.with_suffix(".runs")
runs = counter.read_text().splitlines() if counter.exists() else []
counter.write_text("\\n".join([*runs, str(time.monotonic())]) + "\\n")
step = script.read_text().splitlines()[len(runs)]
if step == "busy":
    print({busy!r}, file=sys.stderr)
    sys.exit(125)
print("Error: image not known" if step == "unknown" else "ValueError: bad pixels", file=sys.stderr)
sys.exit(125 if step == "unknown" else 1)
"""


def _runtime(tmp_path: Path, steps: list[str]) -> tuple[Path, Path]:
    script = tmp_path / "runtime-steps.txt"
    script.write_text("\n".join(steps) + "\n")
    program = tmp_path / "fake-podman"
    program.write_text(FAKE_RUNTIME.format(python=sys.executable, script=str(script), busy=BUSY))
    program.chmod(0o755)
    return program, script.with_suffix(".runs")


async def _fail(make_order: OrderFactory, settings: Settings) -> str:
    with pytest.raises(PreprocessingError) as caught:
        await run_preprocessing(make_order(), settings, log=structlog.get_logger())
    return caught.value.reason


def _starts(runs: Path) -> list[float]:
    return [float(line) for line in runs.read_text().splitlines()]


@pytest.mark.parametrize(
    ("steps", "runs", "reason"),
    [
        (["busy", "busy", "exit1"], 3, "Converter exited with code 1 for image.tif"),
        (
            ["busy", "busy", "busy", "busy"],
            3,
            f"Container runtime exited with code 125 for image.tif: {BUSY}",
        ),
        (
            ["unknown", "busy"],
            1,
            "Container runtime exited with code 125 for image.tif: Error: image",
        ),
        (["exit1", "busy"], 1, "Converter exited with code 1"),
    ],
    ids=["busy-then-converter-runs", "attempts-bounded", "other-runtime-error", "converter-error"],
)
async def test_only_a_busy_bind_source_is_retried(
    make_order: OrderFactory,
    settings: Settings,
    tmp_path: Path,
    *,
    steps: list[str],
    runs: int,
    reason: str,
) -> None:
    runtime, record = _runtime(tmp_path, steps)
    settings = settings.model_copy(
        update={"container_runtime": str(runtime), "podman_bind_retry_delay_seconds": 0.2}
    )
    assert (await _fail(make_order, settings)).startswith(reason)
    starts = _starts(record)
    assert len(starts) == runs
    # 0.2 s before the second run, doubled before the third
    gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
    for gap, delay in zip(gaps, [0.2, 0.4], strict=False):
        assert gap >= delay
