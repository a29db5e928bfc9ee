"""The OMERO simulator's own cost: what ``dispatch.py --backend simulator`` adds over ``null``.

Runs a one-file order's OMERO work (open a session, import the file in place, annotate the
image with 9 pairs, close) in this process, on 1 and on 8 threads, on the simulator and, in
the same run, on the null port (the same calls doing nothing: the peer figure), and prints
CPU milliseconds per order (user plus system, read from the process) with the ratio, and
Python function calls per order (cProfile, one thread: repeatable where CPU time drifts). In
production this work is the OMERO server's, in another process; here it shares the replica's
CPU and GIL, so it bounds the simulator figures of the dispatch benchmark.

    python benchmarks/simulator.py --orders 2000
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import pstats
import resource
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import structlog

from biomero_importer.model import Target
from biomero_importer.omero.null import NullGateway
from biomero_importer.omero.port import OmeroGateway
from biomero_importer.omero.simulator import SimulatorGateway
from biomero_importer.settings import Settings

PAIRS = [(f"key {n}", f"value {n}") for n in range(9)]  # the pairs of a plain order
TARGET = Target("Dataset", 1)


def order(gateway: OmeroGateway, image: Path, n: int) -> None:
    session = gateway.open_session("alice", "lab", order_uuid=f"order-{n}")
    try:
        for obj in session.import_path(
            image, TARGET, order_uuid=f"order-{n}", exclude_existing=False
        ):
            session.annotate(obj, "biomero.import", PAIRS)
    finally:
        session.close()


def cpu_ms_per_order(gateway: OmeroGateway, image: Path, threads: int, orders: int) -> float:
    before = resource.getrusage(resource.RUSAGE_SELF)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda n: order(gateway, image, n), range(orders)))
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return cpu * 1000 / orders


def calls_per_order(gateway: OmeroGateway, image: Path, orders: int) -> float:
    profile = cProfile.Profile()
    profile.enable()
    for n in range(orders):
        order(gateway, image, n)
    profile.disable()
    total: int = pstats.Stats(profile).total_calls  # type: ignore[attr-defined]
    return total / orders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    # as a replica logs with log_level WARNING: the simulator's debug lines cost nothing
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    work = Path(tempfile.mkdtemp(prefix="biomero-simbench-"))
    image = work / "data" / "image.tif"
    image.parent.mkdir()
    image.write_bytes(b"II*\x00" + bytes(64))
    settings = Settings(omero_backend="simulator", omero_simulator_dir=work / "omero-sim")
    ports: dict[str, OmeroGateway] = {
        "simulator": SimulatorGateway(settings),
        "null": NullGateway(settings),
    }
    try:
        for gateway in ports.values():
            cpu_ms_per_order(gateway, image, 1, args.orders // 4)  # warm: tables, caches
        calls = {name: calls_per_order(g, image, args.orders) for name, g in ports.items()}
        print(
            f"python calls per order: simulator {calls['simulator']:.0f}, null {calls['null']:.0f}"
        )
        for threads in (1, 8):
            # interleaved rounds: both ports meet the same minutes of a drifting machine
            figures: dict[str, list[float]] = {name: [] for name in ports}
            for _ in range(args.rounds):
                for name, gateway in ports.items():
                    figures[name].append(cpu_ms_per_order(gateway, image, threads, args.orders))
            sim, null = min(figures["simulator"]), min(figures["null"])
            print(
                f"{threads} thread{'s' if threads > 1 else ''}: cpu ms per order, best of"
                f" {args.rounds}: simulator {sim:.3f}, null {null:.3f}, ratio {sim / null:.1f}x"
            )
    finally:
        for gateway in ports.values():
            gateway.close()


if __name__ == "__main__":
    main()
