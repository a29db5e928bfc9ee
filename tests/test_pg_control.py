"""The test-only PostgreSQL controls leave no server behind, however it was last started."""

from __future__ import annotations

from pathlib import Path

from biomero_importer.db.embedded import EmbeddedPostgres
from tests.pg_control import postmasters, start_server, stop_for_sure, stop_server


def test_stop_for_sure_stops_a_server_restarted_through_pg_ctl(tmp_path: Path) -> None:
    embedded = EmbeddedPostgres(tmp_path / "pgdata")
    embedded.start()
    try:
        first = {p.pid for p in postmasters(embedded.data_dir)}
        stop_server(embedded)
        assert postmasters(embedded.data_dir) == []
        start_server(embedded)
        restarted = {p.pid for p in postmasters(embedded.data_dir)}
        # a new postmaster the library never started: what used to outlive the session
        assert restarted and not restarted & first
    finally:
        stop_for_sure(embedded)
    assert postmasters(embedded.data_dir) == []
