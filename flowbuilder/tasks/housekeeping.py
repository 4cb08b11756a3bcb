"""Beat's periodic housekeeping task (thin: one unit of work around platform code)."""

from __future__ import annotations

from dataclasses import asdict

from celery import Task

from flowbuilder.platform.db import unit_of_work
from flowbuilder.platform.housekeeping import run_housekeeping
from flowbuilder.tasks.app import app
from flowbuilder.tasks.execution import ExecutionTask


@app.task(bind=True, base=ExecutionTask, name="flowbuilder.housekeeping", max_retries=0)
def housekeeping(self: Task) -> dict[str, int]:
    """Purge expired guest sessions, ended rate-limit windows, old logs (if enabled).

    Not retried: it runs again at its next interval, and every step is idempotent.
    """
    with unit_of_work() as session:
        report = run_housekeeping(session=session)
    return asdict(report)
