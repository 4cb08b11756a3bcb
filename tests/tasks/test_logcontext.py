"""Celery's own per-task lines (received, succeeded, failed, retry) get the execution's ids."""

from __future__ import annotations

import io
import json
import logging
import time
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
import structlog
from celery.app import trace

from flowbuilder.platform.logging import setup_logging
from flowbuilder.tasks import logcontext


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    """The platform's JSON logging, its handler writing into a buffer."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    saved_structlog = structlog.get_config()
    setup_logging("INFO", json=True, force=True)
    logcontext.install()
    buffer = io.StringIO()
    [handler] = [h for h in root.handlers if h.get_name() == "flowbuilder"]
    handler.setStream(buffer)
    try:
        yield buffer
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        structlog.configure(**saved_structlog)


def _records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_failure_and_retry_lines_carry_the_ids(
    json_logs: None, capfd: pytest.CaptureFixture
) -> None:
    task_id = str(uuid.uuid4())
    ids = {
        "execution_id": str(uuid.uuid4()),
        "workflow_id": str(uuid.uuid4()),
        "user_id": str(uuid.uuid4()),
        "correlation_id": "corr-lc-1",
    }
    logcontext.remember(task_id, ids)
    other = str(uuid.uuid4())  # a task nobody remembered: its lines get nothing
    name = "flowbuilder.execute_workflow"
    data = {
        "id": task_id,
        "name": name,
        "exc": "TransientError('db')",
        "runtime": 0.1,
        "args": "[]",
        "kwargs": "{}",
        "description": "raised",
        "internal": False,
        "traceback": "",
        "hostname": "w@h",
        "return_value": None,
    }
    trace_logger = logging.getLogger("celery.app.trace")
    trace_logger.info(trace.LOG_RETRY, data, extra={"data": data})
    trace_logger.error(trace.LOG_FAILURE, data, extra={"data": data})
    logging.getLogger("celery.worker.request").info(
        "Task %s[%s] retry: %s", name, task_id, "Retry in 2s"
    )
    logging.getLogger("celery.worker.strategy").info(
        trace.LOG_RECEIVED, {"id": other, "name": name}, extra={"data": {"id": other}}
    )
    records = _records(json_logs.getvalue())
    mine = [r for r in records if task_id in r["event"]]
    assert len(mine) == 3, records
    for record in mine:
        for key, value in ids.items():
            assert record[key] == value, record
    [stranger] = [r for r in records if other in r["event"]]
    assert "execution_id" not in stranger


def test_context_for_reads_only_the_correlation_header_and_the_argument() -> None:
    execution_id = str(uuid.uuid4())
    context = logcontext.context_for(
        "flowbuilder.execute_workflow",
        {"x_correlation_id": "c" * 500, "x_user_id": "forged"},
        f"['{execution_id}']",
    )
    # No such row here (or no database): the ids the message really has, capped.
    assert context["execution_id"] == execution_id
    assert context["correlation_id"] == "c" * 100
    assert "forged" not in context.values()


def test_the_main_process_hands_its_context_to_the_child_and_a_forged_one_is_replaced() -> None:
    """The child reads the context the main process looked up (no second database read),
    and a message cannot set it: the header of that name is overwritten, never trusted."""
    from kombu import Message

    from flowbuilder.tasks.app import app as celery_app
    from flowbuilder.tasks.execution import execute_workflow

    execution_id = str(uuid.uuid4())
    forged = {"user_id": "forged", "workflow_id": "forged"}
    task_message = celery_app.amqp.as_task_v2(
        str(uuid.uuid4()), execute_workflow.name, args=[execution_id]
    )
    headers = dict(task_message.headers, x_correlation_id="corr-passed")
    headers[logcontext.PASSED_CONTEXT] = forged
    body = json.dumps(task_message.body)
    message = Message(
        body=body,
        headers=headers,
        content_type="application/json",
        content_encoding="utf-8",
        properties=task_message.properties,
        delivery_info={},
    )
    request = logcontext.ContextRequest(message, app=celery_app, task=execute_workflow)
    handed = request._request_dict[logcontext.PASSED_CONTEXT]
    assert handed["execution_id"] == execution_id
    assert handed["correlation_id"] == "corr-passed"
    assert "forged" not in handed.values()

    class _ChildRequest:  # what the child's task.request looks like (attributes)
        pass

    child = _ChildRequest()
    setattr(child, logcontext.PASSED_CONTEXT, dict(handed, extra="dropped", user_id=5))
    passed = logcontext.passed_context(child)
    assert passed == {"execution_id": execution_id, "correlation_id": "corr-passed"}
    assert logcontext.passed_context(_ChildRequest()) is None


def test_the_owner_lookup_holds_one_connection_and_survives_losing_it(
    session, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The main process reads an execution's ids on a held autocommit connection: it sees
    rows committed after it was opened, and a connection killed on the server is replaced
    at the next lookup (no pause, the ids still come)."""
    from flowbuilder.platform import engine as runner
    from tests.factories import json_definition, make_user, make_workflow

    user = make_user(session, credits=100)
    workflow = make_workflow(session, user, definition=json_definition(1), publish=True)
    session.commit()

    def new_execution() -> str:
        ex = runner.prepare_execution(session=session, workflow_id=workflow.id, user_id=user.id)
        session.commit()
        return str(ex.id)

    expected = {"workflow_id": str(workflow.id), "user_id": str(user.id)}
    logcontext._drop_connection()
    # An earlier lookup without a database may have paused them.
    monkeypatch.setattr(logcontext, "_lookups_paused_until", 0.0)
    assert logcontext._owner_ids(new_execution()) == expected
    if session.get_bind().dialect.name == "sqlite":
        # No held connection there (it would hold SQLite's write lock), and no lock left.
        assert logcontext._held is None
        assert logcontext._owner_ids(new_execution()) == expected
        return
    held = logcontext._held
    assert held is not None
    # Committed after the connection was opened: still seen (autocommit, no snapshot).
    assert logcontext._owner_ids(new_execution()) == expected
    assert logcontext._held is held
    assert logcontext._owner_ids(str(uuid.uuid4())) == {}

    pid = held[2].exec_driver_sql("SELECT pg_backend_pid()").scalar()
    session.exec(sa.text("SELECT pg_terminate_backend(:pid)").bindparams(pid=pid))
    session.commit()
    assert logcontext._owner_ids(new_execution()) == expected
    assert logcontext._held is not held
    assert logcontext._lookups_paused_until < time.monotonic()
    logcontext._drop_connection()


