"""Workflows, versions, executions, phases, logs and rate limits, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import threading
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlmodel import Session, select

from flowbuilder.platform import db
from flowbuilder.platform.crud import (
    execution_crud,
    log_crud,
    phase_crud,
    rate_limit_crud,
    workflow_crud,
)
from flowbuilder.platform.errors import (
    Conflict,
    InvalidTransition,
    NotFound,
    RateLimited,
    ValidationFailed,
)
from flowbuilder.platform.models import (
    ExecutionLog,
    ExecutionPhase,
    ExecutionStatus,
    LogLevel,
    PhaseStatus,
    RateLimitEntry,
    WorkflowCreate,
    WorkflowExecution,
    WorkflowStatus,
    WorkflowUpdate,
    WorkflowVersion,
    utcnow,
)
from flowbuilder.platform.settings import override_settings
from tests.factories import json_definition, make_user, make_workflow

# ------------------------------------------------------------------------------ workflows


def test_workflow_scoped_by_user(session: Session) -> None:
    alice, bob = make_user(session), make_user(session)
    wf = make_workflow(session, alice)
    session.commit()
    got = workflow_crud.get_workflow_by_id_and_user(
        session=session, workflow_id=wf.id, user_id=alice.id
    )
    assert got.id == wf.id
    with pytest.raises(NotFound) as other:
        workflow_crud.get_workflow_by_id_and_user(
            session=session, workflow_id=wf.id, user_id=bob.id
        )
    with pytest.raises(NotFound) as missing:
        workflow_crud.get_workflow_by_id_and_user(
            session=session, workflow_id=(missing_id := uuid.uuid4()), user_id=alice.id
        )
    # Another user's id gets the same answer as a missing id.
    assert str(other.value) == str(missing.value).replace(str(missing_id), str(wf.id))
    with pytest.raises(NotFound):
        workflow_crud.update_workflow(
            session=session, workflow_id=wf.id, user_id=bob.id, data=WorkflowUpdate(name="x")
        )
    with pytest.raises(NotFound):
        workflow_crud.delete_workflow(session=session, workflow_id=wf.id, user_id=bob.id)
    assert workflow_crud.list_workflows_for_user(session=session, user_id=bob.id) == []


def test_workflow_duplicate_name_conflict(session: Session) -> None:
    user = make_user(session)
    make_workflow(session, user, name="same")
    with pytest.raises(Conflict, match="same"):
        make_workflow(session, user, name="same")
    other = make_user(session)
    assert make_workflow(session, other, name="same").name == "same"


def test_workflow_bad_cron_or_timezone_refused(session: Session) -> None:
    user = make_user(session)
    with pytest.raises(ValidationFailed, match="cron"):
        workflow_crud.create_workflow(
            session=session, user_id=user.id, data=WorkflowCreate(name="w", cron="61 * * * *")
        )
    with pytest.raises(ValidationFailed, match="Mars/Olympus"):
        workflow_crud.create_workflow(
            session=session,
            user_id=user.id,
            data=WorkflowCreate(name="w", cron="0 9 * * *", timezone="Mars/Olympus"),
        )


def test_publish_writes_immutable_version_and_schedules(session: Session) -> None:
    user = make_user(session)
    wf = make_workflow(
        session, user, definition=json_definition(3), cron="0 9 * * *", timezone="Europe/Paris"
    )
    v1 = workflow_crud.publish_workflow(session=session, workflow_id=wf.id, user_id=user.id)
    session.commit()
    assert v1.version == 1 and wf.status == WorkflowStatus.PUBLISHED
    assert wf.credits_cost == v1.credits_cost > 0
    from flowbuilder.platform.plan import ExecutionPlan

    assert len(ExecutionPlan.from_dict(v1.plan).nodes) == 3
    # 09:00 in Paris is 07:00 or 08:00 UTC depending on DST.
    assert wf.next_run_at is not None and wf.next_run_at.tzinfo is not None
    assert wf.next_run_at.astimezone(UTC).hour in (7, 8)
    # Editing makes a draft; the published version stays as it was.
    workflow_crud.update_workflow(
        session=session,
        workflow_id=wf.id,
        user_id=user.id,
        data=WorkflowUpdate(definition=json_definition(1)),
    )
    v2 = workflow_crud.publish_workflow(session=session, workflow_id=wf.id, user_id=user.id)
    session.commit()
    assert v2.version == 2
    session.expire_all()
    assert len(session.get(WorkflowVersion, v1.id).definition["nodes"]) == 3
    assert workflow_crud.get_published_version(session=session, workflow=wf).id == v2.id


def test_publish_invalid_definition_refused(session: Session) -> None:
    user = make_user(session)
    wf = make_workflow(session, user, definition={"version": 1, "nodes": [], "edges": []})
    with pytest.raises(ValidationFailed):
        workflow_crud.publish_workflow(session=session, workflow_id=wf.id, user_id=user.id)
    assert wf.status == WorkflowStatus.DRAFT
    assert session.exec(select(WorkflowVersion)).all() == []


def test_due_workflows(session: Session) -> None:
    user = make_user(session)
    due = make_workflow(session, user, definition=json_definition(), cron="*/5 * * * *")
    later = make_workflow(session, user, definition=json_definition(), cron="*/5 * * * *")
    draft = make_workflow(session, user, definition=json_definition(), cron="*/5 * * * *")
    for wf in (due, later):
        workflow_crud.publish_workflow(session=session, workflow_id=wf.id, user_id=user.id)
    now = utcnow()
    due.next_run_at = now - timedelta(minutes=1)
    later.next_run_at = now + timedelta(minutes=4)
    draft.next_run_at = now - timedelta(minutes=1)
    session.commit()
    found = workflow_crud.get_due_workflows(session=session, now=now)
    assert [w.id for w in found] == [due.id]
    workflow_crud.mark_workflow_run(session=session, workflow=due, now=now)
    session.commit()
    assert due.last_run_at == now and due.next_run_at > now
    assert workflow_crud.get_due_workflows(session=session, now=now) == []


def test_delete_workflow_keeps_execution_record(session: Session) -> None:
    user = make_user(session)
    wf = make_workflow(session, user, definition=json_definition(), publish=True)
    version = workflow_crud.get_published_version(session=session, workflow=wf)
    ex = execution_crud.create_execution(
        session=session, user_id=user.id, workflow_id=wf.id, workflow_version_id=version.id
    )
    phase_crud.create_phases(session=session, execution=ex, planned=_planned(2))
    session.commit()
    workflow_crud.delete_workflow(session=session, workflow_id=wf.id, user_id=user.id)
    session.commit()
    session.expire_all()
    kept = session.get(WorkflowExecution, ex.id)
    assert kept is not None and kept.workflow_id is None
    assert len(phase_crud.list_phases(session=session, execution_id=ex.id, user_id=user.id)) == 2


# ------------------------------------------------------------------------------ executions


class _Planned:
    def __init__(self, i: int) -> None:
        self.node_id, self.node_type, self.number, self.credits = f"n{i}", "delay", i + 1, 1


def _planned(n: int) -> list[_Planned]:
    return [_Planned(i) for i in range(n)]


def _execution(session: Session, user) -> WorkflowExecution:
    return execution_crud.create_execution(
        session=session, user_id=user.id, workflow_id=None, workflow_version_id=None
    )


def test_execution_scoping_and_pagination(session: Session) -> None:
    alice, bob = make_user(session), make_user(session)
    base = utcnow()
    made = []
    for i in range(5):
        ex = _execution(session, alice)
        ex.created_at = base + timedelta(seconds=i)
        made.append(ex)
    _execution(session, bob)
    session.commit()
    page1 = execution_crud.list_executions_for_user(session=session, user_id=alice.id, limit=2)
    page2 = execution_crud.list_executions_for_user(
        session=session, user_id=alice.id, limit=2, offset=2
    )
    assert [e.id for e in page1 + page2] == [e.id for e in reversed(made)][:4]
    with pytest.raises(NotFound):
        execution_crud.get_execution_by_id_and_user(
            session=session, execution_id=made[0].id, user_id=bob.id
        )
    with pytest.raises(NotFound):
        execution_crud.update_execution_status(
            session=session,
            execution_id=made[0].id,
            user_id=bob.id,
            status=ExecutionStatus.CANCELLED,
        )


def test_execution_transitions_checked(session: Session) -> None:
    user = make_user(session)
    ex = _execution(session, user)
    execution_crud.update_execution_status(
        session=session, execution_id=ex.id, status=ExecutionStatus.RUNNING
    )
    done = execution_crud.update_execution_status(
        session=session, execution_id=ex.id, status=ExecutionStatus.COMPLETED
    )
    assert done.completed_at is not None and done.duration_ms is not None
    with pytest.raises(InvalidTransition, match="completed to running"):
        execution_crud.update_execution_status(
            session=session, execution_id=ex.id, status=ExecutionStatus.RUNNING
        )


def test_cancel_pending_is_immediate(session: Session) -> None:
    user = make_user(session)
    ex = _execution(session, user)
    execution_crud.request_cancel(session=session, execution_id=ex.id, user_id=user.id)
    assert ex.status == ExecutionStatus.CANCELLED and ex.cancel_requested
    with pytest.raises(InvalidTransition):
        execution_crud.request_cancel(session=session, execution_id=ex.id, user_id=user.id)


def test_lease_exclusive_until_expiry(session: Session) -> None:
    user = make_user(session)
    ex = _execution(session, user)
    session.commit()
    now = utcnow()
    kw = dict(session=session, execution_id=ex.id, lease_seconds=10)
    assert execution_crud.acquire_lease(owner="a", now=now, **kw)
    assert not execution_crud.acquire_lease(owner="b", now=now, **kw)
    assert execution_crud.acquire_lease(owner="b", now=now + timedelta(seconds=11), **kw)
    execution_crud.update_execution_status(
        session=session, execution_id=ex.id, status=ExecutionStatus.RUNNING
    )
    session.commit()
    held, cancel = execution_crud.renew_lease(
        session=session, execution_id=ex.id, owner="a", lease_seconds=10
    )
    assert not held
    held, cancel = execution_crud.renew_lease(
        session=session, execution_id=ex.id, owner="b", lease_seconds=10
    )
    assert held and not cancel


def test_stale_executions_found_for_the_sweep(session: Session) -> None:
    user = make_user(session)
    now = utcnow()
    due = _execution(session, user)
    execution_crud.mark_sent(execution=due, resend_after_seconds=-60, now=now)
    later = _execution(session, user)
    execution_crud.mark_sent(execution=later, resend_after_seconds=60, now=now)
    # running, due, but its lease is live (a healthy long run): not lost
    live = _execution(session, user)
    execution_crud.mark_sent(execution=live, resend_after_seconds=-60, now=now)
    live.status, live.lease_owner = ExecutionStatus.RUNNING, "w"
    live.lease_expires_at = now + timedelta(seconds=30)
    # running, due, lease lapsed long ago (its worker died): lost
    dead = _execution(session, user)
    execution_crud.mark_sent(execution=dead, resend_after_seconds=-30, now=now)
    dead.status, dead.lease_owner = ExecutionStatus.RUNNING, "w"
    dead.lease_expires_at = now - timedelta(minutes=10)
    session.commit()
    stale = execution_crud.find_stale_executions(
        session=session, now=now, lapsed_before=now - timedelta(minutes=5)
    )
    assert [e.id for e in stale] == [due.id, dead.id]
    assert execution_crud.find_stale_executions(session=session, now=now, limit=1) == [due]


# ------------------------------------------------------------------------------ phases and logs


def test_phases_and_logs(session: Session) -> None:
    user, other = make_user(session), make_user(session)
    ex = _execution(session, user)
    phases = phase_crud.create_phases(session=session, execution=ex, planned=_planned(3))
    first = phases[0]
    phase_crud.update_phase(
        session=session, phase=first, status=PhaseStatus.RUNNING, inputs={"a": 1}
    )
    seq = log_crud.next_log_seq(session=session, execution_id=ex.id)
    now = utcnow()
    seq = log_crud.append_logs(
        session=session,
        execution_id=ex.id,
        phase_id=first.id,
        entries=[("info", "one", now), (LogLevel.ERROR, "two", now)],
        first_seq=seq,
    )
    assert seq == 3
    assert (
        log_crud.append_logs(
            session=session, execution_id=ex.id, phase_id=None, entries=[], first_seq=seq
        )
        == 3
    )
    phase_crud.update_phase(
        session=session, phase=first, status=PhaseStatus.COMPLETED, outputs={"b": 2}
    )
    with pytest.raises(InvalidTransition):
        phase_crud.update_phase(session=session, phase=first, status=PhaseStatus.RUNNING)
    closed = phase_crud.close_open_phases(
        session=session, execution_id=ex.id, status=PhaseStatus.CANCELLED
    )
    session.commit()
    assert closed == 2
    listed = phase_crud.list_phases(session=session, execution_id=ex.id, user_id=user.id)
    assert [p.status for p in listed] == [
        PhaseStatus.COMPLETED,
        PhaseStatus.CANCELLED,
        PhaseStatus.CANCELLED,
    ]
    logs = log_crud.list_logs(session=session, execution_id=ex.id, user_id=user.id)
    assert [(entry.seq, entry.message, entry.level) for entry in logs] == [
        (1, "one", LogLevel.INFO),
        (2, "two", LogLevel.ERROR),
    ]
    assert log_crud.list_logs(session=session, execution_id=ex.id, user_id=other.id) == []
    assert phase_crud.list_phases(session=session, execution_id=ex.id, user_id=other.id) == []
    with pytest.raises(NotFound):
        phase_crud.get_phase(session=session, phase_id=first.id, user_id=other.id)
    assert log_crud.next_log_seq(session=session, execution_id=ex.id) == 3
    assert session.exec(select(ExecutionLog)).all()[0].timestamp.tzinfo is not None


def test_naive_datetime_refused(session: Session) -> None:
    user = make_user(session)
    ex = _execution(session, user)
    ex.started_at = datetime(2026, 1, 1)  # noqa: DTZ001 - the point of the test
    with pytest.raises(Exception, match="naive datetime"):
        session.flush()


# ------------------------------------------------------------------------------ rate limits


def test_rate_limit_window(session: Session) -> None:
    now = datetime(2026, 1, 1, 12, 0, 30, tzinfo=UTC)
    kw = dict(session=session, key="user:1", limit=2, window_seconds=60)
    assert rate_limit_crud.hit(now=now, **kw) == 1
    assert rate_limit_crud.hit(now=now, **kw) == 2
    with pytest.raises(RateLimited) as info:
        rate_limit_crud.hit(now=now, **kw)
    assert info.value.retry_after == 30
    assert rate_limit_crud.hit(now=now + timedelta(seconds=30), **kw) == 1
    session.commit()
    removed = rate_limit_crud.purge_expired(session=session, before=now + timedelta(seconds=30))
    assert removed == 1


def test_rate_limit_concurrent_hits_counted_exactly(engine, session: Session) -> None:
    limit, callers = 15, 24
    allowed, refused, errors = [], [], []

    def call() -> None:
        try:
            with Session(engine) as s:
                rate_limit_crud.hit(session=s, key="k", limit=limit, window_seconds=3600)
                s.commit()
                allowed.append(1)
        except RateLimited:
            refused.append(1)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(allowed) == limit and len(refused) == callers - limit
    assert session.exec(select(RateLimitEntry.count)).one() == limit


# ------------------------------------------------------------------------------ async path


def test_async_session_runs_the_same_crud(settings, engine) -> None:
    """The API's async session calls the one sync implementation through run_sync."""

    async def scenario() -> tuple[str, int]:
        async with db.get_session() as s:
            user = await db.run_sync(s, make_user, credits=3)
            wf = await db.run_sync(
                s, workflow_crud.create_workflow, user_id=user.id, data=WorkflowCreate(name="a")
            )
        async with db.get_session() as s:
            got = await db.run_sync(
                s, workflow_crud.get_workflow_by_id_and_user, workflow_id=wf.id, user_id=user.id
            )
            from flowbuilder.platform.crud import balance_crud

            bal = await db.run_sync(s, balance_crud.get_balance, user_id=user.id)
        await db.get_async_engine().dispose()
        return got.name, bal

    assert asyncio.run(scenario()) == ("a", 3)


