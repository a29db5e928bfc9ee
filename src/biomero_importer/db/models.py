"""SQLAlchemy models of the tables OMERO.biomero, Metabase and SQL clients read and write.

``imports`` and ``imports_preprocessing`` are a public interface: their names, types, indexes
and stage strings match the original importer exactly. ``importer_orders`` is ours: one row per
order uuid, kept current by a trigger, so claiming never scans the event history.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ARRAY,
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    Sequence,
    String,
    Text,
    func,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from biomero_importer.model import (
    ALL_STAGES,
    RUNNING_STAGES,
    STAGE_IMPORTED,
    STAGE_IMPORTING,
    STAGE_INGEST_FAILED,
    STAGE_NEW_ORDER,
    STAGE_PREPROCESSING,
    TERMINAL_STAGES,
)

__all__ = [
    "ALL_STAGES",
    "OWNED_TABLES",
    "RUNNING_STAGES",
    "STAGE_IMPORTED",
    "STAGE_IMPORTING",
    "STAGE_INGEST_FAILED",
    "STAGE_NEW_ORDER",
    "STAGE_PREPROCESSING",
    "TERMINAL_STAGES",
    "Base",
    "IngestionTracking",
    "Preprocessing",
]

# The tables this service owns; migrations and autogenerate never look at anything else.
OWNED_TABLES = frozenset(
    {
        "imports",
        "imports_preprocessing",
        "importer_orders",
        "importer_outbox",
        "importer_outbox_delivery",
        "importer_notify_replicas",
        "importer_users",
    }
)

# An order a claim may take (migration a9c1e3d5f7b2): only these are in the claim's index.
READY = "stage = 'Import Pending' AND worker_id IS NULL AND NOT cancel_requested AND NOT waiting"
WAITING = "stage = 'Import Pending' AND worker_id IS NULL AND waiting"


class Base(DeclarativeBase):
    metadata = MetaData()


class Preprocessing(Base):
    __tablename__ = "imports_preprocessing"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    container: Mapped[str] = mapped_column(String, nullable=False)
    input_file: Mapped[str] = mapped_column(String, nullable=False)
    output_folder: Mapped[str] = mapped_column(String, nullable=False)
    alt_output_folder: Mapped[str | None] = mapped_column(String, nullable=True)
    extra_params: Mapped[Any] = mapped_column(JSON, nullable=True)


class IngestionTracking(Base):
    __tablename__ = "imports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    group_name: Mapped[str] = mapped_column(String, nullable=False)
    user_name: Mapped[str] = mapped_column(String, nullable=False, index=True)
    destination_id: Mapped[str] = mapped_column(String, nullable=False)
    destination_type: Mapped[str] = mapped_column(String, nullable=False)
    stage: Mapped[str] = mapped_column(String, nullable=False)
    uuid: Mapped[str] = mapped_column(String(36), nullable=False, index=True)
    timestamp: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    # Stored as JSON text; the properties below take and give lists, as the original did.
    _files: Mapped[str] = mapped_column("files", Text, nullable=False)
    _file_names: Mapped[str | None] = mapped_column("file_names", Text, nullable=True)
    description: Mapped[str | None] = mapped_column(Text, nullable=True)
    preprocessing_id: Mapped[int | None] = mapped_column(
        Integer, ForeignKey("imports_preprocessing.id"), nullable=True
    )
    preprocessing: Mapped[Preprocessing | None] = relationship(Preprocessing)
    # the order's ImportOptions as JSON text, NULL for none (upstream revision 92e8f9e637a1)
    import_options: Mapped[str | None] = mapped_column(Text, nullable=True)

    __table_args__ = (
        Index("imports_ix_uuid_timestamp", "uuid", "timestamp"),
        # for `biomero-importer status --group` (migration c41d8e2f7a93)
        Index("imports_ix_group_name", "group_name"),
    )

    @property
    def files(self) -> Any:
        return json.loads(self._files)

    @files.setter
    def files(self, files: Any) -> None:
        self._files = json.dumps(files)

    @property
    def file_names(self) -> Any:
        return json.loads(self._file_names) if self._file_names else []

    @file_names.setter
    def file_names(self, file_names: Any) -> None:
        self._file_names = json.dumps(file_names)


class ImporterOrder(Base):
    """Queue state of one order uuid; maintained by the triggers on ``imports``
    (``importer_track_inserts``, and ``importer_track_order`` for a manual retry)."""

    __tablename__ = "importer_orders"

    uuid: Mapped[str] = mapped_column(String(36), primary_key=True)
    stage: Mapped[str] = mapped_column(String, nullable=False)
    latest_id: Mapped[int] = mapped_column(Integer, nullable=False)
    queued_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    worker_id: Mapped[str | None] = mapped_column(String, nullable=True)
    # the replica that ran (or runs) the latest attempt; kept after the order ends
    last_worker_id: Mapped[str | None] = mapped_column(String, nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    # every claim ever, unlike attempts (which a user retry resets): more than one run means
    # OMERO may already hold some of the order's files
    runs: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    cancel_requested: Mapped[bool] = mapped_column(
        Boolean, nullable=False, server_default=text("false")
    )
    objects: Mapped[Any] = mapped_column(JSON, nullable=True)
    # copies of the latest row's names, kept by the importer_order_owner trigger, for the
    # fair claim (migration e8b3f5a2c7d1)
    user_name: Mapped[str] = mapped_column(String, nullable=False, server_default=text("''"))
    group_name: Mapped[str] = mapped_column(String, nullable=False, server_default=text("''"))
    # waits, automatic retries and progress (migration f4a7c2e9b1d3); the
    # importer_order_stage_changed trigger clears them when the order moves on
    not_before: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    waiting_since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    retries: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    progress: Mapped[Any] = mapped_column(JSON, nullable=True)
    progress_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # the ready queue (migration a9c1e3d5f7b2): a waiting order is not ready until it is due
    # (or its cause is back); queue_seq breaks ties of queued_at, and both survive hand-backs
    waiting: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=text("false"))
    wait_cause: Mapped[str | None] = mapped_column(String, nullable=True)
    # its default is nextval of this sequence (owned by the column, so it reflects as one)
    queue_seq: Mapped[int] = mapped_column(
        BigInteger, Sequence("importer_orders_queue_seq"), nullable=False
    )

    __table_args__ = (
        Index(
            "importer_orders_ix_pending",
            "queued_at",
            postgresql_where=text("stage = 'Import Pending' AND worker_id IS NULL"),
        ),
        Index(
            "importer_orders_ix_leases",
            "lease_expires_at",
            postgresql_where=text("worker_id IS NOT NULL"),
        ),
        Index("importer_orders_ix_updated", "updated_at"),
        # for `biomero-importer status` filters (migration c41d8e2f7a93)
        Index("importer_orders_ix_stage_updated", "stage", "updated_at"),
        Index("importer_orders_ix_latest", "latest_id"),
        # the cancel sweep, oldest first (migrations d5a1c9e3f7b2, a9c1e3d5f7b2)
        Index(
            "importer_orders_ix_cancel_pending",
            "queue_seq",
            postgresql_where=text(
                "stage = 'Import Pending' AND worker_id IS NULL AND cancel_requested"
            ),
        ),
        # each user's ready orders in FIFO order; the due waits; the waits by cause
        Index(
            "importer_orders_ix_ready",
            "user_name",
            "queued_at",
            "queue_seq",
            postgresql_where=text(READY),
        ),
        Index(
            "importer_orders_ix_waiting",
            "not_before",
            "queue_seq",
            postgresql_where=text(WAITING),
        ),
        Index(
            "importer_orders_ix_wait_cause",
            "wait_cause",
            "queued_at",
            "queue_seq",
            postgresql_where=text(f"{WAITING} AND wait_cause IS NOT NULL"),
        ),
    )


class ImporterUser(Base):
    """Per user with orders: the head of its ready FIFO (NULL: nothing ready), kept by the
    ``importer_refresh_user`` trigger function (migration a9c1e3d5f7b2)."""

    __tablename__ = "importer_users"

    user_name: Mapped[str] = mapped_column(String, primary_key=True)
    head_queued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    head_seq: Mapped[int | None] = mapped_column(BigInteger)
    head_group: Mapped[str | None] = mapped_column(String)

    __table_args__ = (
        Index(
            "importer_users_ix_head",
            "head_group",
            "head_queued_at",
            "head_seq",
            postgresql_where=text("head_seq IS NOT NULL"),
        ),
    )


class ImporterOutbox(Base):
    """One notification per order outcome that owes a channel, queued in the outcome's
    transaction by the ``importer_order_stage_changed`` trigger (migrations f4a7c2e9b1d3,
    c6e8a0b2d4f3)."""

    __tablename__ = "importer_outbox"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    uuid: Mapped[str] = mapped_column(String(36), nullable=False)
    # the terminal ``imports`` row
    event_id: Mapped[int] = mapped_column(Integer, nullable=False, unique=True)
    stage: Mapped[str] = mapped_column(String, nullable=False)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    next_attempt_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    delivered: Mapped[list[str]] = mapped_column(
        ARRAY(String), nullable=False, server_default=text("'{}'::varchar[]")
    )
    done_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(String, nullable=True)

    __table_args__ = (
        Index(
            "importer_outbox_ix_due",
            "next_attempt_at",
            postgresql_where=text("done_at IS NULL"),
        ),
        Index("importer_outbox_ix_done", "done_at", postgresql_where=text("done_at IS NOT NULL")),
    )


class ImporterOutboxDelivery(Base):
    """One channel an outcome owes, decided by the stage trigger when it queues the outcome
    (migrations b3d5f7a9c1e4, c6e8a0b2d4f3); ``generation`` is the claim's fencing token."""

    __tablename__ = "importer_outbox_delivery"

    outbox_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("importer_outbox.id", ondelete="CASCADE"), primary_key=True
    )
    channel: Mapped[str] = mapped_column(String, primary_key=True)
    due_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    generation: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default=text("0"))
    claimed_by: Mapped[str | None] = mapped_column(String, nullable=True)
    last_error: Mapped[str | None] = mapped_column(String, nullable=True)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    given_up_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        Index(
            "importer_outbox_delivery_ix_due",
            "channel",
            "due_at",
            postgresql_where=text("delivered_at IS NULL AND given_up_at IS NULL"),
        ),
    )


class ImporterNotifyReplica(Base):
    """The notification channels a replica has, recorded at its start (b3d5f7a9c1e4)."""

    __tablename__ = "importer_notify_replicas"

    worker_id: Mapped[str] = mapped_column(String, primary_key=True)
    channels: Mapped[list[str]] = mapped_column(ARRAY(String), nullable=False)
    endpoints: Mapped[dict[str, Any]] = mapped_column(
        JSON, nullable=False, server_default=text("'{}'::json")
    )
    seen_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
