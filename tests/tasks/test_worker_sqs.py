"""End to end: enqueue through the API's entry point, real Celery workers on SQS (moto's
server mode), real PostgreSQL."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from sqlmodel import Session, select

from flowbuilder.platform import db, sqs
from flowbuilder.platform.crud import balance_crud, log_crud, phase_crud
from flowbuilder.platform.errors import InsufficientCredits, RateLimited, ValidationFailed
from flowbuilder.platform.models import (
    BalanceTransaction,
    ExecutionStatus,
    LedgerKind,
    PhaseStatus,
    WorkflowExecution,
    WorkflowVersion,
)
from flowbuilder.platform.settings import override_settings
from flowbuilder.tasks import (
    cancel_execution,
    enqueue_execution,
    sweep_stale_executions,
    wait_for_sends,
)
from flowbuilder.tasks.app import EXECUTIONS_QUEUE, SHORT_EXECUTIONS_QUEUE, queue_name
from tests.factories import json_definition, make_user, make_workflow
from tests.tasks.conftest import execution_status, wait_done, wait_for

pytestmark = pytest.mark.integration


def _delays(*seconds: float) -> dict[str, Any]:
    """Delay nodes chained through their data passthrough: one phase each, in order."""
    nodes = [
        {"id": f"d{i}", "type": "delay", "inputs": {"seconds": s}} for i, s in enumerate(seconds)
    ]
    edges = [
        {"source": f"d{i - 1}", "sourceHandle": "data", "target": f"d{i}", "targetHandle": "data"}
        for i in range(1, len(seconds))
    ]
    return {"version": 1, "nodes": nodes, "edges": edges}


def _enqueue(session: Session, definition: dict[str, Any], credits: int = 50, **kw: Any):
    user = make_user(session, credits=credits)
    wf = make_workflow(session, user, definition=definition, publish=True)
    session.commit()
    ex = enqueue_execution(session, wf.id, user.id, **kw)
    session.commit()
    return user, wf, ex


def _debits(session: Session, user_id: uuid.UUID) -> list[BalanceTransaction]:
    session.rollback()
    return list(
        session.exec(
            select(BalanceTransaction).where(
                BalanceTransaction.user_id == user_id, BalanceTransaction.kind == LedgerKind.DEBIT
            )
        )
    )


def _queue_url(settings: Any, name: str = EXECUTIONS_QUEUE) -> str:
    return sqs.get_sqs_client().get_queue_url(QueueName=queue_name(settings, name))["QueueUrl"]


def _receive(settings: Any, name: str, count: int = 10) -> tuple[str, list[dict[str, Any]]]:
    """Wait for messages in the execution queue ``name``: (its URL, the messages)."""
    url = _queue_url(settings, name)
    return url, wait_for(lambda: sqs.receive_messages(url, max_number=count, wait_time=1), 10)


def _queue_of(settings: Any, execution_id: uuid.UUID) -> str:
    """The queue an execution's message was routed to, from its plan."""
    from flowbuilder.platform.plan import ExecutionPlan
    from flowbuilder.tasks.app import execution_queue_for

    with Session(db.get_engine()) as s:
        ex = s.get(WorkflowExecution, execution_id)
        version = s.get(WorkflowVersion, ex.workflow_version_id)
        plan = ExecutionPlan.from_dict(version.plan)
    return execution_queue_for(settings, plan.worst_case_seconds())


def test_ensure_queues_sets_visibility_and_redrive(worker_settings: Any) -> None:
    for name in (EXECUTIONS_QUEUE, SHORT_EXECUTIONS_QUEUE):
        attrs = sqs.queue_attributes(_queue_url(worker_settings, name))
        assert attrs["VisibilityTimeout"] == str(worker_settings.SQS_VISIBILITY_TIMEOUT)
        assert '"maxReceiveCount"' in attrs["RedrivePolicy"]
        # One dead-letter queue for both.
        assert queue_name(worker_settings, "executions-dlq") in attrs["RedrivePolicy"]


