"""Execution logs, written in batches (one INSERT round trip per batch)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

import sqlalchemy as sa
from sqlmodel import Session, select

from flowbuilder.platform.models import ExecutionLog, LogLevel

MAX_MESSAGE_CHARS = 8000


def next_log_seq(*, session: Session, execution_id: uuid.UUID) -> int:
    """The next free sequence number of an execution's logs (resuming after a crash)."""
    current = session.exec(
        select(sa.func.max(ExecutionLog.seq)).where(ExecutionLog.execution_id == execution_id)
    ).one()
    return int(current or 0) + 1


def append_logs(
    *,
    session: Session,
    execution_id: uuid.UUID,
    phase_id: uuid.UUID | None,
    entries: Sequence[tuple[LogLevel | str, str, datetime]],
    first_seq: int,
) -> int:
    """Insert ``entries`` as one batch with consecutive ``seq`` from ``first_seq``.

    Returns the next free seq. No-op (no round trip) for an empty batch.
    """
    if not entries:
        return first_seq
    rows = [
        {
            "id": uuid.uuid4(),
            "execution_id": execution_id,
            "phase_id": phase_id,
            "seq": first_seq + offset,
            "level": LogLevel(level),
            "message": message[:MAX_MESSAGE_CHARS],
            "timestamp": timestamp,
        }
        for offset, (level, message, timestamp) in enumerate(entries)
    ]
    # Core on the session's connection: the ORM's bulk-insert path costs more per batch.
    session.connection().execute(_INSERT_LOG, rows)
    return first_seq + len(rows)


_INSERT_LOG = sa.insert(ExecutionLog.__table__)


def list_logs(
    *,
    session: Session,
    execution_id: uuid.UUID,
    user_id: uuid.UUID,
    phase_id: uuid.UUID | None = None,
    limit: int = 1000,
) -> list[ExecutionLog]:
    """An execution's logs in order, scoped by the execution's owner."""
    from flowbuilder.platform.models import WorkflowExecution

    stmt = (
        select(ExecutionLog)
        .join(WorkflowExecution, WorkflowExecution.id == ExecutionLog.execution_id)
        .where(ExecutionLog.execution_id == execution_id, WorkflowExecution.user_id == user_id)
    )
    if phase_id is not None:
        stmt = stmt.where(ExecutionLog.phase_id == phase_id)
    stmt = stmt.order_by(ExecutionLog.seq).limit(limit)
    return list(session.exec(stmt))
