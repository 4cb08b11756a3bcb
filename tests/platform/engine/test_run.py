"""The execution engine, run directly (no broker), on SQLite and PostgreSQL.

Celery and SQS are exercised in tests/tasks; here the engine's own guarantees are
checked: phases, logs and ledger; credits policy; cancellation; timeouts; retries;
concurrent runs of one execution; and the database cost per phase.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import sqlalchemy as sa
from sqlmodel import Session, select

from flowbuilder.platform.crud import balance_crud, execution_crud, log_crud, phase_crud
from flowbuilder.platform.engine import (
    Outcome,
    RunResult,
    cancel_execution,
    prepare_execution,
    run_execution,
)
from flowbuilder.platform.errors import (
    Conflict,
    InsufficientCredits,
    NotFound,
    RateLimited,
    TransientError,
    ValidationFailed,
)
from flowbuilder.platform.models import (
    BalanceTransaction,
    ExecutionStatus,
    LedgerKind,
    PhaseStatus,
    WorkflowExecution,
)
from flowbuilder.platform.nodes import get_node_type, register_node_type, unregister_node_type
from flowbuilder.platform.nodes.base import NodeError, NodeType, PortSpec
from flowbuilder.platform.settings import override_settings
from tests.factories import credential_definition, json_definition, make_user, make_workflow

# ----------------------------------------------------------------------------- test nodes

_flaky_calls: dict[str, int] = {}


def _flaky(inputs: dict[str, Any], ctx) -> dict[str, Any]:
    key = str(ctx.execution_id)
    _flaky_calls[key] = _flaky_calls.get(key, 0) + 1
    if _flaky_calls[key] <= inputs["failures"]:
        raise TransientError(f"flaky attempt {_flaky_calls[key]}")
    ctx.log.info(f"succeeded on attempt {_flaky_calls[key]}")
    return {"attempts": _flaky_calls[key]}


_stubborn_finished: set[str] = set()


def _stubborn(inputs: dict[str, Any], ctx) -> dict[str, Any]:
    time.sleep(inputs["seconds"])  # ignores its deadline on purpose
    _stubborn_finished.add(str(ctx.execution_id))
    return {}


def _chatty(inputs: dict[str, Any], ctx) -> dict[str, Any]:
    for i in range(inputs["lines"]):
        ctx.log.info(f"line {i}")
    return {"n": inputs["lines"]}


def _boom(inputs: dict[str, Any], ctx) -> dict[str, Any]:
    raise NodeError("the node refused")


TEST_NODES = [
    NodeType(
        type="test_flaky",
        run=_flaky,
        inputs={"failures": PortSpec("integer", required=True), "after": PortSpec("any")},
        outputs={"attempts": PortSpec("integer")},
        credits=2,
        retryable=True,
        max_retries=3,
        retry_backoff_seconds=0.01,
        timeout_seconds=5,
    ),
    NodeType(
        type="test_stubborn",
        run=_stubborn,
        inputs={"seconds": PortSpec("number", required=True), "after": PortSpec("any")},
        outputs={"done": PortSpec("any")},
        credits=1,
        timeout_seconds=0.3,
    ),
    NodeType(
        type="test_chatty",
        run=_chatty,
        inputs={"lines": PortSpec("integer", required=True), "after": PortSpec("any")},
        outputs={"n": PortSpec("integer")},
        credits=1,
    ),
    NodeType(
        type="test_boom",
        run=_boom,
        inputs={"after": PortSpec("any")},
        outputs={"done": PortSpec("any")},
        credits=3,
    ),
]


@pytest.fixture(autouse=True, scope="module")
def _test_nodes():
    for node_type in TEST_NODES:
        register_node_type(node_type, replace=True)
    yield
    for node_type in TEST_NODES:
        unregister_node_type(node_type.type)


def _single(node_type: str, **inputs: Any) -> dict[str, Any]:
    return {"version": 1, "nodes": [{"id": "a", "type": node_type, "inputs": inputs}], "edges": []}


# Which handles chain one node to the next (data or just order).
_OUT = {
    "test_flaky": "attempts",
    "test_stubborn": "done",
    "test_chatty": "n",
    "test_boom": "done",
    "delay": "data",
}
_IN = {"delay": "data"}


def _chain(*nodes: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    """Nodes that run one after the other: each waits for the previous one's output."""
    return {
        "version": 1,
        "nodes": [
            {"id": f"s{i}", "type": node_type, "inputs": inputs}
            for i, (node_type, inputs) in enumerate(nodes)
        ],
        "edges": [
            {
                "source": f"s{i - 1}",
                "sourceHandle": _OUT[nodes[i - 1][0]],
                "target": f"s{i}",
                "targetHandle": _IN.get(nodes[i][0], "after"),
            }
            for i in range(1, len(nodes))
        ],
    }


