"""Replicas as real OS processes whose output is kept, and checks of what a run left behind."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import psutil

from tests.support import TERMINAL


@dataclass
class Replica:
    """One ``biomero-importer run`` process; stdout and stderr go to its own log file."""

    config: Path
    log: Path
    proc: subprocess.Popen[bytes] = field(init=False)
    started_at: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        self.start()

    def start(self) -> None:
        self.started_at = time.monotonic()
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "biomero_importer", "run", "--config", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group: the replica and anything it started."""
        with _gone():
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self, timeout: float = 60) -> int | None:
        """SIGTERM, then SIGKILL the group if it does not exit in time."""
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        code = self.proc.poll()
        with _gone():
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        return code


class _gone:
    """Ignore 'no such process' (the group already exited)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: object, exc: object, tb: object) -> bool:
        return isinstance(exc, ProcessLookupError)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def fetch(url: str, query: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url, timeout=5)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


async def terminal_count(url: str) -> int | None:
    """Orders in a terminal stage, or None while the database cannot be reached."""
    try:
        rows = await fetch(
            url, "SELECT count(*) AS n FROM importer_orders WHERE stage = ANY($1::text[])", TERMINAL
        )
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncio.TimeoutError):
        return None
    return int(rows[0]["n"])


async def terminate_listeners(url: str) -> int:
    """pg_terminate_backend on every replica's LISTEN connection; how many were ended."""
    try:
        rows = await fetch(
            url,
            "SELECT pg_terminate_backend(pid) AS ok FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            " AND (query LIKE 'LISTEN%' OR query = 'SELECT pg_notify($1, $2)')",
        )
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncio.TimeoutError):
        return 0
    return sum(1 for row in rows if row["ok"])


def attempt_problems(rows: Iterable[asyncpg.Record]) -> list[str]:
    """Problems in one order's history: more than one terminal row per attempt, or no end.

    An attempt starts with 'Import Started'; until the next 'Import Pending' or 'Import
    Started' at most one terminal row may follow, and the history must end in one.
    """
    problems: list[str] = []
    terminal_in_attempt = 0
    completed = 0
    stages = [row["stage"] for row in rows]
    for stage in stages:
        if stage in ("Import Pending", "Import Started"):
            terminal_in_attempt = 0
        elif stage in TERMINAL:
            terminal_in_attempt += 1
            completed += stage == "Import Completed"
            if terminal_in_attempt > 1:
                problems.append(f"two terminal rows in one attempt: {stages}")
    if completed > 1:
        problems.append(f"completed {completed} times: {stages}")
    if not stages or stages[-1] not in TERMINAL:
        problems.append(f"no terminal stage: {stages}")
    return problems


def simulator_objects(simulator_dir: Path) -> list[tuple[str, str, int]]:
    """(order_uuid, client_path, objects) for everything the simulated OMERO holds."""
    db = sqlite3.connect(simulator_dir / "omero.sqlite", timeout=30)
    try:
        return [
            (str(u), str(p), int(n))
            for u, p, n in db.execute(
                "SELECT order_uuid, client_path, count(*) FROM objects GROUP BY 1, 2"
            ).fetchall()
        ]
    finally:
        db.close()


def leftover_containers() -> list[str]:
    """Names of podman containers called biomero-*, or [] when podman is not installed."""
    if shutil.which("podman") is None:
        return []
    result = subprocess.run(
        ["podman", "ps", "--all", "--format", "{{.Names}}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        # podman present but unusable here: no container can have been started either
        return []
    return [name for name in result.stdout.split() if name.startswith("biomero-")]


def processes_using(marker: str) -> list[psutil.Process]:
    """Every process on the machine whose command line mentions ``marker`` (a test folder)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmdline = proc.info["cmdline"] or []
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if proc.pid != os.getpid() and any(marker in part for part in cmdline):
            found.append(proc)
    return found


def new_children(before: set[int]) -> list[psutil.Process]:
    """Children of this test process started since ``before`` that are still running.

    PostgreSQL restarted through pg_ctl runs as its own system user under the postmaster;
    anything else is a leak.
    """
    alive = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.pid in before or child.status() == psutil.STATUS_ZOMBIE:
                continue
            if child.name().startswith("postgres"):
                continue
        except psutil.NoSuchProcess:
            continue
        alive.append(child)
    return alive


def wait_until(predicate: object, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(predicate) and predicate():
            return True
        time.sleep(interval)
    return bool(callable(predicate) and predicate())
