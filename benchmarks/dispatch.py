"""Dispatcher benchmark: pickup latency, end-to-end throughput and memory of real replicas.

Replicas are separate OS processes running ``biomero-importer run`` against a real PostgreSQL
(embedded unless --database-url or BIOMERO_IMPORTER_TEST_DATABASE_URL names one) with no
preprocessing and, by ``--backend``, the OMERO simulator at zero delay (``simulator``), a port
that records nothing (``null``: the service's own overhead), or both in one run (``both``).

    python benchmarks/dispatch.py --orders 2000 --replicas 1
    python benchmarks/dispatch.py --orders 20000 --backend both
    python benchmarks/dispatch.py --orders 20000 --replicas 3 --rate 100 --history 1000000 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import asyncpg
import psycopg2
import yaml

from biomero_importer.db.embedded import EmbeddedPostgres
from biomero_importer.db.migrate import migrate
from biomero_importer.db.urls import with_database
from biomero_importer.settings import normalise_db_url

INSERT = (
    "INSERT INTO imports (group_name, user_name, destination_id, destination_type, stage,"
    " uuid, files) VALUES ('bench', 'bench', '1', 'Dataset', 'Import Pending', $1, $2)"
)


@contextmanager
def fresh_database(explicit: str | None, workdir: Path) -> Iterator[str]:
    external = explicit or os.environ.get("BIOMERO_IMPORTER_TEST_DATABASE_URL")
    embedded = None
    if external:
        admin = normalise_db_url(external)
    else:
        embedded = EmbeddedPostgres(workdir / "pg")
        admin = embedded.start()
    name = f"bench_{uuid.uuid4().hex[:10]}"
    _admin_exec(admin, f"CREATE DATABASE {name}")
    try:
        yield with_database(admin, name)
    finally:
        _admin_exec(admin, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        if embedded is not None:
            embedded.stop()


def _admin_exec(url: str, statement: str) -> None:
    conn = psycopg2.connect(url)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(statement)
    finally:
        conn.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


class Replicas:
    def __init__(self, config: Path, count: int) -> None:
        self.procs = [
            subprocess.Popen(
                [sys.executable, "-m", "biomero_importer", "run", "--config", str(config)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            for _ in range(count)
        ]

    def peak_rss_mb(self) -> list[float]:
        peaks = []
        for proc in self.procs:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            line = next(x for x in status.splitlines() if x.startswith("VmHWM:"))
            peaks.append(int(line.split()[1]) / 1024)
        return peaks

    def stop(self) -> list[int]:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        return [proc.wait(timeout=60) for proc in self.procs]


async def fill_history(url: str, rows: int) -> None:
    """Finished orders of the past, four rows each, as years of use leave them."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "INSERT INTO imports (group_name, user_name, destination_id, destination_type, stage,"
            " uuid, files, timestamp)"
            " SELECT 'old', 'user' || (n % 50), '1', 'Dataset', s.stage,"
            " md5((n / 4)::text)::uuid::text, '[\"/data/old.tif\"]',"
            " now() - interval '1 day' * (n / 1000.0)"
            " FROM generate_series(0, $1 - 1) n"
            " JOIN LATERAL (SELECT (ARRAY['Import Pending', 'Import Started', 'Import Started',"
            " 'Import Completed'])[n % 4 + 1] AS stage) s ON true",
            rows,
        )
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


async def wait_all_done(url: str, prefix: str, expected: int, timeout: float) -> None:
    conn = await asyncpg.connect(url)
    deadline = time.monotonic() + timeout
    try:
        while True:
            done = await conn.fetchval(
                "SELECT count(*) FROM importer_orders WHERE stage = 'Import Completed'"
                " AND uuid LIKE $1",
                prefix + "%",
            )
            if done >= expected:
                return
            if time.monotonic() > deadline:
                raise SystemExit(f"only {done} of {expected} orders completed in {timeout}s")
            await asyncio.sleep(0.05)
    finally:
        await conn.close()


async def order_times(url: str, prefix: str) -> dict[str, dict[str, float]]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT uuid, stage, extract(epoch FROM timestamp)::float8 AS t FROM imports"
            " WHERE uuid LIKE $1 AND stage IN ('Import Started', 'Import Completed')",
            prefix + "%",
        )
    finally:
        await conn.close()
    times: dict[str, dict[str, float]] = {}
    for row in rows:
        times.setdefault(row["uuid"], {})[row["stage"]] = row["t"]
    return times


def bench_uuid(prefix: str, n: int) -> str:
    """Benchmark orders carry a prefix so the two phases can be told apart."""
    return f"{prefix}{n:07d}-{uuid.uuid4().hex[:27]}"[:36]