def _parallel(*nodes: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    """Independent nodes: one phase, run concurrently."""
    return {
        "version": 1,
        "nodes": [
            {"id": f"p{i}", "type": node_type, "inputs": inputs}
            for i, (node_type, inputs) in enumerate(nodes)
        ],
        "edges": [],
    }


def _prepare(session: Session, definition: dict[str, Any], credits: int = 100, **kw: Any):
    user = make_user(session, credits=credits)
    wf = make_workflow(session, user, definition=definition, publish=True)
    session.commit()
    ex = prepare_execution(session=session, workflow_id=wf.id, user_id=user.id, **kw)
    session.commit()
    return user, wf, ex


def _reload(session: Session, ex: WorkflowExecution) -> WorkflowExecution:
    session.rollback()
    session.expire_all()
    return session.get(WorkflowExecution, ex.id)


# ----------------------------------------------------------------------------- happy path


def test_multi_phase_execution_records_everything(engine, session: Session) -> None:
    user, wf, ex = _prepare(session, json_definition(3), credits=10)
    result = run_execution(ex.id)
    assert result.outcome == Outcome.COMPLETED and result.phases_run == 3
    ex = _reload(session, ex)
    assert ex.status == ExecutionStatus.COMPLETED and ex.error is None
    assert ex.credits_consumed == 3 and ex.duration_ms is not None and ex.lease_owner is None
    phases = phase_crud.list_phases(session=session, execution_id=ex.id, user_id=user.id)
    assert [p.status for p in phases] == [PhaseStatus.COMPLETED] * 3
    assert [p.number for p in phases] == [1, 2, 3]
    # Data flowed along the edges: the last node saw every property added before it.
    assert phases[-1].outputs["json"] == {"start": True, "step0": 0, "step1": 1, "step2": 2}
    assert phases[1].inputs["json"] == {"start": True, "step0": 0}
    assert balance_crud.get_balance(session=session, user_id=user.id) == 7
    debits = session.exec(
        select(BalanceTransaction).where(BalanceTransaction.kind == LedgerKind.DEBIT)
    ).all()
    assert sorted(d.idempotency_key for d in debits) == sorted(f"phase:{p.id}" for p in phases)
    assert balance_crud.ledger_total(session=session, user_id=user.id) == 7
    # Running it again (a duplicate delivery) changes nothing.
    again = run_execution(ex.id)
    assert again.outcome == Outcome.ALREADY_DONE
    assert balance_crud.get_balance(session=session, user_id=user.id) == 7


def test_logs_are_recorded_in_order(engine, session: Session) -> None:
    user, _, ex = _prepare(
        session, _chain(("test_chatty", {"lines": 5}), ("test_flaky", {"failures": 1}))
    )
    run_execution(ex.id)
    logs = log_crud.list_logs(session=session, execution_id=ex.id, user_id=user.id)
    messages = [entry.message for entry in logs]
    assert messages[:5] == [f"line {i}" for i in range(5)]
    assert any("retrying" in m for m in messages) and messages[-1] == "succeeded on attempt 2"
    assert [entry.seq for entry in logs] == list(range(1, len(logs) + 1))


# ----------------------------------------------------------------------------- refusals


def test_prepare_refusals(engine, session: Session) -> None:
    user = make_user(session, credits=1)
    other = make_user(session, credits=100)
    draft = make_workflow(session, user, definition=json_definition(2))
    wf = make_workflow(session, user, definition=json_definition(2), publish=True)
    session.commit()
    with pytest.raises(NotFound):
        prepare_execution(session=session, workflow_id=wf.id, user_id=other.id)
    with pytest.raises(Conflict, match="not published"):
        prepare_execution(session=session, workflow_id=draft.id, user_id=user.id)
    with pytest.raises(InsufficientCredits):
        prepare_execution(session=session, workflow_id=wf.id, user_id=user.id)
    session.rollback()
    session.expire_all()
    assert session.exec(select(WorkflowExecution)).all() == []


def test_definition_invalid_at_enqueue_is_refused(engine, session: Session) -> None:
    """A published version that does not validate in this process never runs.

    Versions are immutable, so the enqueue validates each one once per process (the
    in-place change here stands for what a new process sees after a deploy changed the
    rules): an enqueue of a version this process has not validated yet checks it."""
    from flowbuilder.platform.engine import enqueue

    user, wf, _ = _prepare(session, json_definition(1))
    version = session.exec(sa.text("select id from workflow_version")).first()
    session.execute(
        sa.text("update workflow_version set definition = :d where id = :i"),
        {
            "d": '{"version": 1, "nodes": [{"id": "x", "type": "nope"}], "edges": []}',
            "i": version[0],
        },
    )
    session.commit()
    enqueue._versions.clear()  # a process that has not seen the version yet
    with pytest.raises(ValidationFailed, match="nope"):
        prepare_execution(session=session, workflow_id=wf.id, user_id=user.id)
    session.rollback()
    # Refused every time, not only the first.
    with pytest.raises(ValidationFailed, match="nope"):
        prepare_execution(session=session, workflow_id=wf.id, user_id=user.id)
    session.rollback()


def _credential_workflow(session: Session, credits: int = 10):
    from flowbuilder.platform.crud import credentials_crud

    user = make_user(session, credits=credits)
    cred = credentials_crud.create_credential(
        session=session, user_id=user.id, name="api", type="bearer_token", secret_value="tok-123456"
    )
    definition = credential_definition(cred.id)
    wf = make_workflow(session, user, definition=definition, publish=True)
    session.commit()
    return user, cred, wf


def test_credential_deleted_after_publish_refuses_the_enqueue(engine, session: Session) -> None:
    """The ownership of a version's credentials is checked on every enqueue, even once the
    version itself is known valid: a deleted credential is refused with the validation's
    own message, and nothing is recorded."""
    from flowbuilder.platform.crud import credentials_crud

    user, cred, wf = _credential_workflow(session)
    prepare_execution(session=session, workflow_id=wf.id, user_id=user.id)
    session.commit()
    credentials_crud.delete_credential(session=session, credential_id=cred.id, user_id=user.id)
    session.commit()
    for _ in range(2):
        with pytest.raises(ValidationFailed, match="does not exist or belongs to another user"):
            prepare_execution(session=session, workflow_id=wf.id, user_id=user.id)
        session.rollback()
    assert len(execution_crud.list_executions_for_user(session=session, user_id=user.id)) == 1


def test_node_type_removed_refuses_a_validated_version(engine, session: Session) -> None:
    """A change of the node registry invalidates what was validated against it."""
    user, wf, _ = _prepare(session, _chain(("test_chatty", {"lines": 1})))
    chatty = get_node_type("test_chatty")
    unregister_node_type("test_chatty")
    try:
        with pytest.raises(ValidationFailed, match="test_chatty"):
            prepare_execution(session=session, workflow_id=wf.id, user_id=user.id)
        session.rollback()
    finally:
        register_node_type(chatty, replace=True)
    prepare_execution(session=session, workflow_id=wf.id, user_id=user.id)
    session.commit()


def test_rate_limit_guest_stricter(engine, session: Session) -> None:
    # A day-long window: hits made across a minute boundary must not reset the count.
    with override_settings(RATE_LIMIT_GUEST=1, RATE_LIMIT_USER=3, RATE_LIMIT_WINDOW_SECONDS=86400):
        guest = make_user(session, guest=True, credits=100)
        user = make_user(session, credits=100)
        gwf = make_workflow(session, guest, definition=json_definition(1), publish=True)
        uwf = make_workflow(session, user, definition=json_definition(1), publish=True)
        session.commit()
        prepare_execution(session=session, workflow_id=gwf.id, user_id=guest.id)
        session.commit()
        with pytest.raises(RateLimited):
            prepare_execution(session=session, workflow_id=gwf.id, user_id=guest.id)
        session.rollback()
        for _ in range(3):
            prepare_execution(session=session, workflow_id=uwf.id, user_id=user.id)
            session.commit()
        with pytest.raises(RateLimited):
            prepare_execution(session=session, workflow_id=uwf.id, user_id=user.id)
        session.rollback()
    counts = {
        uid: len(execution_crud.list_executions_for_user(session=session, user_id=uid))
        for uid in (guest.id, user.id)
    }
    assert counts == {guest.id: 1, user.id: 3}


# ----------------------------------------------------------------------------- credits


def test_insufficient_credits_mid_run_fails_cleanly(engine, session: Session) -> None:
    user, _, ex = _prepare(session, json_definition(3), credits=3)
    # Another spend drains the balance after the enqueue check passed.
    balance_crud.debit_credits(session=session, user_id=user.id, amount=2, idempotency_key="x")
    session.commit()
    result = run_execution(ex.id)
    assert result.outcome == Outcome.FAILED
    ex = _reload(session, ex)
    assert ex.status == ExecutionStatus.FAILED and "insufficient credits" in ex.error
    statuses = [
        p.status
        for p in phase_crud.list_phases(session=session, execution_id=ex.id, user_id=user.id)
    ]
    assert statuses == [PhaseStatus.COMPLETED, PhaseStatus.FAILED, PhaseStatus.SKIPPED]
    assert balance_crud.get_balance(session=session, user_id=user.id) == 0
    assert ex.credits_consumed == 1


@pytest.mark.parametrize("refund", [True, False])
def test_failed_phase_refund_policy(engine, session: Session, refund: bool) -> None:
    with override_settings(REFUND_FAILED_PHASES=refund):
        user, _, ex = _prepare(
            session, _chain(("test_chatty", {"lines": 1}), ("test_boom", {})), credits=10
        )
        run_execution(ex.id)
    ex = _reload(session, ex)
    assert ex.status == ExecutionStatus.FAILED and "the node refused" in ex.error
    expected = 9 if refund else 6
    assert balance_crud.get_balance(session=session, user_id=user.id) == expected
    assert ex.credits_consumed == 10 - expected
    assert balance_crud.ledger_total(session=session, user_id=user.id) == expected


# ----------------------------------------------------------------------------- control


def test_cancel_before_next_phase(engine, session: Session) -> None:
    user, _, ex = _prepare(
        session,
        _chain(
            ("test_chatty", {"lines": 1}),
            ("test_chatty", {"lines": 1}),
            ("test_chatty", {"lines": 1}),
        ),
        credits=10,
    )

    def cancel_after_first(phase) -> None:
        if phase.position == 0:
            with Session(engine) as s:
                cancel_execution(session=s, execution_id=ex.id, user_id=user.id)
                s.commit()

    result = run_execution(ex.id, on_phase_started=cancel_after_first)
    assert result.outcome == Outcome.CANCELLED
    ex = _reload(session, ex)
    assert ex.status == ExecutionStatus.CANCELLED
    statuses = [
        p.status
        for p in phase_crud.list_phases(session=session, execution_id=ex.id, user_id=user.id)
    ]
    assert statuses == [PhaseStatus.COMPLETED, PhaseStatus.CANCELLED, PhaseStatus.CANCELLED]
    # Charged for the one phase that ran, nothing more: on psycopg the next phase's
    # debit went with the fence that found the cancellation, and was rolled back.
    assert balance_crud.get_balance(session=session, user_id=user.id) == 9
    assert balance_crud.ledger_total(session=session, user_id=user.id) == 9


def test_cancel_pending_never_runs(engine, session: Session) -> None:
    user, _, ex = _prepare(session, json_definition(2), credits=10)
    cancel_execution(session=session, execution_id=ex.id, user_id=user.id)
    session.commit()
    assert run_execution(ex.id).outcome == Outcome.ALREADY_DONE
    assert balance_crud.get_balance(session=session, user_id=user.id) == 10


def test_node_timeout_fails_phase(engine, session: Session) -> None:
    user, _, ex = _prepare(session, _single("test_stubborn", seconds=2), credits=10)
    run_execution(ex.id)
    # The run ended while the node was still sleeping: it did not wait for it.
    assert str(ex.id) not in _stubborn_finished
    ex = _reload(session, ex)
    assert ex.status == ExecutionStatus.FAILED and "timed out after 0.3s" in ex.error


def test_execution_timeout(engine, session: Session) -> None:
    # The first delay ends 0.8 s before the run's time is out (room for a slow machine:
    # 0.2 s was not always enough on SQLite), the second one cannot.
    with override_settings(EXECUTION_TIMEOUT_SECONDS=2.0, SQS_VISIBILITY_TIMEOUT=10):
        user, _, ex = _prepare(
            session,
            _chain(
                ("delay", {"seconds": 1.2}),
                ("delay", {"seconds": 1.2}),
                ("delay", {"seconds": 1.2}),
            ),
            credits=10,
        )
        run_execution(ex.id)
    ex = _reload(session, ex)
    assert ex.status == ExecutionStatus.FAILED
    assert ex.error == "execution timed out after 2s"
    statuses = [
        p.status
        for p in phase_crud.list_phases(session=session, execution_id=ex.id, user_id=user.id)
    ]
    assert statuses[0] == PhaseStatus.COMPLETED and statuses[-1] == PhaseStatus.SKIPPED


def test_transient_retry_within_phase_debits_once(engine, session: Session) -> None:
    user, _, ex = _prepare(session, _single("test_flaky", failures=2), credits=10)
    result = run_execution(ex.id)
    assert result.outcome == Outcome.COMPLETED
    phase = phase_crud.list_phases(session=session, execution_id=ex.id, user_id=user.id)[0]
    assert phase.outputs == {"attempts": 3}
    assert balance_crud.get_balance(session=session, user_id=user.id) == 8


def test_retries_exhausted_fail_the_phase(engine, session: Session) -> None:
    user, _, ex = _prepare(session, _single("test_flaky", failures=10), credits=10)
    run_execution(ex.id)
    ex = _reload(session, ex)
    assert ex.status == ExecutionStatus.FAILED and "flaky attempt 4" in ex.error


# ----------------------------------------------------------------------------- exactly once


def test_two_workers_race_for_one_execution(engine, session: Session) -> None:
    user, _, ex = _prepare(session, _chain(*[("delay", {"seconds": 0.05})] * 4), credits=10)
    results: list[RunResult] = []
    barrier = threading.Barrier(3)

    def run() -> None:
        barrier.wait()
        results.append(run_execution(ex.id))

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    outcomes = sorted(r.outcome.value for r in results)
    assert outcomes.count("completed") == 1
    assert set(outcomes) <= {"completed", "lease_held", "already_done"}
    assert balance_crud.get_balance(session=session, user_id=user.id) == 6
    ex = _reload(session, ex)
    assert ex.status == ExecutionStatus.COMPLETED and ex.credits_consumed == 4


def test_resume_after_crash_skips_completed_and_never_double_debits(
    engine, session: Session
) -> None:
    """Simulate a worker that died in phase 2: its lease lapses, a second run resumes."""
    with override_settings(LEASE_SECONDS=0.5):
        user, _, ex = _prepare(session, json_definition(3), credits=10)

        class Crash(BaseException):
            pass

        def crash_in_second(phase) -> None:
            if phase.position == 1:
                raise Crash()

        with pytest.raises(Crash):
            run_execution(ex.id, owner="dead-worker", on_phase_started=crash_in_second)
        phases = phase_crud.list_phases(session=session, execution_id=ex.id, user_id=user.id)
        assert [p.status for p in phases] == [
            PhaseStatus.COMPLETED,
            PhaseStatus.RUNNING,
            PhaseStatus.CREATED,
        ]
        assert balance_crud.get_balance(session=session, user_id=user.id) == 8
        held = run_execution(ex.id, owner="new-worker")
        assert held.outcome == Outcome.LEASE_HELD and held.retry_after > 0
        time.sleep(0.6)
        result = run_execution(ex.id, owner="new-worker")
    assert result.outcome == Outcome.COMPLETED and result.phases_run == 2
    session.rollback()
    session.expire_all()
    phases = phase_crud.list_phases(session=session, execution_id=ex.id, user_id=user.id)
    assert [p.attempts for p in phases] == [1, 2, 1]
    assert balance_crud.get_balance(session=session, user_id=user.id) == 7
    assert _reload(session, ex).credits_consumed == 3


def test_lost_lease_stops_writing(engine, session: Session) -> None:
    user, _, ex = _prepare(session, json_definition(3), credits=10)

    def steal(phase) -> None:
        if phase.position == 0:
            with Session(engine) as s:
                s.execute(
                    sa.update(WorkflowExecution)
                    .where(WorkflowExecution.id == ex.id)
                    .values(lease_owner="thief")
                )
                s.commit()

    result = run_execution(ex.id, owner="victim", on_phase_started=steal)
    assert result.outcome == Outcome.LEASE_LOST
    phases = phase_crud.list_phases(session=session, execution_id=ex.id, user_id=user.id)
    # The in-flight phase's result was not written by the worker that lost its lease.
    assert phases[0].status == PhaseStatus.RUNNING and phases[0].outputs is None


def test_concurrent_executions_of_one_user_never_overdraw(engine, session: Session) -> None:
    user = make_user(session, credits=10)
    wf = make_workflow(session, user, definition=json_definition(3), publish=True)
    session.commit()
    ids = []
    for _ in range(6):
        ex = prepare_execution(session=session, workflow_id=wf.id, user_id=user.id)
        session.commit()
        ids.append(ex.id)
    threads = [threading.Thread(target=run_execution, args=(i,)) for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    session.rollback()
    session.expire_all()
    balance = balance_crud.get_balance(session=session, user_id=user.id)
    assert balance == 10 - 10 == 0 or balance >= 0
    debits = session.exec(
        select(BalanceTransaction).where(BalanceTransaction.kind == LedgerKind.DEBIT)
    ).all()
    assert len(debits) == 10 and balance == 0
    assert balance_crud.ledger_total(session=session, user_id=user.id) == 0
    executions = [session.get(WorkflowExecution, i) for i in ids]
    assert sum(e.credits_consumed for e in executions) == 10
    assert all(e.status in (ExecutionStatus.COMPLETED, ExecutionStatus.FAILED) for e in executions)


# ----------------------------------------------------------------------------- cost per phase


def _count_statements(engine, fn) -> tuple[int, int]:
    counts = {"stmts": 0, "commits": 0}

    def on_exec(*_a: Any, **_k: Any) -> None:
        counts["stmts"] += 1

    def on_commit(*_a: Any) -> None:
        counts["commits"] += 1

    sa.event.listen(engine, "before_cursor_execute", on_exec)
    sa.event.listen(engine, "commit", on_commit)
    try:
        fn()
    finally:
        sa.event.remove(engine, "before_cursor_execute", on_exec)
        sa.event.remove(engine, "commit", on_commit)
    return counts["stmts"], counts["commits"]


def test_constant_database_cost_per_phase(engine, session: Session) -> None:
    """Statements grow by a fixed amount per phase and commits by one, whatever the log
    volume: each node's result is committed before the next phase runs."""
    costs = {}
    for n, lines in ((2, 1), (4, 1), (6, 1), (6, 40)):
        _, _, ex = _prepare(session, _chain(*[("test_chatty", {"lines": lines})] * n), credits=50)
        costs[(n, lines)] = _count_statements(engine, lambda ex=ex: run_execution(ex.id))
    per_phase = (costs[(4, 1)][0] - costs[(2, 1)][0]) / 2
    assert (costs[(6, 1)][0] - costs[(4, 1)][0]) / 2 == per_phase
    # One transaction per phase: lease check, the previous node's log batch and result,
    # this node's debit (2 on SQLite) and start; plus the BEGIN (explicit on SQLite; on
    # PostgreSQL BEGIN and COMMIT travel as statements in the batches, see engine.run).
    assert per_phase <= 7, costs
    assert costs[(6, 40)][0] == costs[(6, 1)][0], "log lines must be inserted in one batch"
    commits_per_phase = (costs[(6, 1)][1] - costs[(4, 1)][1]) / 2
    assert commits_per_phase == 1, costs


def test_credential_deleted_after_enqueue_fails_cleanly(engine, session: Session) -> None:
    from flowbuilder.platform.crud import credentials_crud

    user, cred, wf = _credential_workflow(session)
    ex = prepare_execution(session=session, workflow_id=wf.id, user_id=user.id)
    session.commit()
    credentials_crud.delete_credential(session=session, credential_id=cred.id, user_id=user.id)
    session.commit()
    result = run_execution(ex.id)
    assert result.outcome == Outcome.FAILED
    ex = _reload(session, ex)
    assert ex.status == ExecutionStatus.FAILED and "no longer available" in ex.error
    assert balance_crud.get_balance(session=session, user_id=user.id) == 10
    assert "tok-123456" not in ex.error


# ------------------------------------------------------------------- one phase, many nodes


def test_nodes_of_one_phase_run_concurrently(engine, session: Session) -> None:
    user, _, ex = _prepare(session, _parallel(*[("delay", {"seconds": 0.3})] * 4), credits=10)
    stmts, commits = _count_statements(engine, lambda: run_execution(ex.id))
    phases = phase_crud.list_phases(session=session, execution_id=ex.id, user_id=user.id)
    assert [p.number for p in phases] == [1, 1, 1, 1]
    assert [p.status for p in phases] == [PhaseStatus.COMPLETED] * 4
    # Every node had started before any of them finished: they overlapped.
    assert max(p.started_at for p in phases) < min(p.completed_at for p in phases)
    assert balance_crud.get_balance(session=session, user_id=user.id) == 6
    # One phase: claim, start, end, finish — the same commits as a one-node phase.
    _, _, single = _prepare(session, _parallel(("delay", {"seconds": 0.01})), credits=10)
    _, single_commits = _count_statements(engine, lambda: run_execution(single.id))
    assert commits == single_commits


def test_insufficient_credits_within_a_phase(engine, session: Session) -> None:
    user, _, ex = _prepare(session, _parallel(*[("test_chatty", {"lines": 1})] * 4), credits=4)
    balance_crud.debit_credits(session=session, user_id=user.id, amount=2, idempotency_key="y")
    session.commit()
    result = run_execution(ex.id)
    assert result.outcome == Outcome.FAILED and "insufficient credits" in result.error
    statuses = [
        p.status
        for p in phase_crud.list_phases(session=session, execution_id=ex.id, user_id=user.id)
    ]
    # Two were paid for and ran; the third could not be paid; the fourth never started.
    assert statuses == [
        PhaseStatus.COMPLETED,
        PhaseStatus.COMPLETED,
        PhaseStatus.FAILED,
        PhaseStatus.SKIPPED,
    ]
    assert balance_crud.get_balance(session=session, user_id=user.id) == 0
    assert _reload(session, ex).credits_consumed == 2


def test_one_failing_node_fails_the_run_after_its_phase(engine, session: Session) -> None:
    definition = _parallel(("test_chatty", {"lines": 2}), ("test_boom", {}))
    definition["nodes"].append({"id": "after", "type": "test_chatty", "inputs": {"lines": 1}})
    definition["edges"].append(
        {"source": "p0", "sourceHandle": "n", "target": "after", "targetHandle": "after"}
    )
    user, _, ex = _prepare(session, definition, credits=10)
    run_execution(ex.id)
    ex = _reload(session, ex)
    assert ex.status == ExecutionStatus.FAILED and "p1 (test_boom) failed" in ex.error
    by_node = {
        p.node_id: p.status
        for p in phase_crud.list_phases(session=session, execution_id=ex.id, user_id=user.id)
    }
    assert by_node == {
        "p0": PhaseStatus.COMPLETED,
        "p1": PhaseStatus.FAILED,
        "after": PhaseStatus.SKIPPED,
    }
    # p0 paid 1; p1's 3 were refunded; "after" never ran.
    assert balance_crud.get_balance(session=session, user_id=user.id) == 9


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ([1, 2], "must be a JSON object"),
        ({"when": object()}, "not JSON serialisable"),
        ({"x": float("nan")}, "not JSON serialisable"),
        ({"big": "x" * 600_000}, "bytes, more than"),
    ],
)
def test_bad_execution_inputs_refused_and_nothing_recorded(
    engine, session: Session, inputs: Any, message: str
) -> None:
    user = make_user(session, credits=10)
    wf = make_workflow(session, user, definition=json_definition(1), publish=True)
    session.commit()
    with pytest.raises(ValidationFailed, match=message):
        prepare_execution(session=session, workflow_id=wf.id, user_id=user.id, inputs=inputs)
    session.rollback()
    assert session.exec(select(WorkflowExecution)).all() == []


