"""A phase's transaction sent whole (PostgreSQL on psycopg): BEGIN, the fence, the previous
phase's results, the next phase's debit and start, and the COMMIT in one round trip, sent
before any answer is read. The fence and the debit refuse by failing their statement,
which aborts the transaction; the step is then made again the way that reads answers.

Each test changes the database between two phases (``on_phase_started``: after a phase's
start committed, before its node runs) and checks that nothing the refused transaction
sent was kept: the outcome, the phases and the ledger are those of the reading path. The
same tests run on SQLite, which only has that path."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlmodel import Session

from flowbuilder.platform.crud import balance_crud, phase_crud
from flowbuilder.platform.engine import Outcome, cancel_execution, prepare_execution, run_execution
from flowbuilder.platform.engine import run as run_module
from flowbuilder.platform.models import ExecutionStatus, PhaseStatus, WorkflowExecution
from tests.factories import json_definition, make_user, make_workflow


@pytest.fixture
def whole(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts the transactions sent whole, and those refused (rolled back, made again)."""
    seen = {"sent": 0, "refused": 0}
    real = run_module._RunConnection.sent_whole

    @contextlib.contextmanager
    def counting(self: Any, state: Any, writes: Any) -> Iterator[Any]:
        seen["sent"] += 1
        try:
            with real(self, state, writes) as value:
                yield value
        except run_module._Unspeculate:
            seen["refused"] += 1
            raise

    monkeypatch.setattr(run_module._RunConnection, "sent_whole", counting)
    return seen


def _prepare(session: Session, phases: int = 3, credits: int = 10) -> tuple[Any, Any]:
    user = make_user(session, credits=credits)
    wf = make_workflow(session, user, definition=json_definition(phases), publish=True)
    session.commit()
    ex = prepare_execution(session=session, workflow_id=wf.id, user_id=user.id)
    session.commit()
    return user, ex


def _after_first(engine: sa.Engine, change: Any) -> Any:
    """``on_phase_started``: ``change(session)`` once, after the first phase started."""

    def hook(phase: Any) -> None:
        if phase.position == 0:
            with Session(engine) as s:
                change(s)
                s.commit()

    return hook


def _phases(session: Session, user: Any, ex: Any) -> list[Any]:
    session.rollback()
    session.expire_all()
    return phase_crud.list_phases(session=session, execution_id=ex.id, user_id=user.id)


def _balanced(session: Session, user: Any) -> int:
    balance = balance_crud.get_balance(session=session, user_id=user.id)
    assert balance == balance_crud.ledger_total(session=session, user_id=user.id)
    return balance


def _postgres(engine: sa.Engine) -> bool:
    return engine.dialect.driver == "psycopg"


def test_a_run_sends_each_step_whole(engine, session: Session, whole: dict[str, int]) -> None:
    user, ex = _prepare(session, phases=3)
    assert run_execution(ex.id).outcome == Outcome.COMPLETED
    # Three phase starts and the run's end; none refused.
    assert whole == ({"sent": 4, "refused": 0} if _postgres(engine) else {"sent": 0, "refused": 0})
    assert [p.status for p in _phases(session, user, ex)] == [PhaseStatus.COMPLETED] * 3
    assert _balanced(session, user) == 7


def test_a_cancel_refuses_the_fence_and_nothing_of_it_is_kept(
    engine, session: Session, whole: dict[str, int]
) -> None:
    user, ex = _prepare(session)
    hook = _after_first(
        engine, lambda s: cancel_execution(session=s, execution_id=ex.id, user_id=user.id)
    )
    assert run_execution(ex.id, on_phase_started=hook).outcome == Outcome.CANCELLED
    if _postgres(engine):
        assert whole["refused"] == 1
    phases = _phases(session, user, ex)
    assert [p.status for p in phases] == [
        PhaseStatus.COMPLETED,
        PhaseStatus.CANCELLED,
        PhaseStatus.CANCELLED,
    ]
    assert _balanced(session, user) == 9  # the second phase's debit did not stay


