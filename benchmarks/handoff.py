"""The cost of handing a blocking call to a pool thread and its outcome back to the loop.

Times ``pipeline.threads.in_thread`` (what the pipeline uses: two hand-offs per one-file
order) beside ``loop.run_in_executor`` with the same context copy and done-callback (the
peer: the pipeline's hand-off before) on the event loop a
replica runs (uvloop), with the process on one CPU as a replica pins itself (``cpus``), 64
callers at once as with ``max_workers: 64``, calls that return at once: the figure is the
hand-off alone. Prints CPU microseconds per hand-off (user plus system of the process) for
interleaved rounds, best of each, and the ratio.

    python benchmarks/handoff.py --calls 40000
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import os
import resource
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import uvloop

from biomero_importer.pipeline.threads import in_thread

CALLERS = 64


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _nothing() -> int:
    return 1


def _ours(pool: ThreadPoolExecutor) -> asyncio.Future[int]:
    return in_thread(pool, _nothing)


def _peer(pool: ThreadPoolExecutor) -> asyncio.Future[int]:
    """The pipeline's hand-off before: the same context copy and done-callback."""
    context = contextvars.copy_context()
    future = asyncio.get_running_loop().run_in_executor(pool, context.run, _nothing)
    future.add_done_callback(_retrieved)
    return future


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


async def _cpu_us_per_call(
    hand_off: Callable[[ThreadPoolExecutor], asyncio.Future[Any]],
    pool: ThreadPoolExecutor,
    calls: int,
) -> float:
    async def caller() -> None:
        for _ in range(calls // CALLERS):
            # shielded, as the pipeline awaits its calls
            await asyncio.shield(hand_off(pool))

    before = _cpu_seconds()
    await asyncio.gather(*(caller() for _ in range(CALLERS)))
    return (_cpu_seconds() - before) / (calls // CALLERS * CALLERS) * 1e6


async def _main(calls: int, rounds: int) -> None:
    with ThreadPoolExecutor(16, thread_name_prefix="omero") as pool:
        await _cpu_us_per_call(_ours, pool, calls // 4)  # warm: the pool's threads started
        await _cpu_us_per_call(_peer, pool, calls // 4)
        figures: dict[str, list[float]] = {"in_thread": [], "run_in_executor": []}
        for _ in range(rounds):
            figures["in_thread"].append(await _cpu_us_per_call(_ours, pool, calls))
            figures["run_in_executor"].append(await _cpu_us_per_call(_peer, pool, calls))
    ours, peer = min(figures["in_thread"]), min(figures["run_in_executor"])
    print(
        f"cpu µs per hand-off, best of {rounds}: in_thread {ours:.1f},"
        f" run_in_executor {peer:.1f} (peer), ratio {ours / peer:.2f}x (<1 is cheaper)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=40_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    # one CPU, as a replica's event loop and pool threads share one
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    uvloop.run(_main(args.calls, args.rounds))


if __name__ == "__main__":
    main()