def test_a_cached_plan_never_runs_a_run_whose_version_was_deleted(engine, session: Session) -> None:
    """Workers keep parsed plans by version id; a version deleted after its plan was cached
    still ends the next run as "version missing" (its id is NULL on the execution)."""
    from flowbuilder.platform.engine import run as run_module
    from flowbuilder.platform.models import WorkflowVersion

    user, wf, first = _prepare(session, json_definition(1), credits=10)
    assert run_execution(first.id).outcome == Outcome.COMPLETED
    assert run_module._cached_plan(first.workflow_version_id) is not None
    # A second run of the same version uses the cached plan and completes the same way.
    second = prepare_execution(session=session, workflow_id=wf.id, user_id=user.id)
    session.commit()
    assert run_execution(second.id).outcome == Outcome.COMPLETED
    third = prepare_execution(session=session, workflow_id=wf.id, user_id=user.id)
    session.commit()
    session.execute(
        sa.delete(WorkflowVersion).where(WorkflowVersion.id == first.workflow_version_id)
    )
    session.commit()
    result = run_execution(third.id)
    assert result.outcome == Outcome.FAILED and result.error == "workflow version missing"
    third = _reload(session, third)
    assert third.status == ExecutionStatus.FAILED
    assert third.error == "the workflow version was deleted before the run"


