"""A stand-in OMERO for the quickstart, demos, tests and benchmarks.

State lives in ``<simulator_dir>/omero.sqlite`` (WAL, so several replicas in separate processes
can share it) and in-place imports create real symlinks under
``<simulator_dir>/ManagedRepository``, laid out as OMERO lays them out, so that the symlink
redirect after preprocessing runs on a real filesystem. Like OMERO, importing the same file
twice creates two objects.

Where the pipeline relies on how OMERO behaves, the simulator behaves the same way, and the rule
is cited next to its code ("OMERO rule: ..."). Rules that tests need to switch are settings
(``omero_simulator_*``) or attributes of the gateway (``open_delay``, ``advance``):

- client-path exclusion across everything the user can see (``omero_simulator_exclusion``);
- a server-side failure after the fileset was created: an orphan fileset
  (``omero_simulator_failure: orphan_fileset``), or a folder import that stops at its first
  failed fileset, the filesets before it committed (``partial``, exit 2 without ``-c``);
- each single-file image of a folder import is its own fileset; a re-run of a partly
  imported unit (``already``) imports only the files no fileset of it holds;
- registered OME-Zarr objects have no fileset, only the order's comment annotation;
- the server's OME-Zarr pixel buffer reads zarr v2 only (``omero_zarr_reads_v3`` says it
  reads v3) and falls back to an empty one-level ROMIO buffer when it cannot read a store;
- a session's time-to-live is a hard lifetime (``omero_simulator_session_ttl``), on a simulated
  clock that imports advance by ``omero_simulator_import_seconds`` without waiting;
- a connection lost in the middle of a multi-step operation
  (``omero_simulator_connection_lost_after``);
- a server that is down: while a file named ``offline`` exists in the simulator folder, opening
  a session and every call of an open session fail as Ice's ConnectionRefusedException does
  (``OmeroUnavailable``); removing the file brings the server back.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import structlog

from biomero_importer.omero.port import (
    ImportAborted,
    ImportedObject,
    ImportFailed,
    ObjectType,
    OmeroError,
    OmeroUnavailable,
    RegistrationOptions,
    Target,
    UnknownUserOrGroup,
    session_ttl_ms,
)
from biomero_importer.omero.zarr import (
    ZarrError,
    ZarrImage,
    check_tile_size,
    expected_tile,
    pixel_buffer_problem,
    read_zarr,
    require_servable_format,
)
from biomero_importer.omero.zarr_labels import for_registration
from biomero_importer.settings import Settings, SimulatorUser
from biomero_importer.text import safe_text

log = structlog.get_logger(__name__)

DB_NAME = "omero.sqlite"
MANAGED_REPOSITORY = "ManagedRepository"
# While this file exists in the simulator folder the server is down (any process can switch it).
OFFLINE_FILE = "offline"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    id INTEGER PRIMARY KEY, type TEXT, name TEXT, client_path TEXT, target_type TEXT,
    target_id INTEGER, user_name TEXT, group_name TEXT, order_uuid TEXT
);
-- one row per (key, value) pair; map_id (the first row's id) names the MapAnnotation
CREATE TABLE IF NOT EXISTS annotations (
    id INTEGER PRIMARY KEY, object_type TEXT, object_id INTEGER, ns TEXT, key TEXT, value TEXT,
    map_id INTEGER
);
CREATE TABLE IF NOT EXISTS users (id INTEGER PRIMARY KEY, name TEXT UNIQUE);
CREATE TABLE IF NOT EXISTS filesets (
    id INTEGER PRIMARY KEY, template_prefix TEXT, order_uuid TEXT, group_name TEXT
);
CREATE TABLE IF NOT EXISTS fileset_files (
    fileset_id INTEGER, managed_path TEXT, client_path TEXT
);
CREATE TABLE IF NOT EXISTS fileset_objects (fileset_id INTEGER, object_id INTEGER);
-- how a registered OME-Zarr object gets its pixels: 'source', or 'label' (label_name) for a
-- label-backed Plate preview; image_paths lists the multiscales groups its images read
CREATE TABLE IF NOT EXISTS registrations (
    object_id INTEGER PRIMARY KEY, pixel_source TEXT, label_name TEXT, image_paths TEXT
);
CREATE INDEX IF NOT EXISTS objects_order_uuid ON objects (order_uuid);
CREATE INDEX IF NOT EXISTS objects_client_path ON objects (client_path, target_type, target_id);
CREATE INDEX IF NOT EXISTS fileset_files_fileset ON fileset_files (fileset_id);
CREATE INDEX IF NOT EXISTS fileset_objects_object ON fileset_objects (object_id);
CREATE INDEX IF NOT EXISTS fileset_files_client ON fileset_files (client_path);
CREATE INDEX IF NOT EXISTS annotations_object ON annotations (object_id, ns);
"""