def test_unit_of_work_commits_or_rolls_back(settings, engine) -> None:
    with db.unit_of_work() as s:
        user = make_user(s)
    with pytest.raises(RuntimeError), db.unit_of_work() as s:
        make_workflow(s, user, name="rolled-back")
        raise RuntimeError("boom")
    with db.unit_of_work() as s:
        assert workflow_crud.list_workflows_for_user(session=s, user_id=user.id) == []
        assert s.get(ExecutionPhase, uuid.uuid4()) is None


def test_create_test_engine_and_session_has_the_schema() -> None:
    engine, session_factory = db.create_test_engine_and_session()
    with session_factory() as s:
        user = make_user(s, credits=2)
        s.commit()
        from flowbuilder.platform.crud import balance_crud

        assert balance_crud.get_balance(session=s, user_id=user.id) == 2
    engine.dispose()


# --------------------------------------------------------- draft size at every write (issue 11)


def _big_draft(size: int) -> dict:
    return {"version": 1, "nodes": [], "edges": [], "notes": "x" * size}


def test_oversized_draft_is_refused_at_create_and_nothing_is_stored(session: Session) -> None:
    user = make_user(session)
    session.commit()
    limit = 512 * 1024  # the default MAX_DEFINITION_BYTES, as at publish
    with pytest.raises(ValidationFailed, match="MAX_DEFINITION_BYTES"):
        workflow_crud.create_workflow(
            session=session,
            user_id=user.id,
            data=WorkflowCreate(name="huge", definition=_big_draft(limit + 1)),
        )
    session.rollback()
    assert workflow_crud.list_workflows_for_user(session=session, user_id=user.id) == []
    # Just under the limit is fine: drafts may be large, not unbounded.
    fits = _big_draft(limit - 200)
    workflow_crud.create_workflow(
        session=session, user_id=user.id, data=WorkflowCreate(name="fits", definition=fits)
    )
    session.commit()


