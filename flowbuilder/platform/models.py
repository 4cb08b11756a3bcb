"""SQLModel table models, their enums, and the small schemas that go with them.

Conventions, chosen once for every table:
- UUID primary keys (``uuid4``), so ids can be made before the row and never leak counts.
- Timestamps are timezone-aware UTC (``UTCDateTime``), on PostgreSQL and on SQLite alike.
- JSON is JSONB on PostgreSQL and JSON text elsewhere; a phase's inputs and outputs are
  ``json`` on PostgreSQL (kept as sent, several times cheaper to write when large).
- Foreign keys say what a delete does. Deleting a workflow keeps its executions (their
  ``workflow_id`` becomes NULL) so the record of what ran, what it logged and what it cost
  stays intact; deleting a user removes everything of theirs.
- Every CRUD query has an index behind it; the index names say which query.
"""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(sa.types.TypeDecorator):
    """A timezone-aware UTC datetime on every backend.

    PostgreSQL stores ``timestamptz``; SQLite has no time zones, so the value is stored
    as naive UTC and made aware again on the way out. Naive datetimes are refused on the
    way in: they are always a bug (whose local time?).
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; use an aware UTC datetime")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


JSONType = sa.JSON().with_variant(JSONB(), "postgresql")
# A phase's inputs and outputs: ``json`` on PostgreSQL, not ``jsonb``. They are the
# largest documents the engine writes, two per phase, and nothing queries inside them;
# ``json`` checks the text and stores it as sent (key order kept), where ``jsonb`` builds
# its binary form: measured on a 110 KB document, an UPDATE of 3.4 ms as jsonb and 1.0 ms
# as json. What makes them storable is decided before they are sent (engine.outputs).
PhaseJSONType = sa.JSON()

# Naming convention so Alembic autogenerate and hand-written migrations agree on names.
SQLModel.metadata.naming_convention = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def _ts(nullable: bool = True, **kw: Any) -> Any:
    return Field(default=None, sa_type=UTCDateTime, nullable=nullable, **kw)


def _created() -> Any:
    return Field(default_factory=utcnow, sa_type=UTCDateTime, nullable=False)


def _fk(target: str, ondelete: str, nullable: bool = False, index: bool = False) -> Any:
    if nullable:
        return Field(
            default=None, foreign_key=target, ondelete=ondelete, nullable=True, index=index
        )
    return Field(foreign_key=target, ondelete=ondelete, nullable=False, index=index)


def _enum(enum_cls: type[enum.Enum], default: Any) -> Any:
    # Stored as its value in a plain string column: adding a status later needs no
    # ALTER TYPE, and a CHECK constraint would have to be migrated anyway.
    return Field(
        default=default,
        sa_type=sa.Enum(
            enum_cls,
            native_enum=False,
            validate_strings=True,
            length=16,
            values_callable=lambda e: [m.value for m in e],
            create_constraint=False,
        ),
        nullable=False,
    )


def _json(nullable: bool = True, default_factory: Any = None, sa_type: Any = JSONType) -> Any:
    if default_factory is not None:
        return Field(default_factory=default_factory, sa_type=sa_type, nullable=nullable)
    return Field(default=None, sa_type=sa_type, nullable=nullable)


# ----------------------------------------------------------------------------- enums


class WorkflowStatus(enum.StrEnum):
    DRAFT = "draft"
    PUBLISHED = "published"
    DISABLED = "disabled"


class ExecutionStatus(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    # A cron fire that could not run (no credits, invalid definition, rate limited,
    # missed while beat was down): recorded so the user sees it, never run.
    SKIPPED = "skipped"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_EXECUTION_STATUSES


TERMINAL_EXECUTION_STATUSES = frozenset(
    {
        ExecutionStatus.COMPLETED,
        ExecutionStatus.FAILED,
        ExecutionStatus.CANCELLED,
        ExecutionStatus.SKIPPED,
    }
)


class PhaseStatus(enum.StrEnum):
    CREATED = "created"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"


TERMINAL_PHASE_STATUSES = frozenset(
    {PhaseStatus.COMPLETED, PhaseStatus.FAILED, PhaseStatus.SKIPPED, PhaseStatus.CANCELLED}
)


class TriggerType(enum.StrEnum):
    MANUAL = "manual"
    CRON = "cron"
    API = "api"


class LogLevel(enum.StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class LedgerKind(enum.StrEnum):
    GRANT = "grant"
    DEBIT = "debit"
    REFUND = "refund"


# ----------------------------------------------------------------------------- users


class UserBase(SQLModel):
    email: str | None = Field(default=None, max_length=320)
    display_name: str | None = Field(default=None, max_length=200)
    # IANA time zone used for the user's cron schedules.
    timezone: str = Field(default="UTC", max_length=64)


class User(UserBase, table=True):
    __tablename__ = "user_account"  # "user" is reserved in PostgreSQL
    __table_args__ = (sa.UniqueConstraint("email"),)

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    is_guest: bool = Field(default=False, nullable=False)
    created_at: datetime = _created()
    updated_at: datetime = _created()


class UserCreate(UserBase):
    is_guest: bool = False


class UserRead(UserBase):
    id: uuid.UUID
    is_guest: bool
    created_at: datetime


class UserBalance(SQLModel, table=True):
    __tablename__ = "user_balance"
    __table_args__ = (
        sa.UniqueConstraint("user_id"),
        sa.CheckConstraint("credits >= 0", name="credits_non_negative"),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    user_id: uuid.UUID = _fk("user_account.id", "CASCADE")
    credits: int = Field(default=0, nullable=False)
    updated_at: datetime = _created()


class BalanceTransaction(SQLModel, table=True):
    """The credit ledger: one row per grant, debit and refund.

    ``sum(amount)`` over a user's rows equals their balance. ``idempotency_key`` is
    unique, so a retried debit (same execution, same phase) can never be recorded twice.
    """

    __tablename__ = "balance_transaction"
    __table_args__ = (
        sa.UniqueConstraint("idempotency_key"),
        sa.Index("ix_balance_transaction_user_created", "user_id", "created_at"),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    user_id: uuid.UUID = _fk("user_account.id", "CASCADE")
    kind: LedgerKind = _enum(LedgerKind, LedgerKind.DEBIT)
    # Signed: grants and refunds are positive, debits negative.
    amount: int = Field(nullable=False)
    balance_after: int = Field(nullable=False)
    idempotency_key: str = Field(max_length=200, nullable=False)
    execution_id: uuid.UUID | None = _fk(
        "workflow_execution.id", "SET NULL", nullable=True, index=True
    )
    phase_id: uuid.UUID | None = _fk("execution_phase.id", "SET NULL", nullable=True)
    reason: str | None = Field(default=None, max_length=500)
    created_at: datetime = _created()


class GuestSession(SQLModel, table=True):
    """A guest's session. Only a SHA-256 hash of the token is stored."""

    __tablename__ = "guest_session"
    __table_args__ = (sa.UniqueConstraint("token_hash"),)

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    user_id: uuid.UUID = _fk("user_account.id", "CASCADE", index=True)
    token_hash: str = Field(max_length=64, nullable=False)
    expires_at: datetime = Field(sa_type=UTCDateTime, nullable=False)
    created_at: datetime = _created()


