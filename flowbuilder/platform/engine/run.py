"""The run loop: claim an execution, run its phases, end it exactly once.

Checkpoints. Each phase commits when it starts (status, inputs, debit) and when it ends
(outputs, logs). A resumed run skips completed phases and re-runs the phase that was in
flight.

Debits. Each phase is debited with the idempotency key ``phase:<phase id>``: a re-run
phase is never charged twice.

Cost per phase: two transactions with a fixed number of statements (lease check, phase
update, debit, log batch), whatever the number of log lines.

Credits policy: a phase's credits are debited when it starts. If its node fails (or is
cancelled or times out) the credits are refunded when REFUND_FAILED_PHASES is true (the
default): users pay for work that produced a result. Phases that never start are never
charged.

Timeouts: each node runs with ``min(node timeout, time left)``. The execution budget
(EXECUTION_TIMEOUT_SECONDS) is the wall-clock budget of one attempt: a run resumed after
a worker crash gets a fresh budget for the phases that remain, because SQS redelivery
time is not the workflow's own time.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm.attributes import instance_dict, set_committed_value
from sqlmodel import Session, select

from flowbuilder.platform.crud import (
    balance_crud,
    execution_crud,
    log_crud,
    phase_crud,
)
from flowbuilder.platform.crud._sql import driver_errors, send_command, send_statement
from flowbuilder.platform.db import get_engine, idle_and_quiet, unit_of_work
from flowbuilder.platform.engine.enqueue import enqueue_lock
from flowbuilder.platform.engine.invoke import (
    Early,
    NodeOutcome,
    all_pure,
    invoke_all,
    load_credential,
    run_inline,
    start_beside,
    start_early,
)
from flowbuilder.platform.engine.lease import Heartbeat, release_quietly, renew, send_renew
from flowbuilder.platform.engine.state import Outcome, RunResult, RunState, is_time_limit
from flowbuilder.platform.errors import (
    FlowBuilderError,
    InsufficientCredits,
    NotFound,
    SecretError,
    TransientError,
)
from flowbuilder.platform.jsonvalues import SerialisedJSON
from flowbuilder.platform.models import (
    ExecutionPhase,
    ExecutionStatus,
    PhaseStatus,
    WorkflowExecution,
    WorkflowVersion,
    utcnow,
)
from flowbuilder.platform.settings import get_settings

logger = structlog.get_logger(__name__)


def _is_infrastructure_error(exc: BaseException) -> bool:
    """The database is unreachable or restarting: retry the whole run later.

    Only connection-level failures. A statement refused because of the data in it
    (DataError, IntegrityError, ProgrammingError) would fail the same way on every retry:
    retrying it is how a run loops forever, so those end the run instead.
    """
    if isinstance(exc, OperationalError | sa.exc.InterfaceError | sa.exc.TimeoutError):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def _is_data_error(exc: BaseException) -> bool:
    return isinstance(exc, DBAPIError) and not _is_infrastructure_error(exc)


def _describe_db_error(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    first = str(orig).strip().splitlines()[0] if str(orig).strip() else ""
    return f"{type(orig).__name__}: {first[:200]}"


def run_execution(
    execution_id: uuid.UUID,
    *,
    owner: str | None = None,
    engine: Engine | None = None,
    on_phase_started: Callable[[ExecutionPhase], None] | None = None,
) -> RunResult:
    """Run (or resume) an execution to its end. Safe to call for any delivery.

    Raises TransientError on infrastructure failures (database down): the caller retries
    the whole call, which resumes from the last checkpoint.
    """
    engine = engine or get_engine()
    owner = owner or f"{uuid.uuid4()}"
    settings = get_settings()
    log = logger.bind(execution_id=str(execution_id))
    db = _RunConnection(engine)
    try:
        try:
            state_or_result = _claim(db, execution_id, owner, settings.LEASE_SECONDS)
            if isinstance(state_or_result, RunResult):
                log.info("execution_skipped", outcome=state_or_result.outcome.value)
                return state_or_result
            state = state_or_result
            # Every line of the run carries these ids; unbound when the run ends.
            with structlog.contextvars.bound_contextvars(
                execution_id=str(state.execution_id),
                workflow_id=str(state.workflow_id) if state.workflow_id else None,
                user_id=str(state.user_id),
            ):
                heartbeat = Heartbeat(engine, execution_id, owner, settings.LEASE_SECONDS)
                # Its first beat is a third of a lease away: the run does not wait for its
                # thread to be running (stopped before it runs, it ends at once).
                start_beside(heartbeat.start, "heartbeat")
                try:
                    result = _run_phases(db, state, heartbeat, on_phase_started)
                finally:
                    heartbeat.stop()
                logger.info(
                    "execution_finished",
                    outcome=result.outcome.value,
                    phases_run=result.phases_run,
                    credits=result.credits,
                    error=result.error,
                )
        finally:
            db.close()
    except Exception as exc:
        if _is_infrastructure_error(exc):
            release_quietly(engine, execution_id, owner)
            raise TransientError(f"database unavailable while running {execution_id}") from exc
        if isinstance(exc, TransientError):  # e.g. the secrets backend is unreachable
            release_quietly(engine, execution_id, owner)
            raise
        # Anything else would fail the same way on every redelivery: the run ends here,
        # failed with the reason, instead of waiting for the sweep to revive it.
        if is_time_limit(exc):
            error = "execution timed out (the worker's time limit)"
        else:
            logger.exception("execution_crashed", execution_id=str(execution_id))
            error = f"internal error while running the execution ({type(exc).__name__})"
        if not _fail_quietly(engine, execution_id, owner, error):
            raise
        return RunResult(Outcome.FAILED, error=error)
    return result


class _RunConnection:
    """One database connection held for the whole run (the heartbeat thread keeps its own).

    A pool checkout per transaction costs a pre-ping round trip and the pool's own work on
    every phase. Held, each phase's transaction is BEGIN, its statements, COMMIT. A
    connection lost between two transactions is noticed by the next one's first statement
    (the lease fence, before any write): :meth:`fenced` then reconnects once, as the pool's
    pre-ping would have. Lost in the middle of a transaction, the error reaches
    run_execution, which maps it to TransientError (the run resumes from its last commit).

    On psycopg, statements that the run does not wait for are sent in batches (pipeline
    mode), one round trip each: BEGIN and the fence with the previous phase's results and
    the next phase's debit (the fence is still the transaction's first statement, so the
    writes after it commit only if it held), and the phase-start writes with the COMMIT.
    On the common path the two go as one, COMMIT included (:meth:`sent_whole`): the fence
    and the debit then refuse by failing, which aborts the transaction. A phase's
    transaction is one round trip instead of six (see :func:`_step`). The driver is in
    autocommit mode from such a batch's BEGIN to its transaction's end (so that it sends
    no BEGIN of its own), and never goes back to the pool that way.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._conn: Connection | None = None
        self.batches = engine.dialect.driver == "psycopg"
        # Writes sent with the COMMIT of the current transaction (see phase_crud.record_phase).
        self.deferred: list[tuple[Any, dict[str, Any]]] = []

    def _connection(self) -> Connection:
        if self._conn is not None and (self._conn.invalidated or self._conn.closed):
            self.close()
        if self._conn is None:
            self._conn = self.engine.connect()
        return self._conn

    @contextlib.contextmanager
    def _session(self) -> Iterator[Session]:
        """A session on the held connection for one transaction: rolled back if the block
        raises, then closed, and the driver back to its own transactions."""
        session = Session(bind=self._connection(), expire_on_commit=False, autoflush=True)
        try:
            yield session
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()
            self._ended()

    @contextlib.contextmanager
    def _bare_session(self) -> Iterator[Any]:
        """:meth:`_session` without the ORM session, for a transaction whose statements
        all go through its connection (:meth:`sent_whole`): making, beginning and closing
        a session cost ~0.1 ms of Python per step (~0.4 ms right after a 10 ms idle), and
        nothing there needs one. The commit finds the driver idle (the batch carried its
        COMMIT): psycopg sends nothing."""
        conn = self._connection()
        if not conn.in_transaction():
            conn.begin()
        try:
            yield _ConnectionOnly(conn)
            conn.commit()
        except BaseException:
            with contextlib.suppress(Exception):
                conn.rollback()
            raise
        finally:
            self._ended()

    def _ended(self) -> None:
        """The transaction is over: nothing deferred is left for the next."""
        self.deferred = []
        self._driver_idle()

    @contextlib.contextmanager
    def unit(self) -> Iterator[Session]:
        """One transaction on the held connection: commit at the end, roll back on error."""
        with self._session() as session:
            yield session
            session.commit()

    def wait_for_enqueue(self, execution_id: uuid.UUID) -> bool:
        """PostgreSQL: wait until no transaction holds ``execution_id``'s enqueue lock
        (:func:`~flowbuilder.platform.engine.enqueue.enqueue_lock`), at most
        ``ENQUEUE_COMMIT_WAIT_SECONDS``. True when it is free, so a row written by that
        transaction is committed or gone for good; False on SQLite (an enqueue is sent
        after its commit there) and when the wait ran out. Then the message is dropped as
        missing: if that enqueue commits after all, the sweep sends its run again."""
        if self.engine.dialect.name != "postgresql":
            return False
        lock_class, lock_key = enqueue_lock(execution_id)
        started = time.monotonic()
        try:
            with self.unit() as s:
                conn = s.connection()
                conn.exec_driver_sql(
                    f"SET LOCAL lock_timeout = '{int(ENQUEUE_COMMIT_WAIT_SECONDS * 1000)}ms'"
                )
                conn.exec_driver_sql(
                    "SELECT pg_advisory_xact_lock(%(c)s, %(k)s)", {"c": lock_class, "k": lock_key}
                )
        except DBAPIError as exc:
            if getattr(exc.orig, "sqlstate", None) != _LOCK_NOT_AVAILABLE:
                raise
            logger.warning(
                "execution_not_committed",
                execution_id=str(execution_id),
                waited_seconds=round(time.monotonic() - started, 3),
            )
            return False
        return True

    def claim(
        self, execution_id: uuid.UUID, owner: str, lease: float
    ) -> tuple[execution_crud.Claimed | None, list[ExecutionPhase]]:
        """The claim and, when it was taken, the run's phases: one transaction of its
        own, committed (the attempt it counts is kept whatever happens next; what the
        claim then finds to do, it does in transactions of their own, under the lease it
        holds). On psycopg one round trip: BEGIN, the claim, the read and the COMMIT in
        one batch."""
        if not self.batches:
            with self.unit() as s:
                claimed = execution_crud.claim_execution(
                    session=s, execution_id=execution_id, owner=owner, lease_seconds=lease
                )
                if claimed is None:
                    return None, []
                return claimed, phase_crud.read_phases(session=s, execution_id=execution_id)
        # No ORM session: every statement goes through the connection, and making one
        # is Python that would delay the claim's send after an idle (see _bare_session).
        with self._bare_session() as session:
            conn = session.connection()
            driver = conn.connection.driver_connection
            with driver_errors(conn):
                driver.autocommit = True  # back to the driver's own BEGIN at the end
                with driver.pipeline():
                    send_command(conn, "BEGIN")
                    # The claim's COMMIT does not wait for its WAL to reach the disk
                    # (~1 ms here, on the way to the first node). What it risks: a server
                    # crash within that moment loses the claim (the attempt it counts, the
                    # lease); the run's connection is lost with it, and the redelivery
                    # claims again. Anything the run then commits (its phases, their
                    # debits: synchronous) flushes the claim's commit first.
                    send_command(conn, _CLAIM_COMMITS_ASYNC)
                    answer = execution_crud.send_claim(
                        connection=conn, execution_id=execution_id, owner=owner, lease_seconds=lease
                    )
                    # Read in the claim's transaction, after it (discarded if not taken).
                    read = phase_crud.send_read_phases(connection=conn, execution_id=execution_id)
                    send_command(conn, "COMMIT")
                claimed = answer()
                phases = read()
        return claimed, phases if claimed is not None else []

    @contextlib.contextmanager
    def fenced(
        self,
        state: RunState,
        writes: Callable[[Session], Any] | None = None,
        undo: Callable[[], None] | None = None,
    ) -> Iterator[tuple[Session, bool, bool, Any]]:
        """A transaction that starts with the lease fence: ``(session, held, cancel,
        written)``. ``writes(session)`` runs after the fence, in the same round trip when
        it can (statements whose results it does not read); ``written`` is what it
        returned (None when the lease is not held: then nothing it wrote is kept).
        ``undo()`` reverts what ``writes`` changed in memory, for the one retry on a
        replaced connection."""
        self.deferred = []
        for attempt in range(2):
            session = Session(bind=self._connection(), expire_on_commit=False, autoflush=True)
            try:
                held, cancel, written = self._fence(session, state, writes)
                break
            except DBAPIError as exc:
                with contextlib.suppress(Exception):
                    session.close()  # rolls back what the batch began
                self._driver_idle()
                if attempt or not exc.connection_invalidated:
                    raise
                if undo is not None:
                    undo()
                logger.info("run_connection_replaced", error=_describe_db_error(exc))
                self.close()
        try:
            yield session, held, cancel, written
            self._commit(session)
        except BaseException:
            session.rollback()
            raise
        finally:
            self.deferred = []
            session.close()
            self._driver_idle()

    def can_send_whole(self) -> bool:
        """Whether a transaction may go in one round trip, COMMIT included (see
        :meth:`sent_whole`): batches, and a held connection that is idle with nothing to
        read. One the server ended while idle says so on its socket; it goes the
        :meth:`fenced` way, which replaces it before anything is written."""
        if not self.batches:
            return False
        conn = self._connection()
        return idle_and_quiet(conn.connection.driver_connection)

    @contextlib.contextmanager
    def sent_whole(
        self, state: RunState, writes: Callable[[Any], Any]
    ) -> Iterator[tuple[Any, bool, bool, Any]]:
        """:meth:`fenced` in one round trip: BEGIN, the fence, ``writes``, what the body
        queues, the COMMIT, all sent before any answer is read. Only for a body that reads
        nothing (see :func:`_step`). The fence and the debit sent this way fail their
        statement unless they succeed outright (the lease renewed, no cancel requested;
        the debit made now), and a failed statement aborts the transaction: nothing of it
        commits. That raises :class:`_Unspeculate` once rolled back, and the step is made
        again the way that reads answers and says why. A connection lost on the way leaves
        the commit unknown: the error goes to run_execution (TransientError), and the run
        resumes from what the database holds, as when any COMMIT's answer is lost.

        A connection that is not idle with nothing to read (the server ended it while it
        was idle) raises :class:`_Unspeculate` before anything is sent: the step is then
        made the :meth:`fenced` way, which replaces it. Checked here, on the thread that
        sends the transaction, not before the step's nodes start (its ~0.1 ms would
        delay every phase's node for a case that is rare)."""
        if not self.can_send_whole():
            raise _Unspeculate
        self.deferred = []
        with self._bare_session() as session:
            conn = session.connection()
            driver = conn.connection.driver_connection
            try:
                with driver_errors(conn):
                    driver.autocommit = True  # back to the driver's own BEGIN at the end
                    with driver.pipeline():
                        send_command(conn, "BEGIN")
                        execution_crud.send_fence_or_abort(
                            connection=conn,
                            execution_id=state.execution_id,
                            owner=state.owner,
                            lease_seconds=state.lease,
                        )
                        written = writes(session)
                        yield session, True, False, written
                        for statement, params in self.deferred:
                            send_statement(conn, statement, params)
                        send_command(conn, "COMMIT")
            except DBAPIError as exc:
                if getattr(exc.orig, "sqlstate", None) == _REFUSED:
                    raise _Unspeculate from exc
                raise

    def _driver_idle(self) -> None:
        """Back to the driver's own transactions once the batch's transaction ended."""
        if not self.batches or self._conn is None or self._conn.invalidated:
            return
        with contextlib.suppress(Exception):  # a broken connection is replaced anyway
            driver = self._conn.connection.driver_connection
            if driver.autocommit and driver.info.transaction_status == 0:  # IDLE
                driver.autocommit = False

    def _fence(
        self, session: Session, state: RunState, writes: Callable[[Session], Any] | None
    ) -> tuple[bool, bool, Any]:
        if not (self.batches and writes is not None):
            held, cancel = renew(session, state)
            return held, cancel, (writes(session) if held and writes is not None else None)
        conn = session.connection()
        driver = conn.connection.driver_connection
        with driver_errors(conn):
            # psycopg would send its own BEGIN and wait for it (a Sync of its own, one
            # more round trip): the BEGIN travels in the batch instead. The driver stays
            # in autocommit mode (it sends no BEGIN of its own) until this transaction
            # ends, see _driver_idle.
            driver.autocommit = True
            with driver.pipeline():
                send_command(conn, "BEGIN")
                answer = send_renew(conn, state)
                written = writes(session)
            # Sent and answered when the batch closed (one round trip): read, no wait.
            held, cancel = answer()
        if not held:
            session.rollback()  # what ``writes`` sent must not be kept
            return False, False, None
        return held, cancel, written

    def _commit(self, session: Session) -> None:
        deferred, self.deferred = self.deferred, []
        if deferred and self.batches:
            conn = session.connection()
            driver = conn.connection.driver_connection
            with driver_errors(conn), driver.pipeline():
                for statement, params in deferred:
                    send_statement(conn, statement, params)
                # The COMMIT in the same batch (the batch's Sync ends it, one round
                # trip). The session's own commit then finds the driver idle: psycopg
                # sends nothing more.
                send_command(conn, "COMMIT")
        else:
            for statement, params in deferred:
                session.connection().execute(statement, params)
        session.commit()

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self.batches:
            # Never hand a connection still in autocommit mode back to the pool: whoever
            # took it next would commit every statement on its own.
            self._conn = conn
            self._driver_idle()
            self._conn = None
            with contextlib.suppress(Exception):
                if not conn.invalidated and conn.connection.driver_connection.autocommit:
                    conn.invalidate()
        with contextlib.suppress(Exception):  # an invalidated connection: nothing to do
            conn.close()