def test_oversized_draft_is_refused_at_update_and_the_draft_is_kept(session: Session) -> None:
    user = make_user(session)
    workflow = make_workflow(session, user, definition=json_definition())
    session.commit()
    before = dict(workflow.definition)
    with override_settings(MAX_DEFINITION_BYTES=4096):
        with pytest.raises(ValidationFailed, match="larger than 4096 bytes"):
            workflow_crud.update_workflow(
                session=session,
                workflow_id=workflow.id,
                user_id=user.id,
                data=WorkflowUpdate(definition=_big_draft(5000)),
            )
        # Multi-byte text counts in bytes: 2,000 characters of 3 bytes each exceed 4 KiB.
        with pytest.raises(ValidationFailed, match="larger than"):
            workflow_crud.update_workflow(
                session=session,
                workflow_id=workflow.id,
                user_id=user.id,
                data=WorkflowUpdate(definition={"notes": "€" * 2000}),
            )
    session.rollback()
    session.expire_all()
    assert (
        workflow_crud.get_workflow_by_id_and_user(
            session=session, workflow_id=workflow.id, user_id=user.id
        ).definition
        == before
    )


def test_draft_with_a_lone_surrogate_is_a_validation_error(session: Session) -> None:
    user = make_user(session)
    with pytest.raises(ValidationFailed, match="not valid Unicode"):
        workflow_crud.create_workflow(
            session=session,
            user_id=user.id,
            data=WorkflowCreate(name="bad", definition={"notes": "x\ud800"}),
        )