# ----------------------------------------------------------------------------- workflows


class WorkflowBase(SQLModel):
    name: str = Field(min_length=1, max_length=200)
    description: str | None = Field(default=None, max_length=2000)
    cron: str | None = Field(default=None, max_length=120)
    timezone: str = Field(default="UTC", max_length=64)


class Workflow(WorkflowBase, table=True):
    __tablename__ = "workflow"
    __table_args__ = (
        # get_due_workflows: published workflows whose next run has come.
        sa.Index("ix_workflow_due", "status", "next_run_at"),
        sa.Index("ix_workflow_user_created", "user_id", "created_at"),
        sa.UniqueConstraint("user_id", "name"),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    user_id: uuid.UUID = _fk("user_account.id", "CASCADE")
    definition: dict[str, Any] = _json(nullable=False, default_factory=dict)
    status: WorkflowStatus = _enum(WorkflowStatus, WorkflowStatus.DRAFT)
    # Number of the latest published WorkflowVersion (0: never published).
    published_version: int = Field(default=0, nullable=False)
    credits_cost: int = Field(default=0, nullable=False)
    next_run_at: datetime | None = _ts()
    last_run_at: datetime | None = _ts()
    created_at: datetime = _created()
    updated_at: datetime = _created()


class WorkflowCreate(WorkflowBase):
    definition: dict[str, Any] = Field(default_factory=dict)


class WorkflowUpdate(SQLModel):
    name: str | None = Field(default=None, min_length=1, max_length=200)
    description: str | None = None
    definition: dict[str, Any] | None = None
    cron: str | None = None
    timezone: str | None = None
    status: WorkflowStatus | None = None


class WorkflowRead(WorkflowBase):
    id: uuid.UUID
    user_id: uuid.UUID
    status: WorkflowStatus
    published_version: int
    credits_cost: int
    next_run_at: datetime | None
    last_run_at: datetime | None
    created_at: datetime
    updated_at: datetime


class WorkflowVersion(SQLModel, table=True):
    """An immutable published definition. Executions point at the version they ran."""

    __tablename__ = "workflow_version"
    __table_args__ = (sa.UniqueConstraint("workflow_id", "version"),)

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    workflow_id: uuid.UUID = _fk("workflow.id", "CASCADE")
    version: int = Field(nullable=False)
    definition: dict[str, Any] = _json(nullable=False, default_factory=dict)
    # The execution plan derived from the definition, stored so workers need not rebuild it.
    plan: dict[str, Any] | None = _json()
    credits_cost: int = Field(default=0, nullable=False)
    created_at: datetime = _created()


# ----------------------------------------------------------------------------- executions


class WorkflowExecution(SQLModel, table=True):
    __tablename__ = "workflow_execution"
    __table_args__ = (
        # list_executions_for_user: newest first.
        sa.Index("ix_workflow_execution_user_created", "user_id", "created_at"),
        # the sweep: pending or running executions by age.
        sa.Index("ix_workflow_execution_status_created", "status", "created_at"),
        sa.Index("ix_workflow_execution_workflow", "workflow_id"),
        # the sweep: what is due for a re-send, oldest first (a bounded range scan).
        sa.Index("ix_workflow_execution_status_resend", "status", "resend_after"),
        # Exactly once per cron fire: one execution per workflow and scheduled fire time,
        # whichever beat (or retry) inserts it first. Manual runs have NULL here, and
        # NULLs never collide.
        sa.UniqueConstraint("workflow_id", "scheduled_for"),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    user_id: uuid.UUID = _fk("user_account.id", "CASCADE")
    # SET NULL: deleting a workflow keeps the record of what it ran.
    workflow_id: uuid.UUID | None = _fk("workflow.id", "SET NULL", nullable=True)
    workflow_version_id: uuid.UUID | None = _fk("workflow_version.id", "SET NULL", nullable=True)
    status: ExecutionStatus = _enum(ExecutionStatus, ExecutionStatus.PENDING)
    trigger: TriggerType = _enum(TriggerType, TriggerType.MANUAL)
    inputs: dict[str, Any] | None = _json()
    error: str | None = Field(default=None, max_length=4000)
    credits_consumed: int = Field(default=0, nullable=False)
    correlation_id: str | None = Field(default=None, max_length=100)
    cancel_requested: bool = Field(default=False, nullable=False)
    # The lease: which worker run holds this execution, and until when. A killed
    # worker stops renewing it; after it lapses a redelivery may take over.
    lease_owner: str | None = Field(default=None, max_length=100)
    lease_expires_at: datetime | None = _ts()
    attempts: int = Field(default=0, nullable=False)
    created_at: datetime = _created()
    started_at: datetime | None = _ts()
    completed_at: datetime | None = _ts()
    duration_ms: int | None = None
    # When the task message was last sent (the sweep re-sends stale pending runs).
    enqueued_at: datetime | None = _ts()
    # When the sweep may re-send this execution's message if it has not ended: set at
    # enqueue (SWEEP_PENDING_AFTER_SECONDS later) and pushed a visibility window further
    # by each re-send, so a run is re-sent at most once per window, whatever the backlog.
    resend_after: datetime | None = _ts()
    # Cron runs: the fire time this execution stands for (UTC), and the earlier fire
    # times that were missed and folded into it (ISO strings, capped), see beat.
    scheduled_for: datetime | None = _ts()
    skipped_fire_times: list[str] | None = _json()


class ExecutionRead(SQLModel):
    id: uuid.UUID
    user_id: uuid.UUID
    workflow_id: uuid.UUID | None
    workflow_version_id: uuid.UUID | None
    status: ExecutionStatus
    trigger: TriggerType
    error: str | None
    credits_consumed: int
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    duration_ms: int | None
    scheduled_for: datetime | None = None
    skipped_fire_times: list[str] | None = None


class ExecutionPhase(SQLModel, table=True):
    """One node of an execution. Nodes of the same ``number`` share a phase of the plan."""

    __tablename__ = "execution_phase"
    __table_args__ = (
        sa.UniqueConstraint("execution_id", "node_id"),
        sa.Index("ix_execution_phase_execution_number", "execution_id", "number"),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    execution_id: uuid.UUID = _fk("workflow_execution.id", "CASCADE")
    user_id: uuid.UUID = _fk("user_account.id", "CASCADE")
    number: int = Field(nullable=False)
    # Position in the plan's execution order (unique within an execution).
    position: int = Field(default=0, nullable=False)
    node_id: str = Field(max_length=100, nullable=False)
    node_type: str = Field(max_length=100, nullable=False)
    status: PhaseStatus = _enum(PhaseStatus, PhaseStatus.CREATED)
    inputs: dict[str, Any] | None = _json(sa_type=PhaseJSONType)
    outputs: dict[str, Any] | None = _json(sa_type=PhaseJSONType)
    credits_cost: int = Field(default=0, nullable=False)
    credits_charged: int = Field(default=0, nullable=False)
    attempts: int = Field(default=0, nullable=False)
    error: str | None = Field(default=None, max_length=4000)
    started_at: datetime | None = _ts()
    completed_at: datetime | None = _ts()
    duration_ms: int | None = None


def _lz4_available(ddl: Any, target: Any, bind: sa.Connection, **kw: Any) -> bool:
    """PostgreSQL 14+ built with lz4 (its compression setting offers it)."""
    row = bind.exec_driver_sql(
        "SELECT 1 FROM pg_settings WHERE name = 'default_toast_compression' "
        "AND 'lz4' = ANY(enumvals)"
    ).first()
    return row is not None


# A phase's inputs and outputs are the largest documents the engine writes, one of each
# per phase: lz4 compresses them several times faster than the default pglz. Migration
# perf_0001 sets this; create_all (tests, benchmarks) gets it here.
sa.event.listen(
    ExecutionPhase.__table__,
    "after_create",
    sa.DDL(
        "ALTER TABLE execution_phase ALTER COLUMN inputs SET COMPRESSION lz4, "
        "ALTER COLUMN outputs SET COMPRESSION lz4"
    ).execute_if(dialect="postgresql", callable_=_lz4_available),
)


class ExecutionLog(SQLModel, table=True):
    __tablename__ = "execution_log"
    __table_args__ = (
        sa.Index("ix_execution_log_execution_seq", "execution_id", "seq"),
        sa.Index("ix_execution_log_phase_seq", "phase_id", "seq"),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    execution_id: uuid.UUID = _fk("workflow_execution.id", "CASCADE")
    phase_id: uuid.UUID | None = _fk("execution_phase.id", "CASCADE", nullable=True)
    # Ordering within the execution; assigned by the writer, monotonic per execution.
    seq: int = Field(sa_type=sa.BigInteger, nullable=False)
    level: LogLevel = _enum(LogLevel, LogLevel.INFO)
    message: str = Field(sa_type=sa.Text, nullable=False)
    timestamp: datetime = _created()


# ----------------------------------------------------------------------------- secrets


class Credential(SQLModel, table=True):
    """A user's stored credential: name, type and an opaque secret reference, no plaintext."""

    __tablename__ = "credential"
    __table_args__ = (sa.UniqueConstraint("user_id", "name"),)

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    user_id: uuid.UUID = _fk("user_account.id", "CASCADE")
    name: str = Field(min_length=1, max_length=200, nullable=False)
    type: str = Field(max_length=50, nullable=False)
    secret_ref: str = Field(max_length=500, nullable=False)
    created_at: datetime = _created()


class CredentialRead(SQLModel):
    id: uuid.UUID
    name: str
    type: str
    created_at: datetime


class DatabaseSecret(SQLModel, table=True):
    """An encrypted secret value (USE_DB_SECRETS=true). ``key_id`` names the key used."""

    __tablename__ = "database_secret"
    __table_args__ = (
        sa.UniqueConstraint("user_id", "name"),
        sa.Index("ix_database_secret_key_id", "key_id"),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    user_id: uuid.UUID = _fk("user_account.id", "CASCADE")
    name: str = Field(max_length=200, nullable=False)
    encrypted_value: str = Field(sa_type=sa.Text, nullable=False)
    key_id: str = Field(max_length=64, nullable=False)
    created_at: datetime = _created()
    updated_at: datetime = _created()


class RateLimitEntry(SQLModel, table=True):
    """A fixed-window counter: one row per key and window start."""

    __tablename__ = "rate_limit_entry"
    __table_args__ = (sa.UniqueConstraint("key", "window_start"),)

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    key: str = Field(max_length=200, nullable=False)
    window_start: datetime = Field(sa_type=UTCDateTime, nullable=False)
    count: int = Field(default=0, nullable=False)
