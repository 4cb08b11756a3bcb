"""Beat's housekeeping (SQLite and PostgreSQL): expired guest sessions and ended
rate-limit windows go, live ones stay; execution-log retention is off unless set."""

from __future__ import annotations

from datetime import timedelta

from sqlmodel import Session, select

from flowbuilder.platform.crud import rate_limit_crud, user_crud
from flowbuilder.platform.housekeeping import run_housekeeping
from flowbuilder.platform.models import (
    ExecutionLog,
    GuestSession,
    RateLimitEntry,
    WorkflowExecution,
    utcnow,
)
from flowbuilder.platform.settings import override_settings
from tests.factories import make_user


def test_housekeeping_purges_only_what_expired(session: Session) -> None:
    now = utcnow()
    expired_user, expired_token = user_crud.create_guest(
        session=session, client_key="198.51.100.9", ttl_seconds=60
    )
    live_user, live_token = user_crud.create_guest(
        session=session, client_key="198.51.100.9", ttl_seconds=3600
    )
    expired = session.exec(
        select(GuestSession).where(GuestSession.user_id == expired_user.id)
    ).one()
    expired.expires_at = now - timedelta(seconds=1)
    # An hourly guest-creation window two hours old ended; the one that holds the guests
    # created above (the same hour) must survive, like the current enqueue window.
    for start in (now - timedelta(hours=3), now):
        rate_limit_crud.hit(
            session=session, key="enqueue:x", limit=10, window_seconds=60, now=start
        )
    user = make_user(session)
    execution = WorkflowExecution(user_id=user.id)
    session.add(execution)
    session.flush()
    session.add_all(
        [
            ExecutionLog(
                execution_id=execution.id, seq=1, message="old", timestamp=now - timedelta(days=40)
            ),
            ExecutionLog(execution_id=execution.id, seq=2, message="new", timestamp=now),
        ]
    )
    session.commit()

    report = run_housekeeping(session=session, now=now)
    session.commit()
    assert report.guest_sessions == 1 and report.rate_limit_entries == 1
    assert report.execution_logs == 0  # retention off by default
    sessions = session.exec(select(GuestSession)).all()
    assert [s.user_id for s in sessions] == [live_user.id]
    assert user_crud.resolve_guest_token(session=session, token=live_token).id == live_user.id
    windows = {w.key: w for w in session.exec(select(RateLimitEntry)).all()}
    assert windows.pop("enqueue:x").window_start == rate_limit_crud.window_start(now, 60)
    [guest_window] = windows.values()  # still counts the two guests created this hour
    assert guest_window.key.startswith("guest-create:") and guest_window.count == 2
    assert len(session.exec(select(ExecutionLog)).all()) == 2
    del expired_token

    with override_settings(EXECUTION_LOG_RETENTION_DAYS=30) as settings:
        report = run_housekeeping(session=session, now=now, settings=settings)
    session.commit()
    assert report.execution_logs == 1
    assert [log.message for log in session.exec(select(ExecutionLog))] == ["new"]
