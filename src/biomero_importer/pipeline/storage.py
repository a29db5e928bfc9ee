"""How the pipeline's storage work fails: every error of shared storage ends the order with
the path and a reason, as a wait and retry when the cause passes, never as 'Internal error'."""

from __future__ import annotations

from biomero_importer import paths
from biomero_importer.pipeline.validate import InvalidOrder
from biomero_importer.text import short


class StorageTimeout(Exception):
    """Shared storage did not answer within ``storage_timeout`` (a hung NFS/SMB mount): a
    failure that passes, so the order is retried automatically."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class StorageError(Exception):
    """Shared storage answered with an error that passes (ESTALE, EIO, ETIMEDOUT: a file
    server restarting or out of reach): the order waits and is retried."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def failure(exc: OSError, current: str) -> InvalidOrder | StorageError:
    """The order's failure for ``exc``, raised while storage work was at ``current`` (the
    error's own file name wins: it is the exact entry)."""
    where = str(exc.filename) if exc.filename else current
    if paths.transient(exc):
        return StorageError(f"Storage error ({paths.why(exc)}): {short(where)}")
    return InvalidOrder(f"Cannot read ({paths.why(exc)}): {short(where)}")
