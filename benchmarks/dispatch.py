"""Dispatcher benchmark: pickup latency, end-to-end throughput and memory of real replicas.

Replicas are separate OS processes running ``biomero-importer run`` against a real PostgreSQL
(embedded unless --database-url or BIOMERO_IMPORTER_TEST_DATABASE_URL names one) with no
preprocessing and, by ``--backend``, the OMERO simulator at zero delay (``simulator``), a port
that records nothing (``null``: the service's own overhead), or both in one run (``both``).

Besides rates it prints the CPU milliseconds per order spent by the replicas and by PostgreSQL
(all its processes, exited backends included), read from the processes themselves, and the
PostgreSQL transactions per order (pg_stat_database): a change can be judged by CPU, which
drifts less than a rate on a shared machine, and by transactions, which do not drift.

``--peer pgqueuer`` (``pip install -e '.[bench]'``) then drains the same number of no-op jobs
with pgqueuer on the same PostgreSQL, right after the project's run, measured the same way
(steady pickup at the same rate, then a backlog), and prints both with the ratios. Pickup is
commit to start: for the project the 'Import Started' row's timestamp (the claim transaction's
start), for pgqueuer the wall clock as its handler begins (a little later in the pickup).

    python benchmarks/dispatch.py --orders 2000 --replicas 1
    python benchmarks/dispatch.py --orders 20000 --backend both
    python benchmarks/dispatch.py --orders 5000 --backend null --peer pgqueuer
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
import psutil
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

    def cpu_seconds(self) -> float:
        return sum(process_cpu(psutil.Process(proc.pid)) for proc in self.procs)

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


def process_cpu(process: psutil.Process) -> float:
    """User plus system CPU seconds of ``process`` and of the children it has reaped."""
    times = process.cpu_times()
    return times.user + times.system + times.children_user + times.children_system


class PostgresCpu:
    """CPU seconds of the PostgreSQL server behind ``url``: the postmaster (whose reaped
    children are its exited backends) plus every live server process. None when the server
    is not a process on this machine that we may read."""

    def __init__(self, postmaster: psutil.Process | None) -> None:
        self.postmaster = postmaster

    @classmethod
    async def of(cls, url: str) -> PostgresCpu:
        conn = await asyncpg.connect(url)
        try:
            # the backend's parent, read while the backend lives
            backend = await conn.fetchval("SELECT pg_backend_pid()")
            try:
                postmaster = psutil.Process(backend).parent()
                if postmaster is not None:
                    process_cpu(postmaster)
            except (psutil.Error, OSError):
                postmaster = None
        finally:
            await conn.close()
        return cls(postmaster)

    def seconds(self) -> float | None:
        if self.postmaster is None:
            return None
        total = process_cpu(self.postmaster)
        for child in self.postmaster.children():
            try:
                times = child.cpu_times()
            except psutil.NoSuchProcess:
                continue  # exited since listed: its time is now the postmaster's
            total += times.user + times.system
        return total


# The transactions a reading of transactions() adds to the next one (its own, reported when
# its connection ends).
OWN_TRANSACTIONS = 1


async def transactions(url: str) -> int:
    """Transactions committed or rolled back in this database so far. Unlike CPU the count
    does not drift with the machine's load: each pool call outside a transaction is one, and
    so was each connection reset. An idle backend reports its counts up to 10 s late, one
    that ends reports them as it ends: read before the processes counted start and after
    they (and every other connection of the window) ended."""
    await asyncio.sleep(0.5)  # connections just closed have reported
    conn = await asyncpg.connect(url)
    try:
        count: int = await conn.fetchval(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database"
            " WHERE datname = current_database()"
        )
        return count
    finally:
        await conn.close()


def per_order_ms(seconds: float | None, orders: int) -> float | None:
    return None if seconds is None else seconds * 1000 / orders


async def wait_listening(url: str, replicas: int, timeout: float = 120.0) -> int:
    """Until every replica's wake-up connection listens (its last statement is the LISTEN or
    a later self-probe): orders queued before that wait for the fallback poll instead.
    Returns the polls made (one transaction each)."""
    conn = await asyncpg.connect(url)
    deadline = time.monotonic() + timeout
    polls = 0
    try:
        while True:
            polls += 1
            listening = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND (query LIKE 'LISTEN %' OR query LIKE 'SELECT pg_notify(%')"
            )
            if listening >= replicas:
                return polls
            if time.monotonic() > deadline:
                raise SystemExit(f"only {listening} of {replicas} replicas listen")
            await asyncio.sleep(0.05)
    finally:
        await conn.close()


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


# Whether any order of a phase is left: the oldest pending entry of importer_orders_ix_pending
# and any running one of importer_orders_ix_stage_updated, so a poll costs the same with 30,000
# orders left as with one. (Counting the completed orders at every poll read the whole queue
# table: at 30,000 orders its 20 polls a second took 19 s of PostgreSQL's CPU, taken from the
# two cores the replica and PostgreSQL share.)
ORDERS_LEFT = """
SELECT EXISTS (SELECT 1 FROM (
           SELECT uuid FROM importer_orders
           WHERE stage = 'Import Pending' AND worker_id IS NULL AND uuid LIKE $1
           ORDER BY queued_at LIMIT 1) pending)
    OR EXISTS (SELECT 1 FROM importer_orders
               WHERE stage IN ('Import Started', 'Import Preprocessing') AND uuid LIKE $1)