# Long enough to ride out another replica's write transaction, which never waits on I/O.
_BUSY_TIMEOUT_MS = 30_000
# 7 parameters a row: within SQLite's oldest limit of 999 parameters a statement
_ROWS_PER_INSERT = 100


def _is_under(candidate: str, path: str) -> bool:
    return candidate == path or candidate.startswith(path.rstrip("/") + "/")


def _importable_files(path: Path) -> list[Path]:
    """A file, or the visible files of a folder (hidden ones such as ``.processed`` skipped)."""
    if not path.is_dir():
        return [path]
    found: list[Path] = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(root) / name for name in sorted(files) if not name.startswith("."))
    return found


def _safe_params(params: Any) -> Any:
    if isinstance(params, dict):
        return {k: safe_text(v) if isinstance(v, str) else v for k, v in params.items()}
    return [safe_text(v) if isinstance(v, str) else v for v in params]


class _TextSafeConnection(sqlite3.Connection):
    """File names that are not UTF-8 reach Python as surrogate escapes, which SQLite cannot
    store; OMERO keeps such names as escaped text too. Every text parameter is escaped the
    same way, so what is written and what is looked up always match."""

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        return super().execute(sql, _safe_params(parameters))

    def executemany(self, sql: str, parameters: Any, /) -> sqlite3.Cursor:
        return super().executemany(sql, [_safe_params(p) for p in parameters])


def _groups(entry: list[str] | SimulatorUser | None) -> list[str]:
    """A user's groups in ``omero_simulator_users``: a plain list, or the entry's groups."""
    if entry is None:
        return []
    return entry.groups if isinstance(entry, SimulatorUser) else entry


