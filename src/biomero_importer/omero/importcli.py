"""The ``omero import`` command line: building it, and judging what it printed.

The blitz backend runs the process. The exit code alone cannot be trusted (``No imports due
to errors!`` and files skipped by ``--exclude`` both exit 0), so a verdict combines the exit
code, the ids of every YAML document and the error count of the summary.

The user's session key never appears on the ``omero import`` command line: it is written,
readable by the service's user only, into the import's private session folder
(``OMERO_SESSIONDIR``) the way ``omero login`` records a session, and the CLI joins the
session it finds there. What stays visible: omero-py hands the key to the Java importer it
starts as ``-k <key>``, so the JVM's command line (``ps`` on the importer's host, or its
container) shows it for the length of the import. The session belongs to the order's user
and ends when the order's connection closes.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml

from biomero_importer.omero.port import Target
from biomero_importer.settings import Settings

# omero-blitz LoggingImportMonitor.ImportSummary.report(): ", N plate(s)" is printed only when
# plates were created, so a plain image import has no plate count at all.
_SUMMARY = re.compile(
    r"(?P<files>\d+) files? uploaded, (?P<filesets>\d+) filesets?"
    r"(?:, (?P<plates>\d+) plates?)? created, (?P<images>\d+) images? imported,"
    r" (?P<errors>\d+) errors?"
)
_NO_IMPORTS_DUE_TO_ERRORS = "No imports due to errors!"
_NO_IMPORTS_FOUND = "No imports found"
_ERROR_LINE = re.compile(r"\bERROR\b|Exception\b|Error:|\bFATAL\b")

# Wrapper exit codes of omero-py's import plugin.
_WRAPPER_ERRORS = {
    3: "cleanup of the transferred files failed",
    103: "no OMERO.java jars found (set fetch_jars, or OMERODIR with lib/client)",
    104: "bulk import given together with paths",
    105: "PyYAML missing in the OMERO CLI environment",
    106: "bulk import stopped after an error",
    107: "bulk import without a path",
    108: "the downloaded OMERO.java.zip was malformed",
}


@dataclass(frozen=True)
class LogPaths:
    """Where the Java importer's stdout (the YAML ids) and stderr (log, summary) go."""

    stdout: Path
    stderr: Path


def log_paths(
    settings: Settings, order_uuid: str, index: int | None = None, attempt: int = 1
) -> LogPaths:
    """``cli.<UUID>[_<index>][_attempt<n>].logs/.errs``, as the original names them: one pair
    per import of an order, and one more per repeated attempt so none overwrites another."""
    name = order_uuid if index is None else f"{order_uuid}_{index}"
    if attempt > 1:
        name = f"{name}_attempt{attempt}"
    folder = Path(os.path.abspath(settings.order_log_dir))
    return LogPaths(folder / f"cli.{name}.logs", folder / f"cli.{name}.errs")


# Transient failures the original importer retries ``omero import`` on: races between
# concurrent Ice sessions and connections dropped mid-import.
RETRYABLE_IMPORT_ERRORS = (
    "Ice.ObjectNotExistException",
    "INTERNAL_EXCEPTION",
    "Ice.ConnectionLostException",
    "Ice.ConnectionRefusedException",
    "Ice.TimeoutException",
)
NO_ERRS_OUTPUT = "no .errs output"
# Of those, the ones that mean the server could not be reached (down, restarting): an import
# that still fails so after its own attempts makes the order wait and retry (OmeroUnavailable)
# instead of failing it. Session races (ObjectNotExist, INTERNAL_EXCEPTION) are not among them.
SERVER_UNREACHABLE = (
    "Ice.ConnectionLostException",
    "Ice.ConnectionRefusedException",
    "Ice.TimeoutException",
)


