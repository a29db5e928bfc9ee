"""The production backend: omero-py (Ice) for the model, the ``omero import`` CLI for pixels.

An admin ("root") connection is shared by the replica and used only to open user sessions
(``suConn``); every order then works on its own user connection in the order's group, so no
call ever switches the group of a shared connection. Imports run as a child process in a new
session (process group) that joins the user session recorded in its private session folder
(never ``-k`` on the CLI's command line; see ``importcli``), so a timeout or an abort can
kill the CLI and its JVM together.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import Ice
import omero.gateway
import omero.model
import omero.rtypes
import omero.sys
import structlog

from biomero_importer.omero.importcli import (
    SERVER_UNREACHABLE,
    LogPaths,
    fetch_jars_argv,
    import_argv,
    import_env,
    order_namespace,
    write_session_store,
)
from biomero_importer.omero.importrun import run_import
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
from biomero_importer.omero.zarr import ZarrContent, ZarrError, ZarrImage, read_zarr
from biomero_importer.omero.zarr_labels import for_registration
from biomero_importer.settings import Settings

log = structlog.get_logger(__name__)

T = TypeVar("T")

NGFF_ENTITY_TYPE = "com.glencoesoftware.ngff:multiscales"
NGFF_ENTITY_ID = 3
_BACKOFF_SECONDS = 1.0
_BACKOFF_MAX_SECONDS = 30.0
_KILL_GRACE_SECONDS = 5.0
_FETCH_JARS_TIMEOUT = 900.0
# The server drops idle sessions after 600 s by default: ping well inside that.
_KEEPALIVE_MAX_SECONDS = 60.0

# zarr v2 dtype strings and v3 data_type names, to OMERO pixel types.
_PIXEL_TYPES = {
    "|i1": "int8",
    "|u1": "uint8",
    "int8": "int8",
    "uint8": "uint8",
    "int16": "int16",
    "uint16": "uint16",
    "int32": "int32",
    "uint32": "uint32",
    "float32": "float",
    "float64": "double",
    "i2": "int16",
    "u2": "uint16",
    "i4": "int32",
    "u4": "uint32",
    "f4": "float",
    "f8": "double",
}


def pixel_type(dtype: str) -> str:
    key = dtype if dtype in _PIXEL_TYPES else dtype.lstrip("<>=|")
    if key not in _PIXEL_TYPES:
        raise ZarrError(f"pixel type {dtype!r} is not supported by OMERO")
    return _PIXEL_TYPES[key]


def map_annotation_link(
    obj: ImportedObject, namespace: str, pairs: Sequence[tuple[str, str]]
) -> omero.model.IObject:
    """An unsaved MapAnnotation with ``pairs``, linked to the Image or Plate."""
    annotation = omero.model.MapAnnotationI()
    annotation.setNs(omero.rtypes.rstring(namespace))
    annotation.setMapValue([omero.model.NamedValue(key, value) for key, value in pairs])
    link: Any
    if obj.type == "Plate":
        link = omero.model.PlateAnnotationLinkI()
        link.setParent(omero.model.PlateI(obj.id, False))
    else:
        link = omero.model.ImageAnnotationLinkI()
        link.setParent(omero.model.ImageI(obj.id, False))
    link.setChild(annotation)
    return link


def experimenter_email(experimenter: omero.model.IObject) -> str | None:
    """An Experimenter's email address; None when it has none (the field is optional and
    often left blank)."""
    value = omero.rtypes.unwrap(experimenter.getEmail())
    if not isinstance(value, str) or not value.strip():
        return None
    return value.strip()


# --- HQL: every query the backend runs, by name, so the contract tests check each one --------

PIXELS_TYPE_HQL = "from PixelsType p where p.value = :value"


def names_hql(kind: ObjectType) -> str:
    return f"select o.id, o.name from {kind} o where o.id in (:ids)"


def _order_marked(alias: str, kind: ObjectType) -> str:
    """The object carries the order's comment annotation (namespace ``:ns``, text ``:uuid``)."""
    return (
        f"exists (select 1 from {kind}AnnotationLink l join l.child a"
        f" where l.parent = {alias} and a.ns = :ns and a.textValue = :uuid)"
    )


