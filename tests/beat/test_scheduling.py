"""Cron fires in batches (flowbuilder.platform.scheduling) on SQLite and PostgreSQL, with
"now" injected: exactly once per fire time, skipped runs with their reason, missed-fire
policies, the same rules as a manual run, DST in two zones, a constant statement count."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa
from sqlmodel import Session, select

from flowbuilder.platform.models import (
    ExecutionPhase,
    ExecutionStatus,
    RateLimitEntry,
    TriggerType,
    Workflow,
    WorkflowExecution,
    WorkflowVersion,
)
from flowbuilder.platform.scheduling import fire_due
from flowbuilder.platform.settings import override_settings
from tests.factories import json_definition, make_user, make_workflow


def _at(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def _cron_workflow(session: Session, user: Any, cron: str = "*/5 * * * *", **kw: Any) -> Workflow:
    wf = make_workflow(session, user, definition=json_definition(2), publish=True, cron=cron, **kw)
    return wf


def _set_next(session: Session, wf: Workflow, at: datetime) -> None:
    wf.next_run_at = at
    session.add(wf)
    session.flush()


def _executions(session: Session, wf: Workflow) -> list[WorkflowExecution]:
    session.expire_all()
    return list(
        session.exec(
            select(WorkflowExecution)
            .where(WorkflowExecution.workflow_id == wf.id)
            .order_by(WorkflowExecution.scheduled_for)
        )
    )


def test_a_fire_records_a_pending_cron_execution_with_its_phases_once(
    session: Session,
) -> None:
    user = make_user(session, credits=100)
    wf = _cron_workflow(session, user)
    fire_time = _at(2026, 11, 26, 10, 5)
    _set_next(session, wf, fire_time)
    session.commit()

    now = fire_time + timedelta(seconds=1)
    outcome = fire_due(session=session, now=now)
    session.commit()
    assert outcome.fired == 1 and outcome.skipped == 0
    [execution] = _executions(session, wf)
    assert execution.status == ExecutionStatus.PENDING
    assert execution.trigger == TriggerType.CRON
    assert execution.scheduled_for == fire_time
    assert execution.user_id == user.id
    # With the run's worst case (two JSON nodes of 10 s, each with its grace): its queue.
    assert outcome.to_send == [(execution.id, execution.correlation_id, 21.0)]
    phases = session.exec(
        select(ExecutionPhase).where(ExecutionPhase.execution_id == execution.id)
    ).all()
    assert len(phases) == 2
    session.refresh(wf)
    assert wf.next_run_at == _at(2026, 11, 26, 10, 10)
    assert wf.last_run_at == now
    assert outcome.next_runs == {wf.id: _at(2026, 11, 26, 10, 10)}

    # Nothing more is due at the same instant.
    assert fire_due(session=session, now=now).fired == 0
    # A beat that comes back with the same fire time (restart mid-tick, a second beat
    # that read the row before the first committed) inserts nothing and sends nothing.
    _set_next(session, wf, fire_time)
    session.commit()
    again = fire_due(session=session, now=now)
    session.commit()
    assert again.fired == 0 and again.duplicates == 1 and again.to_send == []
    assert len(_executions(session, wf)) == 1


def test_the_database_refuses_a_second_execution_for_the_same_fire_time(
    session: Session,
) -> None:
    user = make_user(session, credits=100)
    wf = _cron_workflow(session, user)
    fire_time = _at(2026, 11, 26, 10, 5)
    for _ in range(2):
        session.add(
            WorkflowExecution(
                user_id=user.id,
                workflow_id=wf.id,
                trigger=TriggerType.CRON,
                scheduled_for=fire_time,
            )
        )
    with pytest.raises(sa.exc.IntegrityError):
        session.flush()
    session.rollback()


def test_no_credits_records_a_skipped_run_with_the_reason(session: Session) -> None:
    user = make_user(session, credits=0)
    wf = _cron_workflow(session, user)
    _set_next(session, wf, _at(2026, 11, 26, 10, 5))
    session.commit()

    outcome = fire_due(session=session, now=_at(2026, 11, 26, 10, 5, 2))
    session.commit()
    assert outcome.fired == 0 and outcome.skipped == 1 and outcome.to_send == []
    [execution] = _executions(session, wf)
    assert execution.status == ExecutionStatus.SKIPPED
    assert "insufficient credits" in execution.error.lower(), execution.error
    assert execution.completed_at is not None
    session.refresh(wf)
    # The schedule moves on; the workflow did not run.
    assert wf.next_run_at == _at(2026, 11, 26, 10, 10)
    assert wf.last_run_at is None
    # No rate-limit slot used by a refused fire.
    assert session.exec(select(RateLimitEntry)).all() == [] or all(
        e.count == 0 for e in session.exec(select(RateLimitEntry))
    )


def test_rate_limit_is_shared_with_manual_runs_and_skips_the_excess(session: Session) -> None:
    user = make_user(session, credits=100)
    wfs = [_cron_workflow(session, user) for _ in range(3)]
    for wf in wfs:
        _set_next(session, wf, _at(2026, 11, 26, 10, 5))
    session.commit()
    with override_settings(RATE_LIMIT_USER=2) as settings:
        outcome = fire_due(session=session, now=_at(2026, 11, 26, 10, 5, 1), settings=settings)
    session.commit()
    assert outcome.fired == 2 and outcome.skipped == 1
    statuses = sorted(ex.status.value for wf in wfs for ex in _executions(session, wf))
    assert statuses == ["pending", "pending", "skipped"]
    skipped = [ex for wf in wfs for ex in _executions(session, wf) if ex.error]
    assert "rate limit" in skipped[0].error.lower()
    [entry] = session.exec(select(RateLimitEntry)).all()
    assert entry.key == f"enqueue:{user.id}" and entry.count == 2


def test_a_definition_invalid_since_publishing_is_skipped(session: Session) -> None:
    user = make_user(session, credits=100)
    wf = _cron_workflow(session, user)
    version = session.exec(
        select(WorkflowVersion).where(WorkflowVersion.workflow_id == wf.id)
    ).one()
    version.definition = {"version": 1, "nodes": [{"id": "a", "type": "no_such_node"}]}
    session.add(version)
    _set_next(session, wf, _at(2026, 11, 26, 10, 5))
    session.commit()
    outcome = fire_due(session=session, now=_at(2026, 11, 26, 10, 5, 1))
    session.commit()
    [execution] = _executions(session, wf)
    assert outcome.skipped == 1
    assert execution.status == ExecutionStatus.SKIPPED
    assert execution.error.startswith("not runnable"), execution.error


def test_unpublished_and_deleted_workflows_do_not_fire(session: Session) -> None:
    from flowbuilder.platform.crud import workflow_crud
    from flowbuilder.platform.models import WorkflowStatus, WorkflowUpdate

    user = make_user(session, credits=100)
    off = _cron_workflow(session, user)
    gone = _cron_workflow(session, user)
    for wf in (off, gone):
        _set_next(session, wf, _at(2026, 11, 26, 10, 5))
    workflow_crud.update_workflow(
        session=session,
        workflow_id=off.id,
        user_id=user.id,
        data=WorkflowUpdate(status=WorkflowStatus.DISABLED),
    )
    gone_id = gone.id
    workflow_crud.delete_workflow(session=session, workflow_id=gone.id, user_id=user.id)
    session.commit()
    outcome = fire_due(
        session=session, now=_at(2026, 11, 26, 10, 5, 1), workflow_ids=[off.id, gone_id]
    )
    assert outcome.fired == 0
    # The caller learns they are not scheduled, to remove them from Redis.
    assert outcome.next_runs == {off.id: None, gone_id: None}


def test_missed_fires_run_once_and_are_listed(session: Session) -> None:
    user = make_user(session, credits=100)
    wf = _cron_workflow(session, user, cron="*/5 * * * *")
    _set_next(session, wf, _at(2026, 11, 26, 10, 0))
    session.commit()
    # Beat was down from before 10:00 until 10:22: 10:00, 10:05, 10:10, 10:15, 10:20.
    outcome = fire_due(session=session, now=_at(2026, 11, 26, 10, 22))
    session.commit()
    assert outcome.fired == 1
    [execution] = _executions(session, wf)
    assert execution.status == ExecutionStatus.PENDING
    assert execution.scheduled_for == _at(2026, 11, 26, 10, 20)
    assert execution.skipped_fire_times == [
        "2026-11-26T10:00:00Z",
        "2026-11-26T10:05:00Z",
        "2026-11-26T10:10:00Z",
        "2026-11-26T10:15:00Z",
    ]
    session.refresh(wf)
    assert wf.next_run_at == _at(2026, 11, 26, 10, 25)


def test_missed_fires_policy_skip_records_them_and_waits(session: Session) -> None:
    user = make_user(session, credits=100)
    wf = _cron_workflow(session, user, cron="*/5 * * * *")
    _set_next(session, wf, _at(2026, 11, 26, 10, 0))
    session.commit()
    with override_settings(BEAT_MISSED_FIRE_POLICY="skip") as settings:
        outcome = fire_due(session=session, now=_at(2026, 11, 26, 10, 12), settings=settings)
        session.commit()
        assert outcome.fired == 0 and outcome.skipped == 1
        [execution] = _executions(session, wf)
        assert execution.status == ExecutionStatus.SKIPPED
        assert execution.error.startswith("missed")
        assert execution.skipped_fire_times == [
            "2026-11-26T10:00:00Z",
            "2026-11-26T10:05:00Z",
            "2026-11-26T10:10:00Z",
        ]
        # A fire within the grace period is on time and runs under either policy.
        ok = fire_due(session=session, now=_at(2026, 11, 26, 10, 15, 30), settings=settings)
        session.commit()
    assert ok.fired == 1


def _utc(*stamps: str) -> list[datetime]:
    return [datetime.fromisoformat(f"2026-{s}:00+00:00") for s in stamps]


@pytest.mark.parametrize(
    ("zone", "cron", "start", "expected", "local"),
    [
        # Spring forward: 02:30 does not exist on the transition day; the daily run
        # happens once that day all the same, at 03:00 (the first instant after the gap).
        (
            "Europe/Paris",
            "30 2 * * *",
            _at(2026, 3, 27),
            _utc("03-27T01:30", "03-28T01:30", "03-29T01:00", "03-30T00:30"),
            ["02:30", "02:30", "03:00", "02:30"],
        ),
        (
            "America/New_York",
            "30 2 * * *",
            _at(2026, 3, 6),
            _utc("03-06T07:30", "03-07T07:30", "03-08T07:00", "03-09T06:30"),
            ["02:30", "02:30", "03:00", "02:30"],
        ),
        # Fall back: the wall-clock time happens twice; a fixed-hour schedule runs once,
        # at the first occurrence.
        (
            "Europe/Paris",
            "30 2 * * *",
            _at(2026, 10, 23),
            _utc("10-23T00:30", "10-24T00:30", "10-25T00:30", "10-26T01:30"),
            ["02:30"] * 4,
        ),
        (
            "America/New_York",
            "30 1 * * *",
            _at(2026, 10, 30),
            _utc("10-30T05:30", "10-31T05:30", "11-01T05:30", "11-02T06:30"),
            ["01:30"] * 4,
        ),
    ],
)
def test_dst_transitions_fire_once_a_day_at_local_time(
    session: Session,
    zone: str,
    cron: str,
    start: datetime,
    expected: list[datetime],
    local: list[str],
) -> None:
    """beat ticking at frozen times, exactly at each fire time and once more a minute
    after each (the repeated hour of a fall-back must not fire again)."""
    from flowbuilder.platform.cron import get_next_run_date

    user = make_user(session, credits=10_000)
    wf = _cron_workflow(session, user, cron=cron, timezone=zone)
    _set_next(session, wf, get_next_run_date(cron, timezone=zone, after=start))
    session.commit()
    fired = []
    for _ in range(4):
        session.refresh(wf)
        at = wf.next_run_at
        outcome = fire_due(session=session, now=at)
        session.commit()
        assert outcome.fired == 1
        fired.append(at)
        # One hour later (inside a repeated hour) nothing is due again.
        later = fire_due(session=session, now=at + timedelta(hours=1))
        session.commit()
        assert later.fired == 0 and later.duplicates == 0
    assert fired == expected
    tz = ZoneInfo(zone)
    assert [t.astimezone(tz).strftime("%H:%M") for t in fired] == local
    assert [e.scheduled_for for e in _executions(session, wf)] == expected


def test_statements_per_batch_do_not_grow_with_the_number_of_fires(
    session: Session,
) -> None:
    def count_for(n: int) -> int:
        users = [make_user(session, credits=100) for _ in range(max(1, n // 3))]
        wfs = [_cron_workflow(session, users[i % len(users)]) for i in range(n)]
        fire_time = _at(2026, 11, 26, 10, 5) + timedelta(hours=n)
        for wf in wfs:
            _set_next(session, wf, fire_time)
        session.commit()
        statements = []
        bind = session.get_bind()

        def _count(*_: Any) -> None:
            statements.append(1)

        sa.event.listen(bind, "before_cursor_execute", _count)
        try:
            outcome = fire_due(
                session=session,
                now=fire_time + timedelta(seconds=1),
                workflow_ids=[wf.id for wf in wfs],
            )
            session.flush()
        finally:
            sa.event.remove(bind, "before_cursor_execute", _count)
        session.commit()
        assert outcome.fired == n
        return len(statements)

    small, large = count_for(3), count_for(60)
    assert large == small, (small, large)


def test_scheduled_for_is_unique_per_workflow_but_manual_runs_are_free(
    session: Session,
) -> None:
    user = make_user(session, credits=100)
    wf = _cron_workflow(session, user)
    for _ in range(2):
        session.add(WorkflowExecution(user_id=user.id, workflow_id=wf.id))
    session.flush()  # NULL scheduled_for never collides
    session.rollback()
    assert uuid.UUID(str(wf.id))


def test_a_broken_schedule_is_skipped_without_blocking_the_batch(session: Session) -> None:
    user = make_user(session, credits=100)
    broken = _cron_workflow(session, user)
    fine = _cron_workflow(session, user)
    for wf in (broken, fine):
        _set_next(session, wf, _at(2026, 11, 26, 10, 5))
    session.commit()
    # A zone that no longer exists (edited by hand, or gone from tzdata).
    session.execute(
        sa.update(Workflow).where(Workflow.id == broken.id).values(timezone="Mars/Olympus")
    )
    session.commit()
    outcome = fire_due(session=session, now=_at(2026, 11, 26, 10, 5, 1))
    session.commit()
    assert outcome.fired == 1 and outcome.skipped == 1
    [skipped] = _executions(session, broken)
    assert skipped.status == ExecutionStatus.SKIPPED
    assert "Mars/Olympus" in skipped.error
    assert outcome.next_runs[broken.id] is None  # unscheduled until its owner fixes it
    assert _executions(session, fine)[0].status == ExecutionStatus.PENDING


def test_a_cron_execution_is_swept_like_a_manual_one_if_its_send_is_lost(
    session: Session,
) -> None:
    """A fire whose message never reaches SQS (beat killed between commit and send) is
    re-sent by the sweep, exactly as a manual run would be."""
    from flowbuilder.platform.crud import execution_crud
    from flowbuilder.platform.settings import get_settings

    user = make_user(session, credits=100)
    wf = _cron_workflow(session, user)
    fire_time = _at(2026, 11, 26, 10, 5)
    _set_next(session, wf, fire_time)
    session.commit()
    fire_due(session=session, now=fire_time + timedelta(seconds=1))
    session.commit()
    [execution] = _executions(session, wf)
    wait = get_settings().SWEEP_PENDING_AFTER_SECONDS
    assert execution.resend_after is not None
    soon = execution.created_at + timedelta(seconds=wait - 1)
    later = execution.created_at + timedelta(seconds=wait + 1)
    assert execution_crud.find_stale_executions(session=session, now=soon) == []
    found = execution_crud.find_stale_executions(session=session, now=later)
    assert [e.id for e in found] == [execution.id]
    session.rollback()


def test_an_expired_guest_gets_a_skipped_run_not_an_execution(session: Session) -> None:
    from flowbuilder.platform.models import GuestSession

    guest = make_user(session, credits=100, guest=True)
    wf = _cron_workflow(session, guest)
    fire_time = _at(2026, 11, 26, 10, 5)
    _set_next(session, wf, fire_time)
    session.commit()
    # Every session of the guest ends before the fire.
    session.execute(
        sa.update(GuestSession)
        .where(GuestSession.user_id == guest.id)
        .values(expires_at=fire_time - timedelta(minutes=1))
    )
    session.commit()
    outcome = fire_due(session=session, now=fire_time + timedelta(seconds=1))
    session.commit()
    assert outcome.fired == 0 and outcome.skipped == 1 and outcome.to_send == []
    [execution] = _executions(session, wf)
    assert execution.status == ExecutionStatus.SKIPPED
    assert "guest session has expired" in execution.error