# omero-py sessions.py login(): a recorded session that cannot be joined (expired, killed, the
# server refused or the host is unknown: one ``except Exception`` for all) is reported on stdout,
# and without a user name and a terminal the CLI then dies with 564 (exit status 564 % 256).
SESSION_NOT_JOINED = "Previous session expired"
_STDIN_NOT_A_TERMINAL = "stdin is not a terminal"
_STDIN_NOT_A_TERMINAL_EXIT = 564 % 256


def session_not_joined(exit_code: int, stdout: str, stderr: str) -> bool:
    """The CLI could not join the session recorded for it: the Java importer never started.
    Which of its causes it was only the service's own connection can tell."""
    if SESSION_NOT_JOINED in stdout:
        return True
    return exit_code == _STDIN_NOT_A_TERMINAL_EXIT and _STDIN_NOT_A_TERMINAL in stderr


def retryable_import_error(exit_code: int, errs_file_text: str, stderr: str) -> str | None:
    """What makes a failed import worth another attempt: a transient Ice error, or an
    importer that wrote nothing to its ``.errs`` file (it died before it could). Never a
    killed process or an error of omero-py's wrapper (missing jars etc.: no retry helps)."""
    if exit_code < 0 or exit_code in _WRAPPER_ERRORS:
        return None
    for pattern in RETRYABLE_IMPORT_ERRORS:
        if pattern in errs_file_text or pattern in stderr:
            return pattern
    if not errs_file_text.strip():
        return NO_ERRS_OUTPUT
    return None


def order_namespace(settings: Settings) -> str:
    """Namespace of the comment annotation, holding the order UUID, linked at import time."""
    return f"{settings.annotation_namespace}.order"


def cli_prefix(settings: Settings) -> list[str]:
    """``omero_cli`` may name an executable or a command with arguments."""
    return shlex.split(settings.omero_cli)


def import_argv(
    settings: Settings,
    path: Path | Sequence[Path],
    target: Target,
    *,
    logs: LogPaths,
    exclude_existing: bool,
    order_uuid: str,
) -> list[str]:
    """The full ``omero import`` command for one file or folder (or the files a re-run still
    imports); it joins the session that :func:`write_session_store` recorded (no key on the
    command line)."""
    paths = [path] if isinstance(path, Path) else list(path)
    if not paths:
        raise ValueError("an import needs at least one path")
    for each in paths:
        if not each.is_absolute():
            raise ValueError(f"import paths must be absolute: {each}")
    if settings.omero_host is None:
        raise ValueError("omero_host is not set")
    argv = [
        *cli_prefix(settings),
        "import",
        "-s",
        settings.omero_host,
        "-p",
        str(settings.omero_port),
        "--transfer=ln_s",
        "-d" if target.type == "Dataset" else "-r",
        str(target.id),
        "--parallel-upload",
        str(settings.parallel_upload_per_worker),
        "--parallel-fileset",
        str(settings.parallel_filesets_per_worker),
    ]
    for flag in settings.skip_flags():
        argv += ["--skip", flag]
    argv += [
        "--depth",
        str(settings.import_depth),
        "--file",
        str(logs.stdout),
        "--errs",
        str(logs.stderr),
        "--output",
        "yaml",
        # Marks every imported image with the order, so a retry can find what it made.
        "--annotation-ns",
        order_namespace(settings),
        "--annotation-text",
        order_uuid,
    ]
    if settings.omero_import_encrypted:
        # CommandLineImporter defaults encryptedConnection to false: it would leave the SSL
        # port for the unencrypted one once logged in.
        argv.append("--encrypted=true")
    if exclude_existing:
        argv.append("--exclude=clientpath")
    argv += [str(each) for each in paths]
    return argv


