"""Worker tasks: thin shells around the engine in ``flowbuilder.platform.engine``.

A task takes ids, calls platform code, and decides retries. Messages carry the execution
id only: never a definition, never a secret.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import threading
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import structlog
from celery import Task
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import event
from sqlalchemy.orm import Session as OrmSession
from sqlmodel import Session

from flowbuilder.platform import engine
from flowbuilder.platform.crud import execution_crud
from flowbuilder.platform.db import unit_of_work
from flowbuilder.platform.engine.state import register_time_limit_error
from flowbuilder.platform.errors import TransientError
from flowbuilder.platform.models import TriggerType, WorkflowExecution, utcnow
from flowbuilder.platform.settings import get_settings
from flowbuilder.tasks.app import CORRELATION_HEADER, app, execution_queue_for

logger = structlog.get_logger(__name__)

# A soft time limit is raised asynchronously into whatever the run is doing; the engine
# (which imports no Celery) reports it as a timeout, not as a node's internal error.
register_time_limit_error(SoftTimeLimitExceeded)

_PENDING_SENDS = "flowbuilder.pending_sends"
_EARLY_SENDS = "flowbuilder.early_sends"
# The SAVEPOINT each enqueue of the transaction was made in, if any (see _drop_pending).
_SEND_SCOPES = "flowbuilder.send_scopes"


class ExecutionTask(Task):
    # Every task here is idempotent by design (leases, checkpoints, idempotent debits),
    # which is what makes late acknowledgement safe.
    acks_late = True
    reject_on_worker_lost = True
    # Results are in the database; a result backend would only add a dependency.
    ignore_result = True
    # Remembers the execution's ids for Celery's own "received" log line (logcontext.py).
    Request = "flowbuilder.tasks.logcontext:ContextRequest"


@app.task(
    bind=True,
    base=ExecutionTask,
    name="flowbuilder.execute_workflow",
    # Infrastructure failures (database restart) retry the whole task, which resumes from
    # the last checkpoint. Bounded, so a permanently broken database ends in the DLQ.
    max_retries=20,
)
def execute_workflow(self: Task, execution_id: str) -> str:
    """Run or resume one execution. Safe under duplicate delivery."""
    exec_id = uuid.UUID(execution_id)
    structlog.contextvars.bind_contextvars(execution_id=execution_id)
    # One owner token per delivery: two deliveries of the same message must not share a
    # lease (they carry the same task id, so the task id cannot be the owner).
    owner = f"{self.request.hostname or 'local'}:{uuid.uuid4().hex[:12]}"
    try:
        result = engine.run_execution(exec_id, owner=owner)
    except TransientError as exc:
        countdown = min(60.0, 2.0 * (2**self.request.retries))
        logger.warning("execute_workflow_retry", error=str(exc), countdown=countdown)
        raise self.retry(exc=exc, countdown=countdown) from exc
    if result.outcome == engine.Outcome.LEASE_HELD:
        # Another delivery is running it right now. Come back when its lease would have
        # lapsed: if that worker died, we take over; if it finished, this is a no-op.
        # A fresh message, not self.retry(): retry() shares its counter (and max_retries)
        # with the database-error retries above, so a long run with a duplicate delivery
        # would end in MaxRetriesExceededError. This is bounded all the same, by the
        # execution itself: the holder's run ends (time limits), or it dies and its lease
        # lapses, and the engine stops asking us back (retry_after == 0) once the run is
        # older than EXECUTION_MAX_TOTAL_SECONDS; attempts then end it (EXECUTION_MAX_ATTEMPTS).
        if result.retry_after <= 0:
            logger.info("execute_workflow_duplicate_dropped")
            return result.outcome.value
        headers = getattr(self.request, "headers", None) or {}
        correlation = headers.get(CORRELATION_HEADER) or getattr(
            self.request, CORRELATION_HEADER, None
        )
        send_execution(exec_id, correlation, countdown=result.retry_after + 0.5)
    return result.outcome.value


@app.task(bind=True, base=ExecutionTask, name="flowbuilder.sweep_stale_executions")
def sweep_stale_executions(self: Task, limit: int = 100) -> int:
    """Re-send executions whose message may be lost (send failed after commit, or the
    worker died and its message reached the dead-letter queue). Returns the sends made."""
    found = take_stale_executions(limit)
    sent = resend(found)
    if found:
        logger.info("stale_executions_resent", found=len(found), sent=sent)
    return sent


def take_stale_executions(limit: int = 100) -> list[tuple[uuid.UUID, str | None]]:
    """Claim the executions due for a re-send, in one committed unit of work.

    Only what is due (``resend_after`` passed), at most ``limit``, and each one's next
    re-send is pushed a visibility window further before anything is sent: a backlog is
    never flooded (a copy per run per window at most; a duplicate is a no-op for the
    engine). A send that then fails is retried by the sweep after that window."""
    settings = get_settings()
    now = utcnow()
    window = settings.SQS_VISIBILITY_TIMEOUT + settings.SWEEP_PENDING_AFTER_SECONDS
    with unit_of_work() as session:
        stale = execution_crud.find_stale_executions(
            session=session,
            now=now,
            lapsed_before=now - timedelta(seconds=settings.SWEEP_PENDING_AFTER_SECONDS),
            limit=limit,
        )
        for execution in stale:
            execution_crud.mark_sent(execution=execution, resend_after_seconds=window, now=now)
        return [(e.id, e.correlation_id) for e in stale]


def resend(
    found: list[tuple[uuid.UUID, str | None]],
    on_result: Callable[[uuid.UUID, BaseException | None], None] | None = None,
) -> int:
    """Send each execution's message; returns how many sends succeeded."""
    sent = 0
    for execution_id, correlation_id in found:
        error: BaseException | None = None
        try:
            send_execution(execution_id, correlation_id)
            sent += 1
        except Exception as exc:  # noqa: BLE001 - counted and logged; the sweep retries it
            error = exc
            _log_send_failure(execution_id, exc)
        if on_result is not None:
            on_result(execution_id, error)
    return sent


