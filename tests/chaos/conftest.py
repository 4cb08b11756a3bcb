"""The fault-injection suite: real worker processes on moto's SQS server and PostgreSQL.

``pytest -m chaos`` runs every scenario; the ``chaos_quick`` subset also runs in the
default run (CI). After each scenario the same invariants are checked (every execution
terminal, no phase debited twice, every balance equal to its ledger, no worker dead, the
queue drained, the dead-letter queue holding only what should be there) and one row is
added to the table printed at the end of the session.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlmodel import Session

from flowbuilder.platform import sqs
from flowbuilder.platform.models import WorkflowExecution
from flowbuilder.tasks.app import (
    EXECUTIONS_QUEUE,
    SHORT_EXECUTIONS_QUEUE,
    dead_letter_queue_name,
    execution_queue_for,
    queue_name,
)
from tests.tasks.conftest import (  # noqa: F401 - fixtures shared with the worker tests
    WorkerProcess,
    _queues,
    pg_session,
    wait_for,
    worker_env,
    worker_settings,
)


@dataclass
class ScenarioRow:
    scenario: str
    runs: int = 0
    faults: int = 0
    lost: int = 0
    stuck: int = 0
    duplicated: int = 0
    result: str = "FAIL"
    notes: list[str] = field(default_factory=list)


_ROWS: list[ScenarioRow] = []


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _ROWS:
        return
    write = terminalreporter.write_line
    write("")
    write("fault injection: scenario | runs | faults injected | lost | stuck | duplicated | result")
    header = f"{'scenario':<34}{'runs':>6}{'faults':>8}{'lost':>6}{'stuck':>7}{'dup':>5}  result"
    write(header)
    write("-" * len(header))
    for r in _ROWS:
        write(
            f"{r.scenario:<34}{r.runs:>6}{r.faults:>8}{r.lost:>6}{r.stuck:>7}"
            f"{r.duplicated:>5}  {r.result}{'  (' + '; '.join(r.notes) + ')' if r.notes else ''}"
        )


class ChaosWorker(WorkerProcess):
    """A worker that also loads the test-only crash node (``--include``)."""

    extra_args = ("--include=tests.chaos.crash_node",)
    hostname_prefix = "chaos"

    def alive(self) -> bool:
        return self.proc.poll() is None


class Pool:
    """Chaos workers, with a supervisor's job: respawn what died (counted)."""

    def __init__(self, settings: Any, tmp: Path, **env: Any) -> None:
        self.settings, self.tmp, self.env = settings, tmp, env
        self.workers: list[ChaosWorker] = []
        self.all: list[ChaosWorker] = []
        self.respawned = 0

    def spawn(self, wait: bool = True) -> ChaosWorker:
        worker = ChaosWorker(self.settings, self.tmp / f"w{len(self.all)}.log", **self.env)
        self.workers.append(worker)
        self.all.append(worker)
        if wait:
            worker.wait_ready(60)
        return worker

    def kill(self, worker: ChaosWorker) -> None:
        os.killpg(worker.proc.pid, signal.SIGKILL)
        worker.proc.wait(10)

    def supervise(self) -> int:
        """Respawn dead workers; returns how many had died."""
        dead = [w for w in self.workers if not w.alive()]
        for worker in dead:
            self.workers.remove(worker)
            self.spawn(wait=False)
        self.respawned += len(dead)
        return len(dead)

    def dead(self) -> list[ChaosWorker]:
        return [w for w in self.workers if not w.alive()]

    def stop(self) -> None:
        for worker in self.all:
            if worker.alive():
                worker.stop()
            else:
                worker._log.close()


@pytest.fixture
def pool(worker_settings: Any, tmp_path: Path) -> Iterator[Callable[..., Pool]]:  # noqa: F811
    pools: list[Pool] = []

    def make(**env: Any) -> Pool:
        p = Pool(worker_settings, tmp_path, **env)
        pools.append(p)
        return p

    yield make
    for p in pools:
        p.stop()


def queue_url(settings: Any, dlq: bool = False, name: str | None = None) -> str:
    """The URL of the queue the scenarios' runs are sent to (their plans are capped by the
    tests' short execution budget: the short-run queue, unless SHORT_RUN_MAX_SECONDS is
    0), of queue ``name``, or of the dead-letter queue."""
    if dlq:
        full = dead_letter_queue_name(settings)
    else:
        full = queue_name(
            settings, name or execution_queue_for(settings, settings.EXECUTION_TIMEOUT_SECONDS)
        )
    return sqs.get_sqs_client().get_queue_url(QueueName=full)["QueueUrl"]


