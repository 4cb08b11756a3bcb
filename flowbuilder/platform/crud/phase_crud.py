"""Execution phases: one row per planned node, created with the execution."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, select

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
    """Create one phase per planned node (objects with node_id, node_type, number, credits)."""
    phases = [
        ExecutionPhase(
            execution_id=execution.id,
            user_id=execution.user_id,
            number=node.number,
            position=position,
            node_id=node.node_id,
            node_type=node.node_type,
            credits_cost=node.credits,
        )
        for position, node in enumerate(planned)
    ]
    session.add_all(phases)
    session.flush()
    return phases


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
    if status not in _ALLOWED[phase.status]:
        raise InvalidTransition("phase", phase.id, phase.status, status)
    now = now or utcnow()
    phase.status = status
    if status == PhaseStatus.RUNNING:
        phase.started_at = now
        phase.attempts += 1
        if inputs is not None:
            phase.inputs = inputs
    else:
        phase.completed_at = now
        if phase.started_at is not None:
            phase.duration_ms = int((now - phase.started_at).total_seconds() * 1000)
    if outputs is not None:
        phase.outputs = outputs
    if error is not None:
        phase.error = error[:4000]
    if credits_charged is not None:
        phase.credits_charged = credits_charged
    session.add(phase)
    session.flush()
    return phase


def close_open_phases(
    *, session: Session, execution_id: uuid.UUID, status: PhaseStatus, now: datetime | None = None
) -> int:
    """Mark every phase that has not finished (created or running) with ``status``."""
    result = session.execute(
        sa.update(ExecutionPhase)
        .where(
            ExecutionPhase.execution_id == execution_id,
            ExecutionPhase.status.in_([PhaseStatus.CREATED, PhaseStatus.RUNNING]),
        )
        .values(status=status, completed_at=now or utcnow())
    )
    return result.rowcount or 0