def test_owner_ids_are_read_only_when_a_line_needs_them(
    json_logs: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The main process reads nothing per message: the execution's owner ids are read
    when Celery writes a line about the task (once per task), and never when the level
    filters every such line out."""
    from kombu import Message

    from flowbuilder.tasks.app import app as celery_app
    from flowbuilder.tasks.execution import execute_workflow

    owners = {"workflow_id": str(uuid.uuid4()), "user_id": str(uuid.uuid4())}
    reads: list[str] = []

    def owner_ids(execution_id: str) -> dict[str, str]:
        reads.append(execution_id)
        return owners

    monkeypatch.setattr(logcontext, "_owner_ids", owner_ids)

    def request_for(execution_id: str) -> logcontext.ContextRequest:
        task_message = celery_app.amqp.as_task_v2(
            str(uuid.uuid4()), execute_workflow.name, args=[execution_id]
        )
        message = Message(
            body=json.dumps(task_message.body),
            headers=dict(task_message.headers),
            content_type="application/json",
            content_encoding="utf-8",
            properties=task_message.properties,
            delivery_info={},
        )
        return logcontext.ContextRequest(message, app=celery_app, task=execute_workflow)

    received = logging.getLogger("celery.worker.strategy")
    execution_id = str(uuid.uuid4())
    request = request_for(execution_id)
    assert reads == []  # none when the message is received
    assert "user_id" not in request._request_dict[logcontext.PASSED_CONTEXT]
    data = {"id": request.id, "name": execute_workflow.name}
    for _ in range(2):
        received.info(trace.LOG_RECEIVED, data, extra={"data": data})
    assert reads == [execution_id]  # read once, for the first line written
    [*_, line] = _records(json_logs.getvalue())
    assert line["user_id"] == owners["user_id"] and line["execution_id"] == execution_id

    quiet_id = str(uuid.uuid4())
    quiet = request_for(quiet_id)
    saved = received.level
    received.setLevel(logging.WARNING)
    try:
        data = {"id": quiet.id, "name": execute_workflow.name}
        received.info(trace.LOG_RECEIVED, data, extra={"data": data})
    finally:
        received.setLevel(saved)
    assert quiet_id not in reads
