"""The order store: one interface, a PostgreSQL implementation and an in-memory twin."""

from biomero_importer.store.base import (
    CancelResult,
    ChannelState,
    Delivery,
    DeliveryResult,
    ErrorKind,
    Finish,
    Lease,
    OrderBusy,
    OrderNotFound,
    OrderStore,
    Orphan,
    ReplicaChannels,
    StoreClosed,
    StoreUnavailable,
    classify,
    is_transient,
)
from biomero_importer.store.memory import MemoryStore
from biomero_importer.store.postgres import PostgresStore

__all__ = [
    "CancelResult",
    "ChannelState",
    "Delivery",
    "DeliveryResult",
    "ErrorKind",
    "Finish",
    "Lease",
    "MemoryStore",
    "OrderBusy",
    "OrderNotFound",
    "OrderStore",
    "Orphan",
    "PostgresStore",
    "ReplicaChannels",
    "StoreClosed",
    "StoreUnavailable",
    "classify",
    "is_transient",
]
