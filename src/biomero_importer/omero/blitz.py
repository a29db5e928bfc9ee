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
from omero.model.enums import UnitsLength

from biomero_importer.cpus import children_on_every_cpu
from biomero_importer.omero.importcli import (
    SERVER_UNREACHABLE,
    LogPaths,
    cli_prefix,
    fetch_jars_argv,
    import_argv,
    import_env,
    omero_java_jars,
    order_namespace,
    write_session_store,
)
from biomero_importer.omero.importrun import (
    SESSION_SERVER_UNREACHABLE,
    ImportTimedOut,
    SessionState,
    host_lock,
    missing_files,
    run_import,
    settle_timeout,
)
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
    ZarrContent,
    ZarrError,
    ZarrImage,
    check_tile_size,
    pixel_buffer_problem,
    read_zarr,
    require_servable_format,
)
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
    import links the order comment to the Images it creates (``--annotation-ns/-text``).

    A plate's used files are read per fileset, never per field image: joining each of a
    screen's 3,456 images with each of its fileset's 3,456 files is 12 M rows. An ``exists``
    on the field images ties each fileset to its plate; the database makes it a semi-join that
    stops at the first image (benchmarks/plate_hql.py)."""
    if kind == "Plate":
        return (
            "select p.id, p.name, fs.id, u.clientPath from Plate p join p.screenLinks sl,"
            " Fileset fs join fs.usedFiles u where sl.parent.id = :target and exists"
            " (select 1 from WellSample ws join ws.image i where ws.well.plate = p"
            f" and i.fileset = fs and {_order_marked('i', 'Image')})"
        )
    return (
        "select distinct i.id, i.name, fs.id, u.clientPath from Image i"
        " join i.datasetLinks dl join i.fileset fs join fs.usedFiles u"
        f" where dl.parent.id = :target and {_order_marked('i', 'Image')}"
    )


def managed_files_hql(kind: ObjectType) -> str:
    if kind == "Plate":
        # per fileset, as in imported_hql: one row per used file (the subquery depends on
        # :id only, so it runs once)
        return (
            "select f.path, f.name from Fileset fs join fs.usedFiles u join u.originalFile f"
            " where fs.id in (select i.fileset.id from WellSample ws join ws.image i"
            " where ws.well.plate.id = :id)"
        )
    return (
        "select distinct f.path, f.name from Image i join i.fileset fs join fs.usedFiles u"
        " join u.originalFile f where i.id = :id"
    )


def fileset_files_hql() -> str:
    """Client paths of every file of the filesets ``:ids`` (what a re-run must not import
    again)."""
    return "select u.clientPath from Fileset fs join fs.usedFiles u where fs.id in (:ids)"


def pixels_hql(kind: ObjectType) -> str:
    if kind == "Image":
        return "select pix.id from Pixels pix join pix.image i where i.id = :id"
    return (
        "select pix.id from Plate p join p.wells w join w.wellSamples ws"
        " join ws.image i join i.pixels pix where p.id = :id"
    )


# A registered image's Pixels with its channels, as BlitzGateway.setChannelNames loads them.
CHANNELS_HQL = (
    "select p from Pixels p join fetch p.channels c join fetch c.logicalChannel lc"
    " where p.image.id = :id"
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
    return [PIXELS_TYPE_HQL, CHANNELS_HQL, fileset_files_hql()] + [
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
) -> list[omero.model.IObject]:
    """What makes a created Image a registered OME-Zarr image, to be saved in one call: the
    Image (as the server returned it) with its ExternalInfo, and new link objects to the order
    comment and the Dataset with proxies of both ends, as omero-cli-zarr links
    (``zarr_import.link_to_target``). The server returns collections unloaded
    (``ProxyCleanupFilter``): ``linkAnnotation``/``linkDataset`` on them would raise
    ``UnloadedEntityException``."""
    image.getDetails().setExternalInfo(ngff_external_info(lsid))
    image_id = image.getId().getValue()
    saved: list[omero.model.IObject] = [image]
    if comment is not None:
        annotation_link = omero.model.ImageAnnotationLinkI()
        annotation_link.setParent(omero.model.ImageI(image_id, False))
        annotation_link.setChild(omero.model.CommentAnnotationI(comment, False))
        saved.append(annotation_link)
    if dataset is not None:
        dataset_link = omero.model.DatasetImageLinkI()
        dataset_link.setParent(omero.model.DatasetI(dataset, False))
        dataset_link.setChild(omero.model.ImageI(image_id, False))
        saved.append(dataset_link)
    return saved


def describe_pixels(pixels: omero.model.PixelsI, image: ZarrImage) -> list[omero.model.IObject]:
    """Physical sizes and channel names from the NGFF metadata, as omero-cli-zarr sets them
    (``set_channel_names``: ``omero.channels[].label``), on Pixels loaded with its channels
    (CHANNELS_HQL); returns what to save (nothing when the metadata says nothing)."""
    changed: list[omero.model.IObject] = []
    for size in image.physical_sizes:
        unit = (size.unit or "").upper()
        if not unit or getattr(UnitsLength, unit, None) is None:
            continue  # no unit, or one OMERO has no name for: better none than a wrong one
        setter = getattr(pixels, f"setPhysicalSize{size.axis.upper()}")
        setter(omero.model.LengthI(size.value, unit))
        changed = [pixels]
    if image.channel_names:
        channels = list(pixels.iterateChannels())
        if len(channels) == len(image.channel_names):
            for channel, name in zip(channels, image.channel_names, strict=True):
                logical = channel.getLogicalChannel()
                logical.setName(omero.rtypes.rstring(name))
                changed.append(logical)
    return changed


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
        self._jars_ready = False

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
        conn = self.user_connection(user, group)
        log.debug("omero_session_opened", user=user, group=group, order=order_uuid)
        return BlitzSession(self, conn, order_uuid, user, group)

    def user_connection(self, user: str, group: str) -> omero.gateway.BlitzGateway:
        """A new session as ``user`` in ``group`` (``suConn`` on the admin connection)."""

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

        return self.retry("open_session", attempt)

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
        """OMERO.java jars before the first import: ``--fetch-jars`` downloads and exits.

        Without ``fetch_jars`` and without jars, omero-py would download the latest jars at
        each worker's first import, unlocked; here that download runs once per host under a
        file lock, and never with ``omero_jars_offline``."""
        if self._jars_ready:
            return
        with self._jars_lock:
            if self._jars_ready:
                return
            settings = self.settings
            argv = fetch_jars_argv(settings)
            if argv is None and omero_java_jars(os.environ) is not None:
                self._jars_ready = True
                return
            if settings.omero_jars_offline:
                raise ImportFailed(
                    "OMERO.java jars not found and omero_jars_offline forbids downloading them:"
                    " install them in $OMERODIR/lib/client (the image ships them there)"
                )
            with host_lock(Path(tempfile.gettempdir()) / f"biomero-omero-jars-{os.getuid()}"):
                if argv is None and omero_java_jars(os.environ) is None:
                    # what omero-py itself would fetch: its 'latest', but once per host
                    argv = [*cli_prefix(settings), "import", "--fetch-jars", "latest"]
                if argv is not None:
                    code, _, err = session.run_cli(
                        argv, dict(os.environ), _FETCH_JARS_TIMEOUT, "jars"
                    )
                    if code != 0:
                        raise ImportFailed(
                            f"Fetching OMERO.java jars {argv[-1]} failed (exit {code})",
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
        group: str,
    ) -> None:
        self.backend = backend
        self.user = user
        self.group = group
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
            with children_on_every_cpu():  # the Java importer's work is not the replica's
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
            raise ImportTimedOut(
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
        self,
        path: Path,
        target: Target,
        *,
        order_uuid: str,
        exclude_existing: bool,
        already: Sequence[ImportedObject] = (),
    ) -> list[ImportedObject]:
        if self._aborted.is_set():
            raise ImportAborted(f"aborted before importing {path.name}")
        paths: list[Path] = [path]
        if already:
            # a re-run of a partly imported unit: only the files no fileset of it holds
            paths = missing_files(path, self._covered(already), self.settings.import_depth)
            if not paths:
                log.info("omero_import_nothing_missing", path=str(path), objects=len(already))
                return []
        self.backend.ensure_jars(self)
        index = self._imports
        self._imports += 1

        def run_once(logs: LogPaths) -> tuple[int, str, str]:
            argv = import_argv(
                self.settings,
                paths,
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
                    "omero_import_started",
                    path=str(path),
                    files=len(paths) if already else None,
                    target=f"{target.type}:{target.id}",
                )
                with self._keepalive():
                    return self.run_cli(argv, env, self.settings.import_timeout, path.name)

        try:
            run = run_import(
                self.settings,
                run_once,
                order_uuid=order_uuid,
                index=index,
                name=path.name,
                aborted=self._aborted.wait,
                rejoin=self._rejoin,
            )
        except ImportTimedOut as timed_out:
            return settle_timeout(
                self.settings,
                timed_out,
                look=partial(self._look_after_timeout, path, target, order_uuid, already),
                aborted=self._aborted.wait,
            )
        verdict = run.verdict
        if not verdict.ok:
            if verdict.nothing_imported and exclude_existing:
                log.info("omero_import_excluded", path=str(path))
                return []
            if run.cause in SERVER_UNREACHABLE or run.cause == SESSION_SERVER_UNREACHABLE:
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

    def _covered(self, objects: Sequence[ImportedObject]) -> set[str]:
        """Client paths of every file of the objects' filesets (a fileset-less object: its
        own client path)."""
        covered = {obj.client_path for obj in objects if obj.fileset_id is None}
        filesets = sorted({obj.fileset_id for obj in objects if obj.fileset_id is not None})
        if filesets:
            params = omero.sys.ParametersI()
            params.addIds(filesets)
            rows = self._call(
                "fileset_files",
                lambda: self.conn.getQueryService().projection(
                    fileset_files_hql(), params, self.conn.SERVICE_OPTS
                ),
            )
            covered |= {_absolute_client_path(str(row[0])) for row in _unwrap_rows(rows)}
        return covered

    def _look_after_timeout(
        self, path: Path, target: Target, order_uuid: str, already: Sequence[ImportedObject]
    ) -> tuple[list[ImportedObject], list[Path]]:
        """What a killed import made (this order's objects from ``path`` not in ``already``)
        and the files still missing."""
        before = {(obj.type, obj.id) for obj in already}
        found = self.find_imported(path, target, order_uuid=order_uuid)
        made = [obj for obj in found if (obj.type, obj.id) not in before]
        covered = self._covered([*already, *made])
        return made, missing_files(path, covered, self.settings.import_depth)

    def _rejoin(self) -> SessionState:
        """The CLI could not join this session: ask the server ourselves why (see importrun)."""
        try:
            self.backend.check()
        except OmeroUnavailable:
            return SessionState.UNREACHABLE
        try:
            self.conn.c.getSession().keepAlive(None)
            return SessionState.ALIVE
        except Exception as exc:  # the session is gone (ObjectNotExist, SessionException...)
            log.info("omero_session_renewed", user=self.user, error=type(exc).__name__)
        old, self.conn = self.conn, self.backend.user_connection(self.user, self.group)
        self._opened = time.monotonic()
        try:
            old.close()
        except Exception as exc:
            log.debug("omero_close_failed", error=type(exc).__name__)
        return SessionState.RENEWED

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

    def delete(self, objects: Sequence[ImportedObject]) -> None:
        for obj in objects:

            def attempt(obj: ImportedObject = obj) -> None:
                # the self-test's own objects: their annotations go with them
                self.conn.deleteObjects(
                    obj.type, [obj.id], deleteAnns=True, deleteChildren=True, wait=True
                )

            try:
                self._call("delete", attempt)
            except omero.ServerError as exc:
                raise OmeroError(
                    f"OMERO refused deleting {obj.type} {obj.id}",
                    f"{type(exc).__name__}: {getattr(exc, 'message', '')}",
                ) from exc

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
            require_servable_format(content, self.settings.omero_zarr_reads_v3)
        except ZarrError as exc:
            raise ImportFailed(f"OME-Zarr registration of {path.name} failed: {exc}") from exc
        return self.register_content(
            content, target, order_uuid=order_uuid, existing=existing, on_created=on_created
        )

    def register_content(
        self,
        content: ZarrContent,
        target: Target,
        *,
        order_uuid: str,
        existing: Sequence[ImportedObject] = (),
        on_created: Callable[[ImportedObject], None] | None = None,
    ) -> list[ImportedObject]:
        """Register what ``read_zarr`` found. Each object is created, described, registered
        and (the first of the call) pixel-checked before it is reported to ``on_created``;
        when a step fails, what the failed object left is deleted before the error goes on."""
        name = content.path.name
        if content.kind == "plate" and target.type != "Screen":
            raise ImportFailed(f"{name} is a plate: send it to a Screen, not a Dataset")
        if content.kind != "plate" and target.type != "Dataset":
            raise ImportFailed(f"{name} holds images: send it to a Dataset, not a Screen")
        done: dict[tuple[str, str], ImportedObject] = {(o.type, o.client_path): o for o in existing}
        saved_comment: list[int] = []

        def comment() -> int:
            """The order comment, saved once, when the first object needs it."""
            if not saved_comment:
                saved_comment.append(
                    self._call("order_comment", lambda: self._order_comment(order_uuid))
                )
            return saved_comment[0]

        objects: list[ImportedObject] = []
        try:
            # Each step goes through _call on its own: a lost connection retries only that
            # step, never the steps before it, and abort() is honoured between steps.
            if content.plate is None:
                checked = False
                for image in content.images:
                    old = done.get(("Image", str(image.path)))
                    if old is None:
                        # the first image this call creates is pixel-checked
                        old = self._register_image(
                            content, image, comment, target.id, check=not checked
                        )
                        checked = True
                        if on_created is not None:
                            on_created(old)
                    objects.append(old)
            else:
                old = done.get(("Plate", str(content.path)))
                if old is None:
                    old = self._register_plate(content, comment(), target.id)
                    if on_created is not None:
                        on_created(old)
                objects.append(old)
        except BaseException:
            if saved_comment and not [o for o in objects if o not in existing]:
                # nothing of this call carries the comment: it would be an orphan
                self._delete([("Annotation", saved_comment[0])])
            raise
        log.info("omero_zarr_registered", path=str(content.path), objects=len(objects))
        return objects

    def _order_comment(self, order_uuid: str) -> int:
        """The comment annotation holding the order UUID, as ``omero import`` links it."""
        comment = order_comment(order_namespace(self.settings), order_uuid)
        saved = self.conn.getUpdateService().saveAndReturnObject(comment, self.conn.SERVICE_OPTS)
        return int(saved.getId().getValue())

    def _register_image(
        self,
        content: ZarrContent,
        image: ZarrImage,
        comment: Callable[[], int],
        dataset: int,
        *,
        check: bool,
    ) -> ImportedObject:
        """One Image of a Dataset registration; deleted again when a step after its
        creation fails (it would be an orphan no search finds)."""
        image_id = self._call("create_image", partial(self._create_image, image))
        obj = ImportedObject("Image", image_id, image.name, str(image.path))
        try:
            self._call("describe_image", partial(self._describe_image, image_id, image))
            self._call(
                "register_image",
                partial(self._save_registration, image_id, image, comment(), dataset),
            )
            if check:
                self._require_pixel_buffer(content, image_id, image)
        except (omero.ServerError, omero.ClientError) as exc:
            self._delete([(obj.type, obj.id)])
            raise ImportFailed(
                f"OME-Zarr registration of {content.path.name} failed: OMERO refused"
                f" registering {image.name} ({type(exc).__name__})",
                str(getattr(exc, "message", "") or exc),
            ) from exc
        except BaseException:
            self._delete([(obj.type, obj.id)])
            raise
        return obj

    def _register_plate(self, content: ZarrContent, comment: int, screen: int) -> ImportedObject:
        """A Plate: its field images, then the Plate with wells, ExternalInfo, the order
        comment and the Screen link in one save; everything deleted when a step fails."""
        assert content.plate is not None
        created: list[tuple[str, int]] = []
        try:
            fields: list[list[int]] = []
            for zarr_well in content.plate.wells:
                ids = []
                for field_image in zarr_well.fields:
                    image_id = self._call("create_image", partial(self._create_image, field_image))
                    created.append(("Image", image_id))
                    self._call(
                        "describe_image", partial(self._describe_image, image_id, field_image)
                    )
                    self._call(
                        "register_image",
                        partial(self._save_registration, image_id, field_image, None, None),
                    )
                    ids.append(image_id)
                fields.append(ids)
            plate = registered_plate(content, fields, comment=comment, screen=screen)
            update = self.conn.getUpdateService()
            saved = self._call(
                "register_plate",
                lambda: update.saveAndReturnObject(plate, self.conn.SERVICE_OPTS),
            )
            obj = ImportedObject(
                "Plate", int(saved.getId().getValue()), content.plate.name, str(content.path)
            )
            created.insert(0, (obj.type, obj.id))
            first = next(
                (
                    (ids[0], well.fields[0])
                    for ids, well in zip(fields, content.plate.wells, strict=True)
                    if ids
                ),
                None,
            )
            if first is not None:
                self._require_pixel_buffer(content, *first)
        except (omero.ServerError, omero.ClientError) as exc:
            self._delete(created)
            raise ImportFailed(
                f"OME-Zarr registration of {content.path.name} failed: OMERO refused the"
                f" plate ({type(exc).__name__})",
                str(getattr(exc, "message", "") or exc),
            ) from exc
        except BaseException:
            self._delete(created)
            raise
        return obj

    def _create_image(self, image: ZarrImage) -> int:
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

    def _describe_image(self, image_id: int, image: ZarrImage) -> None:
        """Physical sizes and channel names (a repeat after a lost reply sets them again)."""
        if not (image.physical_sizes or image.channel_names):
            return
        params = omero.sys.ParametersI()
        params.addId(image_id)
        found = self.conn.getQueryService().findAllByQuery(
            CHANNELS_HQL, params, self.conn.SERVICE_OPTS
        )
        if not found:
            return
        changed = describe_pixels(found[0], image)
        if changed:
            self.conn.getUpdateService().saveArray(changed, self.conn.SERVICE_OPTS)

    def _save_registration(
        self, image_id: int, image: ZarrImage, comment: int | None, dataset: int | None
    ) -> None:
        loaded = self.conn.getQueryService().get("Image", image_id, self.conn.SERVICE_OPTS)
        if loaded.getDetails().getExternalInfo() is not None:
            return  # the reply to an earlier try was lost, not its save
        # ExternalInfo, the order comment and the dataset link in one call (one transaction):
        # an image in the target always carries the comment that finds it again.
        saved = registered_image(loaded, str(image.path), comment=comment, dataset=dataset)
        self.conn.getUpdateService().saveArray(saved, self.conn.SERVICE_OPTS)

    def _require_pixel_buffer(self, content: ZarrContent, image_id: int, image: ZarrImage) -> None:
        """Ask the server what only an OME-Zarr pixel buffer answers: its resolution levels
        and the top-left tile (``pixel_buffer_problem``). ``setPixelsId`` alone proves
        nothing: on a Zarr failure the server opens a ROMIO buffer instead."""
        params = omero.sys.ParametersI()
        params.addId(image_id)

        def ask() -> tuple[int, bytes]:
            rows = _unwrap_rows(
                self.conn.getQueryService().projection(
                    pixels_hql("Image"), params, self.conn.SERVICE_OPTS
                )
            )
            store = self.conn.c.sf.createRawPixelsStore()
            try:
                store.setPixelsId(int(rows[0][0]), True, self.conn.SERVICE_OPTS)
                levels = int(store.getResolutionLevels())
                if levels > 1:
                    # OMERO counts resolution levels from the smallest: the last is full size
                    store.setResolutionLevel(levels - 1)
                width, height = check_tile_size(image)
                return levels, bytes(store.getTile(0, 0, 0, 0, 0, width, height))
            finally:
                store.close()

        try:
            levels, tile = self._call("check_pixels", ask)
        except omero.ServerError as exc:
            raise ImportFailed(
                f"OME-Zarr registration of {content.path.name} failed: the OMERO server cannot"
                " read its pixels (omero-zarr-pixel-buffer missing, or the store not visible to"
                " the server at this path)",
                f"{type(exc).__name__}: {getattr(exc, 'message', '')}",
            ) from exc
        problem = pixel_buffer_problem(image, levels, tile)
        if problem is not None:
            raise ImportFailed(f"OME-Zarr registration of {content.path.name} failed: {problem}")

    def _delete(self, objects: Sequence[tuple[str, int]]) -> None:
        """Best effort: a cleanup that fails is logged, never hides the error that caused it."""
        for kind, object_id in objects:
            try:
                self.conn.deleteObjects(kind, [object_id], deleteChildren=True, wait=True)
            except Exception as exc:
                log.warning("omero_cleanup_failed", object=f"{kind}:{object_id}", error=str(exc))

    def close(self) -> None:
        try:
            self.conn.close()
        except Exception as exc:
            log.debug("omero_close_failed", error=type(exc).__name__)
