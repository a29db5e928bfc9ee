"""What progress reporting costs an order, without a database (the writes go to a counter).

- a short order (ends before PROGRESS_DELAY): the reporter's whole life, steps and units
  included, per order;
- a long order: one ``advance`` (one import unit) with the replica's metrics observing, and
  how many writes 10,000 units cause while they take ``--seconds`` in all.

    python benchmarks/progress.py
    python benchmarks/progress.py --orders 50000 --units 10000 --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import time

from biomero_importer.model import Progress
from biomero_importer.observability.metrics import Metrics
from biomero_importer.pipeline.progress import ProgressReporter


class Counter:
    def __init__(self) -> None:
        self.writes = 0

    async def record_progress(self, uuid: str, progress: Progress, *, run: int) -> bool:
        self.writes += 1
        return True


async def short_orders(count: int, metrics: Metrics) -> float:
    """Seconds per order for the reporter of an order that ends within the delay."""
    sink = Counter()
    started = time.perf_counter()
    for n in range(count):
        uuid = f"order-{n}"
        reporter = ProgressReporter(
            uuid, sink, observe=lambda p, u=uuid: metrics.order_progress(u, p)
        )
        reporter.start()
        reporter.start_step("validate")
        reporter.start_step("import", 1, bytes_total=1000)
        reporter.advance(units_done=0, current_file="image.tif", bytes_done=0)
        reporter.advance(units_done=1, bytes_done=1000)
        reporter.end_step()
        reporter.start_step("annotate", 1)
        reporter.advance(units_done=0, current_file="image.tif")
        reporter.advance(units_done=1)
        reporter.end_step()
        await reporter.stop()
    assert sink.writes == 0, "a short order wrote progress"
    return (time.perf_counter() - started) / count


async def long_order(units: int, seconds: float, metrics: Metrics) -> tuple[float, int]:
    """(seconds per advance, writes) for ``units`` units spread over ``seconds``."""
    sink = Counter()
    reporter = ProgressReporter(
        "long", sink, delay=0, observe=lambda p: metrics.order_progress("long", p)
    )
    reporter.start()
    await asyncio.sleep(0)  # the writer starts
    reporter.start_step("import", units, bytes_total=units * 1000)
    pause = seconds / units
    spent = 0.0
    for done in range(units):
        before = time.perf_counter()
        reporter.advance(units_done=done, current_file=f"image{done}.tif", bytes_done=done * 1000)
        spent += time.perf_counter() - before
        await asyncio.sleep(pause)  # the unit's import
    reporter.advance(units_done=units, bytes_done=units * 1000)
    reporter.end_step()
    await asyncio.sleep(0.01)
    await reporter.stop()
    return spent / units, sink.writes


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=20000)
    parser.add_argument("--units", type=int, default=10000)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    metrics = Metrics()
    per_order = await short_orders(args.orders, metrics)
    print(
        f"short order: {per_order * 1e6:.1f} us of progress reporting per order"
        f" ({args.orders} orders)"
    )
    per_unit, writes = await long_order(args.units, args.seconds, metrics)
    print(
        f"long order: {per_unit * 1e6:.2f} us per advance; {args.units} units in"
        f" ~{args.seconds:g} s caused {writes} writes"
    )


if __name__ == "__main__":
    asyncio.run(main())
