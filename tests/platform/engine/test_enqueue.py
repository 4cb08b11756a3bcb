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
    ExecutionPhase,
    GuestSession,
    Workflow,
    WorkflowCreate,
    WorkflowExecution,
    WorkflowUpdate,
    utcnow,
)
from flowbuilder.platform.settings import override_settings
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


def _expire_guest_session(session: Session, user_id: Any) -> None:
    session.execute(
        sa.update(GuestSession)
        .where(GuestSession.user_id == user_id)
        .values(expires_at=utcnow() - timedelta(seconds=1))
    )
    session.commit()


def test_expired_guest_cannot_enqueue(engine, session: Session) -> None:
    guest = make_user(session, guest=True, credits=100)
    wf = make_workflow(session, guest, definition=json_definition(1), publish=True)
    session.commit()
    prepare_execution(session=session, workflow_id=wf.id, user_id=guest.id)  # still valid
    session.commit()
    _expire_guest_session(session, guest.id)
    with pytest.raises(Conflict, match="guest session has expired"):
        prepare_execution(session=session, workflow_id=wf.id, user_id=guest.id)
    session.rollback()
    count = session.exec(
        select(sa.func.count())
        .select_from(WorkflowExecution)
        .where(WorkflowExecution.user_id == guest.id)
    ).one()
    assert count == 1


# ------------------------------------------------------------------- cost of an enqueue


def _statements(engine, fn) -> list[str]:
    seen: list[str] = []

    def on_exec(_conn, _cursor, statement, *_a: Any) -> None:
        seen.append(statement)

    sa.event.listen(engine, "before_cursor_execute", on_exec)
    try:
        fn()
    finally:
        sa.event.remove(engine, "before_cursor_execute", on_exec)
    return seen


# Statements of one enqueue and its commit, whatever the number of phases. PostgreSQL:
# one (the read of workflow, version, user, balance and guest session, the ownership of
# the credentials the version names, the rate-limit hit, the execution and its phases).
# SQLite: BEGIN IMMEDIATE, the read, the hit, the execution, the phases; and the user's
# credentials when the version names one.
ENQUEUE_STATEMENTS = {
    "postgresql": {1: 1, 40: 1, "credential": 1},
    "sqlite": {1: 5, 40: 5, "credential": 6},
}


def test_an_enqueue_costs_a_fixed_number_of_statements(engine, session: Session) -> None:
    from flowbuilder.platform.crud import credentials_crud

    user = make_user(session, credits=1000)
    workflows: dict[Any, Any] = {
        n: make_workflow(session, user, definition=json_definition(n), publish=True)
        for n in (1, 40)
    }
    # A version that names a credential: its ownership is checked in the same statement.
    cred = credentials_crud.create_credential(
        session=session, user_id=user.id, name="api", type="bearer_token", secret_value="tok-1"
    )
    node = {"id": "call", "type": "http_request", "inputs": {"url": "http://example.invalid/"}}
    workflows["credential"] = make_workflow(
        session,
        user,
        definition={
            "version": 1,
            "nodes": [{**node, "credential_id": str(cred.id)}],
            "edges": [],
        },
        publish=True,
    )
    session.commit()

    def enqueue(n: Any) -> None:
        prepare_execution(session=session, workflow_id=workflows[n].id, user_id=user.id)
        session.commit()

    for n in workflows:  # the first enqueue of a version reads and validates it
        enqueue(n)
    # The session's own engine (on SQLite the fixture's session has one).
    bind = session.get_bind()
    counts = {n: len(_statements(bind, lambda n=n: enqueue(n))) for n in workflows}
    assert counts == ENQUEUE_STATEMENTS[engine.dialect.name], counts
    phases = session.exec(
        select(sa.func.count())
        .select_from(ExecutionPhase)
        .join(WorkflowExecution, WorkflowExecution.id == ExecutionPhase.execution_id)
        .where(WorkflowExecution.workflow_id == workflows[40].id)
    ).one()
    assert phases == 40 * 2


def test_an_enqueue_on_postgresql_is_three_round_trips(settings, engine) -> None:
    """Counted on the wire (BEGIN, the enqueue's statement, COMMIT): no pool pre-ping,
    nothing per phase. Through the benchmarks' counting proxy."""
    if engine.dialect.name != "postgresql":
        pytest.skip("round trips on the PostgreSQL wire protocol")
    from benchmarks.pg_roundtrips import RoundTripProxy
    from flowbuilder.platform import db

    with RoundTripProxy() as proxy:
        proxied = db.make_engine(proxy.url_for(str(engine.url.render_as_string(False))))
        try:
            with Session(proxied, expire_on_commit=False) as s:
                user = make_user(s, credits=1000)
                workflows = [
                    make_workflow(s, user, definition=json_definition(n), publish=True)
                    for n in (1, 40)
                ]
                s.commit()
                # psycopg prepares a statement on its 5th run on a connection (one round
                # trip of its own): count the steady state.
                for _ in range(6):
                    for wf in workflows:
                        prepare_execution(session=s, workflow_id=wf.id, user_id=user.id)
                        s.commit()
                trips = []
                for wf in workflows:
                    before = proxy.round_trips
                    prepare_execution(session=s, workflow_id=wf.id, user_id=user.id)
                    s.commit()
                    trips.append(proxy.round_trips - before)
        finally:
            proxied.dispose()
    assert trips == [3, 3]