# ----------------------------------------------------------------------------- enqueue


def send_execution(
    execution_id: uuid.UUID,
    correlation_id: str | None = None,
    *,
    countdown: float | None = None,
    queue: str | None = None,
) -> None:
    """Send the execution's message: to ``queue`` (a short run's, see
    ``app.execution_queue_for``), else to the executions queue, which every worker reads
    by default (re-sends from the sweep and for a held lease go there)."""
    headers = {CORRELATION_HEADER: correlation_id} if correlation_id else None
    # No time limits in the message: apply_async would stamp the sender's
    # task_time_limit/task_soft_time_limit (the API's settings) into a ``timelimit``
    # header, which the worker obeys over its own. The worker's configuration decides.
    execute_workflow.apply_async(
        args=[str(execution_id)],
        headers=headers,
        countdown=countdown,
        queue=queue,
        time_limit=None,
        soft_time_limit=None,
    )


def send_after_commit(
    session: Session,
    execution_id: uuid.UUID,
    correlation_id: str | None = None,
    queue: str | None = None,
) -> None:
    """Send the task once ``session``'s transaction commits; never if it rolls back.

    A worker must never receive an id whose row it cannot see yet, and a rolled-back
    execution must never run. The send itself runs in the background (see
    :func:`wait_for_sends`): ``commit()`` returns once the run is committed.
    """
    session.info.setdefault(_PENDING_SENDS, []).append((execution_id, correlation_id, queue))
    _remember_scope(session, execution_id)


def send_while_committing(
    session: Session,
    execution_id: uuid.UUID,
    correlation_id: str | None = None,
    queue: str | None = None,
) -> None:
    """Start the send now, in a background thread.

    Only for an execution whose row ``session``'s transaction has written under its
    enqueue lock (``engine.enqueue.enqueue_lock``, PostgreSQL): a worker that receives the
    message before the commit finds no row, waits for that lock, and looks again; after a
    rollback it finds none and drops the message. The SQS send (a few milliseconds,
    mostly waiting for the service) then overlaps the rest of the caller's transaction
    and its COMMIT instead of following them, so the run reaches the queue sooner.
    """
    slots = _slots
    if _waiters.any() or not slots.acquire(blocking=False):
        # Every send slot is taken (SQS slow or down), or sends wait for one already: the
        # send waits its turn after the commit, in the background (see _SlotWaiters); a
        # rolled-back run's never waits.
        send_after_commit(session, execution_id, correlation_id, queue)
        return
    started = threading.Event()
    if _submit_send(execution_id, correlation_id, queue, slots, started) is None:
        return
    session.info.setdefault(_EARLY_SENDS, []).append(execution_id)
    _remember_scope(session, execution_id)
    with _in_flight_lock:
        thread_free = len(_in_flight) <= _SEND_THREADS
    if thread_free:
        # Wait (briefly) for the send thread to start. It then holds the GIL until its
        # request is on the wire, and this thread's remaining work overlaps the wait for
        # SQS's answer; otherwise the send would start only when this thread next blocks.
        # Not when every send thread is busy: this send waits its turn, the caller not.
        started.wait(0.05)


