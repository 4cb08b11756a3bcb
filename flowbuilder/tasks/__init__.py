"""Celery app and worker tasks: ``celery -A flowbuilder.tasks worker``.

The API imports :func:`enqueue_execution` from here; a worker runs ``execute_workflow``
only once the caller's transaction has committed. The message is sent in the background
(:func:`wait_for_sends` waits for it).
"""

from flowbuilder.tasks.app import app
from flowbuilder.tasks.execution import (
    cancel_execution,
    enqueue_execution,
    execute_workflow,
    send_after_commit,
    sweep_stale_executions,
    wait_for_sends,
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
    "wait_for_sends",
]
