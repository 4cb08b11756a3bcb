"""Worker tasks: thin shells around the engine in ``flowbuilder.platform.runner``.

A task takes ids, calls platform code, and decides retries. Messages carry the execution
id only: never a definition, never a secret.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import structlog
from celery import Task
from sqlalchemy import event
from sqlalchemy.orm import Session as OrmSession
from sqlmodel import Session

from flowbuilder.platform import runner
from flowbuilder.platform.crud import execution_crud
from flowbuilder.platform.db import unit_of_work
from flowbuilder.platform.errors import TransientError
from flowbuilder.platform.models import TriggerType, WorkflowExecution, utcnow
from flowbuilder.platform.settings import get_settings
from flowbuilder.tasks.app import CORRELATION_HEADER, app

logger = structlog.get_logger(__name__)

_PENDING_SENDS = "flowbuilder.pending_sends"


class ExecutionTask(Task):
    # Every task here is idempotent by design (leases, checkpoints, idempotent debits),
    # which is what makes late acknowledgement safe.
    acks_late = True
    reject_on_worker_lost = True
    # Results are in the database; a result backend would only add a dependency.
    ignore_result = True
    # Remembers the execution's ids for Celery's own "received" log line (logcontext.py).
    Request = "flowbuilder.tasks.logcontext:ContextRequest"


@app.task(
    bind=True,
    base=ExecutionTask,
    name="flowbuilder.execute_workflow",
    # Infrastructure failures (database restart) retry the whole task, which resumes from
    # the last checkpoint. Bounded, so a permanently broken database ends in the DLQ.
    max_retries=20,
)
def execute_workflow(self: Task, execution_id: str) -> str:
    """Run or resume one execution. Safe under duplicate delivery."""
    exec_id = uuid.UUID(execution_id)
    structlog.contextvars.bind_contextvars(execution_id=execution_id)
    # One owner token per delivery: two deliveries of the same message must not share a
    # lease (they carry the same task id, so the task id cannot be the owner).
    owner = f"{self.request.hostname or 'local'}:{uuid.uuid4().hex[:12]}"
    try:
        result = runner.run_execution(exec_id, owner=owner)
    except TransientError as exc:
        countdown = min(60.0, 2.0 * (2**self.request.retries))
        logger.warning("execute_workflow_retry", error=str(exc), countdown=countdown)
        raise self.retry(exc=exc, countdown=countdown) from exc
    if result.outcome == runner.Outcome.LEASE_HELD:
        # Another delivery is running it right now. Come back when its lease would have
        # lapsed: if that worker died, we take over; if it finished, this is a no-op.
        raise self.retry(countdown=result.retry_after + 0.5, max_retries=None)
    return result.outcome.value


@app.task(bind=True, base=ExecutionTask, name="flowbuilder.sweep_stale_executions")
def sweep_stale_executions(self: Task, limit: int = 100) -> int:
    """Re-send executions whose message may be lost (send failed after commit, or the
    worker died and its message reached the dead-letter queue)."""
    settings = get_settings()
    threshold = utcnow() - timedelta(seconds=settings.SWEEP_PENDING_AFTER_SECONDS)
    with unit_of_work() as session:
        stale = execution_crud.find_stale_executions(
            session=session, pending_before=threshold, limit=limit
        )
        for execution in stale:
            execution.enqueued_at = utcnow()
            send_after_commit(session, execution.id, execution.correlation_id)
    if stale:
        logger.info("stale_executions_resent", count=len(stale))
    return len(stale)


# ----------------------------------------------------------------------------- enqueue


def send_execution(execution_id: uuid.UUID, correlation_id: str | None = None) -> None:
    headers = {CORRELATION_HEADER: correlation_id} if correlation_id else None
    execute_workflow.apply_async(args=[str(execution_id)], headers=headers)


def send_after_commit(
    session: Session, execution_id: uuid.UUID, correlation_id: str | None = None
) -> None:
    """Send the task once ``session``'s transaction commits; never if it rolls back.

    A worker must never receive an id whose row it cannot see yet, and a rolled-back
    execution must never run.
    """
    session.info.setdefault(_PENDING_SENDS, []).append((execution_id, correlation_id))


@event.listens_for(OrmSession, "after_commit")
def _send_pending(session: OrmSession) -> None:
    for execution_id, correlation_id in session.info.pop(_PENDING_SENDS, []):
        try:
            send_execution(execution_id, correlation_id)
        except Exception as exc:  # noqa: BLE001 - committed; the sweep re-sends it
            logger.error(
                "execution_send_failed",
                execution_id=str(execution_id),
                error=f"{type(exc).__name__}: {str(exc)[:200]}",
            )


@event.listens_for(OrmSession, "after_soft_rollback")
def _drop_pending(session: OrmSession, previous_transaction: Any) -> None:
    if previous_transaction.parent is None:
        session.info.pop(_PENDING_SENDS, None)


def enqueue_execution(
    session: Session,
    workflow_id: uuid.UUID,
    user_id: uuid.UUID,
    *,
    trigger: TriggerType = TriggerType.MANUAL,
    inputs: dict[str, Any] | None = None,
    correlation_id: str | None = None,
) -> WorkflowExecution:
    """The API's entry point: check, record a pending execution, send after commit.

    Raises NotFound, Conflict (not published), ValidationFailed (bad definition),
    RateLimited or InsufficientCredits; nothing is recorded or sent then.
    """
    execution = runner.prepare_execution(
        session=session,
        workflow_id=workflow_id,
        user_id=user_id,
        trigger=trigger,
        inputs=inputs,
        correlation_id=correlation_id,
    )
    send_after_commit(session, execution.id, correlation_id)
    return execution


def cancel_execution(
    session: Session, execution_id: uuid.UUID, user_id: uuid.UUID
) -> WorkflowExecution:
    return runner.cancel_execution(session=session, execution_id=execution_id, user_id=user_id)