def _fail_quietly(engine: Engine, execution_id: uuid.UUID, owner: str, error: str) -> bool:
    """End the execution failed if we still hold its lease. True when it is ended."""
    try:
        with unit_of_work(engine) as s:
            held, _cancel = execution_crud.renew_lease(
                session=s, execution_id=execution_id, owner=owner, lease_seconds=30
            )
            if not held:
                return False
            execution = s.get(WorkflowExecution, execution_id)
            _abandon(s, execution, error)
        return True
    except Exception:  # noqa: BLE001 - the lease lapses; attempts bound the retries
        logger.warning("execution_fail_failed", execution_id=str(execution_id))
        return False


def _abandon(s: Session, execution: WorkflowExecution | execution_crud.Claimed, error: str) -> None:
    """End a run that cannot go on: phases left running were charged but never finished
    (the worker died in them), so they fail and are refunded per the policy."""
    refund = get_settings().REFUND_FAILED_PHASES
    running = s.exec(
        select(ExecutionPhase).where(
            ExecutionPhase.execution_id == execution.id,
            ExecutionPhase.status == PhaseStatus.RUNNING,
        )
    ).all()
    for phase in running:
        _close_charged_phase(
            s,
            user_id=execution.user_id,
            execution_id=execution.id,
            phase=phase,
            status=PhaseStatus.FAILED,
            error="interrupted: the run ended before this phase finished",
            refund=refund,
        )
    _finish(s, execution.id, ExecutionStatus.FAILED, error, PhaseStatus.SKIPPED)


