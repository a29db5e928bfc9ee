"""What ``omero import`` prints, built by the same rules as the code that prints it.

Every fixture cites the upstream file and version it follows. The importer's verdict code is
only ever tested against these texts, and every stand-in ``omero`` command of the tests prints
them (:func:`fake_omero_script`), so a test can never pass on a format OMERO does not print.

Sources read (stored copies of the upstream repositories):

- omero-blitz (master, 2026-08)
  ``src/main/java/ome/formats/importer/cli/LoggingImportMonitor.java``:
  ``ImportSummary.report()``, ``entityCountToString()``, ``outputYamlResults()``;
- omero-blitz (master, 2026-08)
  ``src/main/java/ome/formats/importer/cli/CommandLineImporter.java``:
  ``start()`` ("No imports due to errors!", "No imports found" then ``usage()`` and exit 1;
  ``successful ? 0 : 2``; 3 on a failed cleanup), ``main()`` (``encryptedConnection`` false by
  default);
- omero-py 5.23.0 ``src/omero/plugins/import.py`` (read at ome/omero-py 0245d330):
  ``ctx.die`` codes 103, 104, 105, 106, 107, 108;
- omero-py 5.23.0 ``src/omero/plugins/sessions.py`` (read at ome/omero-py 1281f16a):
  ``login()``, ``_get_username()``, ``_require_tty()``; ``src/omero/cli.py``: ``die()`` writes
  its text to stderr and the return code becomes the process's exit status (``sys.exit``, so
  564 is seen as ``564 % 256``).

The omero-blitz files were read in the stored copies the notes in
/work/shared/notes/omero-semantics.md were checked against (omero-blitz master, 2026-08).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# --- LoggingImportMonitor.java (omero-blitz master 2026-08) ---------------------------------


def _count(name: str, count: int) -> str:
    """``entityCountToString``: ``String.format("%d %s%s", count, name, count != 1 ? "s" : "")``."""
    return f"{count} {name}{'s' if count != 1 else ''}"


def _hms(millis: int) -> str:
    """commons-lang ``DurationFormatUtils.formatDurationHMS``: ``HH:mm:ss.SSS``."""
    seconds, ms = divmod(millis, 1000)
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours:02d}:{minutes:02d}:{seconds:02d}.{ms:03d}"


def summary(
    *, files: int, filesets: int, images: int, errors: int, plates: int = 0, millis: int = 3210
) -> str:
    """``ImportSummary.report()``, printed on stderr: ``, N plate(s)`` only when plates != 0."""
    text = "\n==> Summary\n"
    text += _count("file", files) + " uploaded, " + _count("fileset", filesets)
    if plates != 0:
        text += ", " + _count("plate", plates)
    text += " created, " + _count("image", images) + " imported, " + _count("error", errors)
    return text + f" in {_hms(millis)}\n"


def yaml_document(fileset: int, objects: Mapping[str, Sequence[int]]) -> tuple[str, str]:
    """``outputYamlResults(IMPORT_DONE)`` for one fileset: (stdout, stderr). One line per class,
    ids joined by ``,`` without spaces."""
    stdout = f"---\n- Fileset: {fileset}\n"
    for kind, ids in objects.items():
        stdout += f"  {kind}: [{','.join(str(i) for i in ids)}]\n"
    return stdout, "Imported objects:\n"


# An ErrorHandler line as logback-cli.xml formats it (logger ome.formats.importer.cli.ErrorHandler,
# level ERROR, message ``<event>: <file>``), the shape of a FILE_EXCEPTION in a real CLI log.
def error_line(path: str) -> str:
    return (
        "2026-08-11 15:33:01,127 2570       [      main] ERROR"
        f"     ome.formats.importer.cli.ErrorHandler - FILE_EXCEPTION: {path}\n"
    )


# --- CommandLineImporter.java start() (omero-blitz master 2026-08) --------------------------

NO_IMPORTS_DUE_TO_ERRORS = "No imports due to errors!\n"
# "No imports found" is followed by usage() (on stderr) and System.exit(1).
NO_IMPORTS_FOUND = "No imports found\n\n Usage:  importer-cli [OPTION]... [path [path ...]]... \n"


@dataclass(frozen=True)
class Run:
    """One ``omero import`` process as the pipeline sees it."""

    exit_code: int
    stdout: str = ""
    stderr: str = ""


def imported(filesets: Sequence[Mapping[str, Sequence[int]]], *, first_fileset: int = 1) -> Run:
    """A successful import of the given filesets (exit 0): a YAML document each, then the
    summary (one uploaded file per fileset)."""
    return partial(filesets, failed=None, first_fileset=first_fileset)


def partial(
    filesets: Sequence[Mapping[str, Sequence[int]]],
    *,
    failed: str | None,
    first_fileset: int = 1,
) -> Run:
    """Without ``-c`` the import stops after the first failed fileset: the filesets before it
    are committed and printed, the summary counts one error, and ``start()`` returns 2."""
    out = err = ""
    images = plates = 0
    for number, objects in enumerate(filesets, start=first_fileset):
        document, note = yaml_document(number, objects)
        out += document
        err += note
        images += len(objects.get("Image", ()))
        plates += len(objects.get("Plate", ()))
    errors = 0 if failed is None else 1
    if failed is not None:
        err += error_line(failed)
    err += summary(
        files=len(filesets), filesets=len(filesets), plates=plates, images=images, errors=errors
    )
    return Run(0 if failed is None else 2, out, err)


def ice_failure(exception: str, path: str = "/data/a.tif") -> Run:
    """An import that met an Ice error: the library logs it at ERROR with the exception's
    class name (logback-cli.xml pattern, logger ``ome.formats.importer.ImportLibrary``), the
    ErrorHandler counts one error, and ``start()`` returns 2."""
    err = (
        "2026-08-11 15:33:01,127 2570       [      main] ERROR"
        f"     ome.formats.importer.ImportLibrary - Error on import of {path}\n"
        f"{exception}\n"
    )
    return Run(2, "", err + summary(files=0, filesets=0, images=0, errors=1))


def no_imports_due_to_errors(path: str) -> Run:
    """Every candidate failed before import: no monitor is attached, so no summary; exit 0."""
    return Run(0, "", error_line(path) + NO_IMPORTS_DUE_TO_ERRORS)


def no_imports_found() -> Run:
    return Run(1, "", NO_IMPORTS_FOUND)


def excluded() -> Run:
    """Every file skipped by ``--exclude=clientpath``: the exclusion vetoes each container
    inside ``ImportLibrary.importCandidates`` (after the monitor is attached), so no YAML
    document, a summary of nothing and exit 0 (see /work/shared/notes/omero-semantics.md,
    "Client-path exclusion")."""
    return Run(0, "", summary(files=0, filesets=0, images=0, errors=0))


def cleanup_failed() -> Run:
    """``afterTransfer`` raised CleanupFailure: logged, then ``return 3`` (the summary is
    printed by ``report()`` in the ``finally``)."""
    return Run(3, "", summary(files=1, filesets=1, images=1, errors=0))


# --- omero-py 5.23.0 src/omero/plugins/import.py: the wrapper's own exits ---------------------

WRAPPER_EXITS: dict[int, str] = {
    103: "No JAR files found under '/opt/omero/lib/client'\n",
    104: "When using bulk import, omit paths\n",
    105: "ERROR: PyYAML is not installed\n",
    106: "Import failed. Use -c to continue after errors\n",
    107: "No path specified\n",
    108: "Expected one top directory in OMERO.java.zip: {'a', 'b'}\n",
}


def wrapper_exit(code: int) -> Run:
    return Run(code, "", WRAPPER_EXITS[code])


# --- omero-py 5.23.0 src/omero/plugins/sessions.py login(): a recorded session not joined -----

# ``die(564, ...)``: the CLI returns 564 and the process exits with its low byte.
STDIN_NOT_A_TERMINAL_EXIT = 564 % 256


def session_not_joined(user: str, host: str, port: int) -> Run:
    """``store.attach`` of the recorded session raised (expired, killed, server refused or
    unknown host: all alike): "Previous session expired ..." on stdout, the session file
    removed; no user was given (``-s -p`` only), so ``_get_username`` calls ``_require_tty``,
    which dies with 564 when stdin is not a terminal. The Java importer never starts: no
    ``--file``/``--errs`` output."""
    return Run(
        STDIN_NOT_A_TERMINAL_EXIT,
        f"Previous session expired for {user} on {host}:{port}\n",
        "stdin is not a terminal: cannot request username\n",
    )


def fake_omero_script(runs: Sequence[Run]) -> str:
    """A stand-in ``omero`` (Python) that plays ``runs`` one per call, in order.

    Like omero-py's wrapper it writes the Java importer's stdout and stderr to the files named
    by ``--file`` and ``--errs`` (the login failure, which happens before the importer starts,
    goes to its own stdout and stderr instead), and exits with the run's code. The call count
    is kept in ``<script>.count``; each call's argv is appended to ``<script>.argv``.
    """
    plays = [(run.exit_code, run.stdout, run.stderr) for run in runs]
    return f"""import json, sys
from pathlib import Path

PLAYS = {plays!r}
me = Path(__file__)
counter = me.with_suffix(".count")
call = int(counter.read_text()) if counter.exists() else 0
counter.write_text(str(call + 1))
with me.with_suffix(".argv").open("a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
code, out, err = PLAYS[min(call, len(PLAYS) - 1)]
argv = sys.argv[1:]
login_failed = code == {STDIN_NOT_A_TERMINAL_EXIT} and out.startswith("Previous session expired")
if login_failed or "--file" not in argv:
    sys.stdout.write(out)
    sys.stderr.write(err)
else:
    Path(argv[argv.index("--file") + 1]).write_text(out)
    Path(argv[argv.index("--errs") + 1]).write_text(err)
sys.exit(code)
"""