def test_a_short_balance_refuses_the_debit_and_the_reading_path_fails_the_run(
    engine, session: Session, whole: dict[str, int]
) -> None:
    user, ex = _prepare(session, credits=3)

    def spend(s: Session) -> None:  # elsewhere, the user spends what the run still needs
        balance_crud.debit_credits(
            session=s, user_id=user.id, amount=2, idempotency_key="elsewhere", reason="other"
        )

    result = run_execution(ex.id, on_phase_started=_after_first(engine, spend))
    assert result.outcome == Outcome.FAILED and "insufficient" in (result.error or "").lower()
    if _postgres(engine):
        assert whole["refused"] == 1
    phases = _phases(session, user, ex)
    # The first phase's results were recorded by the step made again; the second phase
    # failed for its credits and charged nothing.
    assert [p.status for p in phases][:2] == [PhaseStatus.COMPLETED, PhaseStatus.FAILED]
    assert phases[0].outputs is not None and phases[1].credits_charged == 0
    assert _balanced(session, user) == 0


def test_a_lease_taken_over_refuses_the_fence_and_nothing_is_written(
    engine, session: Session, whole: dict[str, int]
) -> None:
    user, ex = _prepare(session)

    def take_over(s: Session) -> None:
        s.execute(
            sa.update(WorkflowExecution)
            .where(WorkflowExecution.id == ex.id)
            .values(lease_owner="another-delivery")
        )

    result = run_execution(ex.id, on_phase_started=_after_first(engine, take_over))
    assert result.outcome == Outcome.LEASE_LOST
    if _postgres(engine):
        assert whole["refused"] == 1
    phases = _phases(session, user, ex)
    # The first phase's results and the second's start were in the refused transaction.
    assert [p.status for p in phases] == [
        PhaseStatus.RUNNING,
        PhaseStatus.CREATED,
        PhaseStatus.CREATED,
    ]
    assert phases[0].outputs is None
    assert _balanced(session, user) == 9
    assert session.get(WorkflowExecution, ex.id).status == ExecutionStatus.RUNNING


def test_a_phase_debited_before_is_not_debited_again(
    engine, session: Session, whole: dict[str, int]
) -> None:
    """An earlier delivery debited the next phase and died before its commit came back
    (or the debit's answer was lost): the debit sent whole refuses (its key exists), and
    the reading path takes the earlier debit as the phase's."""
    user, ex = _prepare(session)
    second = _phases(session, user, ex)[1]

    def debit_second(s: Session) -> None:
        balance_crud.debit_credits(
            session=s,
            user_id=user.id,
            amount=1,
            idempotency_key=f"phase:{second.id}",
            execution_id=ex.id,
            phase_id=second.id,
            reason="an earlier delivery",
        )

    result = run_execution(ex.id, on_phase_started=_after_first(engine, debit_second))
    assert result.outcome == Outcome.COMPLETED
    if _postgres(engine):
        assert whole["refused"] == 1
    assert [p.status for p in _phases(session, user, ex)] == [PhaseStatus.COMPLETED] * 3
    assert _balanced(session, user) == 7  # three phases, each debited once


def _fan_out() -> dict[str, Any]:
    """One node, then two nodes in parallel (one phase of two nodes) reading it."""
    return {
        "version": 1,
        "nodes": [
            {
                "id": "root",
                "type": "add_property_to_json",
                "inputs": {"json": {"start": True}, "property_path": "a", "value": 1},
            },
            {
                "id": "left",
                "type": "add_property_to_json",
                "inputs": {"property_path": "l", "value": 2},
            },
            {
                "id": "right",
                "type": "add_property_to_json",
                "inputs": {"property_path": "r", "value": 3},
            },
        ],
        "edges": [
            {"source": "root", "sourceHandle": "json", "target": t, "targetHandle": "json"}
            for t in ("left", "right")
        ],
    }