def test_message_carries_ids_only(worker_settings: Any, pg_session: Session) -> None:
    """No worker running: read the raw SQS message and check what it holds."""
    user, wf, ex = _enqueue(pg_session, json_definition(2), correlation_id="corr-raw")
    # Two JSON nodes (10 s at most each): a short run, in the short-run queue.
    url, messages = _receive(worker_settings, SHORT_EXECUTIONS_QUEUE)
    raw = " ".join(m["Body"] for m in messages)
    import base64

    decoded = " ".join(base64.b64decode(m["Body"]).decode() for m in messages)
    assert str(ex.id) in decoded
    for leak in ("add_property_to_json", "step0", str(user.id), "definition"):
        assert leak not in decoded and leak not in raw
    for m in messages:
        sqs.delete_message(url, m["ReceiptHandle"])


def test_end_to_end_multi_phase(celery_worker: Any, pg_session: Session) -> None:
    user, wf, ex = _enqueue(pg_session, json_definition(3), credits=10)
    done = wait_done(pg_session, ex.id)
    assert done.status == ExecutionStatus.COMPLETED, done.error
    phases = phase_crud.list_phases(session=pg_session, execution_id=ex.id, user_id=user.id)
    assert [p.status for p in phases] == [PhaseStatus.COMPLETED] * 3
    assert phases[-1].outputs["json"]["step2"] == 2
    assert done.credits_consumed == 3
    assert balance_crud.get_balance(session=pg_session, user_id=user.id) == 7
    assert len(_debits(pg_session, user.id)) == 3
    assert done.workflow_version_id is not None


def test_duplicate_delivery_of_one_message(
    spawn_worker: Any, worker_settings: Any, pg_session: Session
) -> None:
    """The very same SQS message body delivered twice, to two competing workers."""
    user, _, ex = _enqueue(pg_session, _delays(0.5, 0.5, 0.5), credits=10)
    url, (message,) = _receive(worker_settings, _queue_of(worker_settings, ex.id), count=1)
    sqs.delete_message(url, message["ReceiptHandle"])
    sqs.send_message(url, message["Body"])
    sqs.send_message(url, message["Body"])
    workers = [spawn_worker(), spawn_worker()]
    done = wait_done(pg_session, ex.id)
    assert done.status == ExecutionStatus.COMPLETED, done.error
    phases = phase_crud.list_phases(session=pg_session, execution_id=ex.id, user_id=user.id)
    assert [p.attempts for p in phases] == [1, 1, 1]
    assert len(_debits(pg_session, user.id)) == 3
    assert balance_crud.get_balance(session=pg_session, user_id=user.id) == 7

    # Both deliveries were consumed: one ran it, the other found it held or done.
    def both_seen() -> bool:
        events = [line.get("event") for w in workers for line in w.lines()]
        runs = events.count("execution_finished")
        skips = events.count("execution_skipped")
        return runs == 1 and skips >= 1

    wait_for(both_seen, 30)


def test_worker_killed_mid_run_is_resumed_without_double_debit(
    spawn_worker: Any, worker_settings: Any, pg_session: Session
) -> None:
    user, _, ex = _enqueue(pg_session, _delays(0.2, 3.0, 0.2), credits=10)
    first = spawn_worker()

    def second_phase_running() -> bool:
        pg_session.rollback()
        phases = phase_crud.list_phases(session=pg_session, execution_id=ex.id, user_id=user.id)
        return phases[1].status == PhaseStatus.RUNNING

    wait_for(second_phase_running, 30, interval=0.05)
    first.kill()  # SIGKILL: no cleanup, no ack, the lease is left to lapse
    assert execution_status(pg_session, ex.id).status == ExecutionStatus.RUNNING
    killed_at = time.monotonic()
    second = spawn_worker()
    done = wait_done(pg_session, ex.id, timeout=60)
    assert done.status == ExecutionStatus.COMPLETED, done.error
    # Redelivered by SQS after the visibility timeout, not before.
    assert time.monotonic() - killed_at > 2
    phases = phase_crud.list_phases(session=pg_session, execution_id=ex.id, user_id=user.id)
    assert [p.status for p in phases] == [PhaseStatus.COMPLETED] * 3
    # The completed phase was not re-run; the interrupted one was run again.
    assert [p.attempts for p in phases] == [1, 2, 1]
    assert len(_debits(pg_session, user.id)) == 3
    assert balance_crud.get_balance(session=pg_session, user_id=user.id) == 7
    assert balance_crud.ledger_total(session=pg_session, user_id=user.id) == 7
    assert any(line.get("event") == "execution_finished" for line in second.lines())