# The sends of this process still in flight. An enqueue's caller does not wait for its
# send: the committed row is the record of the run, and the message only wakes a worker
# (the transactional-outbox pattern). A send that fails, or never happens because the
# process is killed first, leaves the run pending, and the sweep sends it again once
# SWEEP_PENDING_AFTER_SECONDS have passed; what the caller could have done about a failed
# send is nothing more (it was only ever logged). Bounded: past _MAX_SENDS_IN_FLIGHT a
# committed run's send waits for a slot in one background thread (never in the caller's:
# an async API commits in its event loop's thread, which must not stop for SQS), at most
# _SEND_SLOT_WAIT_SECONDS after its commit and _MAX_SENDS_WAITING at a time; past either
# it is left to the sweep.
_MAX_SENDS_IN_FLIGHT = 256
_MAX_SENDS_WAITING = 1024
_SEND_THREADS = 4
_SEND_SLOT_WAIT_SECONDS = 10.0
_in_flight: set[concurrent.futures.Future[None]] = set()
_in_flight_lock = threading.Lock()
_slots = threading.BoundedSemaphore(_MAX_SENDS_IN_FLIGHT)


def _send_when_a_slot_frees(
    execution_id: uuid.UUID, correlation_id: str | None, queue: str | None
) -> None:
    """Send in the background: now if a slot is free, else once one frees (see
    :class:`_SlotWaiters`). Returns at once, whatever SQS is doing."""
    slots = _slots
    # Behind the sends already waiting, if any: a slot freed for them is not taken here.
    if not _waiters.any() and slots.acquire(blocking=False):
        _submit_send(execution_id, correlation_id, queue, slots)
    elif not _waiters.add(execution_id, correlation_id, queue):
        _log_send_deferred(execution_id, "too many sends waiting for a slot")


def _log_send_deferred(execution_id: uuid.UUID, reason: str) -> None:
    logger.warning(
        "execution_send_deferred",
        execution_id=str(execution_id),
        reason=reason,
        in_flight=_MAX_SENDS_IN_FLIGHT,
        resent_after_seconds=get_settings().SWEEP_PENDING_AFTER_SECONDS,
    )


class _SlotWaiters:
    """Committed runs whose send waits for a slot (every one taken: SQS slow or down),
    waited for by one background thread, oldest first, each until
    _SEND_SLOT_WAIT_SECONDS after its commit; at most _MAX_SENDS_WAITING of them. A
    daemon thread: at the interpreter's exit, what still waits is left to the sweep."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._items: collections.deque[tuple[float, uuid.UUID, str | None, str | None]] = (
            collections.deque()
        )
        self._busy = 0  # taken by the thread, not yet sent or deferred
        self._thread: threading.Thread | None = None

    def add(self, execution_id: uuid.UUID, correlation_id: str | None, queue: str | None) -> bool:
        """Queue a send for the thread; False (nothing queued) when too many wait."""
        with self._cond:
            if len(self._items) + self._busy >= _MAX_SENDS_WAITING:
                return False
            deadline = time.monotonic() + _SEND_SLOT_WAIT_SECONDS
            self._items.append((deadline, execution_id, correlation_id, queue))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="flowbuilder-send-waiter", daemon=True
                )
                self._thread.start()
            self._cond.notify()
        return True

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items:
                    self._cond.wait()
                deadline, execution_id, correlation_id, queue = self._items.popleft()
                self._busy += 1
            try:
                slots = _slots
                if slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
                    _submit_send(execution_id, correlation_id, queue, slots)
                else:
                    _log_send_deferred(execution_id, "no send slot freed in time")
            except Exception as exc:  # noqa: BLE001 - the sweep re-sends it; the thread goes on
                _log_send_failure(execution_id, exc)
            finally:
                with self._cond:
                    self._busy -= 1
                    self._cond.notify_all()

    def any(self) -> bool:
        """Whether sends are waiting for a slot (a new send then queues behind them)."""
        with self._cond:
            return bool(self._items or self._busy)

    def wait_empty(self, timeout: float | None) -> bool:
        """Until nothing waits for a slot (sent on, or deferred); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._items and not self._busy, timeout)