def _prepare_fan_out(session: Session, credits: int) -> tuple[Any, Any]:
    user = make_user(session, credits=credits)
    wf = make_workflow(session, user, definition=_fan_out(), publish=True)
    session.commit()
    ex = prepare_execution(session=session, workflow_id=wf.id, user_id=user.id)
    session.commit()
    return user, ex


def test_a_phase_of_several_nodes_is_sent_whole(
    engine, session: Session, whole: dict[str, int]
) -> None:
    user, ex = _prepare_fan_out(session, credits=10)
    assert run_execution(ex.id).outcome == Outcome.COMPLETED
    # The first phase, the two-node phase, the run's end.
    assert whole == ({"sent": 3, "refused": 0} if _postgres(engine) else {"sent": 0, "refused": 0})
    phases = _phases(session, user, ex)
    assert [p.status for p in phases] == [PhaseStatus.COMPLETED] * 3
    assert {p.node_id: p.outputs["json"] for p in phases}["right"] == {
        "start": True,
        "a": 1,
        "r": 3,
    }
    assert _balanced(session, user) == 7


def test_one_debit_refused_in_a_phase_of_several_nodes_keeps_none_of_them(
    engine, session: Session, whole: dict[str, int]
) -> None:
    """The balance covers one of the two parallel nodes: the transaction sent whole is
    refused as a whole, and the reading path starts what it can pay for (the node that
    started still runs) and fails the other, as without batches."""
    user, ex = _prepare_fan_out(session, credits=3)

    def spend(s: Session) -> None:
        balance_crud.debit_credits(
            session=s, user_id=user.id, amount=1, idempotency_key="elsewhere", reason="other"
        )

    result = run_execution(ex.id, on_phase_started=_after_first(engine, spend))
    assert result.outcome == Outcome.FAILED
    if _postgres(engine):
        assert whole["refused"] == 1
    phases = {p.node_id: p for p in _phases(session, user, ex)}
    assert phases["root"].status == PhaseStatus.COMPLETED
    statuses = sorted(p.status.value for name, p in phases.items() if name != "root")
    assert statuses == [PhaseStatus.COMPLETED.value, PhaseStatus.FAILED.value]
    charged = sum(p.credits_charged for p in phases.values())
    assert charged == 2 and _balanced(session, user) == 0


def test_only_the_claim_commits_without_waiting_for_the_disk(engine, session: Session) -> None:
    """The claim's transaction says ``synchronous_commit = off`` (a server crash may lose
    the claim, never a debit); every other transaction of the run, the phases' debits
    among them, commits the default way. Read from the statements the run sends."""
    if not _postgres(engine):
        pytest.skip("the claim goes in one batch on psycopg only")
    user, ex = _prepare(session, phases=3)
    sent: list[str] = []

    def watch(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        sent.append(" ".join(statement.split()))

    sa.event.listen(engine, "before_cursor_execute", watch)
    try:
        assert run_execution(ex.id, engine=engine).outcome == Outcome.COMPLETED
    finally:
        sa.event.remove(engine, "before_cursor_execute", watch)
    relaxed = [i for i, text in enumerate(sent) if "synchronous_commit" in text]
    begins = [i for i, text in enumerate(sent) if text == "BEGIN"]
    commits = [i for i, text in enumerate(sent) if text == "COMMIT"]
    assert len(relaxed) == 1 and sent[relaxed[0]] == "SET LOCAL synchronous_commit = off"
    # In the run's first transaction (the claim: BEGIN, this, the claim's UPDATE), ...
    assert begins[0] < relaxed[0] < commits[0] and relaxed[0] == begins[0] + 1
    assert sent[relaxed[0] + 1].startswith("UPDATE workflow_execution")
    # ... and in no other: each phase's transaction and the run's end commit as usual.
    assert len(commits) >= 4
    assert _balanced(session, user) == 7