def test_logs_carry_ids_and_correlation_id(spawn_worker: Any, pg_session: Session) -> None:
    worker = spawn_worker()
    user, wf, ex = _enqueue(pg_session, json_definition(2), correlation_id="corr-123")
    wait_done(pg_session, ex.id)
    finished = wait_for(
        lambda: [x for x in worker.lines() if x.get("event") == "execution_finished"], 10
    )[0]
    assert finished["execution_id"] == str(ex.id)
    assert finished["workflow_id"] == str(wf.id)
    assert finished["user_id"] == str(user.id)
    assert finished["correlation_id"] == "corr-123"
    assert finished["outcome"] == "completed"


def test_cancel_running_execution(celery_worker: Any, pg_session: Session) -> None:
    user, _, ex = _enqueue(pg_session, _delays(1.0, 1.0, 1.0), credits=10)
    wait_for(
        lambda: execution_status(pg_session, ex.id).status == ExecutionStatus.RUNNING, 20, 0.05
    )
    cancel_execution(pg_session, ex.id, user.id)
    pg_session.commit()
    done = wait_done(pg_session, ex.id)
    assert done.status == ExecutionStatus.CANCELLED
    phases = phase_crud.list_phases(session=pg_session, execution_id=ex.id, user_id=user.id)
    assert phases[-1].status == PhaseStatus.CANCELLED
    charged = sum(p.credits_charged for p in phases)
    assert (
        charged < 3
        and balance_crud.get_balance(session=pg_session, user_id=user.id) == 10 - charged
    )


def test_execution_timeout_ends_failed(celery_worker: Any, pg_session: Session) -> None:
    user, _, ex = _enqueue(pg_session, _delays(2.5, 2.5, 2.5), credits=10)
    done = wait_done(pg_session, ex.id)
    assert done.status == ExecutionStatus.FAILED
    assert "timed out" in done.error


def test_insufficient_credits_refused_at_enqueue(worker_settings: Any, pg_session: Session) -> None:
    user = make_user(pg_session, credits=1)
    wf = make_workflow(pg_session, user, definition=json_definition(3), publish=True)
    pg_session.commit()
    with pytest.raises(InsufficientCredits):
        enqueue_execution(pg_session, wf.id, user.id)
    pg_session.rollback()
    assert pg_session.exec(select(WorkflowExecution)).all() == []


def test_bad_definition_refused_at_enqueue(worker_settings: Any, pg_session: Session) -> None:
    user = make_user(pg_session, credits=10)
    wf = make_workflow(pg_session, user, definition=json_definition(2), publish=True)
    pg_session.commit()
    from sqlalchemy import text

    pg_session.execute(
        text('update workflow_version set definition = \'{"version": 1, "nodes": []}\'')
    )
    pg_session.commit()
    with pytest.raises(ValidationFailed):
        enqueue_execution(pg_session, wf.id, user.id)
    pg_session.rollback()
    assert pg_session.exec(select(WorkflowExecution)).all() == []


def test_rate_limited_enqueue_sends_nothing(worker_settings: Any, pg_session: Session) -> None:
    # A day-long window: hits made across a minute boundary must not reset the count.
    with override_settings(RATE_LIMIT_USER=2, RATE_LIMIT_WINDOW_SECONDS=86400):
        user = make_user(pg_session, credits=100)
        wf = make_workflow(pg_session, user, definition=json_definition(1), publish=True)
        pg_session.commit()
        for _ in range(2):
            enqueue_execution(pg_session, wf.id, user.id)
            pg_session.commit()
        with pytest.raises(RateLimited):
            enqueue_execution(pg_session, wf.id, user.id)
        pg_session.rollback()
    assert len(pg_session.exec(select(WorkflowExecution)).all()) == 2


