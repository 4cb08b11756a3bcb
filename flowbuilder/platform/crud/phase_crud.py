"""Execution phases: one row per planned node, created with the execution."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.orm import make_transient_to_detached
from sqlalchemy.orm.attributes import instance_dict, set_committed_value
from sqlmodel import Session, select

from flowbuilder.platform.crud._sql import in_batch, send_returning, send_statement
from flowbuilder.platform.errors import InvalidTransition, NotFound
from flowbuilder.platform.models import (
    ExecutionPhase,
    PhaseStatus,
    WorkflowExecution,
    utcnow,
)

_ALLOWED: dict[PhaseStatus, frozenset[PhaseStatus]] = {
    PhaseStatus.CREATED: frozenset(
        {PhaseStatus.RUNNING, PhaseStatus.SKIPPED, PhaseStatus.CANCELLED, PhaseStatus.FAILED}
    ),
    # RUNNING -> RUNNING: a redelivered run resumes a phase its dead worker had started.
    PhaseStatus.RUNNING: frozenset(
        {PhaseStatus.RUNNING, PhaseStatus.COMPLETED, PhaseStatus.FAILED, PhaseStatus.CANCELLED}
    ),
    PhaseStatus.COMPLETED: frozenset(),
    PhaseStatus.FAILED: frozenset(),
    PhaseStatus.SKIPPED: frozenset(),
    PhaseStatus.CANCELLED: frozenset(),
}


def create_phases(
    *, session: Session, execution: WorkflowExecution, planned: Iterable[Any]
) -> list[ExecutionPhase]:
    """Create one phase per planned node (objects with node_id, node_type, number, credits)
    and return them in plan order. :func:`insert_phases` when the objects are not needed."""
    insert_phases(session=session, execution=execution, planned=planned)
    return list(
        session.exec(
            select(ExecutionPhase)
            .where(ExecutionPhase.execution_id == execution.id)
            .order_by(ExecutionPhase.position)
        )
    )


def phase_rows(execution: WorkflowExecution, planned: Iterable[Any]) -> list[dict[str, Any]]:
    """The rows of a new execution's phases, one per planned node, in plan order."""
    return [
        {
            "id": uuid.uuid4(),
            "execution_id": execution.id,
            "user_id": execution.user_id,
            "number": node.number,
            "position": position,
            "node_id": node.node_id,
            "node_type": node.node_type,
            "status": PhaseStatus.CREATED,
            "credits_cost": node.credits,
            "credits_charged": 0,
            "attempts": 0,
        }
        for position, node in enumerate(planned)
    ]


def insert_phases(*, session: Session, execution: WorkflowExecution, planned: Iterable[Any]) -> int:
    """Insert one phase per planned node in one statement; returns how many.

    The enqueue path: Core rows, no ORM object per phase (building 40 of them and
    flushing them cost more than the rest of an enqueue)."""
    rows = phase_rows(execution, planned)
    if rows:
        # The execution's own row may be pending in the session: flush it first.
        session.flush()
        # The other columns start NULL (a JSON column given None would store JSON null).
        session.connection().execute(_INSERT_PHASE, rows)
    return len(rows)


_PHASE = ExecutionPhase.__table__
_PHASE_MANAGER = ExecutionPhase._sa_class_manager
_INSERT_PHASE = sa.insert(_PHASE)
# Built once; the SET clause comes from the parameters given (their keys).
_UPDATE_PHASE = sa.update(_PHASE).where(_PHASE.c.id == sa.bindparam("b_phase_id"))


# The engine's read of a run's phases: Core, built once, sent in the claim's batch on
# psycopg (see send_read_phases); its rows become detached objects directly, without the
# ORM's query path (measured: most of a one-phase run's claim).
_SELECT_PHASES = (
    sa.select(*_PHASE.c)
    .where(_PHASE.c.execution_id == sa.bindparam("b_execution_id"))
    .order_by(_PHASE.c.number, _PHASE.c.position)
)


def read_phases(*, session: Session, execution_id: uuid.UUID) -> list[ExecutionPhase]:
    """An execution's phases in plan order, as detached objects (the engine's read, with
    the lease held: no user scoping, the claim proved the run ours)."""
    connection = session.connection()
    rows = connection.execute(_SELECT_PHASES, {"b_execution_id": execution_id})
    sa.orm.configure_mappers()  # once per process (_detached needs the mapper); a flag check
    return [_detached(dict(row._mapping)) for row in rows]


def send_read_phases(
    *, connection: Connection, execution_id: uuid.UUID
) -> Callable[[], list[ExecutionPhase]]:
    """:func:`read_phases` queued in a batch (psycopg's pipeline mode, see
    ``_sql.send_returning``): returns the function that reads them once it is sent."""
    cursor = send_returning(connection, _SELECT_PHASES, {"b_execution_id": execution_id})
    processors = [
        (column.key, column.type._cached_result_processor(connection.dialect, None))
        for column in _PHASE.c
    ]

    def read() -> list[ExecutionPhase]:
        sa.orm.configure_mappers()  # as in read_phases
        return [
            _detached(
                {
                    key: process(value) if process is not None and value is not None else value
                    for (key, process), value in zip(processors, row, strict=True)
                }
            )
            for row in cursor.fetchall()
        ]

    return read