_waiters = _SlotWaiters()


def _submit_send(
    execution_id: uuid.UUID,
    correlation_id: str | None,
    queue: str | None,
    slots: threading.BoundedSemaphore,
    started: threading.Event | None = None,
) -> concurrent.futures.Future[None] | None:
    """Send the execution's message in a background thread, in a slot already taken from
    ``slots`` (released when the send ends): the future, or None if it was sent here
    because the interpreter is exiting."""

    def send() -> None:
        if started is not None:
            started.set()
        send_execution(execution_id, correlation_id, queue=queue)

    try:
        future = _sender().submit(send)
    except RuntimeError:
        # The interpreter is shutting down (no new threads): send here, as it must go now.
        slots.release()
        try:
            send_execution(execution_id, correlation_id, queue=queue)
        except Exception as exc:  # noqa: BLE001 - committed or locked; the sweep re-sends it
            _log_send_failure(execution_id, exc)
        return None
    with _in_flight_lock:
        _in_flight.add(future)

    def done(finished: concurrent.futures.Future[None]) -> None:
        slots.release()
        with _in_flight_lock:
            _in_flight.discard(finished)
        exc = None if finished.cancelled() else finished.exception()
        if exc is not None:
            _log_send_failure(execution_id, exc)

    future.add_done_callback(done)
    return future


def wait_for_sends(timeout: float | None = None) -> bool:
    """Wait until every send this process has started is done (sent, or failed and
    logged); False if some are still in flight after ``timeout`` seconds.

    For a caller that must know the messages have left before it goes on or exits (the
    CLI, tests, benchmarks). The interpreter also finishes them at a normal exit (not
    those still waiting for a slot: the sweep sends those)."""
    until = None if timeout is None else time.monotonic() + timeout
    # The sends waiting for a slot first: each becomes a send in flight, or is deferred.
    if not _waiters.wait_empty(timeout):
        return False
    with _in_flight_lock:
        pending = list(_in_flight)
    if not pending:
        return True
    left = None if until is None else max(0.0, until - time.monotonic())
    _done, not_done = concurrent.futures.wait(pending, timeout=left)
    return not not_done


_sender_lock = threading.Lock()
_sender_pool: tuple[int, concurrent.futures.ThreadPoolExecutor] | None = None


def _reset_sender_in_child() -> None:
    # A forked child has neither the parent's threads nor, safely, its locks, and none of
    # its sends in flight.
    global _sender_lock, _sender_pool, _in_flight_lock, _slots, _waiters
    _sender_lock = threading.Lock()
    _sender_pool = None
    _in_flight_lock = threading.Lock()
    _in_flight.clear()
    _slots = threading.BoundedSemaphore(_MAX_SENDS_IN_FLIGHT)
    _waiters = _SlotWaiters()


os.register_at_fork(after_in_child=_reset_sender_in_child)


def _sender() -> concurrent.futures.ThreadPoolExecutor:
    """This process's send threads (made again in a forked child: threads do not fork)."""
    global _sender_pool
    with _sender_lock:
        if _sender_pool is None or _sender_pool[0] != os.getpid():
            _sender_pool = (
                os.getpid(),
                # Sends wait on SQS: one thread per concurrent send, up to this many (the
                # rest queue here, within _MAX_SENDS_IN_FLIGHT).
                concurrent.futures.ThreadPoolExecutor(
                    max_workers=_SEND_THREADS, thread_name_prefix="flowbuilder-send"
                ),
            )
        return _sender_pool[1]


def _log_send_failure(execution_id: uuid.UUID, exc: BaseException) -> None:
    logger.error(
        "execution_send_failed",
        execution_id=str(execution_id),
        error=f"{type(exc).__name__}: {str(exc)[:200]}",
    )