def test_send_failure_after_commit_is_recovered_by_the_sweep(
    celery_worker: Any, worker_settings: Any, pg_session: Session
) -> None:
    from flowbuilder.tasks import execution as tasks_execution

    original = tasks_execution.send_execution
    calls: list[Any] = []

    def broken(*args: Any, **kwargs: Any) -> None:
        calls.append(args)
        raise ConnectionError("broker unreachable")

    tasks_execution.send_execution = broken
    try:
        user, _, ex = _enqueue(pg_session, json_definition(1), credits=10)
        assert wait_for_sends(10)
    finally:
        tasks_execution.send_execution = original
    assert calls, "the send was attempted"
    time.sleep(2.5)
    assert execution_status(pg_session, ex.id).status == ExecutionStatus.PENDING
    assert sweep_stale_executions.apply().get() == 1
    done = wait_done(pg_session, ex.id)
    assert done.status == ExecutionStatus.COMPLETED


def test_concurrent_executions_never_overdraw(spawn_worker: Any, pg_session: Session) -> None:
    user = make_user(pg_session, credits=7)
    wf = make_workflow(pg_session, user, definition=json_definition(3), publish=True)
    pg_session.commit()
    ids = []
    for _ in range(3):  # each needs 3; 7 credits cover two runs and a third of one
        ids.append(enqueue_execution(pg_session, wf.id, user.id).id)
        pg_session.commit()
    spawn_worker()
    spawn_worker()
    finished = [wait_done(pg_session, i, timeout=60) for i in ids]
    statuses = sorted(e.status.value for e in finished)
    assert statuses == ["completed", "completed", "failed"]
    assert balance_crud.get_balance(session=pg_session, user_id=user.id) == 0
    assert len(_debits(pg_session, user.id)) == 7
    assert sum(e.credits_consumed for e in finished) == 7
    failed = next(e for e in finished if e.status == ExecutionStatus.FAILED)
    assert "insufficient credits" in failed.error
    logs = log_crud.list_logs(session=pg_session, execution_id=failed.id, user_id=user.id)
    assert isinstance(logs, list)


def _held_sends(
    monkeypatch: Any, session: Session, phases: int = 1
) -> tuple[Any, Any, Any, list[uuid.UUID], list[uuid.UUID]]:
    """A published workflow, and SQS sends held until the returned event is set: (user,
    workflow, that event, the ids whose send began, the ids whose send ended)."""
    import threading

    from flowbuilder.tasks import execution as tasks_execution

    user = make_user(session, credits=10)
    wf = make_workflow(session, user, definition=json_definition(phases), publish=True)
    session.commit()
    release = threading.Event()
    started: list[uuid.UUID] = []
    finished: list[uuid.UUID] = []
    original = tasks_execution.send_execution

    def held(execution_id: uuid.UUID, *args: Any, **kwargs: Any) -> None:
        started.append(execution_id)
        assert release.wait(30)
        original(execution_id, *args, **kwargs)
        finished.append(execution_id)

    monkeypatch.setattr(tasks_execution, "send_execution", held)
    return user, wf, release, started, finished


def test_api_async_session_enqueue_sends_while_committing(
    celery_worker: Any, pg_session: Session, monkeypatch: Any
) -> None:
    """The API's path: an async session, the one sync implementation through run_sync.
    With ENQUEUE_SEND_EARLY on PostgreSQL the send starts as soon as the rows are written
    (under the enqueue lock); the commit returns once the run is committed, without
    waiting for the send, and wait_for_sends() waits for it."""
    import asyncio

    from flowbuilder.platform import db
    from flowbuilder.tasks import wait_for_sends

    user, wf, release, started, finished = _held_sends(monkeypatch, pg_session, phases=2)
    seen_while_open: list[Any] = []

    async def scenario() -> uuid.UUID:
        async with db.get_session() as session:
            ex = await db.run_sync(session, enqueue_execution, workflow_id=wf.id, user_id=user.id)
            seen_while_open.append(list(session.sync_session.info.get("flowbuilder.early_sends")))
            seen_while_open.append(session.sync_session.info.get("flowbuilder.pending_sends"))
        # Committed, and the send (begun before the commit) is still held back.
        assert started == [ex.id] and finished == []
        assert wait_for_sends(0.2) is False
        await db.get_async_engine().dispose()
        return ex.id

    try:
        with override_settings(ENQUEUE_SEND_EARLY=True):
            execution_id = asyncio.run(scenario())
        with db.get_engine().connect() as other:  # committed before the send ended
            assert other.execute(
                sa.select(WorkflowExecution.status).where(WorkflowExecution.id == execution_id)
            ).all() == [(ExecutionStatus.PENDING,)]
        release.set()
        assert wait_for_sends(30) is True
    finally:
        release.set()
    assert finished == [execution_id]
    assert seen_while_open == [[execution_id], None]
    done = wait_done(pg_session, execution_id)
    assert done.status == ExecutionStatus.COMPLETED