def imported_hql(kind: ObjectType) -> str:
    """Imported objects in target ``:target`` and their client paths, for the order: every
    import links the order comment to the Images it creates (``--annotation-ns/-text``)."""
    if kind == "Plate":
        return (
            "select distinct p.id, p.name, fs.id, u.clientPath from Plate p"
            " join p.screenLinks sl join p.wells w join w.wellSamples ws join ws.image i"
            " join i.fileset fs join fs.usedFiles u"
            f" where sl.parent.id = :target and {_order_marked('i', 'Image')}"
        )
    return (
        "select distinct i.id, i.name, fs.id, u.clientPath from Image i"
        " join i.datasetLinks dl join i.fileset fs join fs.usedFiles u"
        f" where dl.parent.id = :target and {_order_marked('i', 'Image')}"
    )


def managed_files_hql(kind: ObjectType) -> str:
    if kind == "Plate":
        source = (
            "from Plate p join p.wells w join w.wellSamples ws join ws.image i"
            " join i.fileset fs join fs.usedFiles u join u.originalFile f where p.id = :id"
        )
    else:
        source = (
            "from Image i join i.fileset fs join fs.usedFiles u join u.originalFile f"
            " where i.id = :id"
        )
    return f"select distinct f.path, f.name {source}"


def pixels_hql(kind: ObjectType) -> str:
    if kind == "Image":
        return "select pix.id from Pixels pix join pix.image i where i.id = :id"
    return (
        "select pix.id from Plate p join p.wells w join w.wellSamples ws"
        " join ws.image i join i.pixels pix where p.id = :id"
    )


def existing_map_annotation_hql(kind: ObjectType) -> str:
    """MapAnnotations in namespace ``:ns`` already linked to the Image or Plate ``:id``."""
    return (
        f"select a.id from {kind}AnnotationLink l join l.child a"
        " where l.parent.id = :id and a.ns = :ns and a.class = MapAnnotation order by a.id"
    )


def registered_hql(kind: ObjectType) -> str:
    """Registered (fileset-less) objects in target ``:target`` carrying the order comment;
    their client path is their ExternalInfo lsid."""
    if kind == "Plate":
        return (
            "select p.id, p.name, ei.lsid from Plate p join p.screenLinks sl"
            " join p.details.externalInfo ei"
            f" where sl.parent.id = :target and {_order_marked('p', 'Plate')}"
        )
    return (
        "select i.id, i.name, ei.lsid from Image i join i.datasetLinks dl"
        " join i.details.externalInfo ei where dl.parent.id = :target and i.fileset is null"
        f" and {_order_marked('i', 'Image')}"
    )


def every_hql() -> list[str]:
    """Every HQL string the backend can send (for the contract tests)."""
    kinds: list[ObjectType] = ["Image", "Plate"]
    return [PIXELS_TYPE_HQL] + [
        build(kind)
        for kind in kinds
        for build in (
            names_hql,
            imported_hql,
            registered_hql,
            managed_files_hql,
            pixels_hql,
            existing_map_annotation_hql,
        )
    ]


def ngff_external_info(lsid: str) -> omero.model.ExternalInfoI:
    """What the omero-zarr-pixel-buffer extension reads to serve pixels from an OME-Zarr."""
    info = omero.model.ExternalInfoI()
    info.setEntityType(omero.rtypes.rstring(NGFF_ENTITY_TYPE))
    info.setEntityId(omero.rtypes.rlong(NGFF_ENTITY_ID))
    info.setLsid(omero.rtypes.rstring(lsid))
    return info


def order_comment(namespace: str, order_uuid: str) -> omero.model.CommentAnnotationI:
    """The comment annotation holding the order UUID, as ``omero import`` links it."""
    comment = omero.model.CommentAnnotationI()
    comment.setNs(omero.rtypes.rstring(namespace))
    comment.setTextValue(omero.rtypes.rstring(order_uuid))
    return comment


def registered_image(
    image: omero.model.ImageI, lsid: str, *, comment: int | None, dataset: int | None
) -> None:
    """Make a created Image a registered OME-Zarr image: ExternalInfo, the order comment and
    the Dataset link, all saved with it in one step."""
    image.getDetails().setExternalInfo(ngff_external_info(lsid))
    if comment is not None:
        image.linkAnnotation(omero.model.CommentAnnotationI(comment, False))
    if dataset is not None:
        image.linkDataset(omero.model.DatasetI(dataset, False))


