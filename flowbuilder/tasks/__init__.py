"""Celery app and worker tasks: ``celery -A flowbuilder.tasks worker``.

The API imports :func:`enqueue_execution` from here; it sends ``execute_workflow`` only
after the caller's transaction commits.
"""

from flowbuilder.tasks.app import app
from flowbuilder.tasks.execution import (
    cancel_execution,
    enqueue_execution,
    execute_workflow,
    send_after_commit,
    sweep_stale_executions,
)

celery = app

__all__ = [
    "app",
    "celery",
    "cancel_execution",
    "enqueue_execution",
    "execute_workflow",
    "send_after_commit",
    "sweep_stale_executions",
]