# Parsed plans by workflow version id. A version and its plan are written once, at
# publish, and never changed (a new definition is a new version), so a worker parses a
# plan once instead of reading and parsing the version row on every run's claim. A
# version deleted later sets the execution's workflow_version_id to NULL (foreign key,
# ON DELETE SET NULL), which the claim reads first, so a cached plan never runs a run
# whose version is gone. ExecutionPlan is immutable and resolve_inputs copies its static
# inputs and defaults, so runs can share one. Bounded: oldest dropped first.
_PLAN_CACHE_SIZE = 256
# How long a worker that finds no row waits for an enqueue still committing (an API
# transaction is milliseconds; one still open after this is not going to be run now).
ENQUEUE_COMMIT_WAIT_SECONDS = 10.0
_LOCK_NOT_AVAILABLE = "55P03"
_plans: collections.OrderedDict[uuid.UUID, Any] = collections.OrderedDict()
_plans_lock = threading.Lock()


def _cached_plan(version_id: uuid.UUID | None) -> Any:
    if version_id is None:
        return None
    with _plans_lock:
        plan = _plans.get(version_id)
        if plan is not None:
            _plans.move_to_end(version_id)
        return plan


def _remember_plan(version_id: uuid.UUID, plan: Any) -> None:
    with _plans_lock:
        _plans[version_id] = plan
        _plans.move_to_end(version_id)
        while len(_plans) > _PLAN_CACHE_SIZE:
            _plans.popitem(last=False)


