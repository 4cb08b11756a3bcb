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
import os
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

# The main process reads an execution's owner ids for every message it receives, inside
# the one event loop that also receives, dispatches and acknowledges for all the pool's
# children: a pooled session there costs a checkout, a pre-ping, BEGIN, the read and the
# reset (about 2 ms, a tenth of the loop's time under load). So the read runs on one
# connection held in autocommit (one round trip), built once, per process and engine
# (PostgreSQL; SQLite opens its local file per read).
_held: tuple[int, Any, Any] | None = None  # (pid, engine, connection)
# Connections inherited through fork are never used nor closed in the child (closing
# would end the parent's session on the shared socket): they are only kept referenced.
_inherited: list[Any] = []
_OWNER_IDS = None


def _owner_statement() -> Any:
    global _OWNER_IDS
    if _OWNER_IDS is None:
        from sqlalchemy import bindparam, select

        from flowbuilder.platform.models import WorkflowExecution

        _OWNER_IDS = select(WorkflowExecution.workflow_id, WorkflowExecution.user_id).where(
            WorkflowExecution.id == bindparam("id")
        )
    return _OWNER_IDS


def _connection() -> Any:
    """The held connection of this process for the current engine (opened if needed)."""
    global _held
    from flowbuilder.platform.db import get_engine

    engine = get_engine()
    if _held is not None:
        pid, held_engine, conn = _held
        if pid == os.getpid() and held_engine is engine:
            return conn
        _held = None
        if pid == os.getpid():
            _close_quietly(conn)  # the engine changed (settings reloaded)
        else:
            _inherited.append(conn)
    conn = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    _held = (os.getpid(), engine, conn)
    return conn


def _read_owner(execution_id: uuid.UUID) -> Any:
    from flowbuilder.platform.db import get_engine

    engine = get_engine()
    if engine.dialect.name == "sqlite":
        # Our SQLite transactions begin IMMEDIATE (a write lock): a held connection would
        # hold it. A local file needs no held connection anyway.
        with engine.connect() as conn:
            return conn.execute(_owner_statement(), {"id": execution_id}).first()
    return _connection().execute(_owner_statement(), {"id": execution_id}).first()


def _drop_connection() -> None:
    global _held
    if _held is not None and _held[0] == os.getpid():
        _close_quietly(_held[2])
    elif _held is not None:
        _inherited.append(_held[2])
    _held = None


def _close_quietly(conn: Any) -> None:
    try:
        conn.invalidate()
        conn.close()
    except Exception:  # noqa: BLE001, S110 - a broken connection is being thrown away
        pass


def _owner_ids(execution_id: str) -> dict[str, str]:
    """The workflow and user ids of an execution (one primary-key read), or nothing."""
    global _lookups_paused_until
    if time.monotonic() < _lookups_paused_until:
        return {}
    row = None
    # A held connection may have died since its last use (database restarted): one
    # retry on a fresh connection, then a pause.
    for attempt in (1, 2):
        try:
            row = _read_owner(uuid.UUID(execution_id))
            break
        except Exception:  # noqa: BLE001 - log context only; the task reports real errors
            _drop_connection()
            if attempt == 2:
                _lookups_paused_until = time.monotonic() + _LOOKUP_PAUSE_SECONDS
                return {}
    if row is None:
        return {}
    return {k: str(v) for k, v in zip(("workflow_id", "user_id"), row, strict=True) if v}


def context_for(
    task_name: str | None,
    headers: dict[str, Any],
    argsrepr: Any,
    task_id: str | None = None,
    *,
    owners: bool = True,
) -> dict[str, str]:
    """The log fields of a task: from the headers (strings only, length-capped: they come
    from the queue) and, for execute_workflow, from its execution's row (``owners``; or
    later, when a line needs them: :func:`with_owners`)."""
    known = lookup(task_id)
    if known is not None:
        return with_owners(task_id, known) if owners else known
    out: dict[str, str] = {}
    value = headers.get(HEADERS["correlation_id"])
    if isinstance(value, str) and value:
        out["correlation_id"] = value[:100]
    if task_name == "flowbuilder.execute_workflow" and argsrepr:
        # Its only argument is the execution id.
        match = _UUID.search(str(argsrepr)[:200])
        if match:
            out["execution_id"] = match.group(0)
            if owners:
                out.update(_owner_ids(out["execution_id"]))
                out[_LOOKED_UP] = "1"
    return out


# Marks a context whose owner ids were read (found or not): never read twice.
_LOOKED_UP = "_owners_read"


def with_owners(task_id: str | None, context: dict[str, str]) -> dict[str, str]:
    """``context`` with its execution's workflow and user ids, read the first time a
    line needs them (then remembered for the task)."""
    if "execution_id" not in context or _LOOKED_UP in context:
        return context
    full = {**context, **_owner_ids(context["execution_id"]), _LOOKED_UP: "1"}
    if task_id:
        remember(task_id, full)
    return full


def public(context: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in context.items() if k in LOG_FIELDS}


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
    passes it to the child that runs the task.

    The execution's owner ids are not read here: this runs in the main process's event
    loop for every message, and a database round trip there holds up receiving,
    dispatching and acknowledging for the whole pool. They are read when one of
    Celery's lines about the task is actually written (:class:`TaskLogContext`): at
    LOG_LEVEL=WARNING, only for a task that fails."""

    def __init__(self, message: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(message, *args, **kwargs)
        context = context_for(self.name, self._request_dict, self._argsrepr, owners=False)
        remember(self.id, context)
        # Always set here, after the message's own headers were copied in: a header of
        # that name in a message is replaced, never trusted.
        self._request_dict[PASSED_CONTEXT] = public(context)


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
                    task_id = arg
                    break
        if context is not None:
            context = public(with_owners(task_id, context))
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
