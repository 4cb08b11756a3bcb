"""Pure nodes start before their phase's start is committed (PostgreSQL on psycopg).

A phase sent whole (see test_run_whole.py) is on its way, COMMIT included, before any
answer is read. When every node of the phase is of a pure type (``NodeType.pure``: it
computes from its inputs only), the nodes start before that transaction is even built,
with the outputs of the phase it records as their inputs, and their work overlaps all of
it. If that transaction is refused, the nodes are told to stop and their results are
never read. A node that is not pure starts only once its phase's start is committed, as
before.

The probes below look at the database from their own connection while they run: the
phase of an early node is not committed as running yet when a lock held by the test
keeps its transaction from finishing; the phase of any other node always is."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlmodel import Session

from flowbuilder.platform import db
from flowbuilder.platform.crud import balance_crud, phase_crud
from flowbuilder.platform.engine import Outcome, prepare_execution, run_execution
from flowbuilder.platform.models import ExecutionPhase, PhaseStatus, WorkflowExecution
from flowbuilder.platform.nodes import NodeType, PortSpec, register_node_type, unregister_node_type
from tests.factories import make_user, make_workflow

_WAIT = 30.0  # seconds: a bound for what must happen, never a measure of speed


class _Lock:
    """The execution's row locked by another connection (the first phase's node takes
    it), so that the next phase's transaction waits at its fence until released."""

    def __init__(self) -> None:
        self.connection: sa.Connection | None = None
        self.taken = threading.Event()

    def take(self, execution_id: Any) -> None:
        self.connection = db.get_engine().connect()
        self.connection.execute(
            sa.select(WorkflowExecution.id)
            .where(WorkflowExecution.id == execution_id)
            .with_for_update()
        )
        self.taken.set()

    def release(self) -> None:
        if self.connection is not None:
            self.connection.rollback()
            self.connection.close()
            self.connection = None


class _Probe:
    """What a probe node saw when it ran."""

    def __init__(self) -> None:
        self.ran = threading.Event()
        self.committed_running: bool | None = None
        self.saw_cancel = threading.Event()
        self.wait_for_cancel = False
        self.inputs: dict[str, Any] | None = None
        self.thread: int | None = None  # the thread it ran on
        self.wait_for_commit = False
        self.saw_commit = threading.Event()


_lock = _Lock()
_probe = _Probe()


def _phase_status(execution_id: Any, node_id: str) -> PhaseStatus:
    with Session(db.get_engine()) as s:
        return s.exec(
            sa.select(ExecutionPhase.status).where(
                ExecutionPhase.execution_id == execution_id, ExecutionPhase.node_id == node_id
            )
        ).scalar_one()


def _locker(inputs: dict[str, Any], ctx: Any) -> dict[str, Any]:
    _lock.take(ctx.execution_id)
    return {"done": True}


def _probe_run(inputs: dict[str, Any], ctx: Any) -> dict[str, Any]:
    _probe.inputs = dict(inputs)
    _probe.thread = threading.get_ident()
    _probe.committed_running = _phase_status(ctx.execution_id, ctx.node_id) == PhaseStatus.RUNNING
    _probe.ran.set()
    if _probe.wait_for_commit:
        # Only a transaction running beside the node can commit its phase meanwhile.
        for _ in range(int(_WAIT / 0.01)):
            if _phase_status(ctx.execution_id, ctx.node_id) == PhaseStatus.RUNNING:
                _probe.saw_commit.set()
                break
            threading.Event().wait(0.01)
    if _probe.wait_for_cancel:
        done = threading.Event()
        for _ in range(int(_WAIT / 0.01)):
            if ctx.is_cancelled():
                _probe.saw_cancel.set()
                break
            done.wait(0.01)
    return {"done": True}


def _node(type_: str, run: Any, *, pure: bool, inline: bool = False) -> NodeType:
    return NodeType(
        type=type_,
        run=run,
        inputs={"after": PortSpec("any")},
        outputs={"done": PortSpec("any")},
        credits=1,
        pure=pure,
        inline=inline,
    )


_NODES = [
    _node("test_locker", _locker, pure=False),
    _node("test_plain", lambda inputs, ctx: {"done": "from n0"}, pure=False),
    _node("test_pure_probe", _probe_run, pure=True),
    _node("test_impure_probe", _probe_run, pure=False),
    _node("test_inline_probe", _probe_run, pure=True, inline=True),
]