def _not_claimed(db: _RunConnection, execution_id: uuid.UUID, lease: float) -> RunResult:
    """Why the claim was not taken: no row, ended, or a live lease held by another."""
    with db.unit() as s:
        row = s.get(WorkflowExecution, execution_id)
        if row is None:
            return RunResult(Outcome.MISSING, error="no such execution")
        if row.status.is_terminal:
            return RunResult(Outcome.ALREADY_DONE)
        remaining = lease
        if row.lease_expires_at is not None:
            remaining = max(0.5, (row.lease_expires_at - utcnow()).total_seconds())
        if row.started_at is not None:
            elapsed = (utcnow() - row.started_at).total_seconds()
            if elapsed > get_settings().EXECUTION_MAX_TOTAL_SECONDS + 2 * lease:
                # Past every run's bound: do not come back (see _exhausted).
                remaining = 0.0
        return RunResult(Outcome.LEASE_HELD, retry_after=remaining)


def _claim(
    db: _RunConnection, execution_id: uuid.UUID, owner: str, lease: float
) -> RunState | RunResult:
    """Take the run and read what it needs. The claim commits first (see
    :meth:`_RunConnection.claim`); what it finds to do otherwise (end a run that must
    not go on, read a plan or a log position this process does not have) is done in a
    transaction of its own, under the lease the claim took."""
    from flowbuilder.platform.plan import ExecutionPlan

    # One round trip on the common path: the lease taken, the execution marked running and
    # its row read back, with its phases. Why it was not taken is read only when it was not.
    execution, phases = db.claim(execution_id, owner, lease)
    if execution is None:
        result = _not_claimed(db, execution_id, lease)
        if result.outcome != Outcome.MISSING or not db.wait_for_enqueue(execution_id):
            return result
        # The enqueue had not committed when the claim looked (its message may leave
        # before the commit: see engine.enqueue); its transaction has ended now.
        execution, phases = db.claim(execution_id, owner, lease)
        if execution is None:
            return _not_claimed(db, execution_id, lease)
    settings = get_settings()
    ended = _exhausted(execution, settings)
    if ended is not None:
        with db.unit() as s:
            _abandon(s, execution, ended)
        return RunResult(Outcome.FAILED, error=ended)
    if execution.cancel_requested:
        with db.unit() as s:
            _finish(s, execution.id, ExecutionStatus.CANCELLED, "cancelled", PhaseStatus.CANCELLED)
        return RunResult(Outcome.CANCELLED)
    plan = _cached_plan(execution.workflow_version_id)
    if plan is None:
        with db.unit() as s:
            version = (
                s.get(WorkflowVersion, execution.workflow_version_id)
                if execution.workflow_version_id
                else None
            )
            if version is not None and version.plan:
                plan = ExecutionPlan.from_dict(version.plan)
                _remember_plan(version.id, plan)
            else:
                _finish(
                    s,
                    execution.id,
                    ExecutionStatus.FAILED,
                    "the workflow version was deleted before the run",
                    PhaseStatus.SKIPPED,
                )
                return RunResult(Outcome.FAILED, error="workflow version missing")
    # A failure recorded in the database is final: a resumed run never skips past a
    # failed phase (a credit refusal, a node that failed) to run the rest.
    failed = next((p for p in phases if p.status == PhaseStatus.FAILED), None)
    if failed is not None:
        error = f"phase {failed.node_id} ({failed.node_type}) failed: {failed.error}"
        with db.unit() as s:
            _abandon(s, execution, error)
        return RunResult(Outcome.FAILED, error=error)
    budget = settings.EXECUTION_TIMEOUT_SECONDS
    if execution.started_at is not None:
        elapsed = (utcnow() - execution.started_at).total_seconds()
        budget = min(budget, settings.EXECUTION_MAX_TOTAL_SECONDS - elapsed)
    # Logs are written only with a phase's end: none yet if no phase has ended.
    next_seq = 1
    if any(p.status not in _OPEN_PHASE for p in phases):
        with db.unit() as s:
            next_seq = log_crud.next_log_seq(session=s, execution_id=execution.id)
    state = RunState(
        execution_id=execution.id,
        user_id=execution.user_id,
        workflow_id=execution.workflow_id,
        owner=owner,
        lease=lease,
        deadline=time.monotonic() + budget,
        plan=plan,
        phases=phases,
        next_seq=next_seq,
        started_at=execution.started_at,
    )
    for phase in phases:
        if phase.status == PhaseStatus.COMPLETED:
            state.outputs_by_node[phase.node_id] = phase.outputs or {}
    return state