def test_api_async_session_enqueue_sends_after_the_commit(
    celery_worker: Any, pg_session: Session, monkeypatch: Any
) -> None:
    """By default the send starts once the caller's transaction has committed, in the
    background: nothing is sent while the transaction is open (so no worker ever holds a
    message whose transaction may still roll back), and the commit does not wait for the
    send."""
    import asyncio

    from flowbuilder.tasks import wait_for_sends

    user, wf, release, started, finished = _held_sends(monkeypatch, pg_session, phases=2)
    seen_while_open: list[Any] = []

    async def scenario() -> uuid.UUID:
        async with db.get_session() as session:
            ex = await db.run_sync(session, enqueue_execution, workflow_id=wf.id, user_id=user.id)
            await asyncio.sleep(0.3)  # time enough for a send that had started early
            seen_while_open.append(list(started))
            pending = session.sync_session.info.get("flowbuilder.pending_sends") or []
            seen_while_open.append([p[0] for p in pending])
        # Committed; the send begins now, and is held back: the commit did not wait.
        wait_for(lambda: started == [ex.id], 10)
        assert finished == [] and wait_for_sends(0.2) is False
        await db.get_async_engine().dispose()
        return ex.id

    try:
        execution_id = asyncio.run(scenario())
        release.set()
        assert wait_for_sends(30) is True
    finally:
        release.set()
    assert finished == [execution_id]
    assert seen_while_open == [[], [execution_id]]
    assert wait_done(pg_session, execution_id).status == ExecutionStatus.COMPLETED


def _one_send_slot_and_held_sends(
    monkeypatch: Any, session: Session, slot_wait: float
) -> tuple[Any, Any, Any, list[uuid.UUID]]:
    """One send slot, waited for at most ``slot_wait`` seconds, and sends held until the
    returned event is set: (user, workflow, that event, the ids whose send began)."""
    import threading

    from flowbuilder.tasks import execution as tasks_execution

    monkeypatch.setattr(tasks_execution, "_slots", threading.BoundedSemaphore(1))
    monkeypatch.setattr(tasks_execution, "_SEND_SLOT_WAIT_SECONDS", slot_wait)
    user, wf, release, sent, _finished = _held_sends(monkeypatch, session)
    return user, wf, release, sent


def test_an_enqueue_never_waits_for_a_send_slot(
    celery_worker: Any, pg_session: Session, monkeypatch: Any
) -> None:
    """With every send slot taken (SQS hanging), an enqueue's commit still returns at once:
    its send waits for a slot in a background thread, never in the caller's (an async API
    commits in its event loop's thread). Here the only slot is released only after the
    second enqueue's commit has returned; its send then takes the freed slot."""
    from flowbuilder.tasks import execution as tasks_execution
    from flowbuilder.tasks import wait_for_sends

    user, wf, release, sent = _one_send_slot_and_held_sends(monkeypatch, pg_session, 30.0)
    try:
        first = enqueue_execution(pg_session, wf.id, user.id).id
        pg_session.commit()
        second = enqueue_execution(pg_session, wf.id, user.id).id
        pg_session.commit()  # would wait for the held slot (up to 30 s) if it waited here
        assert not release.is_set() and sent == [first]
        with db.get_engine().connect() as other:  # committed, its send still waiting
            assert other.execute(
                sa.select(WorkflowExecution.status).where(WorkflowExecution.id == second)
            ).all() == [(ExecutionStatus.PENDING,)]
        assert wait_for_sends(0.2) is False
        assert tasks_execution._waiters.wait_empty(0.2) is False  # the second, waiting
    finally:
        release.set()
    assert wait_for_sends(30) is True
    assert sent == [first, second]  # it got the freed slot: sent, not deferred
    assert wait_done(pg_session, first).status == ExecutionStatus.COMPLETED
    assert wait_done(pg_session, second).status == ExecutionStatus.COMPLETED


