"""The API side of the engine: check and record a new execution, or cancel one.

No Celery here: the caller's unit of work commits, and only then is the task sent
(``flowbuilder.tasks.execution.send_after_commit``).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import structlog
from sqlalchemy.exc import DataError
from sqlmodel import Session

from flowbuilder.platform.crud import (
    execution_crud,
    phase_crud,
    rate_limit_crud,
    user_crud,
    workflow_crud,
)
from flowbuilder.platform.crud._sql import data_error_message
from flowbuilder.platform.errors import (
    Conflict,
    InsufficientCredits,
    NotFound,
    ValidationFailed,
)
from flowbuilder.platform.jsonvalues import (
    MAX_DOCUMENT_DEPTH,
    Unstorable,
    bad_string_reason,
    make_storable,
)
from flowbuilder.platform.models import (
    ExecutionStatus,
    PhaseStatus,
    TriggerType,
    WorkflowExecution,
    WorkflowStatus,
)
from flowbuilder.platform.settings import Settings, get_settings

logger = structlog.get_logger(__name__)


# The rules a cron fire shares with a manual run (``scheduling.fire_due`` applies them to
# a batch): one counter per user, guests stricter, expired guests refused.


def enqueue_limit_key(user_id: uuid.UUID) -> str:
    """The rate-limit counter of a user's enqueues, manual and cron alike."""
    return f"enqueue:{user_id}"


def enqueue_limit(settings: Settings, *, is_guest: bool) -> int:
    return settings.RATE_LIMIT_GUEST if is_guest else settings.RATE_LIMIT_USER


def guest_expired(user_id: uuid.UUID) -> Conflict:
    return Conflict(f"guest {user_id}: the guest session has expired; start a new one")


def prepare_execution(
    *,
    session: Session,
    workflow_id: uuid.UUID,
    user_id: uuid.UUID,
    trigger: TriggerType = TriggerType.MANUAL,
    inputs: dict[str, Any] | None = None,
    correlation_id: str | None = None,
) -> WorkflowExecution:
    """Checks and records a new execution (pending, with its planned phases).

    In order: ownership and a published, valid definition (NotFound, Conflict,
    ValidationFailed); the rate limit (RateLimited); the balance covers the plan
    (InsufficientCredits). Flushes only; the caller's unit of work commits and only then
    is the task sent.
    """
    from flowbuilder.platform.definitions import validate_definition
    from flowbuilder.platform.plan import ExecutionPlan

    settings = get_settings()
    _check_inputs(inputs, settings.MAX_DEFINITION_BYTES)
    if correlation_id is not None and (
        len(correlation_id) > 100 or bad_string_reason(correlation_id) or not correlation_id
    ):
        raise ValidationFailed(["correlation_id: 1 to 100 storable characters"])
    # Each statement here is a round trip on the enqueue path (the API's latency): reads
    # are joined where they can be (workflow and version, user and balance).
    workflow, version = workflow_crud.get_workflow_with_published_version(
        session=session, workflow_id=workflow_id, user_id=user_id
    )
    if workflow.status != WorkflowStatus.PUBLISHED or workflow.published_version == 0:
        raise Conflict(f"workflow {workflow_id} is {workflow.status.value}, not published")
    if version is None:
        raise NotFound("published version of workflow", workflow.id)
    # The plan frozen with the version: the same one the worker runs, so the phases
    # recorded here (and their credit costs) are exactly what will be run and debited.
    plan = ExecutionPlan.from_dict(version.plan)
    # Validated again: a credential may have been deleted since the version was published.
    # Only nodes name credentials; without any, there is nothing to look up.
    uses_credentials = any(node.credential_id is not None for node in plan.nodes)
    validate_definition(
        version.definition,
        owned_credential_ids=(
            workflow_crud.owned_credential_ids(session=session, user_id=user_id)
            if uses_credentials
            else ()
        ),
    )

    user, available = user_crud.get_user_and_credits(session=session, user_id=user_id)
    if user.is_guest and not user_crud.has_active_guest_session(session=session, user_id=user_id):
        raise guest_expired(user_id)
    limit = enqueue_limit(settings, is_guest=user.is_guest)
    rate_limit_crud.hit(
        session=session,
        key=enqueue_limit_key(user_id),
        limit=limit,
        window_seconds=settings.RATE_LIMIT_WINDOW_SECONDS,
    )
    if available < plan.total_credits:
        raise InsufficientCredits(user_id, plan.total_credits, available)

    execution = execution_crud.create_execution(
        session=session,
        user_id=user_id,
        workflow_id=workflow.id,
        workflow_version_id=version.id,
        trigger=trigger,
        inputs=inputs,
        correlation_id=correlation_id,
        # Sent after commit; the sweep re-sends it if it is still pending this much later.
        resend_after_seconds=settings.SWEEP_PENDING_AFTER_SECONDS,
    )
    phase_crud.insert_phases(session=session, execution=execution, planned=plan.nodes)
    try:
        session.flush()
    except DataError as exc:
        # Checked above, so this is a gap in the checks; still the caller's input, and
        # never a raw driver error. The caller's unit of work rolls back: nothing recorded.
        raise ValidationFailed([data_error_message(exc)]) from exc
    logger.info(
        "execution_prepared",
        execution_id=str(execution.id),
        workflow_id=str(workflow.id),
        user_id=str(user_id),
        phases=len(plan.nodes),
        credits=plan.total_credits,
    )
    return execution


def _check_inputs(inputs: Any, max_bytes: int) -> None:
    """Execution inputs are stored as JSON: refuse what cannot be, or is too large."""
    if inputs is None:
        return
    if not isinstance(inputs, dict):
        raise ValidationFailed([f"inputs: must be a JSON object, got {type(inputs).__name__}"])
    try:
        # One iterative pass: NUL, lone surrogates, NaN/Infinity, non-JSON values and
        # absurd nesting are refused by name (json.dumps alone would recurse, and accept
        # what PostgreSQL then refuses).
        make_storable(inputs, max_depth=MAX_DOCUMENT_DEPTH, repair=False)
        size = len(json.dumps(inputs, allow_nan=False))
    except Unstorable as exc:
        raise ValidationFailed([f"inputs: {exc}"]) from None
    except (TypeError, ValueError) as exc:
        raise ValidationFailed([f"inputs: not JSON serialisable ({exc})"]) from None
    if size > max_bytes:
        raise ValidationFailed([f"inputs: {size} bytes, more than the {max_bytes} allowed"])


def cancel_execution(
    *, session: Session, execution_id: uuid.UUID, user_id: uuid.UUID
) -> WorkflowExecution:
    """Request cancellation: a pending run ends now, a running one before its next phase."""
    execution = execution_crud.request_cancel(
        session=session, execution_id=execution_id, user_id=user_id
    )
    if execution.status == ExecutionStatus.CANCELLED:
        phase_crud.close_open_phases(
            session=session, execution_id=execution_id, status=PhaseStatus.CANCELLED
        )
    return execution
