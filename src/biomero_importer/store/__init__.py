"""The order store: one interface, a PostgreSQL implementation and an in-memory twin."""

from biomero_importer.store.base import (
    CancelResult,
    ErrorKind,
    Finish,
    Lease,
    NotificationResult,
    OrderBusy,
    OrderNotFound,
    OrderStore,
    StoreClosed,
    StoreUnavailable,
    classify,
    is_transient,
)
from biomero_importer.store.memory import MemoryStore
from biomero_importer.store.postgres import PostgresStore

__all__ = [
    "CancelResult",
    "ErrorKind",
    "Finish",
    "Lease",
    "MemoryStore",
    "NotificationResult",
    "OrderBusy",
    "OrderNotFound",
    "OrderStore",
    "PostgresStore",
    "StoreClosed",
    "StoreUnavailable",
    "classify",
    "is_transient",
]