def _exhausted(execution: execution_crud.Claimed, settings: Any) -> str | None:
    """Why a run must not be tried again (attempts or total time used up), or None.

    ``attempts`` counts lease acquisitions: each delivery that took the execution. More
    than EXECUTION_MAX_ATTEMPTS means the previous ones all ended without finishing (a
    worker killed mid-run, the database lost): a run that kills its worker every time
    ends here instead of being redelivered and swept forever."""
    tries = execution.attempts - 1
    if tries >= settings.EXECUTION_MAX_ATTEMPTS:
        return (
            f"execution abandoned: it crashed its worker {tries} times "
            f"(EXECUTION_MAX_ATTEMPTS={settings.EXECUTION_MAX_ATTEMPTS})"
        )
    if execution.started_at is not None:
        elapsed = (utcnow() - execution.started_at).total_seconds()
        if elapsed >= settings.EXECUTION_MAX_TOTAL_SECONDS:
            return (
                f"execution timed out: unfinished {elapsed:.0f}s after its first start "
                f"(EXECUTION_MAX_TOTAL_SECONDS={settings.EXECUTION_MAX_TOTAL_SECONDS:g})"
            )
    return None


def _finish(
    s: Session,
    execution_id: uuid.UUID,
    status: ExecutionStatus,
    error: str | None,
    open_phases: PhaseStatus,
) -> None:
    """End the execution: close open phases, total the credits, set the final status."""
    phase_crud.close_open_phases(session=s, execution_id=execution_id, status=open_phases)
    total = s.exec(
        select(sa.func.coalesce(sa.func.sum(ExecutionPhase.credits_charged), 0)).where(
            ExecutionPhase.execution_id == execution_id
        )
    ).one()
    execution = execution_crud.update_execution_status(
        session=s, execution_id=execution_id, status=status, error=error
    )
    execution.credits_consumed = int(total)
    s.flush()


def _run_phases(
    db: _RunConnection,
    state: RunState,
    heartbeat: Heartbeat,
    on_phase_started: Callable[[ExecutionPhase], None] | None,
) -> RunResult:
    """Run the plan's phases in order; the nodes of one phase run concurrently.

    One transaction (one commit) per phase, whatever its number of nodes: it records the
    previous phase's results (logs, outputs, statuses) and starts this one (credentials,
    debits, statuses), fenced by one lease check. After the last phase, one more
    transaction records its results and ends the execution. Every node's result is thus
    committed before the next phase runs: the checkpoint a resumed run starts from.
    """
    settings = get_settings()
    planned = {node.node_id: node for node in state.plan.nodes}
    groups = [
        pending
        for _number, members in itertools.groupby(state.phases, key=lambda p: p.number)
        if (pending := [p for p in members if p.status in _OPEN_PHASE])
    ]
    previous: _GroupRun | None = None
    for group in [*groups, None]:
        try:
            step = _step(db, state, heartbeat, group, previous, planned, settings)
        except Exception as exc:
            if not _is_data_error(exc):
                raise
            return _fail_on_data_error(db, state, previous, exc)
        if isinstance(step, RunResult):
            return step
        current = step
        try:
            if on_phase_started is not None:
                for phase, _node, _credential in current.started:
                    on_phase_started(phase)
            # The nodes themselves, concurrently, outside any transaction: already
            # running when they were started ahead of their phase's transaction (pure nodes).
            current.outcomes = invoke_all(
                current.started, current.inputs, state, heartbeat, current.early
            )
        except BaseException:
            current.stop_early()  # the worker's time limit: the run ends, so do its nodes
            raise
        state.phases_run += len(current.started)
        previous = current
    raise AssertionError("unreachable")  # the loop always returns


class _ConnectionOnly:
    """All that the CRUD functions of a transaction sent whole use of a session: its
    connection (see :meth:`_RunConnection._bare_session`; no ORM object is loaded,
    flushed or read there, and every write goes through the connection)."""

    __slots__ = ("_conn",)

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def connection(self) -> Connection:
        return self._conn


class _Unspeculate(Exception):
    """The next phase's debit went with the fence, but the phase must not start; or a
    transaction sent whole was refused by its fence or its debit (see
    :meth:`_RunConnection.sent_whole`)."""


# Sent first in the claim's transaction (see _RunConnection.claim); that transaction only.
_CLAIM_COMMITS_ASYNC = "SET LOCAL synchronous_commit = off"


# What the statements of a transaction sent whole fail with when they refuse (a division
# by zero, see execution_crud.send_fence_or_abort and balance_crud.send_debit_or_abort);
# nothing else the engine sends computes anything that could divide by zero.
_REFUSED = "22012"


