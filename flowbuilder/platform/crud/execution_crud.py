"""Workflow executions: creation, scoped reads, checked status transitions, leases."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlmodel import Session, select

from flowbuilder.platform.crud._sql import send_returning
from flowbuilder.platform.errors import InvalidTransition, NotFound
from flowbuilder.platform.models import (
    ExecutionPhase,
    ExecutionStatus,
    TriggerType,
    WorkflowExecution,
    utcnow,
)

# Which status may follow which. Terminal statuses have no way out.
_ALLOWED: dict[ExecutionStatus, frozenset[ExecutionStatus]] = {
    ExecutionStatus.PENDING: frozenset(
        {ExecutionStatus.RUNNING, ExecutionStatus.CANCELLED, ExecutionStatus.FAILED}
    ),
    ExecutionStatus.RUNNING: frozenset(
        {ExecutionStatus.COMPLETED, ExecutionStatus.FAILED, ExecutionStatus.CANCELLED}
    ),
    ExecutionStatus.COMPLETED: frozenset(),
    ExecutionStatus.FAILED: frozenset(),
    ExecutionStatus.CANCELLED: frozenset(),
    ExecutionStatus.SKIPPED: frozenset(),
}


def check_transition(execution: WorkflowExecution, target: ExecutionStatus) -> None:
    if target not in _ALLOWED[execution.status]:
        raise InvalidTransition("execution", execution.id, execution.status, target)


def create_execution(
    *,
    session: Session,
    user_id: uuid.UUID,
    workflow_id: uuid.UUID | None,
    workflow_version_id: uuid.UUID | None,
    trigger: TriggerType = TriggerType.MANUAL,
    inputs: dict[str, Any] | None = None,
    correlation_id: str | None = None,
    resend_after_seconds: float | None = None,
) -> WorkflowExecution:
    """A new pending execution. With ``resend_after_seconds``, recorded as sent
    (:func:`mark_sent`) in the same INSERT rather than an UPDATE after it."""
    execution = WorkflowExecution(
        user_id=user_id,
        workflow_id=workflow_id,
        workflow_version_id=workflow_version_id,
        trigger=trigger,
        inputs=inputs,
        correlation_id=correlation_id,
    )
    if resend_after_seconds is not None:
        mark_sent(execution=execution, resend_after_seconds=resend_after_seconds)
    session.add(execution)
    session.flush()
    return execution


def get_execution_by_id_and_user(
    *, session: Session, execution_id: uuid.UUID, user_id: uuid.UUID
) -> WorkflowExecution:
    execution = session.exec(
        select(WorkflowExecution).where(
            WorkflowExecution.id == execution_id, WorkflowExecution.user_id == user_id
        )
    ).first()
    if execution is None:
        raise NotFound("execution", execution_id)
    return execution


def get_execution(*, session: Session, execution_id: uuid.UUID) -> WorkflowExecution:
    """Unscoped read, for the worker, which only ever receives ids it was sent."""
    execution = session.get(WorkflowExecution, execution_id)
    if execution is None:
        raise NotFound("execution", execution_id)
    return execution


def list_executions_for_user(
    *,
    session: Session,
    user_id: uuid.UUID,
    limit: int = 50,
    offset: int = 0,
    workflow_id: uuid.UUID | None = None,
) -> list[WorkflowExecution]:
    """A page of the user's executions, newest first."""
    stmt = select(WorkflowExecution).where(WorkflowExecution.user_id == user_id)
    if workflow_id is not None:
        stmt = stmt.where(WorkflowExecution.workflow_id == workflow_id)
    stmt = (
        stmt.order_by(WorkflowExecution.created_at.desc(), WorkflowExecution.id.desc())
        .limit(max(1, min(limit, 500)))
        .offset(max(0, offset))
    )
    return list(session.exec(stmt))


def update_execution_status(
    *,
    session: Session,
    execution_id: uuid.UUID,
    status: ExecutionStatus,
    user_id: uuid.UUID | None = None,
    error: str | None = None,
    now: datetime | None = None,
) -> WorkflowExecution:
    """Move an execution to ``status``, refusing illegal transitions."""
    if user_id is not None:
        execution = get_execution_by_id_and_user(
            session=session, execution_id=execution_id, user_id=user_id
        )
    else:
        execution = get_execution(session=session, execution_id=execution_id)
    if execution.status == status:
        return execution
    check_transition(execution, status)
    now = now or utcnow()
    execution.status = status
    if status == ExecutionStatus.RUNNING and execution.started_at is None:
        execution.started_at = now
    if status.is_terminal:
        execution.completed_at = now
        execution.lease_owner = None
        execution.lease_expires_at = None
        if execution.started_at is not None:
            execution.duration_ms = int((now - execution.started_at).total_seconds() * 1000)
    if error is not None:
        execution.error = error[:4000]
    session.flush()
    return execution