def execution_queue_urls(settings: Any) -> list[str]:
    """Both execution queues (re-sends of a held lease go to the executions queue)."""
    return [queue_url(settings, name=n) for n in (EXECUTIONS_QUEUE, SHORT_EXECUTIONS_QUEUE)]


def queue_depth(url: str) -> int:
    attrs = sqs.get_sqs_client().get_queue_attributes(
        QueueUrl=url,
        AttributeNames=[
            "ApproximateNumberOfMessages",
            "ApproximateNumberOfMessagesNotVisible",
            "ApproximateNumberOfMessagesDelayed",
        ],
    )["Attributes"]
    return sum(int(v) for v in attrs.values())


def purge(url: str) -> None:
    while got := sqs.receive_messages(url, max_number=10, wait_time=0):
        for m in got:
            sqs.delete_message(url, m["ReceiptHandle"])


def describe(url: str) -> list[str]:
    """What the messages in a queue are (task and arguments), for a failure message.
    Consumes them (a received message would stay invisible, and uncounted by a purge)."""
    import base64
    import json

    out = []
    for m in sqs.receive_messages(url, max_number=10, wait_time=0):
        try:
            message = json.loads(base64.b64decode(m["Body"]))
            headers = message.get("headers", {})
            out.append(f"{headers.get('task')}{headers.get('argsrepr')}")
        except Exception:  # noqa: BLE001 - undecodable: show it raw
            out.append(repr(m["Body"][:40]))
        sqs.delete_message(url, m["ReceiptHandle"])
    return out


def statuses(session: Session, ids: list[uuid.UUID]) -> dict[uuid.UUID, WorkflowExecution]:
    session.rollback()
    session.expire_all()
    rows = session.exec(
        sa.select(WorkflowExecution).where(WorkflowExecution.id.in_(ids))  # type: ignore[arg-type]
    ).scalars()
    return {r.id: r for r in rows}


def check_invariants(
    row: ScenarioRow,
    session: Session,
    settings: Any,
    ids: list[uuid.UUID],
    pool: Pool,
    *,
    timeout: float = 120,
    dlq_expected: int | tuple[int, ...] = 0,
    supervise: bool = True,
) -> dict[uuid.UUID, WorkflowExecution]:
    """Wait for the end, then check every invariant; fills ``row`` and asserts."""
    _ROWS.append(row)
    row.runs = len(ids)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if supervise:
            pool.supervise()
        current = statuses(session, ids)
        if all(e.status.is_terminal for e in current.values()):
            break
        time.sleep(0.5)
    current = statuses(session, ids)
    unfinished = [e for e in current.values() if not e.status.is_terminal]
    row.stuck = sum(1 for e in unfinished if e.attempts > 0)
    row.lost = sum(1 for e in unfinished if e.attempts == 0) + (len(ids) - len(current))
    debited_twice = session.execute(
        sa.text(
            "SELECT count(*) FROM (SELECT phase_id FROM balance_transaction "
            "WHERE kind = 'debit' AND execution_id::text = ANY(:ids) "
            "GROUP BY phase_id HAVING count(*) > 1) d"
        ),
        {"ids": [str(i) for i in ids]},
    ).scalar_one()
    unbalanced = session.execute(
        sa.text(
            "SELECT count(*) FROM user_balance b WHERE b.credits <> "
            "(SELECT coalesce(sum(t.amount), 0) FROM balance_transaction t "
            "WHERE t.user_id = b.user_id)"
        )
    ).scalar_one()
    row.duplicated += int(debited_twice)
    urls, dlq = execution_queue_urls(settings), queue_url(settings, dlq=True)
    # Late duplicates (ETA re-sends of lease-held deliveries) drain once their time comes.
    drained = True
    try:
        wait_for(lambda: all(queue_depth(url) == 0 for url in urls), 60, 0.5)
    except AssertionError:
        drained = False
    dead = pool.dead()
    dlq_count = queue_depth(dlq)
    problems = []
    if unfinished:
        problems.append(f"{len(unfinished)} not terminal")
    if debited_twice:
        problems.append(f"{debited_twice} phases debited twice")
    if unbalanced:
        problems.append(f"{unbalanced} balances differ from their ledger")
    if dead:
        problems.append(f"{len(dead)} workers dead")
    if not drained:
        left = sum(queue_depth(url) for url in urls)
        problems.append(f"queues not drained ({left} left)")
    allowed = dlq_expected if isinstance(dlq_expected, tuple) else (dlq_expected,)
    if dlq_count not in allowed:
        problems.append(
            f"dead-letter queue holds {dlq_count}, expected {dlq_expected}: {describe(dlq)}"
        )
    row.notes.extend(problems)
    row.result = "ok" if not problems and not row.duplicated else "FAIL"
    purge(dlq)
    assert not problems and not row.duplicated, problems
    return current