"""


async def wait_all_done(url: str, prefix: str, expected: int, timeout: float) -> int:
    """Poll until no order of the phase is left, then check that ``expected`` completed;
    returns the polls made (one transaction each, which the transaction count per order
    leaves out)."""
    conn = await asyncpg.connect(url)
    deadline = time.monotonic() + timeout
    polls = 0
    try:
        while True:
            polls += 1
            if not await conn.fetchval(ORDERS_LEFT, prefix + "%"):
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"orders of phase {prefix!r} still open after {timeout}s")
            await asyncio.sleep(0.05)
        polls += 1
        done = await conn.fetchval(
            "SELECT count(*) FROM importer_orders WHERE stage = 'Import Completed'"
            " AND uuid LIKE $1",
            prefix + "%",
        )
        if done != expected:
            raise SystemExit(f"only {done} of {expected} orders completed")
        return polls
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


async def backlog_insert(url: str, orders: int, files: str) -> float:
    """Queue the backlog as a client does, one INSERT per order on one connection; returns
    the seconds it took. The session plans the insert triggers' lookups at its first rows:
    with statistics of a near-empty queue (``--steady-orders 50``), a plan that scans the
    queue would make this grow with the square of the orders (revision f3c5e7a9b1d4)."""
    conn = await asyncpg.connect(url)
    try:
        start = time.perf_counter()
        await conn.executemany(INSERT, [(bench_uuid("z", n), files) for n in range(orders)])
        return time.perf_counter() - start
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
        await wait_listening(url, args.replicas)
        result["steady"] = await steady(url, args.steady_orders, args.rate, files)
        result["steady"]["rate"] = args.rate
        result["steady"]["peak_rss_mb"] = replicas.peak_rss_mb()
        result["steady"]["exit_codes"] = replicas.stop()
        # The backlog comes after a quiet spell, with the statistics autovacuum takes of a
        # table where every order has finished: taken here, not whenever autovacuum runs, so
        # every run meets the planner's worst case (revision f1b3d5e7a9c2) the same way.
        _admin_exec(url, "ANALYZE importer_orders, importer_users")

        # The replicas start before the backlog is queued (in one transaction), so the CPU
        # they spend on it is the orders', not their start-up's.
        postgres = await PostgresCpu.of(url)
        # from before the replicas start to after they stopped: their start-up is in it
        xacts = await transactions(url)
        replicas = Replicas(config, args.replicas)
        polls = await wait_listening(url, args.replicas)
        await asyncio.sleep(1.0)  # past start-up work that follows the LISTEN
        replica_cpu, pg_cpu = replicas.cpu_seconds(), postgres.seconds()
        insert_seconds = await backlog_insert(url, args.orders, files)
        polls += await wait_all_done(url, "z", args.orders, timeout=max(300, args.orders / 100))
        replica_cpu = replicas.cpu_seconds() - replica_cpu
        pg_after = postgres.seconds()
        backlog: dict[str, Any] = {"peak_rss_mb": replicas.peak_rss_mb()}
        backlog["exit_codes"] = replicas.stop()
        # less the backlog insert and this benchmark's polls
        xacts = await transactions(url) - xacts - OWN_TRANSACTIONS - polls - 1
        backlog.update(await backlog_result(url, args.orders))
        backlog["transactions_per_order"] = xacts / args.orders
        backlog["client_insert_us_per_order"] = insert_seconds / args.orders * 1e6
        backlog["replica_cpu_ms_per_order"] = per_order_ms(replica_cpu, args.orders)
        backlog["postgres_cpu_ms_per_order"] = per_order_ms(
            None if pg_cpu is None or pg_after is None else pg_after - pg_cpu, args.orders
        )
        result["backlog"] = backlog
        if args.peer == "pgqueuer":
            result["peer"] = await pgqueuer_run(url, args, postgres)
    return result


# --- the peer: pgqueuer draining no-op jobs ----------------------------------------------------
# The worker is its own OS process, like a replica, so its CPU is read the same way. It runs
# pgqueuer's QueueManager with its defaults (batch size 10, durable tables, LISTEN on its own
# channel) and one no-op entrypoint; each job's payload names it. The worker prints 'ready'
# once it listens, and on exit one JSON line: when each job was picked (its clock) and when
# the last job's completion was flushed to the database.
PEER_ENTRYPOINT = "noop"


async def peer_worker(url: str, jobs: int, batch_size: int) -> None:
    from pgqueuer import AsyncpgDriver, Job, Queries, QueueManager  # noqa: PLC0415 (bench extra)

    conn = await asyncpg.connect(url)
    manager = QueueManager(Queries(AsyncpgDriver(conn)))
    picked: dict[str, float] = {}

    @manager.entrypoint(PEER_ENTRYPOINT)
    async def noop(job: Job) -> None:
        picked[(job.payload or b"").decode()] = time.time()
        if len(picked) >= jobs:
            manager.shutdown.set()

    async def announce() -> None:
        await asyncio.sleep(0.5)  # run() has installed its listener by then
        print("ready", flush=True)

    announcer = asyncio.create_task(announce())
    await manager.run(batch_size=batch_size)
    await announcer
    # run() returns once in-flight jobs ended and their status buffer was flushed
    print(json.dumps({"picked": picked, "done": time.time()}), flush=True)
    await conn.close()


class PeerWorker:
    def __init__(self, url: str, jobs: int, batch_size: int) -> None:
        self.proc = subprocess.Popen(
            [
                *(sys.executable, __file__, "--peer-worker", url, "--orders", str(jobs)),
                *("--peer-batch-size", str(batch_size)),
            ],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.process = psutil.Process(self.proc.pid)

    def wait_ready(self) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            raise SystemExit(f"pgqueuer worker did not start: {line!r}")

    def result(self, timeout: float) -> tuple[dict[str, float], float, float]:
        """(pick time per job, completion time, CPU seconds), read as the worker exits."""
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        cpu = process_cpu(self.process)
        if self.proc.wait(timeout=timeout) != 0 or not line:
            raise SystemExit("pgqueuer worker failed")
        data = json.loads(line)
        return data["picked"], data["done"], cpu


async def pgqueuer_run(url: str, args: argparse.Namespace, postgres: PostgresCpu) -> dict[str, Any]:
    from pgqueuer import AsyncpgDriver, Queries  # noqa: PLC0415 (the bench extra)
    from pgqueuer import __version__ as version  # noqa: PLC0415

    conn = await asyncpg.connect(url)
    try:
        queries = Queries(AsyncpgDriver(conn))
        await queries.install()
        await queries.enqueue(PEER_ENTRYPOINT, b"warm-up")  # its statements prepared

        worker = PeerWorker(url, args.steady_orders + 1, args.peer_batch_size)
        worker.wait_ready()
        committed: dict[str, float] = {}
        start = time.perf_counter()
        for n in range(args.steady_orders):
            delay = start + n / args.rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            key = f"s{n}"
            await queries.enqueue(PEER_ENTRYPOINT, key.encode())
            committed[key] = time.time()
        picked, _, _ = worker.result(timeout=args.steady_orders / args.rate + 120)
        latencies = [(picked[k] - t) * 1000 for k, t in committed.items() if k in picked]
    finally:
        await conn.close()

    # as for the replicas: from before the worker starts to after it ended
    xacts = await transactions(url)
    worker = PeerWorker(url, args.orders, args.peer_batch_size)
    worker.wait_ready()
    await asyncio.sleep(1.0)  # idle, as the replicas were
    cpu_before, pg_before = process_cpu(worker.process), postgres.seconds()
    keys = [f"z{n}" for n in range(args.orders)]
    conn = await asyncpg.connect(url)
    try:
        # one statement, one transaction: like the project's backlog insert
        await Queries(AsyncpgDriver(conn)).enqueue(
            [PEER_ENTRYPOINT] * args.orders, [k.encode() for k in keys], [0] * args.orders
        )
    finally:
        await conn.close()
    picked, done, cpu_after = worker.result(timeout=max(300, args.orders / 100))
    pg_after = postgres.seconds()
    xacts = await transactions(url) - xacts - OWN_TRANSACTIONS - 1  # less the enqueue
    drain = done - min(picked[k] for k in keys)
    return {
        "name": f"pgqueuer {version}",
        "batch_size": args.peer_batch_size,
        "steady": {
            "pickup_p50_ms": percentile(latencies, 50),
            "pickup_p99_ms": percentile(latencies, 99),
            "pickup_mean_ms": statistics.fmean(latencies),
        },
        "backlog": {
            "orders_per_second": args.orders / drain,
            "drain_seconds": drain,
            "transactions_per_order": xacts / args.orders,
            "replica_cpu_ms_per_order": per_order_ms(cpu_after - cpu_before, args.orders),
            "postgres_cpu_ms_per_order": per_order_ms(
                None if pg_before is None or pg_after is None else pg_after - pg_before,
                args.orders,
            ),
        },
    }


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} ms"


def _ratio(ours: float | None, peer: float | None) -> str:
    return "n/a" if not ours or not peer else f"{ours / peer:.2f}x"


def report(result: dict[str, Any], args: argparse.Namespace) -> None:
    steady_result, backlog = result["steady"], result["backlog"]
    print(f"backend={result['backend']} replicas={args.replicas} history_rows={args.history}")
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
    print(
        f"cpu per order: replicas {_ms(backlog['replica_cpu_ms_per_order'])},"
        f" postgresql {_ms(backlog['postgres_cpu_ms_per_order'])};"
        f" postgresql transactions per order {backlog['transactions_per_order']:.2f}"
    )
    print(
        f"client insert: {backlog['client_insert_us_per_order']:.0f} µs/order"
        f" ({args.orders} single-row INSERTs on one connection, after the steady phase's"
        " statistics)"
    )
    peer = result.get("peer")
    if peer is None:
        return
    ps, pb = peer["steady"], peer["backlog"]
    cpu = "replica_cpu_ms_per_order"
    pg_cpu = "postgres_cpu_ms_per_order"
    xacts = "transactions_per_order"
    print(f"peer {peer['name']} (batch size {peer['batch_size']}), same PostgreSQL:")
    print(
        f"  steady {args.rate:.0f}/s: pickup p50={ps['pickup_p50_ms']:.2f} ms"
        f" p99={ps['pickup_p99_ms']:.2f} ms"
    )
    print(
        f"  backlog {args.orders}: {pb['orders_per_second']:.0f} jobs/s"
        f" ({pb['drain_seconds']:.1f} s)"
    )
    print(
        f"  cpu per job: worker {_ms(pb[cpu])}, postgresql {_ms(pb[pg_cpu])};"
        f" postgresql transactions per job {pb['transactions_per_order']:.2f}"
    )
    print(
        "ratio ours/peer:"
        f" drain {_ratio(backlog['orders_per_second'], pb['orders_per_second'])}"
        " (>1 is faster),"
        f" pickup p50 {_ratio(steady_result['pickup_p50_ms'], ps['pickup_p50_ms'])}"
        f" p99 {_ratio(steady_result['pickup_p99_ms'], ps['pickup_p99_ms'])},"
        f" cpu replica {_ratio(backlog[cpu], pb[cpu])}"
        f" postgresql {_ratio(backlog[pg_cpu], pb[pg_cpu])},"
        f" transactions {_ratio(backlog[xacts], pb[xacts])}"
        " (<1 is cheaper)"
    )


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
    parser.add_argument(
        "--peer",
        choices=["pgqueuer"],
        default=None,
        help="after each run, drain as many no-op jobs with this queue on the same PostgreSQL",
    )
    parser.add_argument("--peer-batch-size", type=int, default=10, help=argparse.SUPPRESS)
    parser.add_argument("--peer-worker", metavar="URL", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer_worker is not None:
        asyncio.run(peer_worker(args.peer_worker, args.orders, args.peer_batch_size))
        return
    backends = ["simulator", "null"] if args.backend == "both" else [args.backend]
    for backend in backends:
        result = asyncio.run(run(args, backend))
        if args.json:
            print(json.dumps(result))
        else:
            report(result, args)


if __name__ == "__main__":
    main()
