"""Every run ends, whatever its nodes return or however often its worker dies
(issue 10, items 1-4): the engine run directly on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import math
import uuid
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlmodel import Session, select

from flowbuilder.platform.crud import balance_crud, execution_crud, phase_crud
from flowbuilder.platform.db import unit_of_work
from flowbuilder.platform.engine import Outcome, prepare_execution, run_execution
from flowbuilder.platform.engine.outputs import Unstorable, storable_outputs
from flowbuilder.platform.jsonvalues import copy_json, make_storable
from flowbuilder.platform.models import (
    ExecutionPhase,
    ExecutionStatus,
    PhaseStatus,
    WorkflowExecution,
    utcnow,
)
from flowbuilder.platform.nodes import register_node_type, unregister_node_type
from flowbuilder.platform.nodes.base import NodeType, PortSpec
from flowbuilder.platform.settings import override_settings
from tests.factories import make_user, make_workflow

_returns: dict[str, Any] = {}


def _returner(inputs: dict[str, Any], ctx) -> dict[str, Any]:
    return _returns[inputs["key"]]


def _echo(inputs: dict[str, Any], ctx) -> dict[str, Any]:
    return {"value": inputs.get("value")}


_received: dict[str, list[Any]] = {}


def _recorder(inputs: dict[str, Any], ctx) -> dict[str, Any]:
    # What the node was handed, as JSON text (what a copy would lose is visible here).
    _received.setdefault(inputs["key"], []).append(json.dumps(inputs["value"]))
    return {"value": inputs["value"], "extra": [inputs["value"]]}


def _deep(levels: int) -> Any:
    value: Any = "bottom"
    for _ in range(levels):
        value = [value]
    return value


NODES = [
    NodeType(
        type="test_returner",
        run=_returner,
        inputs={"key": PortSpec("string", required=True)},
        outputs={"value": PortSpec("any")},
        credits=2,
    ),
    NodeType(
        type="test_recorder",
        run=_recorder,
        inputs={"key": PortSpec("string", required=True), "value": PortSpec("any")},
        outputs={"value": PortSpec("any"), "extra": PortSpec("any")},
        credits=1,
    ),
    NodeType(
        type="test_echo",
        run=_echo,
        inputs={"value": PortSpec("any")},
        outputs={"value": PortSpec("any")},
        credits=1,
    ),
]


@pytest.fixture(autouse=True, scope="module")
def _nodes():
    for node_type in NODES:
        register_node_type(node_type, replace=True)
    yield
    for node_type in NODES:
        unregister_node_type(node_type.type)


def _two_phases(key: str) -> dict[str, Any]:
    return {
        "version": 1,
        "nodes": [
            {"id": "src", "type": "test_returner", "inputs": {"key": key}},
            {"id": "next", "type": "test_echo", "inputs": {}},
        ],
        "edges": [
            {"source": "src", "sourceHandle": "value", "target": "next", "targetHandle": "value"}
        ],
    }


def _prepare(session: Session, definition: dict[str, Any], credits: int = 100):
    user = make_user(session, credits=credits)
    wf = make_workflow(session, user, definition=definition, publish=True)
    session.commit()
    ex = prepare_execution(session=session, workflow_id=wf.id, user_id=user.id)
    session.commit()
    return user, ex


def _reload(session: Session, ex_id: uuid.UUID) -> WorkflowExecution:
    session.rollback()
    session.expire_all()
    return session.get(WorkflowExecution, ex_id)


def _books_balance(session: Session, user_id: uuid.UUID) -> None:
    assert balance_crud.get_balance(session=session, user_id=user_id) == balance_crud.ledger_total(
        session=session, user_id=user_id
    )


# ----------------------------------------------------------------------- storable outputs


def test_make_storable_repairs_strings_keys_and_numbers() -> None:
    dirty = {
        "a\x00b": "x\x00y",
        "s": "lone \ud800 surrogate",
        "n": [math.nan, math.inf, -math.inf, 1.5],
        "t": (1, 2),
        "o": object,
        3: "int key",
    }
    clean = make_storable(dirty, max_depth=10, repair=True)
    assert clean["a\ufffdb"] == "x\ufffdy"
    assert "\ud800" not in clean["s"] and clean["s"].startswith("lone ")
    assert clean["n"] == [None, None, None, 1.5]
    assert clean["t"] == [1, 2] and clean["3"] == "int key"
    assert isinstance(clean["o"], str)
    # and the result is what PostgreSQL accepts: no NUL escape, strict JSON
    import json

    text = json.dumps(clean, allow_nan=False)
    assert "\\u0000" not in text
    text.encode("utf-8")


@pytest.mark.parametrize(
    "value, problem",
    [
        ({"a": "x\x00"}, "NUL"),
        ({"a": [1, math.nan]}, "not a JSON number"),
        ({"k\x00": 1}, "NUL"),
        ({"a": "\udc80"}, "surrogate"),
    ],
)
def test_make_storable_refuses_when_not_repairing(value: Any, problem: str) -> None:
    with pytest.raises(Unstorable, match=problem):
        make_storable(value, max_depth=10, repair=False)


def test_deep_values_never_recurse() -> None:
    deep = _deep(100_000)
    with pytest.raises(Unstorable, match="nested deeper than 64 levels"):
        make_storable({"v": deep}, max_depth=64, repair=True)
    # copying (the plan's input resolution) is iterative too
    copied = copy_json({"v": deep})
    assert copied["v"] is not deep
    with pytest.raises(Unstorable):
        storable_outputs({"v": deep}, max_bytes=10_000, max_depth=64)


def test_outputs_capped_in_size() -> None:
    out = storable_outputs({"big": "x" * 5000, "small": 1}, max_bytes=1024, max_depth=10)
    assert out["_truncated"] is True and out["small"] == 1
    assert out["big"] == {"_truncated": True, "size_bytes": 5002}
    many = storable_outputs({f"k{i}": "v" * 50 for i in range(5000)}, max_bytes=2048, max_depth=4)
    import json

    assert len(json.dumps(many)) <= 2048 and many["_omitted_keys"] > 0


@pytest.mark.parametrize(
    "payload, check",
    [
        ({"value": "a\x00b"}, lambda v: v == "a\ufffdb"),
        ({"value": {"k\x00": [math.nan, math.inf]}}, lambda v: v == {"k\ufffd": [None, None]}),
        ({"value": "\ud83d alone"}, lambda v: "\ud83d" not in v),
    ],
)
def test_hostile_outputs_are_stored_and_flow_on(
    engine, session: Session, payload: dict[str, Any], check
) -> None:
    key = uuid.uuid4().hex
    _returns[key] = payload
    user, ex = _prepare(session, _two_phases(key))
    result = run_execution(ex.id)
    assert result.outcome == Outcome.COMPLETED, result.error
    phases = phase_crud.list_phases(session=session, execution_id=ex.id, user_id=user.id)
    assert check(phases[0].outputs["value"]) and check(phases[1].outputs["value"])
    _books_balance(session, user.id)


@pytest.mark.parametrize(
    "value",
    [
        {"q": 'a"b\\', '"\\': "[", "]": "{{", "u": "é😀", "t": (1, 2), 3: None, "f": 0.1},
        {"k\x00": "\ud800", "n": math.nan, "deep": [[[{"x": "]]"}]]]},
        [{"id": i, "name": f"item-{i}", "tags": ["a", "b"]} for i in range(300)],
    ],
)
def test_what_a_phase_is_handed_is_what_a_resumed_run_reads_back(
    engine, session: Session, value: Any
) -> None:
    """Outputs flow on in memory (made storable once, their text reused for the next
    inputs): every phase gets, and stores as its inputs, exactly what the database gives
    back for its upstream's outputs."""
    key = uuid.uuid4().hex
    _returns[key] = {"value": value}
    definition = {
        "version": 1,
        "nodes": [{"id": "src", "type": "test_returner", "inputs": {"key": key}}]
        + [{"id": f"r{i}", "type": "test_recorder", "inputs": {"key": key}} for i in (1, 2)],
        "edges": [
            {"source": s, "sourceHandle": "value", "target": t, "targetHandle": "value"}
            for s, t in (("src", "r1"), ("r1", "r2"))
        ],
    }
    user, ex = _prepare(session, definition)
    result = run_execution(ex.id)
    assert result.outcome == Outcome.COMPLETED, result.error
    phases = phase_crud.list_phases(session=session, execution_id=ex.id, user_id=user.id)
    assert [p.node_id for p in phases] == ["src", "r1", "r2"]
    stored = phases[0].outputs["value"]
    assert stored == make_storable(value, max_depth=64, repair=True)
    for phase, received in zip(phases[1:], _received.pop(key), strict=True):
        assert json.loads(received) == stored
        assert phase.inputs == {"key": key, "value": stored}
        assert phase.outputs == {"value": stored, "extra": [stored]}