def test_sends_waiting_for_a_slot_keep_their_order(
    celery_worker: Any, pg_session: Session, monkeypatch: Any
) -> None:
    """A send that finds others waiting for a slot queues behind them, even when a slot
    has just freed: a newer run must not take it and leave an older one to time out
    (and wait for the sweep)."""
    import threading

    from flowbuilder.tasks import execution as tasks_execution
    from flowbuilder.tasks import wait_for_sends

    class LateWaker(threading.BoundedSemaphore):
        """Slots whose blocking waiter (the waiting thread) wakes a second late, as a busy
        machine may schedule it: the window in which a newer send could take its slot."""

        def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
            if blocking:
                time.sleep(1.0)
            return super().acquire(blocking, timeout)

    user, wf, release, sent = _one_send_slot_and_held_sends(monkeypatch, pg_session, 30.0)
    slots = LateWaker(2)
    monkeypatch.setattr(tasks_execution, "_slots", slots)
    assert slots.acquire(blocking=False)  # the test holds one slot, the first send the other
    try:
        first = enqueue_execution(pg_session, wf.id, user.id).id
        pg_session.commit()
        second = enqueue_execution(pg_session, wf.id, user.id).id
        pg_session.commit()  # waits for a slot
        assert tasks_execution._waiters.any()
        slots.release()  # a slot frees (the second's), while its waiter still sleeps
        third = enqueue_execution(pg_session, wf.id, user.id).id
        pg_session.commit()
        wait_for(lambda: len(sent) >= 2, 10)  # the second's send began (and is held)
        time.sleep(0.3)
        assert sent == [first, second]  # the third waits behind it: no slot is free
    finally:
        release.set()
    assert wait_for_sends(30) is True
    assert sent == [first, second, third]
    for execution_id in (first, second, third):
        assert wait_done(pg_session, execution_id).status == ExecutionStatus.COMPLETED


def test_sends_waiting_for_a_slot_are_bounded_and_the_rest_left_to_the_sweep(
    celery_worker: Any, worker_settings: Any, pg_session: Session, monkeypatch: Any
) -> None:
    """Bounds: with every send slot taken, a committed run's send waits for a slot a
    bounded time (here 0.3 s) and a bounded number wait (here 1); past either, its run is
    left pending, logged, and the sweep sends it. Nothing is lost, nobody waits forever."""
    from structlog.testing import capture_logs

    from flowbuilder.tasks import execution as tasks_execution
    from flowbuilder.tasks import wait_for_sends

    user, wf, release, sent = _one_send_slot_and_held_sends(monkeypatch, pg_session, 0.3)
    monkeypatch.setattr(tasks_execution, "_MAX_SENDS_WAITING", 1)
    try:
        first = enqueue_execution(pg_session, wf.id, user.id).id
        pg_session.commit()
        with capture_logs() as logs:
            second = enqueue_execution(pg_session, wf.id, user.id).id
            pg_session.commit()  # its send waits for a slot
            third = enqueue_execution(pg_session, wf.id, user.id).id
            pg_session.commit()  # one is waiting already: deferred at once
            assert tasks_execution._waiters.wait_empty(10) is True  # the second's wait ended
    finally:
        release.set()
    assert wait_for_sends(30) is True
    assert sent == [first]  # neither of the others had a slot
    deferred = {
        e["execution_id"]: e["reason"] for e in logs if e["event"] == "execution_send_deferred"
    }
    assert deferred == {
        str(third): "too many sends waiting for a slot",
        str(second): "no send slot freed in time",
    }
    assert wait_done(pg_session, first).status == ExecutionStatus.COMPLETED
    for execution_id in (second, third):
        assert execution_status(pg_session, execution_id).status == ExecutionStatus.PENDING
    time.sleep(2.5)  # past SWEEP_PENDING_AFTER_SECONDS
    assert sweep_stale_executions.apply().get() == 2
    assert wait_done(pg_session, second).status == ExecutionStatus.COMPLETED
    assert wait_done(pg_session, third).status == ExecutionStatus.COMPLETED
    assert balance_crud.get_balance(session=pg_session, user_id=user.id) == 7