def test_the_heartbeat_renews_the_lease_while_a_node_runs_and_brings_a_cancel(
    engine, session: Session
) -> None:
    """While a long node runs, only the heartbeat's thread touches the database: it renews
    the lease (every third of LEASE_SECONDS), and it is what tells the node of a cancel
    requested meanwhile (``ctx.is_cancelled()``), so the run ends long before the node's
    20 s. The run does not wait for that thread to start; it must start all the same."""
    definition = {
        "version": 1,
        "nodes": [{"id": "wait", "type": "delay", "inputs": {"seconds": 20}}],
        "edges": [],
    }
    with override_settings(LEASE_SECONDS=0.6):
        user, _, ex = _prepare(session, definition, credits=10)
        results: list[RunResult] = []
        thread = threading.Thread(target=lambda: results.append(run_execution(ex.id)))
        thread.start()

        def lease() -> Any:
            with Session(engine) as s:
                row = s.get(WorkflowExecution, ex.id)
                return row.lease_expires_at if row.status == ExecutionStatus.RUNNING else None

        first = None
        for _ in range(1000):  # at most 10 s for the run to start
            if (first := lease()) is not None:
                break
            time.sleep(0.01)
        assert first is not None, "the run did not start"
        later = first
        for _ in range(200):  # a beat is due every 0.2 s; at most 2 s
            time.sleep(0.01)
            if (later := lease()) is not None and later > first:
                break
        assert later is not None and later > first, "the lease was not renewed"
        with Session(engine) as s:
            cancel_execution(session=s, execution_id=ex.id, user_id=user.id)
            s.commit()
        thread.join(10)
        assert not thread.is_alive(), "the cancel did not reach the running node"
    assert results and results[0].outcome == Outcome.CANCELLED