@pytest.mark.parametrize("levels", [65, 2000, 100_000])
def test_too_deep_output_fails_the_node_and_refunds(engine, session: Session, levels) -> None:
    key = uuid.uuid4().hex
    _returns[key] = {"value": _deep(levels)}
    user, ex = _prepare(session, _two_phases(key), credits=10)
    result = run_execution(ex.id)
    assert result.outcome == Outcome.FAILED
    ex = _reload(session, ex.id)
    assert ex.status == ExecutionStatus.FAILED and ex.lease_owner is None
    assert "outputs cannot be stored" in ex.error and "nested deeper than 64" in ex.error
    phases = phase_crud.list_phases(session=session, execution_id=ex.id, user_id=user.id)
    assert [p.status for p in phases] == [PhaseStatus.FAILED, PhaseStatus.SKIPPED]
    assert balance_crud.get_balance(session=session, user_id=user.id) == 10  # refunded
    _books_balance(session, user.id)


def test_data_error_at_write_fails_the_run_not_retried(engine, session: Session, monkeypatch):
    """Whatever slips past the boundary: a write refused for its data ends the run."""
    from flowbuilder.platform.engine import run as run_module

    key = uuid.uuid4().hex
    _returns[key] = {"value": 1}
    user, ex = _prepare(session, _two_phases(key), credits=10)
    real = run_module._record_group

    def record_then_refuse(s, state, run, settings):
        real(s, state, run, settings)
        raise sa.exc.DataError("UPDATE ...", {}, ValueError("unsupported Unicode escape"))

    monkeypatch.setattr(run_module, "_record_group", record_then_refuse)
    # On psycopg the refused write was in a batch sent in autocommit mode (the batch
    # carries its own BEGIN): the driver must be back to its own transactions after it,
    # or every later statement of the run would commit on its own.
    modes: list[bool] = []
    real_fence = run_module._RunConnection._fence

    def fence(self, session, state, writes):
        connection = session.connection()
        if connection.dialect.driver == "psycopg":
            modes.append(connection.connection.driver_connection.autocommit)
        return real_fence(self, session, state, writes)

    monkeypatch.setattr(run_module._RunConnection, "_fence", fence)
    result = run_execution(ex.id)  # no TransientError: not an infrastructure retry
    assert result.outcome == Outcome.FAILED
    assert not any(modes), modes
    if engine.dialect.driver == "psycopg":
        assert modes
        with engine.connect() as conn:  # the run's connection, back in the pool
            assert not conn.connection.driver_connection.autocommit
    ex = _reload(session, ex.id)
    assert ex.status == ExecutionStatus.FAILED
    assert "could not be stored" in ex.error and "unsupported Unicode escape" in ex.error
    phases = phase_crud.list_phases(session=session, execution_id=ex.id, user_id=user.id)
    assert phases[0].status == PhaseStatus.FAILED and phases[0].credits_charged == 0
    assert balance_crud.get_balance(session=session, user_id=user.id) == 10
    _books_balance(session, user.id)
    assert run_execution(ex.id).outcome == Outcome.ALREADY_DONE