def _detached(values: dict[str, Any]) -> ExecutionPhase:
    """The object the ORM would load for this row, detached, without its query path (nor
    the model's validation: the values come from the database)."""
    phase = _PHASE_MANAGER.new_instance()
    # Where set_committed_value would put each value, in one update: the next call
    # commits them all as a load does (~17 attribute calls per phase fewer, on the
    # claim's path to the first node, for every phase of the run).
    instance_dict(phase).update(values)
    make_transient_to_detached(phase)
    return phase


def list_phases(
    *, session: Session, execution_id: uuid.UUID, user_id: uuid.UUID
) -> list[ExecutionPhase]:
    """The execution's phases in plan order (empty for another user's execution)."""
    stmt = (
        select(ExecutionPhase)
        .where(ExecutionPhase.execution_id == execution_id, ExecutionPhase.user_id == user_id)
        .order_by(ExecutionPhase.number, ExecutionPhase.position)
    )
    return list(session.exec(stmt))


def get_phase(*, session: Session, phase_id: uuid.UUID, user_id: uuid.UUID) -> ExecutionPhase:
    phase = session.exec(
        select(ExecutionPhase).where(
            ExecutionPhase.id == phase_id, ExecutionPhase.user_id == user_id
        )
    ).first()
    if phase is None:
        raise NotFound("phase", phase_id)
    return phase


def _phase_changes(
    phase: ExecutionPhase,
    status: PhaseStatus,
    inputs: dict[str, Any] | None,
    outputs: dict[str, Any] | None,
    error: str | None,
    credits_charged: int | None,
    now: datetime | None,
) -> dict[str, Any]:
    """The columns a move of ``phase`` to ``status`` writes (the transition is checked)."""
    if status not in _ALLOWED[phase.status]:
        raise InvalidTransition("phase", phase.id, phase.status, status)
    now = now or utcnow()
    values: dict[str, Any] = {"status": status}
    if status == PhaseStatus.RUNNING:
        values["started_at"] = now
        values["attempts"] = phase.attempts + 1
        if inputs is not None:
            values["inputs"] = inputs
    else:
        values["completed_at"] = now
        if phase.started_at is not None:
            values["duration_ms"] = int((now - phase.started_at).total_seconds() * 1000)
    if outputs is not None:
        values["outputs"] = outputs
    if error is not None:
        values["error"] = error[:4000]
    if credits_charged is not None:
        values["credits_charged"] = credits_charged
    return values


def update_phase(
    *,
    session: Session,
    phase: ExecutionPhase,
    status: PhaseStatus,
    inputs: dict[str, Any] | None = None,
    outputs: dict[str, Any] | None = None,
    error: str | None = None,
    credits_charged: int | None = None,
    now: datetime | None = None,
) -> ExecutionPhase:
    """Move a phase to ``status`` (checked) and record what goes with it."""
    values = _phase_changes(phase, status, inputs, outputs, error, credits_charged, now)
    for key, value in values.items():
        setattr(phase, key, value)
    session.add(phase)
    session.flush()
    return phase


def record_phase(
    *,
    session: Session,
    phase: ExecutionPhase,
    status: PhaseStatus,
    inputs: dict[str, Any] | None = None,
    outputs: dict[str, Any] | None = None,
    error: str | None = None,
    credits_charged: int | None = None,
    now: datetime | None = None,
    deferred: list[tuple[Any, dict[str, Any]]] | None = None,
) -> ExecutionPhase:
    """:func:`update_phase` as one Core UPDATE of the changed columns, for the engine's
    hot path: ``phase`` may be detached (it is never re-attached or flushed) and is
    updated in memory to what was written. Same checked transitions.

    With ``deferred``, the statement is appended there instead of executed: the engine
    sends it with its commit, in one round trip (it returns nothing the run waits for)."""
    values = _phase_changes(phase, status, inputs, outputs, error, credits_charged, now)
    params = {"b_phase_id": phase.id, **values}
    if deferred is None:
        connection = session.connection()
        if in_batch(connection):  # the engine's batch: queued on the driver's cursor
            send_statement(connection, _UPDATE_PHASE, params)
        else:
            connection.execute(_UPDATE_PHASE, params)
    else:
        deferred.append((_UPDATE_PHASE, params))
    for key, value in values.items():
        # Committed values: a phase that is in a session is not flushed a second time.
        set_committed_value(phase, key, value)
    return phase


def close_open_phases(
    *,
    session: Session,
    execution_id: uuid.UUID,
    status: PhaseStatus,
    now: datetime | None = None,
    deferred: list[tuple[Any, dict[str, Any]]] | None = None,
) -> int:
    """Mark every phase that has not finished (created or running) with ``status``.

    Returns how many; with ``deferred`` (see :func:`record_phase`) the statement is
    appended there and 0 returned."""
    now = now or utcnow()
    if deferred is not None:
        params = {"b_execution_id": execution_id, "status": status, "completed_at": now}
        deferred.append((_CLOSE_OPEN, params))
        return 0
    # Through the session: the phases it holds are updated too.
    result = session.execute(
        sa.update(ExecutionPhase)
        .where(
            ExecutionPhase.execution_id == execution_id,
            ExecutionPhase.status.in_([PhaseStatus.CREATED, PhaseStatus.RUNNING]),
        )
        .values(status=status, completed_at=now)
    )
    return result.rowcount or 0


_CLOSE_OPEN = (
    sa.update(_PHASE)
    .where(
        _PHASE.c.execution_id == sa.bindparam("b_execution_id"),
        _PHASE.c.status.in_([PhaseStatus.CREATED, PhaseStatus.RUNNING]),
    )
    .values(status=sa.bindparam("status"), completed_at=sa.bindparam("completed_at"))
)
