"""Worker-level guarantees around secrets and retries, on real PostgreSQL and SQS (moto).

- A credential's plaintext value never shows up in the worker's logs (at DEBUG), the
  execution's logs, errors, ledger or any other row, or the queue, even when the remote
  server reflects the ``Authorization`` header back and a later node fails.
- A node's transient failures (HTTP 503) are retried inside one phase: one debit, the
  retries in the execution's logs.
- An infrastructure error (the database connection drops) retries the Celery task; the
  run is not failed, and the next delivery resumes it to a clean end.
"""

from __future__ import annotations

import base64
import contextlib
import json
import secrets as pysecrets
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import sqlalchemy as sa
from celery.exceptions import Retry
from sqlmodel import Session, SQLModel, select

from flowbuilder.platform import db, sqs
from flowbuilder.platform.crud import balance_crud, credentials_crud, log_crud, phase_crud
from flowbuilder.platform.engine import prepare_execution
from flowbuilder.platform.models import (
    BalanceTransaction,
    ExecutionStatus,
    LedgerKind,
    PhaseStatus,
    WorkflowExecution,
)
from flowbuilder.platform.nodes import get_node_type
from flowbuilder.platform.settings import override_settings
from flowbuilder.tasks import enqueue_execution, execute_workflow
from flowbuilder.tasks.app import EXECUTIONS_QUEUE, dead_letter_queue_name, queue_name
from tests.factories import json_definition, make_user, make_workflow
from tests.platform._http_server import LocalServer, local_server
from tests.tasks.conftest import execution_status, wait_done, wait_for

pytestmark = pytest.mark.integration

ALLOW_LOCAL = {"OUTBOUND_ALLOWLIST": ["127.0.0.1"]}


# ----------------------------------------------------------------------------- helpers


def _debits(session: Session, execution_id: uuid.UUID) -> list[BalanceTransaction]:
    session.rollback()
    return list(
        session.exec(
            select(BalanceTransaction).where(
                BalanceTransaction.execution_id == execution_id,
                BalanceTransaction.kind == LedgerKind.DEBIT,
            )
        )
    )


class _DynamicRoute:
    """A route for :class:`LocalServer` whose answer depends on the requests so far.

    LocalServer records a request before it looks up its route, so ``seen()`` already
    includes the request being answered. It reads ``status`` once and ``body`` when it
    writes the response.
    """

    delay = 0.0
    send_length = True
    chunk = 0

    def __init__(self, server: LocalServer, path: str) -> None:
        self.server, self.path = server, path
        self.headers = {"Content-Type": "application/json"}

    def seen(self) -> list[Any]:
        return [r for r in self.server.requests if r.path.split("?", 1)[0] == self.path]


class _EchoHeaders(_DynamicRoute):
    """The worst case: the remote server reflects the request headers in its body."""

    status = 200

    @property
    def body(self) -> bytes:
        return json.dumps({"received_headers": self.seen()[-1].headers}).encode()


class _FailThenSucceed(_DynamicRoute):
    def __init__(self, server: LocalServer, path: str, failures: int) -> None:
        super().__init__(server, path)
        self.failures = failures

    @property
    def status(self) -> int:
        return 503 if len(self.seen()) <= self.failures else 200

    @property
    def body(self) -> bytes:
        return b'{"ok": true}' if len(self.seen()) > self.failures else b'{"busy": true}'


# ----------------------------------------------------------------------------- secrets


def _forms(value: str) -> list[str]:
    raw = value.encode()
    return [
        value,
        base64.b64encode(raw).decode(),
        base64.b64encode(raw).decode().rstrip("="),
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
        base64.b64encode(f"Bearer {value}".encode()).decode().rstrip("="),
        raw.hex(),
    ]


def _leaks(text: str, value: str) -> list[str]:
    return [form for form in _forms(value) if form in text]


def _rows_as_text(session: Session, table: sa.Table, exclude: tuple[str, ...] = ()) -> str:
    columns = [c for c in table.columns if c.name not in exclude]
    rows = session.execute(sa.select(*columns)).all()
    return "\n".join(repr(tuple(row)) for row in rows)


@dataclass
class _SecretRun:
    secret: str
    execution: WorkflowExecution
    received: list[Any]
    worker_log: str
    phases: list[Any]
    execution_logs: list[str]
    database: dict[str, str] = field(default_factory=dict)  # table -> rows (no phase data)
    queued: list[str] = field(default_factory=list)