@event.listens_for(OrmSession, "after_commit")
def _send_pending(session: OrmSession) -> None:
    if session.in_nested_transaction():
        # SQLAlchemy emits after_commit when a SAVEPOINT is released too; only the outer
        # commit makes the execution visible to a worker.
        return
    # Committed: the early sends are out or on their way (a failure is logged by the send
    # itself, and the sweep re-sends the run).
    session.info.pop(_EARLY_SENDS, None)
    session.info.pop(_SEND_SCOPES, None)
    for execution_id, correlation_id, queue in session.info.pop(_PENDING_SENDS, []):
        _send_when_a_slot_frees(execution_id, correlation_id, queue)


@event.listens_for(OrmSession, "after_soft_rollback")
def _drop_pending(session: OrmSession, previous_transaction: Any) -> None:
    if previous_transaction.parent is None:
        session.info.pop(_PENDING_SENDS, None)
        session.info.pop(_SEND_SCOPES, None)
        # Sent already, or about to be: the worker finds no row and drops the message.
        for execution_id in session.info.pop(_EARLY_SENDS, []):
            logger.info("execution_send_withdrawn", execution_id=str(execution_id))
    elif previous_transaction.nested:
        _drop_savepoint_sends(session, previous_transaction)


def _remember_scope(session: OrmSession, execution_id: uuid.UUID) -> None:
    savepoint = session.get_nested_transaction()
    if savepoint is not None:
        session.info.setdefault(_SEND_SCOPES, {})[execution_id] = savepoint


def _drop_savepoint_sends(session: OrmSession, savepoint: Any) -> None:
    """The enqueues made inside a SAVEPOINT that was rolled back (or inside one released
    into it) will never commit: their sends are dropped, or, sent early, withdrawn. The
    rest of the transaction's sends still go after its commit."""
    scopes: dict[uuid.UUID, Any] = session.info.get(_SEND_SCOPES) or {}
    lost = {execution_id for execution_id, scope in scopes.items() if _within(scope, savepoint)}
    if not lost:
        return
    for execution_id in lost:
        del scopes[execution_id]
    pending = session.info.get(_PENDING_SENDS) or []
    session.info[_PENDING_SENDS] = [p for p in pending if p[0] not in lost]
    early = session.info.get(_EARLY_SENDS) or []
    session.info[_EARLY_SENDS] = [e for e in early if e not in lost]
    for execution_id in early:
        if execution_id in lost:
            logger.info("execution_send_withdrawn", execution_id=str(execution_id))


def _within(scope: Any, savepoint: Any) -> bool:
    """Whether the transaction ``scope`` is ``savepoint`` or nested inside it."""
    while scope is not None:
        if scope is savepoint:
            return True
        scope = scope.parent
    return False


def enqueue_execution(
    session: Session,
    workflow_id: uuid.UUID,
    user_id: uuid.UUID,
    *,
    trigger: TriggerType = TriggerType.MANUAL,
    inputs: dict[str, Any] | None = None,
    correlation_id: str | None = None,
) -> WorkflowExecution:
    """The API's entry point: check, record a pending execution, and send its message.

    The caller's ``commit()`` returns once the run is committed; its message leaves then,
    in the background (:func:`wait_for_sends`; with ``ENQUEUE_SEND_EARLY`` on PostgreSQL,
    as soon as the rows are written), and the sweep sends it again if it never arrives.
    Raises NotFound, Conflict (not published), ValidationFailed (bad definition),
    RateLimited or InsufficientCredits; nothing is recorded or sent then.
    """
    settings = get_settings()

    def send(written: engine.Written) -> None:
        queue = execution_queue_for(settings, written.worst_case_seconds)
        if written.locked and settings.ENQUEUE_SEND_EARLY:
            # PostgreSQL, the rows written under the enqueue lock: the send overlaps the
            # caller's commit (opt-in: see the setting).
            send_while_committing(session, written.execution_id, correlation_id, queue)
        else:
            # After the commit, in the background. Not earlier by default: the send's
            # Python (Celery, kombu, botocore: ~2 ms) shares the GIL with the caller,
            # whose commit would wait for it (measured: README, Performance).
            send_after_commit(session, written.execution_id, correlation_id, queue)

    execution = engine.prepare_execution(
        session=session,
        workflow_id=workflow_id,
        user_id=user_id,
        trigger=trigger,
        inputs=inputs,
        correlation_id=correlation_id,
        on_written=send,
    )
    return execution


def cancel_execution(
    session: Session, execution_id: uuid.UUID, user_id: uuid.UUID
) -> WorkflowExecution:
    return engine.cancel_execution(session=session, execution_id=execution_id, user_id=user_id)
