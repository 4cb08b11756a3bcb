"""Celery's own per-task lines (received, succeeded, failed, retry) get the execution's ids."""

from __future__ import annotations

import io
import json
import logging
import uuid
from collections.abc import Iterator

import pytest
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
