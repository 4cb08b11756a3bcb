"""One database connection held for the whole run: a connection lost between two phases
is replaced at the next fence and the run goes on; one lost inside a phase's transaction
is an infrastructure failure (TransientError) and the run resumes from its last commit.
PostgreSQL only: the connection is cut with pg_terminate_backend."""

from __future__ import annotations

import time
from typing import Any

import pytest
import sqlalchemy as sa
from sqlmodel import Session

from flowbuilder.platform.crud import balance_crud, phase_crud
from flowbuilder.platform.engine import Outcome, prepare_execution, run_execution
from flowbuilder.platform.engine import run as run_module
from flowbuilder.platform.errors import TransientError
from flowbuilder.platform.models import ExecutionStatus, PhaseStatus, WorkflowExecution
from flowbuilder.platform.nodes import register_node_type, unregister_node_type
from flowbuilder.platform.nodes.base import NodeType, PortSpec
from tests.factories import make_user, make_workflow
from tests.pg_cut import terminate_other_backends

_cut: dict[str, Any] = {}


def _cutter(inputs: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Cuts every other connection to the test database while the node runs (between
    two transactions of the run), once per key."""
    if inputs["key"] in _cut and not _cut[inputs["key"]]["done"]:
        _cut[inputs["key"]]["done"] = True
        terminate_other_backends(_cut[inputs["key"]]["engine"])
    return {"value": inputs["key"]}


def _cutter_type(name: str, run: Any, **flags: Any) -> NodeType:
    return NodeType(
        type=name,
        run=run,
        inputs={"key": PortSpec("string", required=True), "after": PortSpec("any")},
        outputs={"value": PortSpec("any")},
        credits=1,
        **flags,
    )


@pytest.fixture(autouse=True)
def _node():
    types = [
        _cutter_type("test_cutter", _cutter),
        _cutter_type("test_pure_cutter", _pure_cutter, pure=True, inline=True),
    ]
    for node_type in types:
        register_node_type(node_type, replace=True)
    yield
    for node_type in types:
        unregister_node_type(node_type.type)


def _chain(key: str, phases: int, node_type: str = "test_cutter") -> dict[str, Any]:
    return {
        "version": 1,
        "nodes": [
            {"id": f"c{i}", "type": node_type, "inputs": {"key": key}} for i in range(phases)
        ],
        "edges": [
            {
                "source": f"c{i - 1}",
                "sourceHandle": "value",
                "target": f"c{i}",
                "targetHandle": "after",
            }
            for i in range(1, phases)
        ],
    }


def _prepare(session: Session, key: str, phases: int = 3, node_type: str = "test_cutter"):
    user = make_user(session, credits=100)
    wf = make_workflow(session, user, definition=_chain(key, phases, node_type), publish=True)
    session.commit()
    ex = prepare_execution(session=session, workflow_id=wf.id, user_id=user.id)
    session.commit()
    return user, ex


def _check_completed(session: Session, user: Any, ex: Any, phases: int) -> None:
    session.rollback()
    session.expire_all()
    row = session.get(WorkflowExecution, ex.id)
    assert row.status == ExecutionStatus.COMPLETED and row.credits_consumed == phases
    listed = phase_crud.list_phases(session=session, execution_id=ex.id, user_id=user.id)
    assert [p.status for p in listed] == [PhaseStatus.COMPLETED] * phases
    # Each phase debited exactly once, whatever was retried.
    assert balance_crud.get_balance(session=session, user_id=user.id) == 100 - phases
    assert balance_crud.ledger_total(session=session, user_id=user.id) == 100 - phases


@pytest.fixture
def pg_only(engine: sa.Engine) -> sa.Engine:
    if engine.dialect.name != "postgresql":
        pytest.skip("pg_terminate_backend is PostgreSQL's")
    return engine


def test_connection_lost_between_phases_is_replaced_at_the_fence(pg_only, session) -> None:
    key = "between"
    _cut[key] = {"done": False, "engine": pg_only}
    user, ex = _prepare(session, key)
    result = run_execution(ex.id)
    assert _cut[key]["done"]
    assert result.outcome == Outcome.COMPLETED, result
    _check_completed(session, user, ex, 3)


def test_connection_lost_inside_a_transaction_is_transient_and_resumes(
    pg_only, session, monkeypatch
) -> None:
    key = "inside"
    user, ex = _prepare(session, key)
    real = run_module._start_phase
    calls = {"n": 0}

    def cut_then_start(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            # The second phase's start: after the fence and the first phase's results
            # were sent (and answered), before its debit: mid-transaction.
            terminate_other_backends(pg_only)
        return real(*args)

    monkeypatch.setattr(run_module, "_start_phase", cut_then_start)
    with pytest.raises(TransientError):
        run_execution(ex.id)
    monkeypatch.setattr(run_module, "_start_phase", real)
    session.rollback()
    session.expire_all()
    assert session.get(WorkflowExecution, ex.id).lease_owner is None  # released
    assert run_execution(ex.id).outcome == Outcome.COMPLETED
    _check_completed(session, user, ex, 3)


_pure_calls: dict[str, int] = {}


def _pure_cutter(inputs: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Pure and inline (it starts before its phase's transaction is sent): c1 waits until
    its phase's start is committed, then cuts every other connection, the run's held one
    included, which is idle until the next phase's transaction."""
    _pure_calls[ctx.node_id] = _pure_calls.get(ctx.node_id, 0) + 1
    cut = _cut.get(inputs["key"])
    if ctx.node_id == "c1" and cut is not None and not cut["done"]:
        engine = cut["engine"]
        for _ in range(3000):
            with engine.pool._creator() as raw:  # outside the pool: not a run's connection
                status = raw.execute(
                    "SELECT status FROM execution_phase WHERE execution_id = %s AND node_id = 'c1'",
                    (ctx.execution_id,),
                ).fetchone()[0]
            if status == "running":
                break
            ctx.check()
            time.sleep(0.01)
        cut["done"] = True
        terminate_other_backends(engine)
    return {"value": inputs["key"]}


def test_connection_lost_while_idle_before_a_phase_sent_whole(pg_only, session) -> None:
    """The check that the held connection is alive (idle, nothing on its socket) is made
    on the thread that sends the next transaction, after that phase's pure node started:
    found dead, the transaction is not sent, the node's result is thrown away, and the
    step is made again the fenced way, which replaces the connection. The run completes,
    each phase debited once; c2 ran twice (its early start discarded)."""
    key = "idle-before-whole"
    _cut[key] = {"done": False, "engine": pg_only}
    _pure_calls.clear()
    user, ex = _prepare(session, key, node_type="test_pure_cutter")
    result = run_execution(ex.id)
    assert _cut[key]["done"]
    assert result.outcome == Outcome.COMPLETED, result
    assert _pure_calls == {"c0": 1, "c1": 1, "c2": 2}
    _check_completed(session, user, ex, 3)
