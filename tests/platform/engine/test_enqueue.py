"""Definitions that validate can be stored and run; storage errors never reach the caller
raw; an expired guest cannot enqueue (issue 10, items 12 and 13). SQLite and PostgreSQL."""

from __future__ import annotations

import math
import uuid
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlmodel import Session, select

from flowbuilder.platform.crud import execution_crud, workflow_crud
from flowbuilder.platform.definitions import validate_definition
from flowbuilder.platform.engine import Outcome, prepare_execution, run_execution
from flowbuilder.platform.errors import Conflict, ValidationFailed
from flowbuilder.platform.models import (
    GuestSession,
    Workflow,
    WorkflowCreate,
    WorkflowExecution,
    WorkflowUpdate,
    utcnow,
)
from tests.factories import json_definition, make_user, make_workflow


def _with(mutate) -> dict[str, Any]:
    definition = json_definition(2)
    mutate(definition)
    return definition


def _set_id(d: dict[str, Any], new: str) -> None:
    d["nodes"][0]["id"] = new
    d["edges"][0]["source"] = new


@pytest.mark.parametrize(
    "mutate, path",
    [
        (lambda d: _set_id(d, "a\x00b"), "NUL character"),
        (lambda d: _set_id(d, "tab\there"), "nodes[0].id"),
        (lambda d: _set_id(d, "x" * 101), "nodes[0].id"),
        (lambda d: d["nodes"][0]["inputs"].update(property_path="p\x00"), "property_path"),
        (lambda d: d["nodes"][0]["inputs"].update(value="\ud800"), "surrogate"),
        (lambda d: d["nodes"][0]["inputs"].update(value=math.nan), ""),
        (lambda d: d["edges"][0].update(id="e\x00"), "edges[0].id"),
        (lambda d: d.update(viewport={"zoom": math.inf}), ""),
    ],
)
def test_unstorable_definitions_refused_by_validation(mutate, path: str) -> None:
    with pytest.raises(ValidationFailed) as info:
        validate_definition(_with(mutate), owned_credential_ids=None)
    assert path in str(info.value)


def test_node_id_limit_matches_the_column(engine, session: Session) -> None:
    """A 100-character id (the documented maximum) validates, enqueues and runs."""
    user = make_user(session, credits=10)
    long_id = "n" * 100
    wf = make_workflow(session, user, definition=_with(lambda d: _set_id(d, long_id)), publish=True)
    session.commit()
    ex = prepare_execution(session=session, workflow_id=wf.id, user_id=user.id)
    session.commit()
    assert run_execution(ex.id).outcome == Outcome.COMPLETED


@pytest.mark.parametrize(
    "definition",
    [
        {"version": 1, "nodes": [{"id": "a\x00", "type": "delay"}]},
        {"version": 1, "nodes": [], "viewport": {"zoom": math.nan}},
        {"version": 1, "nodes": [{"id": "a", "inputs": {"v": "\udcff"}}]},
    ],
)
def test_unstorable_drafts_refused_when_saved(engine, session: Session, definition) -> None:
    user = make_user(session)
    session.commit()
    name = f"wf-{uuid.uuid4().hex[:8]}"
    with pytest.raises(ValidationFailed, match="definition"):
        workflow_crud.create_workflow(
            session=session, user_id=user.id, data=WorkflowCreate(name=name, definition=definition)
        )
    session.rollback()
    wf = make_workflow(session, user)
    session.commit()
    with pytest.raises(ValidationFailed, match="definition"):
        workflow_crud.update_workflow(
            session=session,
            workflow_id=wf.id,
            user_id=user.id,
            data=WorkflowUpdate(definition=definition),
        )
    session.rollback()
    stored = session.exec(select(Workflow).where(Workflow.user_id == user.id)).all()
    assert [w.definition for w in stored] == [{}]


def test_unstorable_name_refused(engine, session: Session) -> None:
    user = make_user(session)
    session.commit()
    with pytest.raises(ValidationFailed, match="name"):
        workflow_crud.create_workflow(
            session=session, user_id=user.id, data=WorkflowCreate(name="a\x00b", definition={})
        )


def test_storage_errors_become_validation_failed(engine, session: Session) -> None:
    """Whatever the checks miss, the database's refusal reaches the caller as
    ValidationFailed, not a raw DataError (here: a name longer than its column, which
    only PostgreSQL enforces)."""
    if engine.dialect.name != "postgresql":
        pytest.skip("SQLite does not enforce VARCHAR lengths")
    user = make_user(session)
    wf = make_workflow(session, user)
    session.commit()
    data = WorkflowUpdate.model_construct(name="x" * 500)  # skip the schema's own check
    data.model_fields_set.add("name")
    with pytest.raises(ValidationFailed, match="refused a value"):
        workflow_crud.update_workflow(
            session=session, workflow_id=wf.id, user_id=user.id, data=data
        )
    session.rollback()


@pytest.mark.parametrize(
    "inputs, message",
    [
        ({"x": "a\x00"}, "NUL"),
        ({"k\x00": 1}, "NUL"),
        ({"x": "\ud800"}, "surrogate"),
    ],
)
def test_unstorable_execution_inputs_refused(engine, session: Session, inputs, message) -> None:
    user = make_user(session, credits=10)
    wf = make_workflow(session, user, definition=json_definition(1), publish=True)
    session.commit()
    with pytest.raises(ValidationFailed, match=message):
        prepare_execution(session=session, workflow_id=wf.id, user_id=user.id, inputs=inputs)
    session.rollback()
    assert execution_crud.list_executions_for_user(session=session, user_id=user.id) == []


def test_deep_execution_inputs_refused_without_recursion(engine, session: Session) -> None:
    user = make_user(session, credits=10)
    wf = make_workflow(session, user, definition=json_definition(1), publish=True)
    session.commit()
    deep: Any = 1
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(ValidationFailed, match="nested deeper"):
        prepare_execution(session=session, workflow_id=wf.id, user_id=user.id, inputs={"d": deep})
    session.rollback()


def test_bad_correlation_id_refused(engine, session: Session) -> None:
    user = make_user(session, credits=10)
    wf = make_workflow(session, user, definition=json_definition(1), publish=True)
    session.commit()
    for bad in ("x" * 101, "a\x00"):
        with pytest.raises(ValidationFailed, match="correlation_id"):
            prepare_execution(
                session=session, workflow_id=wf.id, user_id=user.id, correlation_id=bad
            )
        session.rollback()


def test_expired_guest_cannot_enqueue(engine, session: Session) -> None:
    guest = make_user(session, guest=True, credits=100)
    wf = make_workflow(session, guest, definition=json_definition(1), publish=True)
    session.commit()
    prepare_execution(session=session, workflow_id=wf.id, user_id=guest.id)  # still valid
    session.commit()
    session.execute(
        sa.update(GuestSession)
        .where(GuestSession.user_id == guest.id)
        .values(expires_at=utcnow() - timedelta(seconds=1))
    )
    session.commit()
    with pytest.raises(Conflict, match="guest session has expired"):
        prepare_execution(session=session, workflow_id=wf.id, user_id=guest.id)
    session.rollback()
    count = session.exec(
        select(sa.func.count())
        .select_from(WorkflowExecution)
        .where(WorkflowExecution.user_id == guest.id)
    ).one()
    assert count == 1