def _step(
    db: _RunConnection,
    state: RunState,
    heartbeat: Heartbeat,
    group: list[ExecutionPhase] | None,
    previous: _GroupRun | None,
    planned: dict[str, Any],
    settings: Any,
    *,
    speculate: bool = True,
) -> _GroupRun | RunResult:
    """One transaction: record ``previous``, start ``group`` (or end the run).

    On psycopg the common case is one round trip. A phase whose nodes all produced a
    result is recorded with writes only (the logs, the results): they travel with the
    fence. When the next phase's nodes need no credential, their debits travel there
    too, and so do their starts and the COMMIT (or, after the last phase, the run's end
    and the COMMIT): the transaction is sent whole, and its fence and debits fail it
    unless they succeed outright. Otherwise, or when that transaction is refused, the
    fence's answer is read first (two round trips; a one-node phase's debit still goes
    with the fence, its answer read before the phase starts). If the fence then says the
    phase must not start (the run was cancelled or is out of time), the whole transaction
    is rolled back, the debit with it, and the step is made again without it. One that
    failed also refunds and may end the run, which reads results: recorded after the
    fence."""
    succeeded = (
        previous is not None
        and previous.refusal is None
        and all(outcome.error is None for outcome in previous.outcomes)
    )
    # Phases whose debits can travel with the fence: no credential to read first.
    light = (
        speculate
        and db.batches
        and (previous is None or succeeded)
        and group is not None
        and all(planned[phase.node_id].credential_id is None for phase in group)
    )
    # The whole transaction in one round trip when its body reads nothing: the run's end
    # after a phase that succeeded, or the start of a phase whose debits go ahead.
    whole = bool(
        speculate
        and db.batches
        and (light or (group is None and succeeded))
        and not heartbeat.cancelled.is_set()
        and state.deadline - time.monotonic() > 0
    )
    ahead = None  # the phases whose debits travel with the fence
    if whole and group is not None:
        ahead = group
    elif light and len(group) == 1 and group[0].credits_cost > 0:  # type: ignore[arg-type]
        # Read back before the phase starts: one node only, so that a refused debit
        # leaves no other debit of this transaction without its phase.
        ahead = group
    early: tuple[dict[uuid.UUID, dict[str, Any]], Early] | None = None  # set below
    writes = undo = None
    if succeeded or ahead is not None:
        run = previous if succeeded else None

        def writes(s: Session) -> Any:
            if run is not None:
                _record_group(s, state, run, settings)
            if ahead is None:
                return None
            sent = _send_debits_ahead(
                s, state, ahead, or_abort=whole, inputs=early[0] if early else None
            )
            if sent is None and whole:
                raise _Unspeculate  # an input does not resolve: the common path fails it
            return sent

        if run is not None or whole:
            undo = _memory_snapshot(state, run, ahead if whole and ahead is not None else [])
    if whole:
        # A phase of pure nodes starts now, before its transaction is even built: the
        # nodes' work overlaps all of it (see _start_at_once).
        early = _start_at_once(state, heartbeat, group, planned, previous if succeeded else None)

    def transaction() -> _GroupRun | RunResult:
        try:
            made = _fenced_step(
                db,
                state,
                heartbeat,
                group,
                previous,
                planned,
                settings,
                succeeded,
                writes,
                undo,
                whole=whole,
                early=early[1] if early else None,
            )
        except BaseException:
            if early is not None:
                # The phase's start did not commit (refused, made again, or unknown):
                # the nodes started ahead stop, and their results are never read.
                early[1].abort.set()
            raise
        if early is not None and (
            not isinstance(made, _GroupRun) or len(made.started) != len(early[1].calls)
        ):
            early[1].abort.set()  # the run ended here instead, or not every node started
        return made

    try:
        if early is not None and early[1].inline:
            # The phase's one node on this thread, its transaction beside it.
            return run_inline(early[1], transaction)
        return transaction()
    except _Unspeculate:
        if undo is not None:
            undo()
        return _step(db, state, heartbeat, group, previous, planned, settings, speculate=False)


def _start_at_once(
    state: RunState,
    heartbeat: Heartbeat,
    group: list[ExecutionPhase] | None,
    planned: dict[str, Any],
    finished: _GroupRun | None,
) -> tuple[dict[uuid.UUID, dict[str, Any]], Early] | None:
    """Start a phase's nodes before its transaction is sent, when they are all pure
    (``NodeType.pure``: they compute from their inputs alone, so running them before their
    start is committed changes nothing anywhere) and need no credential: ``(their inputs,
    the calls started)``. Only for a transaction sent whole (see :meth:`_step`), which
    either commits every node's start or is refused as a whole; refused, the nodes are
    told to stop and the step is made again the common way. None when the phase is not
    such a phase, an input does not resolve (the common path fails it), or no thread can
    start (interpreter shutdown). ``finished``: the phase that succeeded just before,
    whose outputs the transaction is about to record (and to keep in ``state``)."""
    if group is None:
        return None
    # No credential to load: a transaction is sent whole only for such phases (_step).
    started = [(phase, planned[phase.node_id], None) for phase in group]
    if not all_pure(started):
        return None
    outputs: Mapping[str, Any] = state.outputs_by_node
    if finished is not None:
        outputs = collections.ChainMap(
            {
                phase.node_id: _stored_outputs(outcome)
                for (phase, _n, _c), outcome in zip(
                    finished.started, finished.outcomes, strict=True
                )
            },
            state.outputs_by_node,
        )
    try:
        inputs = {phase.id: _inputs_of(state, phase, outputs) for phase in group}
    except FlowBuilderError:
        return None
    try:
        return inputs, start_early(started, inputs, state, heartbeat)
    except RuntimeError:
        return None