class SimulatorGateway:
    """One per replica; hands out one SQLite connection per thread."""

    name = "simulator"
    # calls return at once: a one-file order's OMERO work is one executor job
    one_job = True

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.root = settings.simulator_dir
        self.db_path = self.root / DB_NAME
        self.repository = self.root / MANAGED_REPOSITORY
        # looked up before every call: a plain string spares the path arithmetic
        self._offline = os.fspath(self.root / OFFLINE_FILE)
        self.fail_pattern = (
            re.compile(settings.omero_simulator_fail_pattern)
            if settings.omero_simulator_fail_pattern
            else None
        )
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._user_ids: dict[str, int] = {}
        # Simulated seconds added to the wall clock: imports "take" omero_simulator_import_seconds
        # of server time without the test waiting for it.
        self._skew = 0.0
        # Sessions opened and not closed yet, to prove none leaks.
        self.open_sessions: set[int] = set()
        # Test hook: seconds open_session takes (a cancel can arrive meanwhile).
        self.open_delay = 0.0
        # Steps of multi-step operations so far (omero_simulator_connection_lost_after).
        self._steps = 0
        self._connection_lost = False
        try:
            self.repository.mkdir(parents=True, exist_ok=True)
            # One transaction, so replicas starting together never see half a schema.
            self.connection().executescript(f"BEGIN IMMEDIATE;{_SCHEMA}COMMIT;")
            self._upgrade()
        except (OSError, sqlite3.Error) as exc:
            raise OmeroError(f"OMERO simulator folder {self.root} is not usable", str(exc)) from exc
        log.warning(
            "omero_simulated",
            message="OMERO IS SIMULATED: nothing is imported into a real OMERO server",
            state=str(self.db_path),
        )

    def connection(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(
                self.db_path,
                timeout=_BUSY_TIMEOUT_MS / 1000,
                isolation_level=None,
                check_same_thread=False,
                factory=_TextSafeConnection,
            )
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
            self._local.db = db
            with self._lock:
                self._connections.append(db)
        return db

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that takes the lock up front, so it never deadlocks on upgrade.

        Threads of one process queue on a lock first: SQLite's own busy handler sleeps in
        growing steps, which under many importing threads costs far more than the writes.
        Other processes (replicas) still meet at SQLite's lock.
        """
        db = self.connection()
        with self._write_lock:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def _upgrade(self) -> None:
        """Add the columns a simulator folder made by an earlier version lacks (the quickstart
        keeps its folder), filled in from what the old rows say."""
        with self.transaction() as db:
            annotations = {row[1] for row in db.execute("PRAGMA table_info(annotations)")}
            if "map_id" not in annotations:
                db.execute("ALTER TABLE annotations ADD COLUMN map_id INTEGER")
                # old rows: one MapAnnotation per object and namespace, as far as anyone knows
                db.execute(
                    "UPDATE annotations SET map_id = (SELECT min(a.id) FROM annotations a"
                    " WHERE a.object_id = annotations.object_id"
                    " AND a.object_type = annotations.object_type AND a.ns = annotations.ns)"
                )
            filesets = {row[1] for row in db.execute("PRAGMA table_info(filesets)")}
            if "group_name" not in filesets:
                db.execute("ALTER TABLE filesets ADD COLUMN group_name TEXT")
                db.execute(
                    "UPDATE filesets SET group_name = (SELECT o.group_name FROM fileset_objects fo"
                    " JOIN objects o ON o.id = fo.object_id WHERE fo.fileset_id = filesets.id"
                    " LIMIT 1)"
                )

    def clock(self) -> float:
        """Server time in seconds: the wall clock plus simulated time."""
        with self._lock:
            return time.monotonic() + self._skew

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` of server time pass at once (a simulated long import)."""
        with self._lock:
            self._skew += seconds

    def step(self) -> None:
        """One step of a multi-step operation succeeded on the server.

        OMERO rule: a multi-step operation (register an image, then link it...) is not one
        transaction; the connection can drop after any step, leaving earlier steps committed.
        With ``omero_simulator_connection_lost_after: N`` the connection is lost once, after
        the N-th step of the replica's life.
        """
        limit = self.settings.omero_simulator_connection_lost_after
        with self._lock:
            self._steps += 1
            lost = limit is not None and not self._connection_lost and self._steps >= limit
            if lost:
                self._connection_lost = True
        if lost:
            raise OmeroUnavailable("Ice.ConnectionLostException (simulated)")

    def reachable(self) -> None:
        """OMERO rule: a server that is down refuses the connection (Ice
        ConnectionRefusedException) for a new session and for every call of an open one;
        omero-py reports both the same way, and nothing the call would have done happens."""
        if os.path.exists(self._offline):
            raise OmeroUnavailable(
                f"Ice.ConnectionRefusedException (simulated: {self._offline} exists)"
            )

    def user_id(self, user: str) -> int:
        known = self._user_ids.get(user)
        if known is not None:
            return known
        with self.transaction() as db:
            db.execute("INSERT OR IGNORE INTO users (name) VALUES (?)", (user,))
            (user_id,) = db.execute("SELECT id FROM users WHERE name = ?", (user,)).fetchone()
        self._user_ids[user] = int(user_id)
        return int(user_id)

    def describe(self) -> str:
        return f"OMERO simulator ({self.db_path})"

    def check(self) -> None:
        self.reachable()
        try:
            self.connection().execute("SELECT count(*) FROM objects").fetchone()
            probe = self.repository / f".probe-{os.getpid()}-{threading.get_ident()}"
            probe.touch()
            probe.unlink()
        except (OSError, sqlite3.Error) as exc:
            raise OmeroError(f"OMERO simulator folder {self.root} is not usable", str(exc)) from exc

    def open_session(self, user: str, group: str, *, order_uuid: str) -> SimulatorSession:
        if self.open_delay > 0:
            time.sleep(self.open_delay)
        self.reachable()
        users = self.settings.omero_simulator_users
        if users is not None and group not in _groups(users.get(user)):
            raise UnknownUserOrGroup(user, group, "not in omero_simulator_users")
        session = SimulatorSession(self, user, group, order_uuid)
        with self._lock:
            self.open_sessions.add(id(session))
        return session

    def experimenter_email(self, user: str) -> str | None:
        """The address ``omero_simulator_users`` gives the user (OMERO: Experimenter.email)."""
        entry = (self.settings.omero_simulator_users or {}).get(user)
        if isinstance(entry, SimulatorUser) and entry.email and entry.email.strip():
            return entry.email.strip()
        return None

    def forget(self, session: SimulatorSession) -> None:
        with self._lock:
            self.open_sessions.discard(id(session))

    def close(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
        for db in connections:
            db.close()
        self._local = threading.local()


class SimulatorSession:
    def __init__(self, gateway: SimulatorGateway, user: str, group: str, order_uuid: str) -> None:
        self.gateway = gateway
        self.user = user
        self.group = group
        self.order_uuid = order_uuid
        self._aborted = threading.Event()
        self.started = gateway.clock()
        self.ttl = session_ttl_ms(gateway.settings) / 1000

    def remaining(self) -> float:
        return self.ttl - (self.gateway.clock() - self.started)

    def _alive(self, what: str) -> None:
        """OMERO rule: ``suConn(ttl)`` sets timeToLive with timeToIdle 0, and the SessionCache
        ends the session once ``now - started > timeToLive``; keep-alives do not extend it.
        (omero-server SessionCache; ``omero_simulator_session_ttl: false`` switches it off.)
        A server that is down fails the call first (``reachable``)."""
        self.gateway.reachable()
        if self.gateway.settings.omero_simulator_session_ttl and self.remaining() < 0:
            raise ImportFailed(
                f"OMERO session expired during {what}",
                f"session time-to-live {self.ttl:g} s exceeded (hard lifetime)",
            )

    def _pause(self, what: str) -> None:
        """The simulated import time (each step of a registration takes it too); abort() ends
        it at once."""
        self._alive(what)
        delay = self.gateway.settings.omero_simulator_import_delay
        if self._aborted.is_set() or (delay > 0 and self._aborted.wait(delay)):
            raise ImportAborted(f"aborted during {what}")
        seconds = self.gateway.settings.omero_simulator_import_seconds
        if seconds > 0:
            self.gateway.advance(seconds)
        if delay > 0 or seconds > 0:
            # the import ran in this session: it fails when the session ended meanwhile
            self._alive(what)

    def _failing(self, files: Sequence[Path]) -> list[Path]:
        pattern = self.gateway.fail_pattern
        return [f for f in files if pattern is not None and pattern.search(str(f))]

    @staticmethod
    def _failure(name: str, failing: Sequence[Path]) -> ImportFailed:
        errors = len(failing)
        return ImportFailed(
            f"OMERO import of {name} failed with {errors} error{'s' if errors > 1 else ''}:"
            f" {', '.join(f.name for f in failing)} could not be imported",
            f"simulated failure: {failing[0]} matches omero_simulator_fail_pattern",
        )

    def _check_fail_pattern(self, files: Sequence[Path], name: str) -> None:
        failing = self._failing(files)
        if failing:
            raise self._failure(name, failing)

    def _excluded(self, db: sqlite3.Connection, files: Sequence[Path], target: Target) -> set[str]:
        """OMERO rule (ClientPathExclusion, ``--exclude=clientpath``): a file is skipped when
        *any* FilesetEntry with its client path is visible to the session: any dataset, any
        earlier import or order, orphan filesets of failed imports included. Visibility is
        modelled as the user's group. ``omero_simulator_exclusion: target`` switches back to
        the old, unfaithful rule (only what was imported into the same target)."""
        names = [str(f) for f in files]
        marks = ",".join("?" * len(names))
        if self.gateway.settings.omero_simulator_exclusion == "target":
            rows = db.execute(
                "SELECT client_path FROM objects WHERE target_type = ? AND target_id = ?"
                f" AND client_path IN ({marks})",
                (target.type, target.id, *names),
            ).fetchall()
        else:
            rows = db.execute(
                "SELECT ff.client_path FROM fileset_files ff"
                " JOIN filesets fs ON fs.id = ff.fileset_id"
                f" WHERE fs.group_name = ? AND ff.client_path IN ({marks})",
                (self.group, *names),
            ).fetchall()
        return {row[0] for row in rows}

    def import_path(
        self,
        path: Path,
        target: Target,
        *,
        order_uuid: str,
        exclude_existing: bool,
        already: Sequence[ImportedObject] = (),
    ) -> list[ImportedObject]:
        self._pause(f"the import of {path.name}")
        if not path.exists():
            raise ImportFailed(f"OMERO import of {path.name} failed: file not found")
        files = _importable_files(path)
        if not files:
            raise ImportFailed(f"OMERO import of {path.name} failed: no importable files found")
        if already:
            # As the blitz backend: a re-run imports the files no fileset of ``already`` holds.
            covered = self._covered(already)
            files = [f for f in files if str(f) not in covered]
            if not files:
                return []
        failing = self._failing(files)
        mode = self.gateway.settings.omero_simulator_failure
        if failing and mode == "clean":
            raise self._failure(path.name, failing)
        user_id = self.gateway.user_id(self.user)
        if exclude_existing:
            done = self._excluded(self.gateway.connection(), files, target)
            files = [f for f in files if str(f) not in done]
            failing = [f for f in failing if str(f) not in done]
            if not files:
                # OMERO rule: excluded files print nothing and the import exits 0.
                return []
        if target.type == "Screen" or mode == "orphan_fileset":
            # a plate is one fileset of all its files; so is the orphan of a failed upload
            groups = [files]
        else:
            # OMERO rule (ImportCandidates): each single-file image of a folder is its own
            # fileset (import candidate).
            groups = [[f] for f in files]
        objects: list[ImportedObject] = []
        for group in groups:
            broken = [f for f in group if f in failing]
            objects += self._import_fileset(
                path, group, broken, target=target, order_uuid=order_uuid, user_id=user_id
            )
            if broken:
                # OMERO rule (CommandLineImporter without -c): the import stops after the
                # first failed fileset and exits 2; the filesets before it stay committed.
                raise self._failure(path.name, broken)
        log.debug("simulated_import", path=str(path), objects=len(objects))
        return objects

    def _covered(self, objects: Sequence[ImportedObject]) -> set[str]:
        """Client paths of every file of the objects' filesets."""
        covered = {obj.client_path for obj in objects if obj.fileset_id is None}
        ids = [obj.fileset_id for obj in objects if obj.fileset_id is not None]
        if ids:
            marks = ",".join("?" * len(ids))
            rows = (
                self.gateway.connection()
                .execute(
                    f"SELECT client_path FROM fileset_files WHERE fileset_id IN ({marks})", ids
                )
                .fetchall()
            )
            covered |= {row[0] for row in rows}
        return covered

    def _import_fileset(
        self,
        path: Path,
        files: list[Path],
        broken: list[Path],
        *,
        target: Target,
        order_uuid: str,
        user_id: int,
    ) -> list[ImportedObject]:
        """One fileset: its links, its rows and its objects, or (``broken``) an orphan."""
        # The fileset folder is unique (time and a random token): its links are made before
        # the write transaction, which then holds the lock for the rows alone.
        folder = self._fileset_folder(user_id)
        try:
            managed = self._link(path, files, folder)
        except OSError as exc:
            shutil.rmtree(folder, ignore_errors=True)
            raise ImportFailed(
                f"OMERO import of {path.name} failed: cannot link it into the ManagedRepository",
                str(exc),
            ) from exc
        with self.gateway.transaction() as db:
            (fileset_id,) = db.execute(
                "INSERT INTO filesets (template_prefix, order_uuid, group_name)"
                " VALUES (?, ?, ?) RETURNING id",
                (str(folder.relative_to(self.gateway.repository)) + "/", order_uuid, self.group),
            ).fetchone()
            db.executemany(
                "INSERT INTO fileset_files (fileset_id, managed_path, client_path)"
                " VALUES (?, ?, ?)",
                [(fileset_id, str(link), str(source)) for link, source in managed],
            )
            made: list[tuple[ObjectType, str, Path]]
            if broken:
                # OMERO rule: a server-side failure (Bio-Formats parsing, pixel processing)
                # after the upload leaves the Fileset and its entries, with no Image/Plate.
                made = []
            elif target.type == "Screen":
                made = [("Plate", path.name, path)]
            else:
                made = [("Image", f.name, f) for f in files]
            return [
                self._insert(db, item, target=target, order_uuid=order_uuid, fileset_id=fileset_id)
                for item in made
            ]

    def _fileset_folder(self, user_id: int) -> Path:
        """``<user>_<id>/<YYYY-MM>/<DD>/<HH-MM-SS.mmm>-<token>``, as OMERO's template lays out."""
        now = datetime.now(timezone.utc)
        # Several replicas import in the same millisecond: a random token keeps folders apart.
        leaf = f"{now:%H-%M-%S}.{now.microsecond // 1000:03d}-{secrets.token_hex(4)}"
        return self.gateway.repository / f"{self.user}_{user_id}/{now:%Y-%m}/{now:%d}/{leaf}"

    @staticmethod
    def _link(path: Path, files: list[Path], folder: Path) -> list[tuple[Path, Path]]:
        """ln_s: one symlink per file, keeping the folder layout of a folder import."""
        links: list[tuple[Path, Path]] = []
        for source in files:
            relative = source.relative_to(path) if path.is_dir() else Path(source.name)
            link = folder / relative
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(source.absolute())
            links.append((link, source))
        return links

    def _insert(
        self,
        db: sqlite3.Connection,
        made: tuple[ObjectType, str, Path],
        *,
        target: Target,
        order_uuid: str,
        fileset_id: int | None,
    ) -> ImportedObject:
        kind, name, client_path = made
        (object_id,) = db.execute(
            "INSERT INTO objects (type, name, client_path, target_type, target_id, user_name,"
            " group_name, order_uuid) VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (
                kind,
                name,
                str(client_path),
                target.type,
                target.id,
                self.user,
                self.group,
                order_uuid,
            ),
        ).fetchone()
        if fileset_id is not None:
            db.execute(
                "INSERT INTO fileset_objects (fileset_id, object_id) VALUES (?, ?)",
                (fileset_id, object_id),
            )
        return ImportedObject(kind, int(object_id), name, str(client_path), fileset_id)

    def register_zarr(
        self,
        path: Path,
        target: Target,
        *,
        order_uuid: str,
        options: RegistrationOptions | None = None,
        existing: Sequence[ImportedObject] = (),
        on_created: Callable[[ImportedObject], None] | None = None,
    ) -> list[ImportedObject]:
        if self._aborted.is_set():
            raise ImportAborted(f"aborted before registering {path.name}")
        self._alive(f"the registration of {path.name}")
        try:
            content = for_registration(read_zarr(path), options)
            require_servable_format(content, self.gateway.settings.omero_zarr_reads_v3)
        except ZarrError as exc:
            raise ImportFailed(f"OME-Zarr registration of {path.name} failed: {exc}") from exc
        self._check_fail_pattern([path], path.name)
        pixel_source = "source"
        label_name = None
        if content.plate is not None:
            if target.type != "Screen":
                raise ImportFailed(f"{path.name} is a plate: send it to a Screen, not a Dataset")
            made: list[tuple[ObjectType, str, Path]] = [("Plate", content.name, path)]
            images = [[f.path for w in content.plate.wells for f in w.fields]]
            if options is not None and options.plate_pixel_source == "label":
                pixel_source, label_name = "label", options.plate_label_name
        else:
            if target.type != "Dataset":
                raise ImportFailed(f"{path.name} holds images: send it to a Dataset, not a Screen")
            made = [("Image", image.name, image.path) for image in content.images]
            images = [[image.path] for image in content.images]
        firsts = (
            [next((f for w in content.plate.wells for f in w.fields), None)]
            if content.plate is not None
            else list(content.images)
        )
        done = {(o.type, o.client_path): o for o in existing}
        objects: list[ImportedObject] = []
        checked = False
        for item, image_paths, first in zip(made, images, firsts, strict=True):
            old = done.get((item[0], str(item[2])))
            if old is not None:
                objects.append(old)
                continue
            # abort() is honoured between steps, never in the middle of one
            self._pause(f"the registration of {path.name}")
            # OMERO rule: registered objects have no Fileset (ExternalInfo only), so only the
            # order's comment annotation, saved with the object in one step, finds them again.
            with self.gateway.transaction() as db:
                obj = self._insert(db, item, target=target, order_uuid=order_uuid, fileset_id=None)
                db.execute(
                    "INSERT INTO registrations (object_id, pixel_source, label_name, image_paths)"
                    " VALUES (?, ?, ?, ?)",
                    (obj.id, pixel_source, label_name, json.dumps([str(p) for p in image_paths])),
                )
            if not checked and first is not None:
                # the first object of the call is checked before it is reported: a server that
                # cannot serve it leaves nothing behind
                checked = True
                self._require_pixel_buffer(path, obj, first)
            objects.append(obj)
            if on_created is not None:
                on_created(obj)
            self.gateway.step()
        return objects

    def _served(self, image: ZarrImage) -> tuple[int, bytes]:
        """What the server's RawPixelsStore answers for a registered image: its resolution
        levels and the top-left tile.

        OMERO rule: omero-server's ``ZarrPixelsService`` returns null when omero-zarr-pixel-
        buffer cannot open the multiscales (0.6.1 reads zarr v2 only, every level's array
        metadata must be readable), and omero-romio then opens an empty ROMIO buffer: one
        resolution level, zeros. ``setPixelsId`` succeeds either way."""
        width, height = check_tile_size(image)
        reads_v3 = self.gateway.settings.omero_zarr_reads_v3
        meta = ".zarray" if image.zarr_format == 2 else "zarr.json"
        readable = (image.zarr_format == 2 or reads_v3) and all(
            (image.path / level / meta).is_file() for level in image.levels
        )
        if readable:
            tile = expected_tile(image)
            if tile is not None:
                return len(image.levels), tile
        item = int(image.dtype[2:]) if image.dtype[2:].isdigit() else 1
        return (len(image.levels) if readable else 1), bytes(width * height * item)

    def _require_pixel_buffer(self, path: Path, obj: ImportedObject, image: ZarrImage) -> None:
        levels, tile = self._served(image)
        problem = pixel_buffer_problem(image, levels, tile)
        if problem is None:
            return
        with self.gateway.transaction() as db:
            db.execute("DELETE FROM registrations WHERE object_id = ?", (obj.id,))
            db.execute("DELETE FROM objects WHERE id = ?", (obj.id,))
        raise ImportFailed(f"OME-Zarr registration of {path.name} failed: {problem}")

    def find_imported(
        self, client_path: Path, target: Target, *, order_uuid: str
    ) -> list[ImportedObject]:
        self.gateway.reachable()
        text = str(client_path)
        rows = (
            self.gateway.connection()
            .execute(
                "SELECT o.id, o.type, o.name, o.client_path, fo.fileset_id FROM objects o"
                " LEFT JOIN fileset_objects fo ON fo.object_id = o.id"
                " WHERE o.order_uuid = ? AND o.target_type = ? AND o.target_id = ?"
                " ORDER BY o.id",
                (order_uuid, target.type, target.id),
            )
            .fetchall()
        )
        return [
            ImportedObject(kind, int(object_id), name, client, fileset_id)
            for object_id, kind, name, client, fileset_id in rows
            if _is_under(client, text)
        ]

    def annotate(
        self, obj: ImportedObject, namespace: str, pairs: Sequence[tuple[str, str]]
    ) -> int:
        if not pairs:
            raise ValueError("a map annotation needs at least one key")
        if self._aborted.is_set():
            raise ImportAborted("aborted before annotating")
        self._alive("annotating")
        with self.gateway.transaction() as db:
            # One statement reads all this needs (the object exists, an annotation in the
            # namespace, the next row id): the write lock is held, so the ids are ours.
            exists, found, last = db.execute(
                "SELECT (SELECT 1 FROM objects WHERE id = ? AND type = ?),"
                " (SELECT min(map_id) FROM annotations WHERE object_id = ? AND object_type = ?"
                " AND ns = ?), (SELECT coalesce(max(id), 0) FROM annotations)",
                (obj.id, obj.type, obj.id, obj.type, namespace),
            ).fetchone()
            if exists is None:
                raise OmeroError(f"{obj.type} {obj.id} not found in OMERO")
            # OMERO rule: nothing stops a second MapAnnotation in the same namespace on an
            # object; the check is the caller's, and this port method makes it.
            if found is not None:
                return int(found)
            first = int(last) + 1
            rows = [
                (first + n, obj.type, obj.id, namespace, key, value, first)
                for n, (key, value) in enumerate(pairs)
            ]
            # a statement of many rows, not one per pair: each runs with the GIL released
            # and taken back, which the event loop pays for while other threads import
            for start in range(0, len(rows), _ROWS_PER_INSERT):
                chunk = rows[start : start + _ROWS_PER_INSERT]
                db.execute(
                    "INSERT INTO annotations (id, object_type, object_id, ns, key, value, map_id)"
                    " VALUES " + ",".join(["(?, ?, ?, ?, ?, ?, ?)"] * len(chunk)),
                    [value for row in chunk for value in row],
                )
        return first

    @staticmethod
    def _require(db: sqlite3.Connection, obj: ImportedObject) -> None:
        row = db.execute(
            "SELECT 1 FROM objects WHERE id = ? AND type = ?", (obj.id, obj.type)
        ).fetchone()
        if row is None:
            raise OmeroError(f"{obj.type} {obj.id} not found in OMERO")

    def rename(self, obj: ImportedObject, name: str) -> None:
        self.gateway.reachable()
        with self.gateway.transaction() as db:
            self._require(db, obj)
            db.execute("UPDATE objects SET name = ? WHERE id = ?", (name, obj.id))

    def managed_files(self, obj: ImportedObject) -> list[Path]:
        self.gateway.reachable()
        rows = (
            self.gateway.connection()
            .execute(
                "SELECT ff.managed_path FROM fileset_objects fo"
                " JOIN fileset_files ff ON ff.fileset_id = fo.fileset_id"
                " WHERE fo.object_id = ? ORDER BY ff.rowid",
                (obj.id,),
            )
            .fetchall()
        )
        return [Path(row[0]) for row in rows]

    def delete(self, objects: Sequence[ImportedObject]) -> None:
        """OMERO rule (Delete2 of an Image or Plate with its annotations): a fileset goes once
        none of its objects is left, and with it its ManagedRepository entries."""
        self._alive("deleting")
        ids = [obj.id for obj in objects]
        marks = ",".join("?" * len(ids))
        with self.gateway.transaction() as db:
            filesets = [
                row[0]
                for row in db.execute(
                    f"SELECT DISTINCT fileset_id FROM fileset_objects WHERE object_id IN ({marks})",
                    ids,
                )
            ]
            for table, column in (
                ("annotations", "object_id"),
                ("registrations", "object_id"),
                ("fileset_objects", "object_id"),
                ("objects", "id"),
            ):
                db.execute(f"DELETE FROM {table} WHERE {column} IN ({marks})", ids)
            links: list[str] = []
            for fileset in filesets:
                if db.execute(
                    "SELECT 1 FROM fileset_objects WHERE fileset_id = ?", (fileset,)
                ).fetchone():
                    continue
                links.extend(
                    row[0]
                    for row in db.execute(
                        "SELECT managed_path FROM fileset_files WHERE fileset_id = ?", (fileset,)
                    )
                )
                db.execute("DELETE FROM fileset_files WHERE fileset_id = ?", (fileset,))
                db.execute("DELETE FROM filesets WHERE id = ?", (fileset,))
        for link in links:
            Path(link).unlink(missing_ok=True)

    def abort(self) -> None:
        self._aborted.set()

    def close(self) -> None:
        """Connections belong to the gateway's threads; the session itself ends."""
        self.gateway.forget(self)