@pytest.fixture(autouse=True)
def _nodes(engine: sa.Engine) -> Iterator[None]:
    if engine.dialect.driver != "psycopg":
        pytest.skip("transactions are sent whole on psycopg only")
    global _lock, _probe
    _lock, _probe = _Lock(), _Probe()
    for node_type in _NODES:
        register_node_type(node_type, replace=True)
    yield
    _lock.release()
    for node_type in _NODES:
        unregister_node_type(node_type.type)


def _chain(*types: str) -> dict[str, Any]:
    nodes = [{"id": f"n{i}", "type": t, "inputs": {}} for i, t in enumerate(types)]
    edges = [
        {"source": f"n{i}", "sourceHandle": "done", "target": f"n{i + 1}", "targetHandle": "after"}
        for i in range(len(types) - 1)
    ]
    return {"version": 1, "nodes": nodes, "edges": edges}


def _prepare(session: Session, *types: str, credits: int = 10) -> tuple[Any, Any]:
    user = make_user(session, credits=credits)
    wf = make_workflow(session, user, definition=_chain(*types), publish=True)
    session.commit()
    ex = prepare_execution(session=session, workflow_id=wf.id, user_id=user.id)
    session.commit()
    return user, ex


def _in_background(execution_id: Any, **kwargs: Any) -> tuple[threading.Thread, list[Any]]:
    result: list[Any] = []
    thread = threading.Thread(
        target=lambda: result.append(run_execution(execution_id, **kwargs)), daemon=True
    )
    thread.start()
    return thread, result


def _balanced(session: Session, user: Any) -> int:
    session.rollback()
    balance = balance_crud.get_balance(session=session, user_id=user.id)
    assert balance == balance_crud.ledger_total(session=session, user_id=user.id)
    return balance


def test_a_pure_node_starts_before_its_phase_start_is_committed(session: Session) -> None:
    user, ex = _prepare(session, "test_locker", "test_pure_probe")
    thread, result = _in_background(ex.id)
    try:
        # The second phase's transaction waits for the lock at its fence; its pure node
        # runs all the same.
        assert _probe.ran.wait(_WAIT), "the pure node did not start while its phase committed"
        assert _probe.committed_running is False
        assert _phase_status(ex.id, "n1") == PhaseStatus.CREATED
        assert _phase_status(ex.id, "n0") == PhaseStatus.RUNNING  # its results wait too
    finally:
        _lock.release()
    thread.join(_WAIT)
    assert result and result[0].outcome == Outcome.COMPLETED
    assert _probe.thread != thread.ident  # not inline: a node thread of its own
    phases = phase_crud.list_phases(session=session, execution_id=ex.id, user_id=user.id)
    assert [p.status for p in phases] == [PhaseStatus.COMPLETED] * 2
    assert phases[1].outputs == {"done": True}
    assert _balanced(session, user) == 8


