"""A service-like process for the measurements that need a process of their own.

``python probe.py memory <workdir> <image>``: peak RSS growth while converters flood 50 MB of log
lines and print one 20 MB line, with the service's logging configured.
``python probe.py sigterm <workdir> <image>``: a conversion that SIGTERM cancels, like the service's
shutdown does; prints one JSON line when done.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import uuid
from pathlib import Path

import structlog

from biomero_importer.model import Order, PreprocessingSpec
from biomero_importer.observability.logging import configure_logging
from biomero_importer.omero.port import Target
from biomero_importer.preprocessing import run_preprocessing
from biomero_importer.settings import Settings


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def reset_peak() -> int:
    """Current RSS, with the peak (VmHWM) reset to it. ru_maxrss would not do: it survives
    exec, so it starts at the peak of the (larger) pytest process that started this one."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS")


def peak_kib() -> int:
    return _status_kib("VmHWM")


def make_order(workdir: Path, mode: str, image: str) -> Order:
    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    source = data / f"{mode}.tif"
    source.write_bytes(b"raw")
    return Order(
        uuid=str(uuid.uuid4()),
        group="Demo",
        user="researcher",
        target=Target("Dataset", 1),
        files=[source],
        file_names=[source.name],
        preprocessing=PreprocessingSpec(
            id=1,
            container=image,
            input_file="{Files}",
            output_folder="/data",
            alt_output_folder="/out",
            extra_params={"mode": mode},
        ),
        attempt=1,
        run=1,
    )


async def memory(workdir: Path, settings: Settings, image: str) -> dict[str, float]:
    log = structlog.get_logger("probe")
    await run_preprocessing(make_order(workdir, "ok", image), settings, log=log)
    baseline = reset_peak()
    started = time.monotonic()
    flood = await run_preprocessing(make_order(workdir, "flood", image), settings, log=log)
    flood_seconds = time.monotonic() - started
    flood_peak = peak_kib()
    bigline_baseline = reset_peak()
    bigline = await run_preprocessing(make_order(workdir, "bigline", image), settings, log=log)
    bigline_peak = peak_kib()
    return {
        "baseline_kib": baseline,
        "flood_growth_kib": flood_peak - baseline,
        "bigline_growth_kib": bigline_peak - bigline_baseline,
        "flood_seconds": round(flood_seconds, 3),
        "items": len(flood.items) + len(bigline.items),
    }


async def sigterm(workdir: Path, settings: Settings, image: str) -> dict[str, float]:
    main = asyncio.current_task()
    assert main is not None
    received: list[float] = []

    def on_sigterm() -> None:
        received.append(time.monotonic())
        main.cancel()

    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, on_sigterm)
    try:
        await run_preprocessing(
            make_order(workdir, "sleep", image), settings, log=structlog.get_logger("probe")
        )
    except asyncio.CancelledError:
        return {"cancelled": 1, "stop_seconds": round(time.monotonic() - received[0], 3)}
    return {"cancelled": 0}


def main() -> None:
    mode, workdir, image = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    settings = Settings(
        omero_inplace_dir=workdir / "inplace",
        order_log_dir=workdir / "logs",
        log_file_path=workdir / "service.log",
        embedded_db_dir=workdir / "pg",
        import_roots=[workdir],
        allowed_containers=[image],
    )
    with open(os.devnull, "w") as devnull:
        configure_logging(settings, stream=devnull)
        result = asyncio.run(
            memory(workdir, settings, image)
            if mode == "memory"
            else sigterm(workdir, settings, image)
        )
    print(json.dumps(result), flush=True)  # noqa: T201


if __name__ == "__main__":
    main()
