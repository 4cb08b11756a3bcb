"""Workflows and their published versions."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import defer
from sqlmodel import Session, select

from flowbuilder.platform import cron_schedule
from flowbuilder.platform.cron import check_schedule, get_next_run_date
from flowbuilder.platform.crud._sql import conflict_on_duplicate
from flowbuilder.platform.errors import Conflict, NotFound, ValidationFailed
from flowbuilder.platform.models import (
    Credential,
    Workflow,
    WorkflowCreate,
    WorkflowStatus,
    WorkflowUpdate,
    WorkflowVersion,
    utcnow,
)
from flowbuilder.platform.settings import get_settings


def check_draft(fields: dict[str, Any]) -> None:
    """Refuse what a draft write cannot store, with ValidationFailed naming it.

    Drafts are stored before they are ever validated, so the limits that publishing
    enforces hold at every write: nothing the database cannot store (NUL, lone
    surrogates, NaN/Infinity, absurd nesting; checked iteratively first, so no
    RecursionError), and no definition above MAX_DEFINITION_BYTES (as UTF-8 JSON).
    """
    from flowbuilder.platform.definitions import storability_problem

    problems = []
    for name, value in fields.items():
        if isinstance(value, str | dict | list):
            problem = storability_problem(value)
            if problem is not None:
                path = f"{name}.{problem.path}" if problem.path else name
                problems.append(f"{path}: {problem.message}")
    if problems:
        raise ValidationFailed(problems, what="workflow")
    definition = fields.get("definition")
    if definition is None:
        return
    limit = get_settings().MAX_DEFINITION_BYTES
    try:
        size = len(json.dumps(definition, ensure_ascii=False, separators=(",", ":")).encode())
    except (TypeError, ValueError) as exc:
        problem_text = f"definition: not JSON-serialisable ({type(exc).__name__})"
    else:
        if size <= limit:
            return
        problem_text = f"definition: larger than {limit} bytes (MAX_DEFINITION_BYTES)"
    raise ValidationFailed([problem_text], what="workflow definition")


def create_workflow(*, session: Session, user_id: uuid.UUID, data: WorkflowCreate) -> Workflow:
    """Create a draft workflow. Drafts may be incomplete; publishing validates."""
    if data.cron:
        check_schedule(data.cron, data.timezone)
    check_draft(data.model_dump())
    workflow = Workflow.model_validate(data, update={"user_id": user_id})
    with conflict_on_duplicate(session, f"a workflow named {data.name!r} already exists"):
        session.add(workflow)
    return workflow


def get_workflow_by_id_and_user(
    *, session: Session, workflow_id: uuid.UUID, user_id: uuid.UUID
) -> Workflow:
    """The user's workflow. Another user's id raises NotFound exactly like a missing one."""
    workflow = session.exec(
        select(Workflow).where(Workflow.id == workflow_id, Workflow.user_id == user_id)
    ).first()
    if workflow is None:
        raise NotFound("workflow", workflow_id)
    return workflow


def list_workflows_for_user(
    *, session: Session, user_id: uuid.UUID, limit: int = 50, offset: int = 0
) -> list[Workflow]:
    stmt = (
        select(Workflow)
        .where(Workflow.user_id == user_id)
        .order_by(Workflow.created_at.desc(), Workflow.id)
        .limit(limit)
        .offset(offset)
    )
    return list(session.exec(stmt))


def _reschedule(workflow: Workflow, now: datetime | None = None) -> None:
    before = workflow.next_run_at
    if workflow.status == WorkflowStatus.PUBLISHED and workflow.cron:
        workflow.next_run_at = get_next_run_date(
            workflow.cron, timezone=workflow.timezone, after=now or utcnow()
        )
    else:
        workflow.next_run_at = None
    if before is not None or workflow.next_run_at is not None:
        # beat's Redis schedule follows once the caller commits (never on rollback).
        session = Session.object_session(workflow)
        if session is not None:
            cron_schedule.note_change(session, workflow.id, workflow.next_run_at)


def update_workflow(
    *, session: Session, workflow_id: uuid.UUID, user_id: uuid.UUID, data: WorkflowUpdate
) -> Workflow:
    """Change fields. Publishing goes through :func:`publish_workflow`, which validates."""
    workflow = get_workflow_by_id_and_user(
        session=session, workflow_id=workflow_id, user_id=user_id
    )
    changes = data.model_dump(exclude_unset=True)
    check_draft(changes)
    if changes.get("status") == WorkflowStatus.PUBLISHED and workflow.published_version == 0:
        raise Conflict(f"workflow {workflow_id} has no published version; publish it first")
    cron = changes.get("cron", workflow.cron)
    tz = changes.get("timezone", workflow.timezone)
    if cron:
        check_schedule(cron, tz)
    name = changes.get("name", workflow.name)
    with conflict_on_duplicate(session, f"a workflow named {name!r} already exists"):
        for field, value in changes.items():
            setattr(workflow, field, value)
        if "definition" in changes and "status" not in changes:
            # What runs stays the published version; the edit is a draft until republished.
            workflow.status = WorkflowStatus.DRAFT
        workflow.updated_at = utcnow()
        _reschedule(workflow)
    return workflow


def delete_workflow(*, session: Session, workflow_id: uuid.UUID, user_id: uuid.UUID) -> None:
    """Delete a workflow and its versions; its executions stay (workflow_id becomes NULL)."""
    workflow = get_workflow_by_id_and_user(
        session=session, workflow_id=workflow_id, user_id=user_id
    )
    if workflow.next_run_at is not None:
        cron_schedule.note_change(session, workflow.id, None)
    session.delete(workflow)
    session.flush()


def owned_credential_ids(*, session: Session, user_id: uuid.UUID) -> set[uuid.UUID]:
    return set(session.exec(select(Credential.id).where(Credential.user_id == user_id)))


def publish_workflow(
    *, session: Session, workflow_id: uuid.UUID, user_id: uuid.UUID
) -> WorkflowVersion:
    """Validate the definition and freeze it as a new immutable WorkflowVersion."""
    from flowbuilder.platform.definitions import validate_definition
    from flowbuilder.platform.plan import build_plan

    workflow = get_workflow_by_id_and_user(
        session=session, workflow_id=workflow_id, user_id=user_id
    )
    definition = validate_definition(
        workflow.definition,
        owned_credential_ids=owned_credential_ids(session=session, user_id=user_id),
    )
    plan = build_plan(definition)
    # Lock the workflow row so two concurrent publishes get distinct version numbers.
    session.execute(sa.select(Workflow.id).where(Workflow.id == workflow.id).with_for_update())
    session.refresh(workflow)
    version = WorkflowVersion(
        workflow_id=workflow.id,
        version=workflow.published_version + 1,
        definition=definition.model_dump(mode="json", by_alias=True, exclude_none=True),
        plan=plan.to_dict(),
        credits_cost=plan.total_credits,
    )
    with conflict_on_duplicate(session, f"version {version.version} of {workflow_id} exists"):
        session.add(version)
        workflow.published_version = version.version
        workflow.credits_cost = plan.total_credits
        workflow.status = WorkflowStatus.PUBLISHED
        workflow.updated_at = utcnow()
        _reschedule(workflow)
    return version


def get_published_version(*, session: Session, workflow: Workflow) -> WorkflowVersion:
    version = session.exec(
        select(WorkflowVersion).where(
            WorkflowVersion.workflow_id == workflow.id,
            WorkflowVersion.version == workflow.published_version,
        )
    ).first()
    if version is None:
        raise NotFound("published version of workflow", workflow.id)
    return version


def get_workflow_with_published_version(
    *, session: Session, workflow_id: uuid.UUID, user_id: uuid.UUID
) -> tuple[Workflow, WorkflowVersion | None]:
    """The user's workflow and its published version (None if it has none), in one query.

    NotFound for another user's workflow exactly like a missing one."""
    row = session.exec(
        select(Workflow, WorkflowVersion)
        .outerjoin(
            WorkflowVersion,
            sa.and_(
                WorkflowVersion.workflow_id == Workflow.id,
                WorkflowVersion.version == Workflow.published_version,
            ),
        )
        .where(Workflow.id == workflow_id, Workflow.user_id == user_id)
        # The draft definition is not what runs (the version's is): loaded only if read.
        .options(defer(Workflow.definition))
    ).first()
    if row is None:
        raise NotFound("workflow", workflow_id)
    return row[0], row[1]


def get_due_workflows(
    *, session: Session, now: datetime | None = None, limit: int = 100
) -> list[Workflow]:
    """Published workflows with a cron whose next run has come, oldest first.

    On PostgreSQL the rows are locked with SKIP LOCKED, so two schedulers never fire
    the same workflow twice; the caller advances ``next_run_at`` and commits.
    """
    now = now or utcnow()
    stmt = (
        select(Workflow)
        .where(
            Workflow.status == WorkflowStatus.PUBLISHED,
            Workflow.next_run_at.is_not(None),
            Workflow.next_run_at <= now,
        )
        .order_by(Workflow.next_run_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return list(session.exec(stmt))


def mark_workflow_run(*, session: Session, workflow: Workflow, now: datetime | None = None) -> None:
    """Record a cron run and compute the next one in the workflow's time zone."""
    now = now or utcnow()
    workflow.last_run_at = now
    _reschedule(workflow, now)
    session.flush()
