"""The task shell around the engine: time limits belong to the worker, a time limit is a
timeout, lease-held duplicates come back without touching the retry budget (issue 10,
items 7 and 8). Real SQS (moto's server) and PostgreSQL."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import timedelta
from typing import Any

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from sqlmodel import Session

from flowbuilder.platform import sqs
from flowbuilder.platform.engine import Outcome, prepare_execution, run_execution
from flowbuilder.platform.models import ExecutionStatus, WorkflowExecution, utcnow
from flowbuilder.platform.nodes import register_node_type, unregister_node_type
from flowbuilder.platform.nodes.base import NodeType, PortSpec
from flowbuilder.platform.settings import override_settings
from flowbuilder.tasks import execution as tasks_execution
from flowbuilder.tasks.app import EXECUTIONS_QUEUE, SHORT_EXECUTIONS_QUEUE, app, queue_name
from tests.factories import json_definition, make_user, make_workflow
from tests.tasks.conftest import execution_status

pytestmark = pytest.mark.integration


def _queue_url(settings: Any, name: str = EXECUTIONS_QUEUE) -> str:
    return sqs.get_sqs_client().get_queue_url(QueueName=queue_name(settings, name))["QueueUrl"]


def _drain(settings: Any) -> list[dict[str, Any]]:
    """Every message now in the execution queues (both), decoded, and deleted."""
    out = []
    for name in (EXECUTIONS_QUEUE, SHORT_EXECUTIONS_QUEUE):
        url = _queue_url(settings, name)
        while got := sqs.receive_messages(url, max_number=10, wait_time=1):
            for m in got:
                out.append(json.loads(base64.b64decode(m["Body"])))
                sqs.delete_message(url, m["ReceiptHandle"])
    return out


def _prepare(session: Session) -> WorkflowExecution:
    user = make_user(session, credits=10)
    wf = make_workflow(session, user, definition=json_definition(2), publish=True)
    session.commit()
    ex = prepare_execution(session=session, workflow_id=wf.id, user_id=user.id)
    session.commit()
    return ex


def test_messages_carry_no_time_limits(worker_settings: Any) -> None:
    """The sender's settings (here a budget of 6 s: limits of 36/66 s) never reach the
    worker through the message: its own configuration decides."""
    assert app.conf.task_time_limit  # the sender has limits configured...
    _drain(worker_settings)
    tasks_execution.send_execution(uuid.uuid4(), "corr-1")
    (message,) = _drain(worker_settings)
    assert message["headers"]["timelimit"] in ([None, None], (None, None))  # ...not sent
    assert message["headers"]["x_correlation_id"] == "corr-1"


def _soft_limit(inputs: dict[str, Any], ctx) -> dict[str, Any]:
    raise SoftTimeLimitExceeded()


@pytest.fixture
def soft_limit_node():
    node = NodeType(
        type="test_soft_limit",
        run=_soft_limit,
        inputs={"json": PortSpec("any")},
        outputs={"json": PortSpec("any")},
        credits=1,
    )
    register_node_type(node, replace=True)
    yield
    unregister_node_type(node.type)


def test_soft_time_limit_in_a_node_is_a_timeout(
    worker_settings: Any, pg_session: Session, soft_limit_node: None
) -> None:
    user = make_user(pg_session, credits=10)
    definition = {"version": 1, "nodes": [{"id": "a", "type": "test_soft_limit"}], "edges": []}
    wf = make_workflow(pg_session, user, definition=definition, publish=True)
    pg_session.commit()
    ex = prepare_execution(session=pg_session, workflow_id=wf.id, user_id=user.id)
    pg_session.commit()
    result = run_execution(ex.id)
    assert result.outcome == Outcome.FAILED
    done = execution_status(pg_session, ex.id)
    assert done.status == ExecutionStatus.FAILED
    assert "timed out" in done.error and "internal error" not in done.error


def test_soft_time_limit_in_the_run_loop_is_a_timeout(
    worker_settings: Any, pg_session: Session
) -> None:
    ex = _prepare(pg_session)

    def strike(_phase: Any) -> None:
        raise SoftTimeLimitExceeded()

    assert run_execution(ex.id, on_phase_started=strike).outcome == Outcome.FAILED
    done = execution_status(pg_session, ex.id)
    assert done.status == ExecutionStatus.FAILED and "timed out" in done.error


def _hold_lease(session: Session, ex_id: uuid.UUID, started_ago: float) -> None:
    session.rollback()
    execution = session.get(WorkflowExecution, ex_id)
    execution.status = ExecutionStatus.RUNNING
    execution.started_at = utcnow() - timedelta(seconds=started_ago)
    execution.lease_owner = "another-worker"
    execution.lease_expires_at = utcnow() + timedelta(seconds=3)
    session.commit()


def test_lease_held_duplicate_comes_back_as_a_fresh_message(
    worker_settings: Any, pg_session: Session
) -> None:
    ex = _prepare(pg_session)
    _drain(worker_settings)
    _hold_lease(pg_session, ex.id, started_ago=1)
    # Many duplicates in a row: never MaxRetriesExceededError, each one a new message
    # whose retry counter starts from zero.
    for _ in range(25):
        outcome = tasks_execution.execute_workflow.apply(args=[str(ex.id)], retries=20)
        assert outcome.successful(), outcome.traceback
        assert outcome.get() == Outcome.LEASE_HELD.value
    messages = _drain(worker_settings)
    assert len(messages) == 25
    for message in messages:
        assert message["headers"]["retries"] == 0 and message["headers"]["eta"]
    assert execution_status(pg_session, ex.id).status == ExecutionStatus.RUNNING


def test_lease_held_duplicate_of_an_overdue_run_is_dropped(
    worker_settings: Any, pg_session: Session
) -> None:
    ex = _prepare(pg_session)
    _drain(worker_settings)
    overdue = worker_settings.EXECUTION_MAX_TOTAL_SECONDS + 60
    _hold_lease(pg_session, ex.id, started_ago=overdue)
    outcome = tasks_execution.execute_workflow.apply(args=[str(ex.id)])
    assert outcome.get() == Outcome.LEASE_HELD.value
    assert _drain(worker_settings) == []


def test_sweep_with_a_backlog_does_not_multiply_messages(
    worker_settings: Any, pg_session: Session
) -> None:
    """50 runs waiting in a backlog (no worker), swept over and over: each is re-sent at
    most once per window, never once per sweep."""
    from flowbuilder.tasks import enqueue_execution, sweep_stale_executions

    _drain(worker_settings)
    user = make_user(pg_session, credits=1000)
    wf = make_workflow(pg_session, user, definition=json_definition(1), publish=True)
    pg_session.commit()
    with override_settings(RATE_LIMIT_USER=1000):
        for _ in range(50):
            enqueue_execution(pg_session, wf.id, user.id)
            pg_session.commit()
    # Not due yet: nothing re-sent.
    assert sweep_stale_executions.apply().get() == 0
    # Sweep over and over for longer than it takes every run to become due (2 s) but
    # less than the re-send window (visibility 8 s + 2 s): each run is re-sent once, in
    # bounded batches.
    import time

    counts: list[int] = []
    end = time.monotonic() + worker_settings.SWEEP_PENDING_AFTER_SECONDS + 4
    while time.monotonic() < end:
        counts.append(sweep_stale_executions.apply(kwargs={"limit": 20}).get())
        time.sleep(0.2)
    assert sum(counts) == 50 and max(counts) <= 20 and counts[-1] == 0
    messages = _drain(worker_settings)
    assert len(messages) == 100  # the 50 sends and 50 re-sends: no more