def _queue_empty(settings: Any) -> bool:
    """Both execution queues hold nothing, visible or in flight."""
    for name in (EXECUTIONS_QUEUE, SHORT_EXECUTIONS_QUEUE):
        attrs = sqs.queue_attributes(_queue_url(settings, name))
        if attrs["ApproximateNumberOfMessages"] != "0":
            return False
        if attrs["ApproximateNumberOfMessagesNotVisible"] != "0":
            return False
    return True


@pytest.mark.parametrize("early", [False, True], ids=["after-commit", "send-early"])
def test_rolled_back_enqueue_never_runs(
    celery_worker: Any, worker_settings: Any, pg_session: Session, early: bool
) -> None:
    """By default nothing is sent. With ENQUEUE_SEND_EARLY its message is out already
    (sent while the transaction was open): the worker finds no row once the transaction
    has ended, and drops it. Nothing is recorded either way."""
    from flowbuilder.tasks import execution as tasks_execution

    user = make_user(pg_session, credits=10)
    wf = make_workflow(pg_session, user, definition=json_definition(1), publish=True)
    pg_session.commit()
    calls: list[Any] = []
    original = tasks_execution.send_execution

    def recording(*args: Any, **kwargs: Any) -> None:
        calls.append(args)
        original(*args, **kwargs)

    tasks_execution.send_execution = recording
    try:
        with override_settings(ENQUEUE_SEND_EARLY=early):
            execution_id = enqueue_execution(pg_session, wf.id, user.id).id
            time.sleep(1.0)  # sent early: the worker has the message and waits for the lock
            pg_session.rollback()
            pg_session.commit()  # a later commit must not send the rolled-back execution
            assert wait_for_sends(10)
    finally:
        tasks_execution.send_execution = original
    assert [c[0] for c in calls] == ([execution_id] if early else [])
    wait_for(lambda: _queue_empty(worker_settings), 15)  # received, dropped, deleted
    assert pg_session.exec(select(WorkflowExecution)).all() == []
    assert balance_crud.get_balance(session=pg_session, user_id=user.id) == 10


@pytest.mark.parametrize("early", [False, True], ids=["after-commit", "send-early"])
def test_enqueue_in_a_savepoint_runs_after_the_outer_commit(
    celery_worker: Any, worker_settings: Any, pg_session: Session, early: bool
) -> None:
    """Releasing a SAVEPOINT fires SQLAlchemy's after_commit too; only the outer commit
    makes the execution visible. Of two enqueues, each in a SAVEPOINT, the one whose
    SAVEPOINT is rolled back is never sent (sent early, the worker drops it); the other
    runs."""
    from flowbuilder.tasks import execution as tasks_execution

    user = make_user(pg_session, credits=10)
    wf = make_workflow(pg_session, user, definition=json_definition(1), publish=True)
    pg_session.commit()
    calls: list[Any] = []
    original = tasks_execution.send_execution

    def recording(*args: Any, **kwargs: Any) -> None:
        calls.append(args)
        original(*args, **kwargs)

    tasks_execution.send_execution = recording
    try:
        with override_settings(ENQUEUE_SEND_EARLY=early):
            with pytest.raises(RuntimeError), pg_session.begin_nested():
                lost = enqueue_execution(pg_session, wf.id, user.id).id
                raise RuntimeError("the caller's own error")
            with pg_session.begin_nested():
                kept = enqueue_execution(pg_session, wf.id, user.id).id
            time.sleep(0.5)
            with db.get_engine().connect() as other:  # not visible before the commit
                seen = other.execute(
                    sa.select(WorkflowExecution.id).where(WorkflowExecution.id == kept)
                ).all()
            assert seen == []
            assert len(calls) == (2 if early else 0)  # by default, nothing before the commit
            pg_session.commit()
            assert wait_for_sends(10)
    finally:
        tasks_execution.send_execution = original
    assert sorted(c[0] for c in calls) == sorted([lost, kept] if early else [kept])
    assert wait_done(pg_session, kept).status == ExecutionStatus.COMPLETED
    wait_for(lambda: _queue_empty(worker_settings), 15)
    assert [e.id for e in pg_session.exec(select(WorkflowExecution)).all()] == [kept]