async def steady(url: str, orders: int, rate: float, files: str) -> dict[str, float]:
    """Insert one order per transaction at a steady rate; pickup = commit to Started."""
    conn = await asyncpg.connect(url)
    committed: dict[str, float] = {}
    try:
        start = time.perf_counter()
        for n in range(orders):
            target = start + n / rate
            delay = target - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            order = bench_uuid("s", n)
            await conn.execute(INSERT, order, files)
            committed[order] = time.time()
    finally:
        await conn.close()
    await wait_all_done(url, "s", orders, timeout=orders / rate + 120)
    times = await order_times(url, "s")
    latencies = [
        (times[u]["Import Started"] - t) * 1000 for u, t in committed.items() if u in times
    ]
    return {
        "pickup_p50_ms": percentile(latencies, 50),
        "pickup_p99_ms": percentile(latencies, 99),
        "pickup_mean_ms": statistics.fmean(latencies),
    }


async def backlog_insert(url: str, orders: int, files: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.executemany(INSERT, [(bench_uuid("z", n), files) for n in range(orders)])
    finally:
        await conn.close()


async def backlog_result(url: str, orders: int) -> dict[str, float]:
    times = await order_times(url, "z")
    first = min(t["Import Started"] for t in times.values())
    last = max(t["Import Completed"] for t in times.values())
    return {"orders_per_second": orders / (last - first), "drain_seconds": last - first}


def write_config(workdir: Path, url: str, data_file: Path, workers: int, backend: str) -> Path:
    config = workdir / "bench.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "ingest_tracking_db": url,
                "omero_backend": backend,
                "omero_simulator_dir": str(workdir / "omero-sim"),
                "import_roots": [str(data_file.parent)],
                "order_log_dir": str(workdir / "logs"),
                "log_file_path": None,
                "log_level": "WARNING",
                "max_workers": workers,
                "poll_interval": 2.0,
                "allowed_containers": [],
            }
        )
    )
    return config


async def run(args: argparse.Namespace, backend: str) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="biomero-bench-"))
    data = workdir / "data"
    data.mkdir()
    image = data / "image.tif"
    image.write_bytes(b"II*\x00" + bytes(64))
    files = json.dumps([str(image)])
    result: dict[str, Any] = {"orders": args.orders, "replicas": args.replicas, "backend": backend}
    with fresh_database(args.database_url, workdir) as url:
        migrate(url, channel="biomero_importer_orders")
        if args.history:
            await fill_history(url, args.history)
            result["history_rows"] = args.history
        config = write_config(workdir, url, image, args.max_workers, backend)

        replicas = Replicas(config, args.replicas)
        await asyncio.sleep(2.0)  # let every replica connect and LISTEN
        result["steady"] = await steady(url, args.steady_orders, args.rate, files)
        result["steady"]["rate"] = args.rate
        result["steady"]["peak_rss_mb"] = replicas.peak_rss_mb()
        result["steady"]["exit_codes"] = replicas.stop()

        await backlog_insert(url, args.orders, files)
        replicas = Replicas(config, args.replicas)
        await wait_all_done(url, "z", args.orders, timeout=max(300, args.orders / 100))
        backlog = await backlog_result(url, args.orders)
        backlog["peak_rss_mb"] = replicas.peak_rss_mb()
        backlog["exit_codes"] = replicas.stop()
        result["backlog"] = backlog
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=5000, help="orders in the backlog case")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--rate", type=float, default=100.0, help="orders/s in the steady case")
    parser.add_argument("--steady-orders", type=int, default=1000)
    parser.add_argument("--history", type=int, default=0, help="history rows to prefill")
    parser.add_argument("--max-workers", type=int, default=64)
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--json", action="store_true", help="print one JSON object per backend")
    parser.add_argument(
        "--backend",
        choices=["simulator", "null", "both"],
        default="simulator",
        help="the OMERO port of the replicas; 'both' measures one after the other",
    )
    args = parser.parse_args()
    backends = ["simulator", "null"] if args.backend == "both" else [args.backend]
    for backend in backends:
        result = asyncio.run(run(args, backend))
        if args.json:
            print(json.dumps(result))
            continue
        steady_result, backlog = result["steady"], result["backlog"]
        print(f"backend={backend} replicas={args.replicas} history_rows={args.history}")
        print(
            f"steady {steady_result['rate']:.0f}/s:"
            f" pickup p50={steady_result['pickup_p50_ms']:.2f} ms"
            f" p99={steady_result['pickup_p99_ms']:.2f} ms"
            f" peak_rss_mb={[round(x) for x in steady_result['peak_rss_mb']]}"
        )
        print(
            f"backlog {args.orders}: {backlog['orders_per_second']:.0f} orders/s"
            f" ({backlog['drain_seconds']:.1f} s)"
            f" peak_rss_mb={[round(x) for x in backlog['peak_rss_mb']]}"
        )


if __name__ == "__main__":
    main()
