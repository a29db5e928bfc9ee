"""Helpers for the end-to-end acceptance tests: what the simulated OMERO holds afterwards.

These tests run the real service in-process (``running_service``) against a real PostgreSQL
(``migrated_url``), with real files, the simulator backend and, for preprocessing, real podman.
They read the simulator's state straight from ``<simulator_dir>/omero.sqlite``.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

NAMESPACE = "biomero.import"
CORE_KEYS = [
    "UUID",
    "Filepath",
    "Group",
    "Username",
    "DestinationID",
    "DestinationType",
    "Files",
    "FileNames",
]


@dataclass(frozen=True)
class SimObject:
    id: int
    type: str
    name: str
    client_path: str
    target_type: str
    target_id: int
    user_name: str
    group_name: str
    order_uuid: str


def sim_objects(simulator_dir: Path, order_uuid: str | None = None) -> list[SimObject]:
    db = sqlite3.connect(simulator_dir / "omero.sqlite")
    try:
        query = (
            "SELECT id, type, name, client_path, target_type, target_id, user_name,"
            " group_name, order_uuid FROM objects"
        )
        rows = (
            db.execute(f"{query} WHERE order_uuid = ? ORDER BY id", (order_uuid,)).fetchall()
            if order_uuid is not None
            else db.execute(f"{query} ORDER BY id").fetchall()
        )
    finally:
        db.close()
    return [SimObject(*row) for row in rows]


def sim_annotations(simulator_dir: Path, obj: SimObject) -> list[dict[str, str]]:
    """The map annotations of one object, each as an ordered dict (rows of one annotation are
    consecutive and start again at the key ``UUID``)."""
    db = sqlite3.connect(simulator_dir / "omero.sqlite")
    try:
        rows = db.execute(
            "SELECT ns, key, value FROM annotations WHERE object_type = ? AND object_id = ?"
            " ORDER BY id",
            (obj.type, obj.id),
        ).fetchall()
    finally:
        db.close()
    annotations: list[dict[str, str]] = []
    for ns, key, value in rows:
        assert ns == NAMESPACE
        if key == "UUID" or not annotations:
            annotations.append({})
        annotations[-1][key] = value
    return annotations


def managed_links(simulator_dir: Path, obj: SimObject) -> list[Path]:
    db = sqlite3.connect(simulator_dir / "omero.sqlite")
    try:
        rows = db.execute(
            "SELECT ff.managed_path FROM fileset_objects fo"
            " JOIN fileset_files ff ON ff.fileset_id = fo.fileset_id WHERE fo.object_id = ?",
            (obj.id,),
        ).fetchall()
    finally:
        db.close()
    return [Path(row[0]) for row in rows]