def request_cancel(
    *, session: Session, execution_id: uuid.UUID, user_id: uuid.UUID
) -> WorkflowExecution:
    """Ask for cancellation. A pending execution is cancelled at once; a running one
    stops before its next phase (the worker sees ``cancel_requested``)."""
    execution = get_execution_by_id_and_user(
        session=session, execution_id=execution_id, user_id=user_id
    )
    if execution.status.is_terminal:
        raise InvalidTransition(
            "execution", execution_id, execution.status, ExecutionStatus.CANCELLED
        )
    execution.cancel_requested = True
    if execution.status == ExecutionStatus.PENDING:
        update_execution_status(
            session=session,
            execution_id=execution_id,
            status=ExecutionStatus.CANCELLED,
            error="cancelled before it started",
        )
    session.flush()
    return execution


# ------------------------------------------------------------------------------ leases


def acquire_lease(
    *,
    session: Session,
    execution_id: uuid.UUID,
    owner: str,
    lease_seconds: float,
    now: datetime | None = None,
) -> bool:
    """Take the execution for ``owner`` if nobody holds a live lease on it.

    One conditional UPDATE: of two workers racing for the same execution exactly one
    sees a row updated. Terminal executions are never taken.
    """
    now = now or utcnow()
    result = session.execute(
        sa.update(WorkflowExecution)
        .where(
            WorkflowExecution.id == execution_id,
            WorkflowExecution.status.in_([ExecutionStatus.PENDING, ExecutionStatus.RUNNING]),
            sa.or_(
                WorkflowExecution.lease_owner.is_(None),
                WorkflowExecution.lease_owner == owner,
                WorkflowExecution.lease_expires_at < now,
            ),
        )
        .values(
            lease_owner=owner,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            attempts=WorkflowExecution.attempts + 1,
        )
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


@dataclass(frozen=True, slots=True)
class Claimed:
    """What a run needs of the execution it has just claimed (the row as updated)."""

    id: uuid.UUID
    user_id: uuid.UUID
    workflow_id: uuid.UUID | None
    workflow_version_id: uuid.UUID | None
    attempts: int
    started_at: datetime | None
    cancel_requested: bool


def claim_execution(
    *,
    session: Session,
    execution_id: uuid.UUID,
    owner: str,
    lease_seconds: float,
    now: datetime | None = None,
) -> Claimed | None:
    """:func:`acquire_lease` and the move to running, in one UPDATE ... RETURNING.

    Takes the lease (counting the attempt), marks a pending execution running (its
    ``started_at`` set once) and returns what the run needs of the row as updated; None
    when it was not taken (missing, ended, or a live lease held by another owner)."""
    params = _claim_params(execution_id, owner, lease_seconds, now)
    row = session.connection().execute(_CLAIM, params).first()
    return Claimed(*row) if row is not None else None


def send_claim(
    *,
    connection: Connection,
    execution_id: uuid.UUID,
    owner: str,
    lease_seconds: float,
    now: datetime | None = None,
) -> Callable[[], Claimed | None]:
    """:func:`claim_execution` queued in a batch (psycopg's pipeline mode): returns the
    function that reads its answer once the batch is sent."""
    params = _claim_params(execution_id, owner, lease_seconds, now)
    cursor = send_returning(connection, _CLAIM, params)

    def answer() -> Claimed | None:
        row = cursor.fetchone()
        return Claimed(*row) if row is not None else None

    return answer


def _claim_params(
    execution_id: uuid.UUID, owner: str, lease_seconds: float, now: datetime | None
) -> dict[str, Any]:
    now = now or utcnow()
    return {
        "b_id": execution_id,
        "b_owner": owner,
        "b_now": now,
        "b_expires": now + timedelta(seconds=lease_seconds),
        "b_pending": ExecutionStatus.PENDING,
        "b_running": ExecutionStatus.RUNNING,
    }


def finish_execution(
    *,
    session: Session,
    execution_id: uuid.UUID,
    status: ExecutionStatus,
    error: str | None,
    started_at: datetime | None,
    now: datetime | None = None,
    deferred: list[tuple[Any, dict[str, Any]]] | None = None,
) -> int | None:
    """End a running execution whose lease the caller checked in this transaction (so it
    is running): the final status, the lease released, and the credits it consumed (the
    sum of its phases' charges), in one UPDATE. Returns the credits; with ``deferred``
    (the statement appended there, sent with the COMMIT) None."""
    if not status.is_terminal:
        raise ValueError(f"finish_execution: {status.value} is not a final status")
    now = now or utcnow()
    values: dict[str, Any] = {
        "b_id": execution_id,
        "status": status,
        "completed_at": now,
        "lease_owner": None,
        "lease_expires_at": None,
        "duration_ms": (
            int((now - started_at).total_seconds() * 1000) if started_at is not None else None
        ),
    }
    if error is not None:
        values["error"] = error[:4000]
    if deferred is not None:
        deferred.append((_FINISH_WITHOUT_RESULT, values))
        return None
    row = session.connection().execute(_FINISH, values).first()
    if row is None:
        raise NotFound("execution", execution_id)
    return int(row[0])


def renew_lease(
    *,
    session: Session,
    execution_id: uuid.UUID,
    owner: str,
    lease_seconds: float,
    now: datetime | None = None,
) -> tuple[bool, bool]:
    """Extend ``owner``'s lease. Returns ``(still_held, cancel_requested)`` in one round trip.

    Runs at the start of every phase's transaction (the fence): the statement is built
    once and executed on the session's connection, without the ORM."""
    params = _renew_params(execution_id, owner, lease_seconds, now)
    return _lease_answer(session.connection().execute(_RENEW_LEASE, params).first())


def send_renew_lease(
    *,
    connection: Connection,
    execution_id: uuid.UUID,
    owner: str,
    lease_seconds: float,
    now: datetime | None = None,
) -> Callable[[], tuple[bool, bool]]:
    """:func:`renew_lease` queued in a batch (psycopg's pipeline mode, see
    ``_sql.send_returning``): returns the function that reads its answer, which waits
    for the batch."""
    params = _renew_params(execution_id, owner, lease_seconds, now)
    cursor = send_returning(connection, _RENEW_LEASE, params)
    return lambda: _lease_answer(cursor.fetchone())


def send_fence_or_abort(
    *, connection: Connection, execution_id: uuid.UUID, owner: str, lease_seconds: float
) -> None:
    """:func:`send_renew_lease` for a batch that commits without reading answers
    (PostgreSQL, see engine.run): the lease is renewed, or the statement fails and takes
    the whole transaction with it (the lease not ours, the run not running, or a cancel
    requested). Nothing to read back."""
    params = _renew_params(execution_id, owner, lease_seconds, None)
    send_returning(connection, _FENCE_OR_ABORT, params)


def _renew_params(
    execution_id: uuid.UUID, owner: str, lease_seconds: float, now: datetime | None
) -> dict[str, Any]:
    return {
        "b_id": execution_id,
        "b_owner": owner,
        "b_running": ExecutionStatus.RUNNING,
        "lease_expires_at": (now or utcnow()) + timedelta(seconds=lease_seconds),
    }


def _lease_answer(row: Any) -> tuple[bool, bool]:
    if row is None:
        return False, False
    return True, bool(row[0])


_EXECUTION = WorkflowExecution.__table__
_PHASES = ExecutionPhase.__table__
# The final UPDATE; sent in a batch whose results are not read, without its RETURNING.
_FINISH_WITHOUT_RESULT = (
    sa.update(_EXECUTION)
    .where(_EXECUTION.c.id == sa.bindparam("b_id"))
    .values(
        credits_consumed=sa.select(sa.func.coalesce(sa.func.sum(_PHASES.c.credits_charged), 0))
        .where(_PHASES.c.execution_id == sa.bindparam("b_id"))
        .scalar_subquery()
    )
)
_FINISH = _FINISH_WITHOUT_RESULT.returning(_EXECUTION.c.credits_consumed)
# Built once (a statement built per call costs its construction and its cache key on
# every claim), Core (the ORM's bulk-update path was a fifth of a one-phase run).
_STATUS = _EXECUTION.c.status.type
_CLAIM = (
    sa.update(_EXECUTION)
    .where(
        _EXECUTION.c.id == sa.bindparam("b_id"),
        # Not IN (...): an expanding parameter, which a statement sent on the driver's
        # cursor (send_returning) cannot carry.
        sa.or_(
            _EXECUTION.c.status == sa.bindparam("b_pending", type_=_STATUS),
            _EXECUTION.c.status == sa.bindparam("b_running", type_=_STATUS),
        ),
        sa.or_(
            _EXECUTION.c.lease_owner.is_(None),
            _EXECUTION.c.lease_owner == sa.bindparam("b_owner"),
            _EXECUTION.c.lease_expires_at < sa.bindparam("b_now"),
        ),
    )
    .values(
        lease_owner=sa.bindparam("b_owner"),
        lease_expires_at=sa.bindparam("b_expires"),
        attempts=_EXECUTION.c.attempts + 1,
        status=sa.bindparam("b_running", type_=_STATUS),
        started_at=sa.func.coalesce(_EXECUTION.c.started_at, sa.bindparam("b_now")),
    )
    .returning(
        _EXECUTION.c.id,
        _EXECUTION.c.user_id,
        _EXECUTION.c.workflow_id,
        _EXECUTION.c.workflow_version_id,
        _EXECUTION.c.attempts,
        _EXECUTION.c.started_at,
        _EXECUTION.c.cancel_requested,
    )
)
# The fence of a transaction sent whole (see send_fence_or_abort): _RENEW_LEASE, and a
# division by zero, at run time (a count, not a constant the planner could fold), unless
# it renewed the lease of a run nobody asked to cancel.
_FENCE_OR_ABORT = sa.text(
    """
WITH renewed AS (
    UPDATE workflow_execution SET lease_expires_at = :lease_expires_at
    WHERE id = :b_id AND lease_owner = :b_owner AND status = :b_running
    RETURNING cancel_requested
)
SELECT 1 / (SELECT count(*) FROM renewed WHERE NOT cancel_requested)::int AS held
"""
).bindparams(
    sa.bindparam("b_id", type_=_EXECUTION.c.id.type),
    sa.bindparam("b_owner", type_=_EXECUTION.c.lease_owner.type),
    sa.bindparam("b_running", type_=_EXECUTION.c.status.type),
    sa.bindparam("lease_expires_at", type_=_EXECUTION.c.lease_expires_at.type),
)
_RENEW_LEASE = (
    sa.update(_EXECUTION)
    .where(
        _EXECUTION.c.id == sa.bindparam("b_id"),
        _EXECUTION.c.lease_owner == sa.bindparam("b_owner"),
        _EXECUTION.c.status == sa.bindparam("b_running", type_=_EXECUTION.c.status.type),
    )
    .returning(_EXECUTION.c.cancel_requested)
)


def release_lease(*, session: Session, execution_id: uuid.UUID, owner: str) -> None:
    session.execute(
        sa.update(WorkflowExecution)
        .where(WorkflowExecution.id == execution_id, WorkflowExecution.lease_owner == owner)
        .values(lease_owner=None, lease_expires_at=None)
        .execution_options(synchronize_session=False)
    )


def find_stale_executions(
    *,
    session: Session,
    now: datetime | None = None,
    lapsed_before: datetime | None = None,
    limit: int = 100,
) -> list[WorkflowExecution]:
    """Executions whose message may be lost, at most ``limit``, oldest due first.

    Due means ``resend_after`` has passed (see the column) and the run is pending (its
    message never arrived, or is still waiting in a backlog: one more copy per window is
    harmless), or running with a lease that lapsed before ``lapsed_before`` (its worker
    died and its message may have gone to the dead-letter queue). One index range scan on
    (status, resend_after): the cost is the batch, not the backlog. Locked with SKIP
    LOCKED so two sweeps never pick the same rows."""
    now = now or utcnow()
    lapsed_before = lapsed_before or now
    stmt = (
        select(WorkflowExecution)
        .where(
            WorkflowExecution.status.in_([ExecutionStatus.PENDING, ExecutionStatus.RUNNING]),
            WorkflowExecution.resend_after < now,
            sa.or_(
                WorkflowExecution.status == ExecutionStatus.PENDING,
                WorkflowExecution.lease_expires_at.is_(None),
                WorkflowExecution.lease_expires_at < lapsed_before,
            ),
        )
        .order_by(WorkflowExecution.resend_after)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return list(session.exec(stmt))


def mark_sent(
    *, execution: WorkflowExecution, resend_after_seconds: float, now: datetime | None = None
) -> None:
    """Record a send of the execution's message, and when the sweep may send it again."""
    now = now or utcnow()
    execution.enqueued_at = now
    execution.resend_after = now + timedelta(seconds=resend_after_seconds)