def test_enqueues_in_rolled_back_savepoints_are_never_sent(
    pg_session: Session, monkeypatch: Any
) -> None:
    """Nested SAVEPOINTs: an enqueue in an inner SAVEPOINT released into an outer one that
    is then rolled back goes with it, and so does one in the outer SAVEPOINT itself; the
    enqueues outside, or in a SAVEPOINT released into the transaction, are sent after
    the commit."""
    from flowbuilder.tasks import execution as tasks_execution

    sent: list[uuid.UUID] = []
    monkeypatch.setattr(
        tasks_execution, "send_execution", lambda execution_id, *a, **k: sent.append(execution_id)
    )
    user = make_user(pg_session, credits=10)
    wf = make_workflow(pg_session, user, definition=json_definition(1), publish=True)
    pg_session.commit()
    first = enqueue_execution(pg_session, wf.id, user.id).id
    with pytest.raises(RuntimeError), pg_session.begin_nested():
        with pg_session.begin_nested():
            enqueue_execution(pg_session, wf.id, user.id)
        enqueue_execution(pg_session, wf.id, user.id)
        raise RuntimeError("the caller's own error")
    with pg_session.begin_nested():
        kept = enqueue_execution(pg_session, wf.id, user.id).id
    assert sent == []
    pg_session.commit()
    assert wait_for_sends(10)
    assert sorted(sent) == sorted([first, kept])
    stored = pg_session.exec(select(WorkflowExecution.id)).all()
    assert sorted(stored) == sorted([first, kept])


def test_redrive_policy_moves_a_poison_message_to_the_dead_letter_queue(
    worker_settings: Any,
) -> None:
    """A message received SQS_DLQ_MAX_RECEIVE_COUNT times without being deleted (a worker
    that keeps dying on it) lands in the dead-letter queue that ensure-queues set up."""
    from flowbuilder.platform.settings import override_settings

    prefix = f"redrive-{uuid.uuid4().hex[:6]}-"
    with override_settings(SQS_DLQ_MAX_RECEIVE_COUNT=2, SQS_VISIBILITY_TIMEOUT=10) as s:
        urls = sqs.ensure_queues(f"{prefix}work", f"{prefix}work-dlq", settings=s)
    work, dlq = urls[f"{prefix}work"], urls[f"{prefix}work-dlq"]
    client = sqs.get_sqs_client()
    sqs.send_message(work, "poison")
    for _ in range(2):
        got = sqs.receive_messages(work, max_number=1, wait_time=1)
        assert [m["Body"] for m in got] == ["poison"]
        # Make it visible again at once, as a lapsed visibility timeout would.
        client.change_message_visibility(
            QueueUrl=work, ReceiptHandle=got[0]["ReceiptHandle"], VisibilityTimeout=0
        )
    assert sqs.receive_messages(work, max_number=1, wait_time=1) == []
    dead = sqs.receive_messages(dlq, max_number=1, wait_time=1)
    assert [m["Body"] for m in dead] == ["poison"]


def test_acknowledged_messages_are_deleted_in_batches(
    spawn_worker: Any, worker_settings: Any, pg_session: Session
) -> None:
    """Acknowledgements leave the worker's loop as DeleteMessageBatch requests: every
    message of a burst is deleted (not merely invisible until its visibility timeout,
    which would deliver it again), and the worker says nothing about undeleted ones."""
    url = _queue_url(worker_settings)
    user = make_user(pg_session, credits=100)
    wf = make_workflow(pg_session, user, definition=json_definition(1), publish=True)
    pg_session.commit()
    ids = []
    for _ in range(14):  # more than one batch of 10
        ids.append(enqueue_execution(pg_session, wf.id, user.id).id)
        pg_session.commit()
    worker = spawn_worker()
    for execution_id in ids:
        assert wait_done(pg_session, execution_id).status == ExecutionStatus.COMPLETED

    def queue_empty() -> bool:
        attrs = sqs.queue_attributes(url)
        return (
            attrs["ApproximateNumberOfMessages"] == "0"
            and attrs["ApproximateNumberOfMessagesNotVisible"] == "0"
        )

    wait_for(queue_empty, 10)
    assert "sqs_ack_not_deleted" not in worker.text()