# ------------------------------------------------------------------- a failure is final


def _simulate_crash_after_refusal(session: Session, ex_id: uuid.UUID) -> None:
    """What a worker killed right after a credit refusal leaves: the phase recorded
    failed, the execution still running with a lapsed lease."""
    session.rollback()
    phase = session.exec(
        select(ExecutionPhase)
        .where(ExecutionPhase.execution_id == ex_id)
        .order_by(ExecutionPhase.number)
    ).first()
    phase.status = PhaseStatus.FAILED
    phase.error = "insufficient credits: needed 2, available 0"
    execution = session.get(WorkflowExecution, ex_id)
    execution.status = ExecutionStatus.RUNNING
    execution.started_at = utcnow()
    execution.lease_owner = "dead-worker"
    execution.lease_expires_at = utcnow() - timedelta(seconds=5)
    execution.attempts = 1
    session.commit()


def test_recorded_failure_is_final_after_crash_and_top_up(engine, session: Session) -> None:
    key = uuid.uuid4().hex
    _returns[key] = {"value": 1}
    user, ex = _prepare(session, _two_phases(key), credits=10)
    _simulate_crash_after_refusal(session, ex.id)
    balance_crud.grant_credits(session=session, user_id=user.id, amount=100)  # the top-up
    session.commit()
    result = run_execution(ex.id)
    assert result.outcome == Outcome.FAILED
    ex = _reload(session, ex.id)
    assert ex.status == ExecutionStatus.FAILED and "insufficient credits" in ex.error
    phases = phase_crud.list_phases(session=session, execution_id=ex.id, user_id=user.id)
    assert [p.status for p in phases] == [PhaseStatus.FAILED, PhaseStatus.SKIPPED]
    assert balance_crud.get_balance(session=session, user_id=user.id) == 110  # nothing charged
    _books_balance(session, user.id)


# ------------------------------------------------------------------ bounded attempts/time


