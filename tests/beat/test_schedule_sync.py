"""The cron schedule in Redis follows every workflow change once it commits, and the
reconciliation restores it from the database (real Redis, SQLite and PostgreSQL)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import redis
from sqlmodel import Session

from flowbuilder.platform import cron_schedule
from flowbuilder.platform.crud import workflow_crud
from flowbuilder.platform.models import Workflow, WorkflowStatus, WorkflowUpdate
from tests.factories import json_definition, make_user, make_workflow


def _entries(client: redis.Redis, prefix: str) -> dict[str, float]:
    return dict(client.zrange(f"{prefix}flowbuilder:cron", 0, -1, withscores=True))


def _score(session: Session, wf: Workflow) -> float:
    session.refresh(wf)
    assert wf.next_run_at is not None
    return wf.next_run_at.timestamp()


def test_the_schedule_follows_every_workflow_change(
    beat_settings: Any, session: Session, redis_prefix: tuple[str, redis.Redis]
) -> None:
    prefix, client = redis_prefix
    # An hour at least one hour ahead, whenever the test runs: its :00 and :30 are then
    # both the next fires, 30 minutes apart (a fixed 09:00 was not, between 09:00 and
    # 09:30 UTC, when the next 09:00 is tomorrow's and the next 09:30 today's).
    hour = (datetime.now(UTC).hour + 2) % 24
    user = make_user(session, credits=10)
    wf = make_workflow(
        session, user, definition=json_definition(2), cron=f"0 {hour} * * *", timezone="UTC"
    )
    session.commit()
    assert _entries(client, prefix) == {}  # a draft is not scheduled
    wid = str(wf.id)

    workflow_crud.publish_workflow(session=session, workflow_id=wf.id, user_id=user.id)
    assert _entries(client, prefix) == {}  # nothing before the commit
    session.commit()
    assert _entries(client, prefix) == {wid: _score(session, wf)}

    def update(**changes: Any) -> None:
        workflow_crud.update_workflow(
            session=session, workflow_id=wf.id, user_id=user.id, data=WorkflowUpdate(**changes)
        )
        session.commit()

    before = _entries(client, prefix)[wid]
    update(cron=f"30 {hour} * * *")
    assert _entries(client, prefix)[wid] == _score(session, wf) == before + 1800
    update(timezone="Asia/Tokyo")  # UTC+9, no daylight saving time
    assert _entries(client, prefix)[wid] == _score(session, wf)
    assert wf.next_run_at.hour == (hour - 9) % 24 and wf.next_run_at.minute == 30

    # A rolled-back change never reaches Redis.
    workflow_crud.update_workflow(
        session=session, workflow_id=wf.id, user_id=user.id, data=WorkflowUpdate(cron="1 1 * * *")
    )
    session.rollback()
    assert _entries(client, prefix)[wid] == _score(session, wf)

    update(status=WorkflowStatus.DISABLED)
    assert _entries(client, prefix) == {}
    update(status=WorkflowStatus.PUBLISHED)
    assert _entries(client, prefix) == {wid: _score(session, wf)}
    update(cron=None)
    assert _entries(client, prefix) == {}
    update(cron="*/10 * * * *")
    assert _entries(client, prefix) == {wid: _score(session, wf)}

    workflow_crud.delete_workflow(session=session, workflow_id=wf.id, user_id=user.id)
    session.commit()
    assert _entries(client, prefix) == {}


def test_a_change_commits_when_redis_is_down_and_reconcile_repairs_it(
    beat_settings: Any, session: Session, redis_prefix: tuple[str, redis.Redis]
) -> None:
    from flowbuilder.platform.settings import override_settings

    prefix, client = redis_prefix
    user = make_user(session, credits=10)
    with override_settings(REDIS_URL="redis://127.0.0.1:1/0"):
        wf = make_workflow(
            session, user, definition=json_definition(2), publish=True, cron="* * * * *"
        )
        session.commit()  # does not raise; the failed update is logged
    assert _entries(client, prefix) == {}
    report = cron_schedule.reconcile(session=session)
    assert report.added == [str(wf.id)]
    assert _entries(client, prefix) == {str(wf.id): _score(session, wf)}


def test_reconcile_restores_a_wiped_schedule_and_removes_stale_entries(
    beat_settings: Any, session: Session, redis_prefix: tuple[str, redis.Redis]
) -> None:
    prefix, client = redis_prefix
    user = make_user(session, credits=10)
    wfs = [
        make_workflow(session, user, definition=json_definition(1), publish=True, cron=c)
        for c in ("* * * * *", "0 * * * *", "0 0 * * *")
    ]
    draft = make_workflow(session, user, definition=json_definition(1), cron="* * * * *")
    session.commit()
    truth = {str(wf.id): _score(session, wf) for wf in wfs}
    assert _entries(client, prefix) == truth

    client.delete(f"{prefix}flowbuilder:cron")  # a Redis restart without persistence
    stale = str(uuid.uuid4())
    client.zadd(f"{prefix}flowbuilder:cron", {stale: 1.0, str(wfs[0].id): 2.0})
    report = cron_schedule.reconcile(session=session)
    assert sorted(report.added) == sorted(str(wf.id) for wf in wfs[1:])
    assert report.updated == [str(wfs[0].id)]
    assert report.removed == [stale]
    assert _entries(client, prefix) == truth
    assert str(draft.id) not in _entries(client, prefix)
    # A second run finds nothing to do.
    assert cron_schedule.reconcile(session=session).changed == 0


def test_a_fire_does_not_overwrite_an_entry_changed_meanwhile(
    beat_settings: Any, redis_prefix: tuple[str, redis.Redis]
) -> None:
    from datetime import UTC, datetime

    prefix, client = redis_prefix
    key = f"{prefix}flowbuilder:cron"
    edited, untouched, deleted = (uuid.uuid4() for _ in range(3))
    client.zadd(key, {str(edited): 100.0, str(untouched): 100.0, str(deleted): 100.0})
    read = cron_schedule.due(datetime.fromtimestamp(150, UTC), 10, client=client)
    assert read == {edited: 100.0, untouched: 100.0, deleted: 100.0}
    # While the batch is recorded: one workflow is edited, another deleted.
    client.zadd(key, {str(edited): 500.0})
    client.zrem(key, str(deleted))
    later = datetime.fromtimestamp(200, UTC)
    changed = cron_schedule.apply_if_unchanged(
        {edited: later, untouched: later, deleted: later}, read, client=client
    )
    assert changed == 1
    assert _entries(client, prefix) == {str(edited): 500.0, str(untouched): 200.0}