def write_session_store(session_dir: Path, settings: Settings, user: str, key: str) -> None:
    """Record ``key`` as the current session of ``user`` in an empty CLI session folder.

    The layout is omero-py's ``SessionsStore``: ``._LASTHOST_`` and ``._LASTPORT_`` name the
    server, ``<host>/._LASTUSER_`` the user, ``<host>/<user>/._LASTSESS_`` the session, and
    ``<host>/<user>/<key>`` holds its properties. ``omero import -s <host> -p <port>`` then
    attaches to it as ``omero login`` would.
    """
    if settings.omero_host is None:
        raise ValueError("omero_host is not set")
    if not user or "/" in user or user.startswith(".") or "\x00" in user:
        raise ValueError(f"user name {user!r} cannot be a session folder")
    host, port = settings.omero_host, str(settings.omero_port)
    user_dir = session_dir / quote(host, safe="") / user
    user_dir.mkdir(mode=0o700, parents=True)
    properties = {"omero.host": host, "omero.port": port, "omero.user": user, "omero.sess": key}
    for path, text in (
        (session_dir / "._LASTHOST_", host),
        (session_dir / "._LASTPORT_", port),
        (user_dir.parent / "._LASTUSER_", user),
        (user_dir / "._LASTSESS_", key),
        (user_dir / key, "".join(f"{k}={v}\n" for k, v in properties.items())),
    ):
        # O_EXCL: the folder is new and private; a file already there is not ours to reuse.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)


def fetch_jars_argv(settings: Settings) -> list[str] | None:
    """``omero import --fetch-jars`` downloads the jars and exits: it runs before imports."""
    if not settings.fetch_jars:
        return None
    return [*cli_prefix(settings), "import", "--fetch-jars", settings.fetch_jars]


def omero_java_jars(env: Mapping[str, str]) -> Path | None:
    """The folder of OMERO.java jars ``omero import`` would use, or None when it would have to
    download them first (omero-py 5.23.0 ``plugins/import.py`` ``_get_classpath_logback``):
    ``$OMERODIR/lib/client``, else what ``--fetch-jars`` left in omero-py's user cache
    (``util.get_omero_user_cache_dir``: ``$OMERO_USERDIR/cache``, or appdirs'
    ``~/.cache/OMERO.py/5``) under ``jars/``, named by ``jars/OMERO.java.txt``."""
    if env.get("OMERODIR"):
        client = Path(env["OMERODIR"]) / "lib" / "client"
        if client.exists():
            # omero-py uses lib/client whenever it exists, and dies (103) when it holds none
            return client if any(client.glob("*.jar")) else None
    if env.get("OMERO_USERDIR"):
        cache = Path(env["OMERO_USERDIR"]) / "cache"
    else:
        base = env.get("XDG_CACHE_HOME") or str(Path(env.get("HOME", "~")).expanduser() / ".cache")
        cache = Path(base) / "OMERO.py" / "5"
    named = cache / "jars" / "OMERO.java.txt"
    try:
        folder = cache / "jars" / named.read_text(encoding="utf-8").strip() / "libs"
    except OSError:
        return None
    return folder if any(folder.glob("*.jar")) else None


