"""Execution ids on Celery's own lines about a task (received, succeeded, failed, retry).

The sender puts the execution, workflow and user ids and the correlation id in the task
headers (:func:`task_headers`). Celery logs "received" in the worker's main process before
any task code runs, and in a prefork pool the other lines come from a child, so the ids
are kept per task id in a small bounded map: filled by :class:`ContextRequest` (main
process, when the message is turned into a request) and at ``task_prerun`` (child), and
copied onto every record of Celery's task loggers by :class:`TaskLogContext`. The
structlog formatter picks them up with ``ExtraAdder`` (``flowbuilder.platform.logging``).
"""

from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from typing import Any

from celery.worker.request import Request

# Header names (Celery's own ``correlation_id`` is the task id, so ours are prefixed).
HEADERS = {
    "execution_id": "x_execution_id",
    "workflow_id": "x_workflow_id",
    "user_id": "x_user_id",
    "correlation_id": "x_correlation_id",
}
LOG_FIELDS = tuple(HEADERS)
# Celery's loggers that write a line per task event.
TASK_LOGGERS = ("celery.worker.strategy", "celery.app.trace", "celery.worker.request")

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I)
_MAX_TASKS = 4096
_by_task: OrderedDict[str, dict[str, str]] = OrderedDict()
_lock = threading.Lock()


def task_headers(
    execution_id: Any,
    *,
    workflow_id: Any = None,
    user_id: Any = None,
    correlation_id: str | None = None,
) -> dict[str, str]:
    """The headers that carry the log context of an execution's task message."""
    values = {
        "execution_id": execution_id,
        "workflow_id": workflow_id,
        "user_id": user_id,
        "correlation_id": correlation_id,
    }
    return {HEADERS[k]: str(v) for k, v in values.items() if v is not None}


def context_from_headers(headers: dict[str, Any], argsrepr: str | None = None) -> dict[str, str]:
    """The log fields found in a message's headers (strings only, length-capped: the
    headers come from the queue and are not trusted)."""
    out = {}
    for field, header in HEADERS.items():
        value = headers.get(header)
        if isinstance(value, str) and value:
            out[field] = value[:200]
    if "execution_id" not in out and argsrepr:
        # A message sent without the headers: execute_workflow's only argument is the id.
        match = _UUID.search(str(argsrepr)[:200])
        if match:
            out["execution_id"] = match.group(0)
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


class ContextRequest(Request):
    """The worker's request for our tasks: remembers the message's log context."""

    def __init__(self, message: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(message, *args, **kwargs)
        remember(self.id, context_from_headers(self._request_dict, self._argsrepr))


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