def test_the_engines_read_of_phases_is_what_the_orm_loads(engine, session: Session) -> None:
    """read_phases (and its batched form on psycopg) build detached objects from Core rows,
    without the ORM's query path: the same values and types as the ORM's, and objects that
    update, not insert, when a session takes them back."""
    import sqlalchemy as sa

    user = make_user(session)
    ex = _execution(session, user)
    phases = phase_crud.create_phases(session=session, execution=ex, planned=_planned(3))
    phase_crud.update_phase(
        session=session, phase=phases[0], status=PhaseStatus.RUNNING, inputs={"z": 1, "a": [2]}
    )
    phase_crud.update_phase(
        session=session, phase=phases[0], status=PhaseStatus.COMPLETED, outputs={"b": None}
    )
    session.commit()
    expected = phase_crud.list_phases(session=session, execution_id=ex.id, user_id=user.id)
    columns = [column.key for column in ExecutionPhase.__table__.c]

    def values(items: list) -> list[dict]:
        return [{key: getattr(item, key) for key in columns} for item in items]

    with Session(engine) as s:
        read = phase_crud.read_phases(session=s, execution_id=ex.id)
    assert values(read) == values(expected)
    assert read[0].status is PhaseStatus.COMPLETED and read[0].started_at.tzinfo is not None
    if engine.dialect.driver == "psycopg":
        with engine.connect() as conn:
            driver = conn.connection.driver_connection
            with driver.pipeline():
                answer = phase_crud.send_read_phases(connection=conn, execution_id=ex.id)
            batched = answer()
        assert values(batched) == values(expected)
        assert batched[0].status is PhaseStatus.COMPLETED
        assert batched[0].completed_at.tzinfo is not None
    # Detached, not new: taken back by a session, a change is an UPDATE of that row.
    assert sa.inspect(read[1]).detached
    with Session(engine) as s:
        phase = s.merge(read[1], load=False)
        phase.error = "changed"
        s.commit()
    session.rollback()  # a fresh snapshot (SQLite keeps a read transaction's view)
    session.expire_all()
    assert session.get(ExecutionPhase, read[1].id).error == "changed"
    assert len(phase_crud.list_phases(session=session, execution_id=ex.id, user_id=user.id)) == 3
