"""A run's message may reach a worker before its enqueue commits (PostgreSQL).

``prepare_execution`` writes the execution under an advisory lock that its transaction
holds until it ends, and tells the caller (``on_written``) so the task layer can start
the SQS send while the caller commits. A worker that finds no row waits for that lock:
it runs the execution once it is committed, and drops the message if it never is. On
SQLite nothing of this applies (the message is sent after the commit).
"""

from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest
import structlog
from sqlmodel import Session

from flowbuilder.platform import db
from flowbuilder.platform.engine import Outcome, Written, prepare_execution, run_execution
from flowbuilder.platform.engine import run as engine_run
from flowbuilder.platform.engine.enqueue import ENQUEUE_LOCK_CLASS, enqueue_lock
from flowbuilder.platform.models import ExecutionStatus, WorkflowExecution
from tests.factories import json_definition, make_user, make_workflow


@pytest.fixture
def pg(session: Session) -> Session:
    if session.get_bind().dialect.name != "postgresql":
        pytest.skip("the enqueue lock is PostgreSQL's (SQLite sends after the commit)")
    return session


def _published(session: Session) -> tuple[Any, Any]:
    user = make_user(session, credits=10)
    wf = make_workflow(session, user, definition=json_definition(2), publish=True)
    session.commit()
    return user, wf


def _prepare(session: Session, user: Any, wf: Any) -> tuple[WorkflowExecution, list[uuid.UUID]]:
    written: list[Written] = []
    ex = prepare_execution(
        session=session, workflow_id=wf.id, user_id=user.id, on_written=written.append
    )
    assert all(w.locked for w in written)
    return ex, [w.execution_id for w in written]


def _run_in_thread(execution_id: uuid.UUID) -> tuple[threading.Thread, list[Any]]:
    results: list[Any] = []
    thread = threading.Thread(
        target=lambda: results.append(run_execution(execution_id, owner="early-worker")),
        daemon=True,
    )
    thread.start()
    return thread, results


def _lock_holders(execution_id: uuid.UUID) -> int:
    lock_class, lock_key = enqueue_lock(execution_id)
    with db.get_engine().connect() as conn:
        return conn.exec_driver_sql(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND classid::int = %(c)s AND objid::int = %(k)s AND objsubid = 2",
            {"c": lock_class, "k": lock_key},
        ).scalar_one()


def test_the_enqueue_transaction_holds_the_lock_until_it_ends(pg: Session) -> None:
    user, wf = _published(pg)
    for _ in range(2):  # the first enqueue of a version (two statements), then the one
        ex, written = _prepare(pg, user, wf)
        assert written == [ex.id]  # called once the rows are written
        assert enqueue_lock(ex.id)[0] == ENQUEUE_LOCK_CLASS
        assert _lock_holders(ex.id) == 1
        pg.commit()
        assert _lock_holders(ex.id) == 0


def test_a_refused_enqueue_does_not_call_on_written(pg: Session) -> None:
    user = make_user(pg, credits=0)  # the plan needs 2
    wf = make_workflow(pg, user, definition=json_definition(2), publish=True)
    pg.commit()
    written: list[Written] = []
    for _ in range(2):
        with pytest.raises(Exception, match="nsufficient"):
            prepare_execution(
                session=pg, workflow_id=wf.id, user_id=user.id, on_written=written.append
            )
        pg.rollback()
    assert written == []


def test_a_message_before_the_commit_runs_once_committed(pg: Session) -> None:
    user, wf = _published(pg)
    ex, _ = _prepare(pg, user, wf)
    thread, results = _run_in_thread(ex.id)
    # The worker found no row and is waiting on the enqueue's lock: not done, not missing.
    thread.join(1.0)
    assert thread.is_alive() and results == []
    pg.commit()
    thread.join(30)
    assert [r.outcome for r in results] == [Outcome.COMPLETED]
    pg.expire_all()
    done = pg.get(WorkflowExecution, ex.id)
    assert done.status == ExecutionStatus.COMPLETED and done.attempts == 1


def test_a_message_for_a_rolled_back_enqueue_is_dropped(pg: Session) -> None:
    user, wf = _published(pg)
    ex, _ = _prepare(pg, user, wf)
    execution_id = ex.id
    thread, results = _run_in_thread(execution_id)
    thread.join(0.5)
    assert thread.is_alive()
    pg.rollback()
    thread.join(30)
    assert [r.outcome for r in results] == [Outcome.MISSING]
    assert pg.get(WorkflowExecution, execution_id) is None


def test_a_rolled_back_savepoint_loses_its_execution_only(pg: Session) -> None:
    """The lock taken inside a SAVEPOINT goes with it; the outer transaction commits the
    rest, and the message finds no row."""
    user, wf = _published(pg)
    with pytest.raises(RuntimeError), pg.begin_nested():
        ex, written = _prepare(pg, user, wf)
        lost = ex.id
        raise RuntimeError("the caller's own error")
    assert written == [lost]
    kept, _ = _prepare(pg, user, wf)
    pg.commit()
    assert run_execution(lost, owner="w").outcome == Outcome.MISSING
    assert run_execution(kept.id, owner="w").outcome == Outcome.COMPLETED


def test_the_wait_is_bounded_and_the_run_stays_pending_for_the_sweep(
    pg: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine_run, "ENQUEUE_COMMIT_WAIT_SECONDS", 0.3)
    user, wf = _published(pg)
    ex, _ = _prepare(pg, user, wf)
    with structlog.testing.capture_logs() as logs:
        thread, results = _run_in_thread(ex.id)
        thread.join(30)
    assert [r.outcome for r in results] == [Outcome.MISSING]
    waited = [e for e in logs if e["event"] == "execution_not_committed"]
    assert len(waited) == 1 and waited[0]["waited_seconds"] >= 0.25
    pg.commit()
    pg.expire_all()
    row = pg.get(WorkflowExecution, ex.id)
    # Still pending with its re-send time: the sweep sends it again.
    assert row.status == ExecutionStatus.PENDING and row.resend_after is not None
    assert run_execution(ex.id, owner="sweep-resent").outcome == Outcome.COMPLETED


def test_sqlite_is_told_to_send_after_the_commit(session: Session) -> None:
    if session.get_bind().dialect.name != "sqlite":
        pytest.skip("SQLite's path")
    user, wf = _published(session)
    written: list[Written] = []
    ex = prepare_execution(
        session=session, workflow_id=wf.id, user_id=user.id, on_written=written.append
    )
    # Two nodes of 10 s at most each (and their grace).
    assert [(w.execution_id, w.locked, w.worst_case_seconds) for w in written] == [
        (ex.id, False, 21.0)
    ]