def test_a_pure_node_starts_before_its_phase_transaction_is_sent(
    session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its inputs come from the phase before, whose results that same transaction is to
    record: the node runs with them before the transaction is even built, and its work
    overlaps all of it."""
    from flowbuilder.platform.engine import run as run_module

    seen: list[bool] = []  # at each transaction sent whole: has the probe run?
    sent_whole = run_module._RunConnection.sent_whole

    def watched(self: Any, *args: Any, **kwargs: Any) -> Any:
        # The second one records n0 and starts n1: nothing of it is sent until the probe
        # has run (which never happens if the probe waits for this transaction).
        seen.append(_probe.ran.wait(_WAIT) if len(seen) == 1 else _probe.ran.is_set())
        return sent_whole(self, *args, **kwargs)

    monkeypatch.setattr(run_module._RunConnection, "sent_whole", watched)
    user, ex = _prepare(session, "test_plain", "test_pure_probe")
    result = run_execution(ex.id)
    assert result.outcome == Outcome.COMPLETED
    # Start n0; record n0 and start n1; record n1 and end the run.
    assert seen == [False, True, True]
    assert _probe.inputs == {"after": "from n0"}
    assert _probe.committed_running is False
    phases = phase_crud.list_phases(session=session, execution_id=ex.id, user_id=user.id)
    assert [p.status for p in phases] == [PhaseStatus.COMPLETED] * 2
    assert phases[1].inputs == {"after": "from n0"}
    assert _balanced(session, user) == 8


def test_a_node_that_is_not_pure_starts_only_once_its_phase_start_is_committed(
    session: Session,
) -> None:
    user, ex = _prepare(session, "test_locker", "test_impure_probe")
    thread, result = _in_background(ex.id)
    try:
        assert _lock.taken.wait(_WAIT)
        # While the lock holds its phase's transaction back, the node does not start
        # (given time to, were it started early) ...
        assert not _probe.ran.wait(0.5)
    finally:
        _lock.release()
    thread.join(_WAIT)
    assert result and result[0].outcome == Outcome.COMPLETED
    # ... and when it does, its phase was committed as running before.
    assert _probe.ran.is_set() and _probe.committed_running is True
    assert _balanced(session, user) == 8


@pytest.mark.parametrize("probe", ["test_pure_probe", "test_inline_probe"])
def test_a_refused_phase_stops_its_early_nodes_and_keeps_nothing_of_them(
    session: Session, probe: str
) -> None:
    """The second phase's debit is refused (the balance was spent elsewhere while the
    first phase ran): the transaction sent whole is rolled back, the probe started with
    it is told to stop, and the reading path fails the phase, charged nothing. An inline
    probe runs on the run's own thread, busy in it until then: the transaction tells it
    from its own thread (without that, the probe would wait _WAIT for a cancel, and only
    then would the run's thread learn of the refusal)."""
    user, ex = _prepare(session, "test_locker", probe, credits=2)
    _probe.wait_for_cancel = True
    thread, result = _in_background(ex.id)
    try:
        assert _lock.taken.wait(_WAIT)
        with Session(db.get_engine()) as other:  # not blocked: a different row
            balance_crud.debit_credits(
                session=other, user_id=user.id, amount=1, idempotency_key="elsewhere", reason="x"
            )
            other.commit()
        assert _probe.ran.wait(_WAIT)
    finally:
        _lock.release()
    assert _probe.saw_cancel.wait(_WAIT), "the early node was not told to stop"
    thread.join(_WAIT)
    assert result and result[0].outcome == Outcome.FAILED
    assert "insufficient" in (result[0].error or "").lower()
    assert (_probe.thread == thread.ident) is (probe == "test_inline_probe")
    phases = phase_crud.list_phases(session=session, execution_id=ex.id, user_id=user.id)
    assert [p.status for p in phases] == [PhaseStatus.COMPLETED, PhaseStatus.FAILED]
    assert phases[1].outputs is None and phases[1].credits_charged == 0
    assert _balanced(session, user) == 0


def test_no_thread_for_an_early_start_runs_the_phase_the_common_way(
    session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No new thread can start (the interpreter is shutting down): the pure node runs
    after its phase's commit instead, the common way, and the run completes."""
    from flowbuilder.platform.engine import run as run_module

    refused: list[bool] = []

    def refusing(*args: Any, **kwargs: Any) -> Any:
        refused.append(True)
        raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    monkeypatch.setattr(run_module, "start_early", refusing)
    user, ex = _prepare(session, "test_pure_probe")
    result = run_execution(ex.id)
    assert refused and result.outcome == Outcome.COMPLETED
    assert _probe.committed_running is True  # it ran after the commit
    assert _balanced(session, user) == 9


def test_no_thread_beside_an_inline_node_runs_its_transaction_then_the_node(
    session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No thread can start for the transaction beside an inline node (the interpreter is
    shutting down): the transaction runs first, on the run's thread, then the node; the
    run completes."""
    from flowbuilder.platform.engine import invoke

    class _Closed:
        def submit(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    monkeypatch.setattr(invoke, "_transaction_pool", _Closed())
    user, ex = _prepare(session, "test_plain", "test_inline_probe")
    result = run_execution(ex.id)
    assert result.outcome == Outcome.COMPLETED
    assert _probe.committed_running is True  # its phase's start committed before it ran
    assert _probe.thread == threading.get_ident()
    assert _balanced(session, user) == 8


def test_a_type_no_longer_registered_is_not_pure() -> None:
    from flowbuilder.platform.engine.invoke import all_pure

    class _Phase:
        node_type = "test_no_such_type"

    assert all_pure([(_Phase(), None, None)]) is False
    _Phase.node_type = "delay"
    assert all_pure([(_Phase(), None, None)]) is True
    assert all_pure([(_Phase(), None, object())]) is False  # a credential: never early


# ----------------------------------------------------------------------------- inline


def test_an_inline_node_runs_on_the_runs_thread_its_transaction_beside_it(
    session: Session,
) -> None:
    """``NodeType.inline``: the phase's one node runs on the run's own thread (no thread
    hand-over before or after it) while its phase's transaction runs on another. The
    probe starts while the lock holds that transaction back, then waits on the run's
    thread until the transaction has committed its phase as running: were the
    transaction run after the node on the same thread, it never would."""
    user, ex = _prepare(session, "test_locker", "test_inline_probe")
    _probe.wait_for_commit = True
    thread, result = _in_background(ex.id)
    try:
        assert _probe.ran.wait(_WAIT), "the inline node did not start while its phase committed"
        assert _probe.committed_running is False
        assert _phase_status(ex.id, "n1") == PhaseStatus.CREATED
    finally:
        _lock.release()
    thread.join(_WAIT)
    assert result and result[0].outcome == Outcome.COMPLETED
    assert _probe.thread == thread.ident  # the run's own thread
    assert _probe.saw_commit.is_set(), "the transaction did not run beside the node"
    phases = phase_crud.list_phases(session=session, execution_id=ex.id, user_id=user.id)
    assert [p.status for p in phases] == [PhaseStatus.COMPLETED] * 2
    assert phases[1].outputs == {"done": True}
    assert _balanced(session, user) == 8


class _TimeLimit(Exception):
    """Stands for Celery's SoftTimeLimitExceeded (the platform imports no Celery)."""


def test_a_time_limit_while_an_inline_node_waits_for_its_transaction(
    session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's time limit strikes the run's thread (a signal, as Celery's soft
    limit does) after the inline node returned, while its transaction is still held
    back by the lock: the run waits for that transaction to end before it closes the
    connection it runs on, then ends failed as timed out, its balance equal to its
    ledger."""
    import signal

    from flowbuilder.platform.engine.state import _TIME_LIMIT_ERRORS, register_time_limit_error

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach the main thread only")
    from flowbuilder.platform.engine import run as run_module

    register_time_limit_error(_TimeLimit)
    user, ex = _prepare(session, "test_locker", "test_inline_probe")
    ended: list[bool] = []  # the transactions that ended, as the run's thread sees them
    fenced_step = run_module._fenced_step

    def lingering(*args: Any, **kwargs: Any) -> Any:
        try:
            return fenced_step(*args, **kwargs)
        finally:
            if len(ended) == 1:  # the inline node's: it lingers after its COMMIT
                threading.Event().wait(0.5)
            ended.append(True)

    monkeypatch.setattr(run_module, "_fenced_step", lingering)

    def strike(_signum: int, _frame: Any) -> None:
        # Released a moment later: the transaction then commits the phase's start.
        threading.Timer(0.3, _lock.release).start()
        raise _TimeLimit()

    previous = signal.signal(signal.SIGALRM, strike)
    try:
        # The probe returns at once; the run's thread then waits for the transaction.
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        result = run_execution(ex.id)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        _TIME_LIMIT_ERRORS.remove(_TimeLimit)
    assert len(ended) == 2, "the run ended before its transaction did"
    assert _probe.thread == threading.get_ident()
    assert result.outcome == Outcome.FAILED
    assert "time limit" in (result.error or "")
    with Session(db.get_engine()) as other:
        execution = other.get(WorkflowExecution, ex.id)
        assert execution is not None and execution.status.value == "failed"
        assert execution.error == result.error
    phases = phase_crud.list_phases(session=session, execution_id=ex.id, user_id=user.id)
    assert [p.status for p in phases] == [PhaseStatus.COMPLETED, PhaseStatus.FAILED]
    assert phases[1].credits_charged == 0  # interrupted: refunded, per the policy
    assert _balanced(session, user) == 9