def test_a_republished_workflow_enqueues_its_new_version(engine, session: Session) -> None:
    """The version an enqueue expects is a hint: after a republish the new version runs,
    with its own phases (and the one after that takes the short path again)."""
    from flowbuilder.platform.crud import phase_crud

    user = make_user(session, credits=100)
    wf = make_workflow(session, user, definition=json_definition(1), publish=True)
    session.commit()
    first = prepare_execution(session=session, workflow_id=wf.id, user_id=user.id)
    session.commit()
    workflow_crud.update_workflow(
        session=session,
        workflow_id=wf.id,
        user_id=user.id,
        data=WorkflowUpdate(definition=json_definition(3)),
    )
    workflow_crud.publish_workflow(session=session, workflow_id=wf.id, user_id=user.id)
    session.commit()
    for _ in range(2):
        ex = prepare_execution(session=session, workflow_id=wf.id, user_id=user.id)
        session.commit()
        assert ex.workflow_version_id != first.workflow_version_id
        phases = phase_crud.list_phases(session=session, execution_id=ex.id, user_id=user.id)
        assert len(phases) == 3
    # Unpublished again: refused, on the short path's statement as on the first one.
    workflow_crud.update_workflow(
        session=session,
        workflow_id=wf.id,
        user_id=user.id,
        data=WorkflowUpdate(definition=json_definition(2)),
    )
    session.commit()
    with pytest.raises(Conflict, match="not published"):
        prepare_execution(session=session, workflow_id=wf.id, user_id=user.id)
    session.rollback()


def test_phase_rows_keep_node_ids_exactly(engine, session: Session) -> None:
    """Node ids reach the phase rows as they are, whatever characters they hold (the
    PostgreSQL write passes them as array literals)."""
    from flowbuilder.platform.crud import phase_crud

    odd = ['a"b', "c\\d", "e,f", "{g}", "h i", "NULL", "é"]
    definition = {
        "version": 1,
        "nodes": [{"id": node_id, "type": "delay", "inputs": {"seconds": 0}} for node_id in odd],
        "edges": [],
    }
    user = make_user(session, credits=100)
    wf = make_workflow(session, user, definition=definition, publish=True)
    session.commit()
    for _ in range(2):  # the first enqueue of the version, then the one-statement path
        ex = prepare_execution(session=session, workflow_id=wf.id, user_id=user.id)
        session.commit()
        phases = phase_crud.list_phases(session=session, execution_id=ex.id, user_id=user.id)
        assert sorted(p.node_id for p in phases) == sorted(odd)
        assert {p.node_type for p in phases} == {"delay"}


def test_refusals_count_a_rate_limit_hit_as_before(engine, session: Session) -> None:
    """Once the workflow's version is known (the one-statement path), a refused enqueue
    touches the rate-limit counter exactly as the step-by-step checks do: not at all when
    refused before the rate limit (expired guest, unpublished), one hit when refused after
    it (credits), undone with the caller's rollback."""
    from flowbuilder.platform.crud import balance_crud
    from flowbuilder.platform.engine.enqueue import enqueue_limit_key
    from flowbuilder.platform.errors import InsufficientCredits
    from flowbuilder.platform.models import RateLimitEntry

    guest = make_user(session, guest=True, credits=2)
    wf = make_workflow(session, guest, definition=json_definition(1), publish=True)
    session.commit()

    def count() -> int:
        found = session.exec(
            select(RateLimitEntry.count).where(RateLimitEntry.key == enqueue_limit_key(guest.id))
        ).first()
        return found or 0

    with override_settings(RATE_LIMIT_WINDOW_SECONDS=86400):
        prepare_execution(session=session, workflow_id=wf.id, user_id=guest.id)
        session.commit()
        assert count() == 1
        balance_crud.debit_credits(session=session, user_id=guest.id, amount=2, idempotency_key="d")
        session.commit()
        with pytest.raises(InsufficientCredits):
            prepare_execution(session=session, workflow_id=wf.id, user_id=guest.id)
        assert count() == 2  # counted, as the step-by-step checks always did ...
        session.rollback()
        assert count() == 1  # ... and undone with the transaction
        _expire_guest_session(session, guest.id)
        with pytest.raises(Conflict, match="guest session has expired"):
            prepare_execution(session=session, workflow_id=wf.id, user_id=guest.id)
        assert count() == 1
        session.rollback()


def test_concurrent_enqueues_never_pass_the_rate_limit(engine, session: Session) -> None:
    """Enqueues racing on the one-statement path: exactly the limit's worth succeed."""
    import threading

    from flowbuilder.platform import db
    from flowbuilder.platform.errors import RateLimited

    if engine.dialect.name != "postgresql":
        pytest.skip("concurrent writers (SQLite serialises them on its write lock)")
    user = make_user(session, credits=1000)
    wf = make_workflow(session, user, definition=json_definition(3), publish=True)
    session.commit()
    outcomes: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)
    with override_settings(RATE_LIMIT_USER=4, RATE_LIMIT_WINDOW_SECONDS=86400):
        with db.unit_of_work(engine) as first:  # the version is known from here on
            prepare_execution(session=first, workflow_id=wf.id, user_id=user.id)

        def enqueue() -> None:
            barrier.wait()
            try:
                with db.unit_of_work(engine) as own:
                    prepare_execution(session=own, workflow_id=wf.id, user_id=user.id)
                result = "ok"
            except RateLimited:
                result = "limited"
            with lock:
                outcomes.append(result)

        threads = [threading.Thread(target=enqueue) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert sorted(outcomes) == ["limited"] * 5 + ["ok"] * 3
    executions = execution_crud.list_executions_for_user(session=session, user_id=user.id)
    assert len(executions) == 4