def registered_plate(
    content: ZarrContent, fields: list[list[int]], *, comment: int, screen: int
) -> omero.model.PlateI:
    """An unsaved Plate with its Wells and WellSamples (``fields``: the Image ids per well),
    its ExternalInfo, the order comment and its Screen link."""
    assert content.plate is not None
    plate = omero.model.PlateI()
    plate.setName(omero.rtypes.rstring(content.plate.name))
    for zarr_well, image_ids in zip(content.plate.wells, fields, strict=True):
        well = omero.model.WellI()
        well.setRow(omero.rtypes.rint(zarr_well.row))
        well.setColumn(omero.rtypes.rint(zarr_well.column))
        for image_id in image_ids:
            sample = omero.model.WellSampleI()
            sample.setImage(omero.model.ImageI(image_id, False))
            well.addWellSample(sample)
        plate.addWell(well)
    plate.getDetails().setExternalInfo(ngff_external_info(str(content.path)))
    plate.linkAnnotation(omero.model.CommentAnnotationI(comment, False))
    plate.linkScreen(omero.model.ScreenI(screen, False))
    return plate


def _unwrap_rows(rows: Any) -> list[list[Any]]:
    return [[omero.rtypes.unwrap(cell) for cell in row] for row in rows]


def _absolute_client_path(client_path: str) -> str:
    # OMERO stores client paths without their leading slash.
    return client_path if client_path.startswith("/") else f"/{client_path}"


def _is_under(candidate: str, path: str) -> bool:
    return candidate == path or candidate.startswith(path.rstrip("/") + "/")