def _crashed_in_phase(session: Session, ex_id: uuid.UUID, attempts: int, started_ago: float):
    """A run whose worker died mid-phase ``attempts`` times: phase running and debited."""
    session.rollback()
    execution = session.get(WorkflowExecution, ex_id)
    phase = session.exec(
        select(ExecutionPhase)
        .where(ExecutionPhase.execution_id == ex_id)
        .order_by(ExecutionPhase.number)
    ).first()
    balance_crud.debit_credits(
        session=session,
        user_id=execution.user_id,
        amount=phase.credits_cost,
        idempotency_key=f"phase:{phase.id}",
        execution_id=ex_id,
        phase_id=phase.id,
        reason="test",
    )
    phase.status, phase.credits_charged = PhaseStatus.RUNNING, phase.credits_cost
    execution.status = ExecutionStatus.RUNNING
    execution.started_at = utcnow() - timedelta(seconds=started_ago)
    execution.lease_owner = "dead-worker"
    execution.lease_expires_at = utcnow() - timedelta(seconds=1)
    execution.attempts = attempts
    session.commit()


def test_exhausted_attempts_end_failed_with_reason(engine, session: Session) -> None:
    key = uuid.uuid4().hex
    _returns[key] = {"value": 1}
    user, ex = _prepare(session, _two_phases(key), credits=10)
    with override_settings(EXECUTION_MAX_ATTEMPTS=5):
        _crashed_in_phase(session, ex.id, attempts=4, started_ago=1)
        # fourth crash so far: the fifth attempt still runs (and completes)
        key2 = uuid.uuid4().hex
        _returns[key2] = {"value": 2}
        user2, ex2 = _prepare(session, _two_phases(key2), credits=10)
        _crashed_in_phase(session, ex2.id, attempts=5, started_ago=1)
        assert run_execution(ex.id).outcome == Outcome.COMPLETED
        result = run_execution(ex2.id)
    assert result.outcome == Outcome.FAILED
    ex2 = _reload(session, ex2.id)
    assert ex2.status == ExecutionStatus.FAILED
    assert "crashed its worker 5 times" in ex2.error
    phases = phase_crud.list_phases(session=session, execution_id=ex2.id, user_id=user2.id)
    assert [p.status for p in phases] == [PhaseStatus.FAILED, PhaseStatus.SKIPPED]
    assert phases[0].credits_charged == 0
    assert balance_crud.get_balance(session=session, user_id=user2.id) == 10  # refunded
    _books_balance(session, user2.id)
    # the sweep has nothing to revive: the run is terminal
    with unit_of_work(engine) as s:
        stale = execution_crud.find_stale_executions(session=s, now=utcnow() + timedelta(days=1))
    assert ex2.id not in {e.id for e in stale}


def test_total_time_bounded_across_redeliveries(engine, session: Session) -> None:
    key = uuid.uuid4().hex
    _returns[key] = {"value": 1}
    user, ex = _prepare(session, _two_phases(key), credits=10)
    _crashed_in_phase(session, ex.id, attempts=1, started_ago=7200)
    with override_settings(EXECUTION_TIMEOUT_SECONDS=60, EXECUTION_MAX_TOTAL_SECONDS=3600):
        result = run_execution(ex.id)
    assert result.outcome == Outcome.FAILED
    ex = _reload(session, ex.id)
    assert "timed out" in ex.error and "EXECUTION_MAX_TOTAL_SECONDS" in ex.error
    _books_balance(session, user.id)


def test_unexpected_engine_error_ends_the_run(engine, session: Session, monkeypatch) -> None:
    from flowbuilder.platform.engine import run as run_module

    key = uuid.uuid4().hex
    _returns[key] = {"value": 1}
    user, ex = _prepare(session, _two_phases(key), credits=10)

    def broken(*args, **kwargs):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(run_module, "invoke_all", broken)
    result = run_execution(ex.id)
    assert result.outcome == Outcome.FAILED
    ex = _reload(session, ex.id)
    assert ex.status == ExecutionStatus.FAILED and "RecursionError" in ex.error
    assert balance_crud.get_balance(session=session, user_id=user.id) == 10
    _books_balance(session, user.id)


def test_deep_property_path_ends_the_run(engine, session: Session) -> None:
    """add_property_to_json with a 2,000-segment path builds a 2,000-deep value: the run
    ends failed with a clear reason (or the definition is refused), never stuck."""
    from flowbuilder.platform.errors import ValidationFailed

    path = ".".join(["a"] * 2000)
    definition = {
        "version": 1,
        "nodes": [
            {
                "id": "deep",
                "type": "add_property_to_json",
                "inputs": {"json": {}, "property_path": path, "value": 1},
            },
            {"id": "next", "type": "test_echo", "inputs": {}},
        ],
        "edges": [
            {"source": "deep", "sourceHandle": "json", "target": "next", "targetHandle": "value"}
        ],
    }
    try:
        user, ex = _prepare(session, definition, credits=10)
    except ValidationFailed:
        return  # refused up front: nothing to run
    result = run_execution(ex.id)
    assert result.outcome == Outcome.FAILED
    ex = _reload(session, ex.id)
    assert ex.status == ExecutionStatus.FAILED and ex.error
    assert "RecursionError" not in ex.error
    _books_balance(session, user.id)