@pytest.fixture
def secret_run(
    spawn_worker: Callable[..., Any], worker_settings: Any, pg_session: Session
) -> _SecretRun:
    """Store a bearer token, call an echoing server with it, then fail a later node;
    a subprocess worker at DEBUG runs it. Everything captured is returned for scanning."""
    secret = f"fbsecret-{pysecrets.token_urlsafe(24)}"
    with local_server() as server:
        server.routes["/echo"] = _EchoHeaders(server, "/echo")  # type: ignore[assignment]
        user = make_user(pg_session, credits=20)
        credential = credentials_crud.create_credential(
            session=pg_session,
            user_id=user.id,
            name="remote api",
            type="bearer_token",
            secret_value=secret,
        )
        definition = {
            "version": 1,
            "nodes": [
                {
                    "id": "call",
                    "type": "http_request",
                    "inputs": {"url": server.url("/echo?q=1"), "method": "GET"},
                    "credential_id": str(credential.id),
                },
                {
                    "id": "read",
                    "type": "read_property_from_json",
                    "inputs": {"property_path": "received_headers.no_such_header"},
                },
            ],
            "edges": [
                {"source": "call", "sourceHandle": "body", "target": "read", "targetHandle": "json"}
            ],
        }
        with override_settings(**ALLOW_LOCAL):
            wf = make_workflow(pg_session, user, definition=definition, publish=True)
            pg_session.commit()
            ex = enqueue_execution(pg_session, wf.id, user.id, correlation_id="corr-secret")
            pg_session.commit()
        worker = spawn_worker(OUTBOUND_ALLOWLIST="127.0.0.1", LOG_LEVEL="DEBUG")
        done = wait_done(pg_session, ex.id)
        wait_for(lambda: "execution_finished" in worker.text(), 15)
        worker.stop()  # every line flushed, shutdown included
        received = list(server.requests)

    phases = phase_crud.list_phases(session=pg_session, execution_id=ex.id, user_id=user.id)
    logs = log_crud.list_logs(session=pg_session, execution_id=ex.id, user_id=user.id)
    run = _SecretRun(
        secret=secret,
        execution=done,
        received=received,
        worker_log=worker.text(),
        phases=phases,
        execution_logs=[f"{entry.level} {entry.message}" for entry in logs],
    )
    pg_session.rollback()
    for table in SQLModel.metadata.sorted_tables:
        exclude = ("inputs", "outputs") if table.name == "execution_phase" else ()
        run.database[table.name] = _rows_as_text(pg_session, table, exclude)
    client = sqs.get_sqs_client()
    for name in (
        queue_name(worker_settings, EXECUTIONS_QUEUE),
        dead_letter_queue_name(worker_settings),
    ):
        url = client.get_queue_url(QueueName=name)["QueueUrl"]
        for message in sqs.receive_messages(url, max_number=10, wait_time=1):
            body = message["Body"]
            run.queued.append(body)
            with contextlib.suppress(ValueError):
                run.queued.append(base64.b64decode(body).decode(errors="replace"))
    return run


def test_secret_never_leaks_from_a_worker_run(secret_run: _SecretRun) -> None:
    run, secret = secret_run, secret_run.secret
    # The credential did its job: the server got the header, and the run took the error
    # path in the second node.
    assert [r.headers.get("authorization") for r in run.received] == [f"Bearer {secret}"]
    assert run.execution.status == ExecutionStatus.FAILED
    assert [p.status for p in run.phases] == [PhaseStatus.COMPLETED, PhaseStatus.FAILED]
    assert "not found" in run.execution.error and "not found" in run.phases[1].error
    # The scan is meaningful: the worker logged at DEBUG, and the run's lines are there.
    lines = [json.loads(x) for x in run.worker_log.splitlines() if x.startswith("{")]
    assert any(line.get("level") == "debug" for line in lines)
    events = {line.get("event") for line in lines}
    assert {"credential_resolved", "outbound_request", "execution_finished"} <= events
    assert any(str(line.get("logger")).startswith("httpx") for line in lines)
    # httpcore's trace prints raw response headers (an echo of the credential): never logged.
    assert not any(str(line.get("logger")).startswith("httpcore") for line in lines)
    assert any("not found" in m for m in run.execution_logs)
    assert run.database["database_secret"], "the secret is stored (encrypted) in the database"

    assert _leaks(run.worker_log, secret) == [], "worker log"
    assert _leaks("\n".join(run.execution_logs), secret) == [], "execution logs"
    assert _leaks(run.execution.error or "", secret) == [], "execution error"
    for phase in run.phases:
        assert _leaks(phase.error or "", secret) == [], f"error of phase {phase.node_id}"
    for table, text in run.database.items():
        assert _leaks(text, secret) == [], f"table {table}"
    assert _leaks("\n".join(run.queued), secret) == [], "SQS messages"