def _inputs_of(
    state: RunState, phase: ExecutionPhase, outputs: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    # serialised: their stored text reuses the upstream outputs' text.
    return state.plan.resolve_inputs(
        phase.node_id,
        state.outputs_by_node if outputs is None else outputs,
        hand_over_sole=True,
        serialised=True,
    )


def _stored_outputs(outcome: NodeOutcome) -> Any:
    """A succeeded node's outputs as they are stored and passed on: with the JSON text
    made at the node boundary, so they are not serialised a second time."""
    if outcome.outputs_json is not None:
        return SerialisedJSON(outcome.outputs, outcome.outputs_json)
    return outcome.outputs


def _send_debits_ahead(
    s: Session,
    state: RunState,
    phases: list[ExecutionPhase],
    *,
    or_abort: bool = False,
    inputs: dict[uuid.UUID, dict[str, Any]] | None = None,
) -> dict[uuid.UUID, tuple[dict[str, Any], Any]] | None:
    """Each phase's inputs (resolved here unless given) and its debit (None for a phase
    that costs nothing), queued in the fence's batch; None, with nothing queued, when an
    input does not resolve (the phase then fails on the common path, charged nothing).
    With ``or_abort`` (a transaction sent whole), each debit is made now or the
    transaction fails: the function that reads its answer has nothing to read."""
    if inputs is None:
        try:
            inputs = {phase.id: _inputs_of(state, phase) for phase in phases}
        except FlowBuilderError:
            return None
    send = balance_crud.send_debit_or_abort if or_abort else balance_crud.send_debit_once
    sent: dict[uuid.UUID, tuple[dict[str, Any], Any]] = {}
    for phase in phases:
        debit = None
        if phase.credits_cost > 0:
            answer = send(connection=s.connection(), **_phase_debit(state, phase))
            debit = _debited_now if or_abort else answer
        sent[phase.id] = (inputs[phase.id], debit)
    return sent


def _phase_debit(state: RunState, phase: ExecutionPhase) -> dict[str, Any]:
    """A phase's debit, keyed ``phase:<id>`` (once per phase, whichever way it is sent)."""
    return {
        "user_id": state.user_id,
        "amount": phase.credits_cost,
        "idempotency_key": f"phase:{phase.id}",
        "execution_id": state.execution_id,
        "phase_id": phase.id,
        "reason": f"{phase.node_type} {phase.node_id}",
    }


def _debited_now(_session: Session) -> bool:
    """The answer of a debit sent whole: made now (or its transaction did not commit)."""
    return True


def _fenced_step(
    db: _RunConnection,
    state: RunState,
    heartbeat: Heartbeat,
    group: list[ExecutionPhase] | None,
    previous: _GroupRun | None,
    planned: dict[str, Any],
    settings: Any,
    succeeded: bool,
    writes: Callable[[Session], Any] | None,
    undo: Callable[[], None] | None,
    *,
    whole: bool = False,
    early: Early | None = None,
) -> _GroupRun | RunResult:
    transaction = (
        db.sent_whole(state, writes)  # type: ignore[arg-type]  # whole: writes is set
        if whole
        else db.fenced(state, writes, undo)
    )
    # The nodes started ahead (see _start_at_once): carried on once their start commits.
    current = _GroupRun(early=early)
    with transaction as (s, held, cancel, ahead):
        if not held:
            return RunResult(Outcome.LEASE_LOST, phases_run=state.phases_run)
        if previous is not None and not succeeded:
            ended = _record_group(s, state, previous, settings)
            if ended is not None:
                return ended
        if group is None:
            return _complete(s, state, db.deferred)
        stop = cancel or heartbeat.cancelled.is_set() or state.deadline - time.monotonic() <= 0
        if stop and ahead is not None:
            raise _Unspeculate  # rolls this transaction back, the debit sent ahead with it
        if cancel or heartbeat.cancelled.is_set():
            return _cancel_run(s, state)
        if state.deadline - time.monotonic() <= 0:
            return _fail_run(s, state, _timeout_message(settings))
        for phase in group:
            debit = None
            try:
                if ahead is not None:
                    current.inputs[phase.id], debit = ahead[phase.id]
                else:
                    current.inputs[phase.id] = _inputs_of(state, phase)
            except FlowBuilderError as exc:  # a required input upstream did not produce
                phase_crud.record_phase(
                    session=s, phase=phase, status=PhaseStatus.FAILED, error=str(exc)
                )
                current.refusal = f"phase {phase.node_id} ({phase.node_type}) failed: {exc}"
                break
            current.refusal = _start_phase(
                s,
                state,
                phase,
                planned[phase.node_id],
                current.inputs[phase.id],
                current.started,
                db.deferred,
                debit,
            )
            if current.refusal is not None:
                # The rest of this phase does not start; what started still runs.
                break
        if current.refusal is not None and not current.started:
            return _fail_run(s, state, current.refusal)
    return current


def _fail_on_data_error(
    db: _RunConnection, state: RunState, previous: _GroupRun | None, exc: BaseException
) -> RunResult:
    """The database refused what a phase would store (the data, not the connection).

    Retrying would fail the same way forever (and repeat the nodes' side effects), so
    the phase whose results could not be stored fails, refunded per the policy, and so
    does the run."""
    reason = f"its results could not be stored ({_describe_db_error(exc)})"
    logger.warning("phase_results_unstorable", error=_describe_db_error(exc))
    with db.fenced(state) as (s, held, _cancel, _written):
        if not held:
            return RunResult(Outcome.LEASE_LOST, phases_run=state.phases_run)
        settings = get_settings()
        error = f"execution failed: {reason}"
        if previous is not None and previous.started:
            for started, _node, _credential in previous.started:
                # As committed: the refused transaction changed the objects in memory.
                phase = s.get(ExecutionPhase, started.id, populate_existing=True)
                outcome = NodeOutcome(error=reason)
                _record_failure(s, state, phase, outcome, settings.REFUND_FAILED_PHASES)
            phase = previous.started[0][0]
            error = f"phase {phase.node_id} ({phase.node_type}) failed: {reason}"
        return _fail_run(s, state, error)


_OPEN_PHASE = (PhaseStatus.CREATED, PhaseStatus.RUNNING)
# What recording a phase changes on its object in memory (phase_crud.record_phase).
_RECORDED_FIELDS = (
    "status",
    "started_at",
    "completed_at",
    "duration_ms",
    "attempts",
    "inputs",
    "outputs",
    "error",
    "credits_charged",
)


def _memory_snapshot(
    state: RunState, run: _GroupRun | None, starting: list[ExecutionPhase]
) -> Callable[[], None]:
    """What :func:`_record_group` (for ``run``) and the start of the ``starting`` phases
    change in memory, and the function that puts it back: these writes may be lost with a
    connection that turned out dead, or a transaction sent whole that was refused, and
    are made again."""
    next_seq = state.next_seq
    recorded = [p for p, _n, _c in run.started] if run is not None else []
    outputs = {p.node_id: state.outputs_by_node.get(p.node_id) for p in recorded}
    # The objects' loaded values, copied whole (one C call; an attribute read per field
    # is ~20 Python calls per phase): undo puts back the recorded fields.
    phases = [(p, instance_dict(p).copy()) for p in recorded + starting]

    def undo() -> None:
        state.next_seq = next_seq
        for node_id, value in outputs.items():
            if value is None:
                state.outputs_by_node.pop(node_id, None)
            else:
                state.outputs_by_node[node_id] = value
        for phase, values in phases:
            for name in _RECORDED_FIELDS:
                if name in values:  # loaded before (a phase the engine read has them all)
                    set_committed_value(phase, name, values[name])

    return undo


@dataclass
class _GroupRun:
    """One phase in flight: what started, with which inputs, and how each node ended."""

    started: list[tuple[ExecutionPhase, Any, Any]] = field(default_factory=list)
    inputs: dict[uuid.UUID, dict[str, Any]] = field(default_factory=dict)
    outcomes: list[NodeOutcome] = field(default_factory=list)
    refusal: str | None = None
    # Pure nodes started before their phase's start was committed (see _start_at_once).
    early: Early | None = None

    def stop_early(self) -> None:
        if self.early is not None:
            self.early.abort.set()


def _record_group(s: Session, state: RunState, run: _GroupRun, settings: Any) -> RunResult | None:
    """Store a finished phase's logs and results. Returns the run's end if it ends here."""
    failure: str | None = None
    cancelled = False
    for (phase, _node, _credential), outcome in zip(run.started, run.outcomes, strict=True):
        state.next_seq = log_crud.append_logs(
            session=s,
            execution_id=state.execution_id,
            phase_id=phase.id,
            entries=outcome.logs,
            first_seq=state.next_seq,
        )
        if outcome.error is None:
            outputs = _stored_outputs(outcome)  # made storable at the node boundary (invoke)
            phase_crud.record_phase(
                session=s, phase=phase, status=PhaseStatus.COMPLETED, outputs=outputs
            )
            state.outputs_by_node[phase.node_id] = outputs
            continue
        _record_failure(s, state, phase, outcome, settings.REFUND_FAILED_PHASES)
        cancelled = cancelled or outcome.cancelled
        if failure is None and not outcome.cancelled:
            failure = (
                _timeout_message(settings)
                if outcome.execution_timeout
                else f"phase {phase.node_id} ({phase.node_type}) failed: {outcome.error}"
            )
    error = run.refusal or failure
    if error is not None:
        return _fail_run(s, state, error)
    if cancelled:
        return _cancel_run(s, state)
    return None


def _end_fenced(
    s: Session,
    state: RunState,
    status: ExecutionStatus,
    error: str | None,
    open_phases: PhaseStatus,
) -> int:
    """:func:`_finish` inside a fenced transaction (the lease check in it proved the
    execution running and ours): two Core statements, no ORM load. Returns the credits."""
    phase_crud.close_open_phases(session=s, execution_id=state.execution_id, status=open_phases)
    return execution_crud.finish_execution(
        session=s,
        execution_id=state.execution_id,
        status=status,
        error=error,
        started_at=state.started_at,
    )


def _fail_run(s: Session, state: RunState, error: str) -> RunResult:
    _end_fenced(s, state, ExecutionStatus.FAILED, error, PhaseStatus.SKIPPED)
    return RunResult(Outcome.FAILED, phases_run=state.phases_run, error=error)


def _complete(s: Session, state: RunState, deferred: list[tuple[Any, dict[str, Any]]]) -> RunResult:
    """The run's end, sent with the COMMIT (one round trip on psycopg). The credits it
    reports are its phases' charges as this run holds them: the statement sets the same
    sum from the database."""
    phase_crud.close_open_phases(
        session=s,
        execution_id=state.execution_id,
        status=PhaseStatus.SKIPPED,
        deferred=deferred,
    )
    execution_crud.finish_execution(
        session=s,
        execution_id=state.execution_id,
        status=ExecutionStatus.COMPLETED,
        error=None,
        started_at=state.started_at,
        deferred=deferred,
    )
    credits = sum(phase.credits_charged or 0 for phase in state.phases)
    return RunResult(Outcome.COMPLETED, phases_run=state.phases_run, credits=credits)


def _cancel_run(s: Session, state: RunState) -> RunResult:
    _end_fenced(s, state, ExecutionStatus.CANCELLED, "cancelled by the user", PhaseStatus.CANCELLED)
    return RunResult(Outcome.CANCELLED, phases_run=state.phases_run)


def _start_phase(
    s: Session,
    state: RunState,
    phase: ExecutionPhase,
    node: Any,
    inputs: dict[str, Any],
    started: list[tuple[ExecutionPhase, Any, Any]],
    deferred: list[tuple[Any, dict[str, Any]]],
    debit: Callable[[Session], bool] | None = None,
) -> str | None:
    """Load the credential, debit, mark running. Returns why the run must stop, or None.

    The move to running is ``deferred``: written with the transaction's COMMIT. Nothing
    after it in the same transaction reads or closes the phase (a run that ends in this
    transaction ends before any phase of the group started)."""
    credential = None
    error = run_error = None
    if node.credential_id is not None:
        try:
            credential = load_credential(s, node.credential_id, state.user_id)
        except NotFound:
            # Deleted after the run was enqueued: fail cleanly, charge nothing.
            error = f"credential {node.credential_id} is no longer available"
            run_error = f"phase {phase.node_id} ({phase.node_type}) failed: {error}"
        except SecretError as exc:
            if isinstance(exc, TransientError):
                # The backend is unreachable or throttling: not the run's fault. The task
                # retries the run from its last commit (bounded by its attempts).
                raise
            # It cannot be read (a ciphertext moved from another row, a key no longer
            # configured, the backend refusing): retrying would fail the same way, so the
            # run ends here, charged nothing. SecretError messages never carry the value.
            error = f"credential {node.credential_id} could not be read ({exc})"
            run_error = f"phase {phase.node_id} ({phase.node_type}) failed: {error}"
    if error is None and phase.credits_cost > 0:
        try:
            if debit is not None:  # sent with the fence (see _step): its answer is here
                debit(s)
            else:
                balance_crud.debit_once(session=s, **_phase_debit(state, phase))
        except InsufficientCredits as exc:
            error = run_error = str(exc)
    if error is not None:
        phase_crud.record_phase(session=s, phase=phase, status=PhaseStatus.FAILED, error=error)
        return run_error
    phase_crud.record_phase(
        session=s,
        phase=phase,
        status=PhaseStatus.RUNNING,
        inputs=inputs,
        credits_charged=phase.credits_cost,
        deferred=deferred,
    )
    started.append((phase, node, credential))
    return None


def _record_failure(
    s: Session, state: RunState, phase: ExecutionPhase, outcome: NodeOutcome, refund: bool
) -> None:
    _close_charged_phase(
        s,
        user_id=state.user_id,
        execution_id=state.execution_id,
        phase=phase,
        status=PhaseStatus.CANCELLED if outcome.cancelled else PhaseStatus.FAILED,
        error=outcome.error,
        refund=refund,
    )


def _close_charged_phase(
    s: Session,
    *,
    user_id: uuid.UUID,
    execution_id: uuid.UUID,
    phase: ExecutionPhase,
    status: PhaseStatus,
    error: str | None,
    refund: bool,
) -> None:
    """End a phase that did not produce a result (failed, cancelled, interrupted): its
    debit is refunded when the policy says so (idempotent key ``refund:<phase id>``)."""
    refunded = refund and phase.credits_charged > 0
    if refunded:
        balance_crud.refund_credits(
            session=s,
            user_id=user_id,
            amount=phase.credits_charged,
            idempotency_key=f"refund:{phase.id}",
            execution_id=execution_id,
            phase_id=phase.id,
            reason=f"{status.value} phase {phase.node_id}",
        )
    phase_crud.record_phase(
        session=s,
        phase=phase,
        status=status,
        error=error,
        credits_charged=0 if refunded else None,
    )


# Coordinates the nodes of one phase; each node itself runs on _node_pool.


def _timeout_message(settings: Any) -> str:
    return f"execution timed out after {settings.EXECUTION_TIMEOUT_SECONDS:g}s"