def import_env(
    settings: Settings, session_dir: Path, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment of one import: its own session folder, and JAVA_OPTS when configured."""
    env = dict(os.environ if base is None else base)
    env["OMERO_SESSIONDIR"] = str(session_dir)
    if settings.java_opts:
        env["JAVA_OPTS"] = settings.java_opts
    return env


@dataclass(frozen=True)
class ImportVerdict:
    ok: bool
    reason: str = ""
    images: list[int] = field(default_factory=list)
    plates: list[int] = field(default_factory=list)
    filesets: list[int] = field(default_factory=list)
    fileset_of: dict[int, int] = field(default_factory=dict)
    # Exit 0, no document, no error: everything was skipped (``--exclude``) or not found.
    nothing_imported: bool = False
    errors: int | None = None
    detail: str = ""


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, list):
        return [int(v) for v in value]
    return [int(value)]


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _first_error(stderr: str) -> str | None:
    for line in stderr.splitlines():
        if _ERROR_LINE.search(line):
            return line.strip()[:200]
    return None


def summary_errors(stderr: str) -> int | None:
    """Error count of the last ``==> Summary`` of a run, or None when there is none."""
    matches = list(_SUMMARY.finditer(stderr))
    return int(matches[-1]["errors"]) if matches else None


def parse_yaml_ids(stdout: str) -> tuple[list[dict[str, list[int]]], str | None]:
    """One {Fileset, Image, Plate: ids} per YAML document, or a problem description."""
    documents: list[dict[str, list[int]]] = []
    try:
        for doc in yaml.safe_load_all(stdout):
            if doc is None:
                continue
            entries = doc if isinstance(doc, list) else [doc]
            for entry in entries:
                if not isinstance(entry, dict):
                    return documents, f"unexpected YAML item {type(entry).__name__}"
                documents.append(
                    {key: _ids(entry.get(key)) for key in ("Fileset", "Image", "Plate")}
                )
    except (yaml.YAMLError, TypeError, ValueError) as exc:
        return documents, f"unreadable YAML output ({type(exc).__name__})"
    return documents, None


def parse_import_result(exit_code: int, stdout: str, stderr: str, *, name: str) -> ImportVerdict:
    """Judge one ``omero import`` run; ``name`` (the file) appears in every failure reason."""
    detail = _tail(stderr)
    errors = summary_errors(stderr)
    if exit_code != 0:
        first = _first_error(stderr)
        if exit_code < 0:
            reason = f"OMERO import of {name} was killed (signal {-exit_code})"
        elif exit_code == 1 and _NO_IMPORTS_FOUND in stderr:
            reason = f"OMERO import of {name} failed: no importable files found"
        elif exit_code == 1:
            reason = f"OMERO import of {name} failed: the import command was refused (exit 1)"
        elif exit_code in _WRAPPER_ERRORS:
            reason = f"OMERO import of {name} failed: {_WRAPPER_ERRORS[exit_code]}"
        else:
            reason = f"OMERO import of {name} failed (exit {exit_code})"
        if first and exit_code not in _WRAPPER_ERRORS:
            reason = f"{reason}: {first}"
        return ImportVerdict(False, reason, errors=errors, detail=detail)

    if _NO_IMPORTS_DUE_TO_ERRORS in stderr or (errors is not None and errors > 0):
        count = f"{errors} error{'s' if errors != 1 else ''}" if errors else "errors"
        first = _first_error(stderr)
        reason = f"OMERO import of {name} failed with {count}"
        if first:
            reason = f"{reason}: {first}"
        return ImportVerdict(False, reason, errors=errors, detail=detail)

    documents, problem = parse_yaml_ids(stdout)
    if problem is not None:
        return ImportVerdict(
            False, f"OMERO import of {name}: {problem}", errors=errors, detail=detail
        )
    if not documents:
        return ImportVerdict(
            False,
            f"OMERO import of {name} created nothing",
            nothing_imported=errors == 0 or errors is None,
            errors=errors,
            detail=detail,
        )
    if errors is None:
        return ImportVerdict(
            False, f"OMERO import of {name}: no import summary found", errors=None, detail=detail
        )
    images: list[int] = []
    plates: list[int] = []
    filesets: list[int] = []
    fileset_of: dict[int, int] = {}
    for index, document in enumerate(documents, start=1):
        if not document["Image"] and not document["Plate"]:
            fileset = document["Fileset"][0] if document["Fileset"] else f"#{index}"
            return ImportVerdict(
                False,
                f"OMERO import of {name}: fileset {fileset} reported no Image or Plate ids",
                errors=errors,
                detail=detail,
            )
        images += document["Image"]
        plates += document["Plate"]
        filesets += document["Fileset"]
        if document["Fileset"]:
            for object_id in document["Image"] + document["Plate"]:
                fileset_of[object_id] = document["Fileset"][0]
    return ImportVerdict(
        True,
        images=images,
        plates=plates,
        filesets=filesets,
        fileset_of=fileset_of,
        errors=errors,
        detail=detail,
    )