def test_reflected_secret_is_redacted_from_phase_data(secret_run: _SecretRun) -> None:
    run, secret = secret_run, secret_run.secret
    assert [r.headers.get("authorization") for r in run.received] == [f"Bearer {secret}"]
    assert [p.status for p in run.phases] == [PhaseStatus.COMPLETED, PhaseStatus.FAILED]
    call = run.phases[0]
    assert call.outputs["status"] == 200 and "received_headers" in call.outputs["body"]
    leaked = [
        f"{what} of phase {phase.node_id}"
        for phase in run.phases
        for what in ("inputs", "outputs")
        if _leaks(json.dumps(getattr(phase, what), default=str), secret)
    ]
    assert leaked == []
    # The echo is still there, with the value replaced.
    assert "Bearer [redacted]" in json.dumps(call.outputs)


# ----------------------------------------------------------------------------- node retries


def test_node_retries_transient_http_errors_within_one_phase(
    celery_worker: Any, pg_session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    """503, 503, 200: three requests, one phase attempt, one debit, retries logged."""
    # The real backoff (2 s, then 4 s) would not fit the tests' 6 s execution budget.
    monkeypatch.setattr(get_node_type("http_request"), "retry_backoff_seconds", 0.2)
    with local_server() as server, override_settings(**ALLOW_LOCAL):
        server.routes["/flaky"] = _FailThenSucceed(server, "/flaky", failures=2)  # type: ignore[assignment]
        user = make_user(pg_session, credits=10)
        definition = {
            "version": 1,
            "nodes": [
                {"id": "call", "type": "http_request", "inputs": {"url": server.url("/flaky")}}
            ],
            "edges": [],
        }
        wf = make_workflow(pg_session, user, definition=definition, publish=True)
        pg_session.commit()
        ex = enqueue_execution(pg_session, wf.id, user.id)
        pg_session.commit()
        done = wait_done(pg_session, ex.id)
        paths = [r.path for r in server.requests]

    assert done.status == ExecutionStatus.COMPLETED, done.error
    assert paths == ["/flaky"] * 3
    (phase,) = phase_crud.list_phases(session=pg_session, execution_id=ex.id, user_id=user.id)
    assert phase.status == PhaseStatus.COMPLETED and phase.attempts == 1
    assert phase.outputs["status"] == 200 and phase.outputs["body"] == {"ok": True}
    debits = _debits(pg_session, ex.id)
    assert [(d.amount, d.idempotency_key) for d in debits] == [(-2, f"phase:{phase.id}")]
    assert done.credits_consumed == 2
    assert balance_crud.get_balance(session=pg_session, user_id=user.id) == 8
    messages = [
        e.message
        for e in log_crud.list_logs(session=pg_session, execution_id=ex.id, user_id=user.id)
    ]
    retries = [m for m in messages if "retrying in" in m]
    assert len(retries) == 2, messages
    assert "attempt 1 of 3 failed" in retries[0] and "HTTP 503" in retries[0]
    assert "attempt 2 of 3 failed" in retries[1] and "HTTP 503" in retries[1]
    # Exponential backoff: 0.2 s, then 0.4 s.
    assert retries[0].endswith("retrying in 0.2s") and retries[1].endswith("retrying in 0.4s")


# ----------------------------------------------------------------------------- infrastructure


class _DropConnectionOnce:
    """Raise OperationalError ("server closed the connection") on the nth statement of
    the thread that installed it (the heartbeat thread's statements are not counted)."""

    def __init__(self, engine: sa.Engine, nth: int | None) -> None:
        self.engine, self.nth = engine, nth
        self.thread = threading.get_ident()
        self.count = 0
        self.fired: str | None = None

    def __call__(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if threading.get_ident() != self.thread:
            return
        self.count += 1
        if self.count == self.nth and self.fired is None:
            self.fired = statement
            raise sa.exc.OperationalError(
                "stmt", {}, Exception("server closed the connection unexpectedly")
            )

    def __enter__(self) -> _DropConnectionOnce:
        sa.event.listen(self.engine, "before_cursor_execute", self)
        return self

    def __exit__(self, *exc: object) -> None:
        sa.event.remove(self.engine, "before_cursor_execute", self)


def _prepared(session: Session, steps: int = 3) -> tuple[Any, WorkflowExecution]:
    """A pending execution in the database, without sending a message."""
    user = make_user(session, credits=10)
    wf = make_workflow(session, user, definition=json_definition(steps), publish=True)
    session.commit()
    ex = prepare_execution(session=session, workflow_id=wf.id, user_id=user.id)
    session.commit()
    return user, ex


def _assert_completed_cleanly(session: Session, user: Any, ex: WorkflowExecution) -> None:
    done = execution_status(session, ex.id)
    assert done.status == ExecutionStatus.COMPLETED, done.error
    assert done.lease_owner is None and done.credits_consumed == 3
    phases = phase_crud.list_phases(session=session, execution_id=ex.id, user_id=user.id)
    assert [p.status for p in phases] == [PhaseStatus.COMPLETED] * 3
    assert phases[-1].outputs["json"] == {"start": True, "step0": 0, "step1": 1, "step2": 2}
    debits = _debits(session, ex.id)
    assert sorted(d.idempotency_key for d in debits) == sorted(f"phase:{p.id}" for p in phases)
    assert balance_crud.get_balance(session=session, user_id=user.id) == 7
    assert balance_crud.ledger_total(session=session, user_id=user.id) == 7
    logs = log_crud.list_logs(session=session, execution_id=ex.id, user_id=user.id)
    assert [e.seq for e in logs] == list(range(1, len(logs) + 1))


def test_database_drop_retries_the_task_and_the_next_delivery_resumes(
    worker_settings: Any, pg_session: Session
) -> None:
    engine = db.get_engine()
    # How many statements a clean run makes (the same for every run of this workflow).
    user, ex = _prepared(pg_session)
    with _DropConnectionOnce(engine, nth=None) as counter:
        assert execute_workflow.apply(args=[str(ex.id)]).get() == "completed"
    total = counter.count
    # A sanity floor (the loop below must walk a real run's statements): 18 for this
    # three-phase run since the claim and the run's end take fewer statements.
    assert total >= 12, total

    # The connection drops at each statement of the run in turn.
    for nth in range(1, total + 1):
        user, ex = _prepared(pg_session)
        with _DropConnectionOnce(engine, nth) as drop, pytest.raises(Retry) as info:
            # throw=True: without it an eager apply() re-runs a retry at once.
            execute_workflow.apply(args=[str(ex.id)], throw=True)
        assert drop.fired is not None, nth
        assert isinstance(info.value.exc, Exception) and "database unavailable" in str(
            info.value.exc
        )
        assert info.value.when == 2.0  # the first retry's countdown

        between = execution_status(pg_session, ex.id)
        assert between.status in (ExecutionStatus.PENDING, ExecutionStatus.RUNNING), (
            nth,
            drop.fired,
        )
        assert between.lease_owner is None and between.error is None, (nth, drop.fired)
        phases = phase_crud.list_phases(session=pg_session, execution_id=ex.id, user_id=user.id)
        assert all(
            p.status in (PhaseStatus.CREATED, PhaseStatus.RUNNING, PhaseStatus.COMPLETED)
            for p in phases
        ), (nth, drop.fired, [p.status for p in phases])

        # The next delivery, on a healthy database.
        result = execute_workflow.apply(args=[str(ex.id)])
        assert (result.state, result.get()) == ("SUCCESS", "completed"), (nth, drop.fired)
        _assert_completed_cleanly(pg_session, user, ex)


def test_eager_apply_reruns_a_retry_at_once(worker_settings: Any, pg_session: Session) -> None:
    """Without throw=True, Celery runs an eager retry immediately: one apply() covers the
    dropped connection and the resumed run (the 6th statement starts the first phase)."""
    user, ex = _prepared(pg_session)
    with _DropConnectionOnce(db.get_engine(), nth=6) as drop:
        result = execute_workflow.apply(args=[str(ex.id)])
    assert drop.fired is not None
    assert (result.state, result.get()) == ("SUCCESS", "completed")
    _assert_completed_cleanly(pg_session, user, ex)
