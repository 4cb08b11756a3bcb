"""Execution ids on Celery's own lines about a task (received, succeeded, failed, retry).

The message carries the execution id (the task's argument) and the correlation id (a
header) only: never the user's or the workflow's id. The worker looks those two up by the
execution's primary key. Celery logs "received" in the worker's main process before any
task code runs, and in a prefork pool the other lines come from a child, so the ids are
kept per task id in a small bounded map: filled by :class:`ContextRequest` (main process,
when the message is turned into a request) and at ``task_prerun`` (child), and copied onto
every record of Celery's task loggers by :class:`TaskLogContext`. The structlog formatter
picks them up with ``ExtraAdder`` (``flowbuilder.platform.logging``).
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any

from celery.worker.request import Request

# Header names (Celery's own ``correlation_id`` is the task id, so ours is prefixed).
HEADERS = {"correlation_id": "x_correlation_id"}
LOG_FIELDS = ("execution_id", "workflow_id", "user_id", "correlation_id")
# Celery's loggers that write a line per task event.
TASK_LOGGERS = ("celery.worker.strategy", "celery.app.trace", "celery.worker.request")

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I)
_MAX_TASKS = 4096
_by_task: OrderedDict[str, dict[str, str]] = OrderedDict()
_lock = threading.Lock()


# After a failed lookup (database down), none for a while: the receiving loop must not
# stall on a database that is not there; the lines then carry the ids they have.
_LOOKUP_PAUSE_SECONDS = 30.0
_lookups_paused_until = 0.0


def _owner_ids(execution_id: str) -> dict[str, str]:
    """The workflow and user ids of an execution (one primary-key read), or nothing."""
    global _lookups_paused_until
    if time.monotonic() < _lookups_paused_until:
        return {}
    try:
        from sqlmodel import Session, select

        from flowbuilder.platform.db import get_engine
        from flowbuilder.platform.models import WorkflowExecution

        with Session(get_engine()) as session:
            row = session.exec(
                select(WorkflowExecution.workflow_id, WorkflowExecution.user_id).where(
                    WorkflowExecution.id == uuid.UUID(execution_id)
                )
            ).first()
    except Exception:  # noqa: BLE001 - log context only; the task reports real errors
        _lookups_paused_until = time.monotonic() + _LOOKUP_PAUSE_SECONDS
        return {}
    if row is None:
        return {}
    return {k: str(v) for k, v in zip(("workflow_id", "user_id"), row, strict=True) if v}


def context_for(
    task_name: str | None, headers: dict[str, Any], argsrepr: Any, task_id: str | None = None
) -> dict[str, str]:
    """The log fields of a task: from the headers (strings only, length-capped: they come
    from the queue) and, for execute_workflow, from its execution's row."""
    known = lookup(task_id)
    if known is not None:
        return known
    out: dict[str, str] = {}
    value = headers.get(HEADERS["correlation_id"])
    if isinstance(value, str) and value:
        out["correlation_id"] = value[:100]
    if task_name == "flowbuilder.execute_workflow" and argsrepr:
        # Its only argument is the execution id.
        match = _UUID.search(str(argsrepr)[:200])
        if match:
            out["execution_id"] = match.group(0)
            out.update(_owner_ids(out["execution_id"]))
    return out


def remember(task_id: str | None, context: dict[str, str]) -> None:
    if not task_id or not context:
        return
    with _lock:
        _by_task[task_id] = context
        _by_task.move_to_end(task_id)
        while len(_by_task) > _MAX_TASKS:
            _by_task.popitem(last=False)


def lookup(task_id: str | None) -> dict[str, str] | None:
    if not task_id:
        return None
    with _lock:
        return _by_task.get(task_id)


# The key under which the main process hands its looked-up context to the pool child
# with the request (so the child does not read the execution's row a second time).
PASSED_CONTEXT = "flowbuilder_log_context"


class ContextRequest(Request):
    """The worker's request for our tasks: remembers the message's log context and
    passes it to the child that runs the task."""

    def __init__(self, message: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(message, *args, **kwargs)
        context = context_for(self.name, self._request_dict, self._argsrepr)
        remember(self.id, context)
        # Always set here, after the message's own headers were copied in: a header of
        # that name in a message is replaced, never trusted.
        self._request_dict[PASSED_CONTEXT] = dict(context)


def passed_context(request: Any) -> dict[str, str] | None:
    """The context the main process handed over with ``request`` (None if it did not)."""
    value = getattr(request, PASSED_CONTEXT, None) if request is not None else None
    if not isinstance(value, dict):
        return None
    return {k: v for k, v in value.items() if k in LOG_FIELDS and isinstance(v, str)}


class TaskLogContext(logging.Filter):
    """Adds the execution's ids to Celery's per-task records (never drops a record)."""

    def filter(self, record: logging.LogRecord) -> bool:
        data = getattr(record, "data", None)
        task_id = data.get("id") if isinstance(data, dict) else None
        context = lookup(task_id)
        if context is None and isinstance(record.args, tuple):
            for arg in record.args:
                if isinstance(arg, str) and (context := lookup(arg)):
                    break
        for key, value in (context or {}).items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


_installed = False


def install() -> None:
    """Attach the filter to Celery's task loggers (once per process)."""
    global _installed
    if _installed:
        return
    for name in TASK_LOGGERS:
        logging.getLogger(name).addFilter(TaskLogContext())
    _installed = True