def kill_process_tree(proc: subprocess.Popen[bytes]) -> None:
    """TERM, then KILL, the whole process group started with ``start_new_session``."""
    for sig, grace in ((signal.SIGTERM, _KILL_GRACE_SECONDS), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        if grace is None:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


class BlitzBackend:
    name = "blitz"
    # each call is a network round trip or an import subprocess: one job each, so a cancel
    # is heard between them
    one_job = False

    def __init__(self, settings: Settings) -> None:
        if not (settings.omero_host and settings.omero_user and settings.omero_password):
            raise ValueError("the blitz backend needs omero_host, omero_user and omero_password")
        self.settings = settings
        self._root: omero.gateway.BlitzGateway | None = None
        self._lock = threading.Lock()
        self._jars_lock = threading.Lock()
        self._jars_ready = fetch_jars_argv(settings) is None

    def describe(self) -> str:
        settings = self.settings
        return f"OMERO {settings.omero_user}@{settings.omero_host}:{settings.omero_port}"

    # --- connections ------------------------------------------------------------------------
    def retry(self, what: str, call: Callable[[], T]) -> T:
        """Run ``call``; Ice connection errors are retried with backoff, then OmeroUnavailable."""
        attempts = self.settings.omero_retries + 1
        for attempt in range(1, attempts + 1):
            try:
                return call()
            except Ice.LocalException as exc:
                detail = f"{type(exc).__name__}: {exc}".strip()
                self._drop_root()
                log.warning(
                    "omero_unreachable",
                    action=what,
                    attempt=attempt,
                    attempts=attempts,
                    error=type(exc).__name__,
                )
                if attempt == attempts:
                    raise OmeroUnavailable(detail) from exc
                time.sleep(min(_BACKOFF_SECONDS * 2 ** (attempt - 1), _BACKOFF_MAX_SECONDS))
        raise AssertionError("unreachable")

    def _connect_root(self) -> omero.gateway.BlitzGateway:
        settings = self.settings
        assert settings.omero_password is not None
        conn = omero.gateway.BlitzGateway(
            settings.omero_user,
            settings.omero_password.get_secret_value(),
            host=settings.omero_host,
            port=settings.omero_port,
            secure=True,
        )
        try:
            if conn.connect():
                return conn
            error = conn.getLastError()
        finally:
            if not conn.isConnected():
                # Each attempt owns an Ice communicator: destroy it, or it leaks per retry.
                conn.close()
        if isinstance(error, Ice.LocalException):
            raise error
        raise OmeroError(
            f"OMERO login refused for user '{settings.omero_user}'",
            type(error).__name__ if error is not None else "connect() returned False",
        )

    def root(self) -> omero.gateway.BlitzGateway:
        """The admin connection; call with ``self._lock`` held."""
        if self._root is not None and self._root.keepAlive():
            return self._root
        self._drop_root_locked()
        self._root = self._connect_root()
        log.info("omero_connected", server=self.describe())
        return self._root

    def _drop_root(self) -> None:
        with self._lock:
            self._drop_root_locked()

    def _drop_root_locked(self) -> None:
        root, self._root = self._root, None
        if root is not None:
            try:
                root.close()
            except Exception as exc:
                log.debug("omero_close_failed", error=type(exc).__name__)

    def check(self) -> None:
        def attempt() -> None:
            with self._lock:
                if not self.root().isAdmin():
                    raise OmeroError(
                        f"OMERO user '{self.settings.omero_user}' is not an administrator"
                    )

        self.retry("check", attempt)

    def open_session(self, user: str, group: str, *, order_uuid: str) -> BlitzSession:
        def attempt() -> omero.gateway.BlitzGateway:
            with self._lock:
                root = self.root()
                try:
                    # the TTL is a hard lifetime: at least import_timeout plus a margin
                    conn = root.suConn(user, group=group, ttl=session_ttl_ms(self.settings))
                except omero.ServerError as exc:
                    raise UnknownUserOrGroup(user, group, type(exc).__name__) from exc
            if conn is None or not conn.isConnected():
                raise UnknownUserOrGroup(user, group, "suConn returned no connection")
            return conn

        conn = self.retry("open_session", attempt)
        log.debug("omero_session_opened", user=user, group=group, order=order_uuid)
        return BlitzSession(self, conn, order_uuid, user)

    def experimenter_email(self, user: str) -> str | None:
        def attempt() -> str | None:
            with self._lock:
                admin = self.root().getAdminService()
                try:
                    experimenter = admin.lookupExperimenter(user)
                except omero.ApiUsageException:  # no experimenter by that name
                    return None
            return experimenter_email(experimenter)

        return self.retry("experimenter_email", attempt)

    def ensure_jars(self, session: BlitzSession) -> None:
        """``--fetch-jars`` downloads and exits, so it runs once before the first import."""
        argv = fetch_jars_argv(self.settings)
        if self._jars_ready or argv is None:
            return
        with self._jars_lock:
            if self._jars_ready:
                return
            code, _, err = session.run_cli(argv, dict(os.environ), _FETCH_JARS_TIMEOUT, "jars")
            if code != 0:
                raise ImportFailed(
                    f"Fetching OMERO.java jars {self.settings.fetch_jars} failed (exit {code})",
                    err[-2000:],
                )
            self._jars_ready = True

    def close(self) -> None:
        self._drop_root()


class BlitzSession:
    def __init__(
        self,
        backend: BlitzBackend,
        conn: omero.gateway.BlitzGateway,
        order_uuid: str,
        user: str,
    ) -> None:
        self.backend = backend
        self.user = user
        self.settings = backend.settings
        self.conn = conn
        self.order_uuid = order_uuid
        self._aborted = threading.Event()
        self._proc_lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        # imports of this order so far: numbers each one's cli.<UUID>_<i> log files
        self._imports = 0
        # the session's hard lifetime counts from its creation (timeToLive, timeToIdle 0)
        self._opened = time.monotonic()
        self._ttl = session_ttl_ms(self.settings) / 1000

    def remaining(self) -> float:
        return self._ttl - (time.monotonic() - self._opened)

    @property
    def session_key(self) -> str:
        return str(self.conn.getSession().getUuid().val)

    def _call(self, what: str, call: Callable[[], T]) -> T:
        if self._aborted.is_set():
            raise ImportAborted(f"aborted before {what}")
        return self.backend.retry(what, call)

    # --- processes --------------------------------------------------------------------------
    @contextmanager
    def _keepalive(self) -> Iterator[None]:
        interval = min(self.settings.ttl_for_user_conn / 4000, _KEEPALIVE_MAX_SECONDS)
        stop = threading.Event()

        def ping() -> None:
            while not stop.wait(interval):
                try:
                    self.conn.keepAlive()
                except Exception as exc:
                    log.warning("omero_keepalive_failed", error=type(exc).__name__)

        thread = threading.Thread(target=ping, name="omero-keepalive", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)

    def run_cli(
        self, argv: list[str], env: dict[str, str], timeout: float, name: str
    ) -> tuple[int, str, str]:
        """Run one CLI process in its own process group; abort() or the timeout kill it."""
        with self._proc_lock:
            if self._aborted.is_set():
                raise ImportAborted(f"aborted before importing {name}")
            proc = subprocess.Popen(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
            self._proc = proc
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_process_tree(proc)
            proc.communicate()
            raise ImportFailed(
                f"OMERO import of {name} timed out after {timeout:g} s (import_timeout)"
            ) from None
        finally:
            with self._proc_lock:
                self._proc = None
        if self._aborted.is_set():
            raise ImportAborted(f"import of {name} was killed")
        return (
            proc.returncode,
            out.decode("utf-8", "replace"),
            err.decode("utf-8", "replace"),
        )

    def abort(self) -> None:
        self._aborted.set()
        with self._proc_lock:
            proc = self._proc
        if proc is not None:
            threading.Thread(target=kill_process_tree, args=(proc,), daemon=True).start()

    # --- import -----------------------------------------------------------------------------
    def import_path(
        self, path: Path, target: Target, *, order_uuid: str, exclude_existing: bool
    ) -> list[ImportedObject]:
        if self._aborted.is_set():
            raise ImportAborted(f"aborted before importing {path.name}")
        self.backend.ensure_jars(self)
        index = self._imports
        self._imports += 1

        def run_once(logs: LogPaths) -> tuple[int, str, str]:
            argv = import_argv(
                self.settings,
                path,
                target,
                logs=logs,
                exclude_existing=exclude_existing,
                order_uuid=order_uuid,
            )
            with tempfile.TemporaryDirectory(prefix="omero-sessions-") as session_dir:
                # the import joins this session from its private folder: no key in its argv
                write_session_store(Path(session_dir), self.settings, self.user, self.session_key)
                env = import_env(self.settings, Path(session_dir))
                log.info(
                    "omero_import_started", path=str(path), target=f"{target.type}:{target.id}"
                )
                with self._keepalive():
                    return self.run_cli(argv, env, self.settings.import_timeout, path.name)

        run = run_import(
            self.settings,
            run_once,
            order_uuid=order_uuid,
            index=index,
            name=path.name,
            aborted=self._aborted.wait,
        )
        verdict = run.verdict
        if not verdict.ok:
            if verdict.nothing_imported and exclude_existing:
                log.info("omero_import_excluded", path=str(path))
                return []
            if run.cause in SERVER_UNREACHABLE:
                # the server went away under the import: a failure that passes
                raise OmeroUnavailable(
                    f"omero import of {path.name}: {run.cause} after {run.attempts} attempts;"
                    f" {verdict.detail}"
                )
            raise ImportFailed(verdict.reason, verdict.detail)
        kind: ObjectType = "Plate" if target.type == "Screen" else "Image"
        ids = verdict.plates if kind == "Plate" else verdict.images
        if not ids:
            raise ImportFailed(f"OMERO import of {path.name} created no {kind}", verdict.detail)
        names = self._names(kind, ids)
        return [
            ImportedObject(kind, i, names.get(i, path.name), str(path), verdict.fileset_of.get(i))
            for i in ids
        ]

    def _names(self, kind: ObjectType, ids: list[int]) -> dict[int, str]:
        params = omero.sys.ParametersI()
        params.addIds(ids)
        rows = self._call(
            "names",
            lambda: self.conn.getQueryService().projection(
                names_hql(kind),
                params,
                self.conn.SERVICE_OPTS,
            ),
        )
        return {int(row[0]): str(row[1]) for row in _unwrap_rows(rows)}

    def find_imported(
        self, client_path: Path, target: Target, *, order_uuid: str
    ) -> list[ImportedObject]:
        """Objects in the target, from files under ``client_path``, that this order imported.

        Every import links a comment annotation holding the order UUID to its images
        (``--annotation-ns/--annotation-text``), so earlier imports of the same file by other
        orders never match.
        """
        params = omero.sys.ParametersI()
        params.addLong("target", target.id)
        params.addString("ns", order_namespace(self.settings))
        params.addString("uuid", order_uuid)
        kind: ObjectType = "Plate" if target.type == "Screen" else "Image"
        hql = imported_hql(kind)
        # Registered OME-Zarr objects have no fileset: found by their ExternalInfo path and
        # the order comment the registration saved with them.
        registered = registered_hql(kind)
        query = self.conn.getQueryService()
        rows = self._call(
            "find_imported", lambda: query.projection(hql, params, self.conn.SERVICE_OPTS)
        )
        found: dict[int, ImportedObject] = {}
        for object_id, name, fileset_id, used in _unwrap_rows(rows):
            used_path = _absolute_client_path(str(used))
            if int(object_id) not in found and _is_under(used_path, str(client_path)):
                found[int(object_id)] = ImportedObject(
                    kind, int(object_id), str(name), used_path, int(fileset_id)
                )
        rows = self._call(
            "find_registered", lambda: query.projection(registered, params, self.conn.SERVICE_OPTS)
        )
        for object_id, name, lsid in _unwrap_rows(rows):
            if int(object_id) not in found and _is_under(str(lsid), str(client_path)):
                found[int(object_id)] = ImportedObject(kind, int(object_id), str(name), str(lsid))
        return sorted(found.values(), key=lambda o: o.id)

    # --- annotations, names, files ----------------------------------------------------------
    def annotate(
        self, obj: ImportedObject, namespace: str, pairs: Sequence[tuple[str, str]]
    ) -> int:
        params = omero.sys.ParametersI()
        params.addId(obj.id)
        params.addString("ns", namespace)
        existing = _unwrap_rows(
            self._call(
                "find_annotation",
                lambda: self.conn.getQueryService().projection(
                    existing_map_annotation_hql(obj.type), params, self.conn.SERVICE_OPTS
                ),
            )
        )
        if existing:
            # an earlier run annotated it (the ledger had not been saved): never a second one
            return int(existing[0][0])
        link = map_annotation_link(obj, namespace, pairs)
        saved = self._call(
            "annotate",
            lambda: self.conn.getUpdateService().saveAndReturnObject(link, self.conn.SERVICE_OPTS),
        )
        return int(saved.getChild().getId().getValue())

    def rename(self, obj: ImportedObject, name: str) -> None:
        def attempt() -> None:
            loaded = self.conn.getQueryService().get(obj.type, obj.id, self.conn.SERVICE_OPTS)
            loaded.setName(omero.rtypes.rstring(name))
            self.conn.getUpdateService().saveObject(loaded, self.conn.SERVICE_OPTS)

        self._call("rename", attempt)

    def managed_files(self, obj: ImportedObject) -> list[Path]:
        params = omero.sys.ParametersI()
        params.addId(obj.id)
        rows = self._call(
            "managed_files",
            lambda: self.conn.getQueryService().projection(
                managed_files_hql(obj.type), params, self.conn.SERVICE_OPTS
            ),
        )
        root = self.settings.omero_managed_repository
        return sorted({root / str(path) / str(name) for path, name in _unwrap_rows(rows)})

    # --- OME-Zarr ---------------------------------------------------------------------------
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
        try:
            # label pixels: every field image is created from its label image's multiscales
            content = for_registration(read_zarr(path), options)
        except ZarrError as exc:
            raise ImportFailed(f"OME-Zarr registration of {path.name} failed: {exc}") from exc
        if content.kind == "plate" and target.type != "Screen":
            raise ImportFailed(f"{path.name} is a plate: send it to a Screen, not a Dataset")
        if content.kind != "plate" and target.type != "Dataset":
            raise ImportFailed(f"{path.name} holds images: send it to a Dataset, not a Screen")
        done: dict[tuple[str, str], ImportedObject] = {(o.type, o.client_path): o for o in existing}
        created: list[ImportedObject] = []

        def made(obj: ImportedObject) -> None:
            created.append(obj)
            if on_created is not None:
                on_created(obj)

        saved_comment: list[int] = []

        def comment() -> int:
            """The order comment, saved once, when the first object needs it."""
            if not saved_comment:
                saved_comment.append(
                    self._call("order_comment", lambda: self._order_comment(order_uuid))
                )
            return saved_comment[0]

        # Each step goes through _call on its own: a lost connection retries only that step,
        # never the steps before it, and abort() is honoured between steps.
        objects = self._register(content, target, comment, done, made)
        self._require_pixel_buffer(path, created)
        log.info("omero_zarr_registered", path=str(path), objects=len(created))
        return objects

    def _order_comment(self, order_uuid: str) -> int:
        """The comment annotation holding the order UUID, as ``omero import`` links it."""
        comment = order_comment(order_namespace(self.settings), order_uuid)
        saved = self.conn.getUpdateService().saveAndReturnObject(comment, self.conn.SERVICE_OPTS)
        return int(saved.getId().getValue())

    def _register(
        self,
        content: ZarrContent,
        target: Target,
        comment: Callable[[], int],
        done: dict[tuple[str, str], ImportedObject],
        made: Callable[[ImportedObject], None],
    ) -> list[ImportedObject]:
        update = self.conn.getUpdateService()
        if content.plate is None:
            objects = []
            for image in content.images:
                old = done.get(("Image", str(image.path)))
                if old is not None:
                    objects.append(old)
                    continue
                image_id = self._create_image(image, comment=comment(), dataset=target.id)
                obj = ImportedObject("Image", image_id, image.name, str(image.path))
                made(obj)
                objects.append(obj)
            return objects
        old = done.get(("Plate", str(content.path)))
        if old is not None:
            return [old]
        fields = [
            [self._create_image(field_image) for field_image in zarr_well.fields]
            for zarr_well in content.plate.wells
        ]
        # plate, ExternalInfo, order comment and screen link in one save: one step
        plate = registered_plate(content, fields, comment=comment(), screen=target.id)
        saved = self._call(
            "register_plate", lambda: update.saveAndReturnObject(plate, self.conn.SERVICE_OPTS)
        )
        obj = ImportedObject(
            "Plate", int(saved.getId().getValue()), content.plate.name, str(content.path)
        )
        made(obj)
        return [obj]

    def _create_image(
        self, image: ZarrImage, *, comment: int | None = None, dataset: int | None = None
    ) -> int:
        """Two steps, each retried on its own after a lost connection: createImage, then the
        save that makes it a registered image (skipped when an earlier try committed it)."""

        def create() -> int:
            query = self.conn.getQueryService()
            params = omero.sys.ParametersI()
            params.addString("value", pixel_type(image.dtype))
            ptype = query.findByQuery(PIXELS_TYPE_HQL, params, self.conn.SERVICE_OPTS)
            image_id = self.conn.getPixelsService().createImage(
                image.size("x"),
                image.size("y"),
                image.size("z"),
                image.size("t"),
                list(range(image.size("c"))),
                ptype,
                image.name,
                "",
                self.conn.SERVICE_OPTS,
            )
            return int(image_id.getValue())

        def register(image_id: int) -> None:
            loaded = self.conn.getQueryService().get("Image", image_id, self.conn.SERVICE_OPTS)
            if loaded.getDetails().getExternalInfo() is not None:
                return  # the reply to an earlier try was lost, not its save
            # ExternalInfo, the order comment and the dataset link in one save: an image in
            # the target always carries the comment that finds it again.
            registered_image(loaded, str(image.path), comment=comment, dataset=dataset)
            self.conn.getUpdateService().saveObject(loaded, self.conn.SERVICE_OPTS)

        image_id = self._call("create_image", create)
        self._call("register_image", partial(register, image_id))
        return image_id

    def _require_pixel_buffer(self, path: Path, objects: list[ImportedObject]) -> None:
        """Read one plane's worth of metadata back; without the extension the server cannot."""
        if not objects:
            return
        first = objects[0]
        params = omero.sys.ParametersI()
        params.addId(first.id)
        hql = pixels_hql(first.type)
        rows = _unwrap_rows(
            self.conn.getQueryService().projection(hql, params, self.conn.SERVICE_OPTS)
        )
        store = self.conn.c.sf.createRawPixelsStore()
        try:
            store.setPixelsId(int(rows[0][0]), True, self.conn.SERVICE_OPTS)
        except omero.ServerError as exc:
            self._delete(objects)
            raise ImportFailed(
                f"OME-Zarr registration of {path.name} failed: the OMERO server cannot read"
                " OME-Zarr (omero-zarr-pixel-buffer extension missing?)",
                f"{type(exc).__name__}: {getattr(exc, 'message', '')}",
            ) from exc
        finally:
            store.close()

    def _delete(self, objects: list[ImportedObject]) -> None:
        for obj in objects:
            try:
                self.conn.deleteObjects(obj.type, [obj.id], deleteChildren=True, wait=True)
            except Exception as exc:
                log.warning("omero_cleanup_failed", object=f"{obj.type}:{obj.id}", error=str(exc))

    def close(self) -> None:
        try:
            self.conn.close()
        except Exception as exc:
            log.debug("omero_close_failed", error=type(exc).__name__)
