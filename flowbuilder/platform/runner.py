"""The execution engine: prepare an execution (the API side) and run it (the worker side).

No Celery here. The worker task in ``flowbuilder.tasks`` is a thin shell that calls
:func:`run_execution` and decides retries; the API calls :func:`prepare_execution` and
sends the task after its transaction commits.

Exactly once under at-least-once delivery
------------------------------------------
A message may arrive twice, two workers may hold the same execution, a worker may be
killed mid-run. The engine makes that harmless:

- **Lease.** A run first takes the execution's lease (one conditional UPDATE). While it
  holds it, a heartbeat thread renews it; every phase start and phase end re-checks it
  in the same transaction as its writes (fencing), so a worker that lost its lease
  writes nothing more. A duplicate that finds a live lease is told to come back after it
  lapses; a killed worker's lease lapses and the redelivered message takes over.
- **Checkpoints.** Each phase commits when it starts (status, inputs, debit) and when it
  ends (outputs, logs). A resumed run skips completed phases and re-runs the phase that
  was in flight.
- **Debits.** Each phase is debited with the idempotency key ``phase:<phase id>``: a
  re-run phase is never charged twice.

Node side effects (an HTTP call) are at-least-once, like in every queue-driven system:
a phase interrupted mid-call runs its node again after a crash.

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

import concurrent.futures
import itertools
import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlmodel import Session, select

from flowbuilder.platform.crud import (
    balance_crud,
    execution_crud,
    log_crud,
    phase_crud,
    rate_limit_crud,
    user_crud,
    workflow_crud,
)
from flowbuilder.platform.db import get_engine, unit_of_work
from flowbuilder.platform.errors import (
    Conflict,
    FlowBuilderError,
    InsufficientCredits,
    NotFound,
    SecretError,
    TransientError,
    ValidationFailed,
)
from flowbuilder.platform.models import (
    ExecutionPhase,
    ExecutionStatus,
    PhaseStatus,
    TriggerType,
    WorkflowExecution,
    WorkflowStatus,
    WorkflowVersion,
    utcnow,
)
from flowbuilder.platform.redaction import credential_forms, redact, redacted_traceback
from flowbuilder.platform.settings import get_settings

logger = structlog.get_logger(__name__)


# ----------------------------------------------------------------------------- enqueue side


def prepare_execution(
    *,
    session: Session,
    workflow_id: uuid.UUID,
    user_id: uuid.UUID,
    trigger: TriggerType = TriggerType.MANUAL,
    inputs: dict[str, Any] | None = None,
    correlation_id: str | None = None,
) -> WorkflowExecution:
    """Checks and records a new execution (pending, with its planned phases).

    In order: ownership and a published, valid definition (NotFound, Conflict,
    ValidationFailed); the rate limit (RateLimited); the balance covers the plan
    (InsufficientCredits). Flushes only; the caller's unit of work commits and only then
    is the task sent.
    """
    from flowbuilder.platform.definitions import validate_definition
    from flowbuilder.platform.plan import ExecutionPlan

    settings = get_settings()
    _check_inputs(inputs, settings.MAX_DEFINITION_BYTES)
    workflow = workflow_crud.get_workflow_by_id_and_user(
        session=session, workflow_id=workflow_id, user_id=user_id
    )
    if workflow.status != WorkflowStatus.PUBLISHED or workflow.published_version == 0:
        raise Conflict(f"workflow {workflow_id} is {workflow.status.value}, not published")
    version = workflow_crud.get_published_version(session=session, workflow=workflow)
    # Validated again: a credential may have been deleted since the version was published.
    validate_definition(
        version.definition,
        owned_credential_ids=workflow_crud.owned_credential_ids(session=session, user_id=user_id),
    )
    # The plan frozen with the version: the same one the worker runs, so the phases
    # recorded here (and their credit costs) are exactly what will be run and debited.
    plan = ExecutionPlan.from_dict(version.plan)

    user = user_crud.get_user(session=session, user_id=user_id)
    limit = settings.RATE_LIMIT_GUEST if user.is_guest else settings.RATE_LIMIT_USER
    rate_limit_crud.hit(
        session=session,
        key=f"enqueue:{user_id}",
        limit=limit,
        window_seconds=settings.RATE_LIMIT_WINDOW_SECONDS,
    )
    available = balance_crud.get_balance(session=session, user_id=user_id)
    if available < plan.total_credits:
        raise InsufficientCredits(user_id, plan.total_credits, available)

    execution = execution_crud.create_execution(
        session=session,
        user_id=user_id,
        workflow_id=workflow.id,
        workflow_version_id=version.id,
        trigger=trigger,
        inputs=inputs,
        correlation_id=correlation_id,
    )
    execution.enqueued_at = utcnow()
    phase_crud.create_phases(session=session, execution=execution, planned=plan.nodes)
    logger.info(
        "execution_prepared",
        execution_id=str(execution.id),
        workflow_id=str(workflow.id),
        user_id=str(user_id),
        phases=len(plan.nodes),
        credits=plan.total_credits,
    )
    return execution


def _check_inputs(inputs: Any, max_bytes: int) -> None:
    """Execution inputs are stored as JSON: refuse what cannot be, or is too large."""
    if inputs is None:
        return
    if not isinstance(inputs, dict):
        raise ValidationFailed([f"inputs: must be a JSON object, got {type(inputs).__name__}"])
    try:
        size = len(json.dumps(inputs, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValidationFailed([f"inputs: not JSON serialisable ({exc})"]) from None
    if size > max_bytes:
        raise ValidationFailed([f"inputs: {size} bytes, more than the {max_bytes} allowed"])


def cancel_execution(
    *, session: Session, execution_id: uuid.UUID, user_id: uuid.UUID
) -> WorkflowExecution:
    """Request cancellation: a pending run ends now, a running one before its next phase."""
    execution = execution_crud.request_cancel(
        session=session, execution_id=execution_id, user_id=user_id
    )
    if execution.status == ExecutionStatus.CANCELLED:
        phase_crud.close_open_phases(
            session=session, execution_id=execution_id, status=PhaseStatus.CANCELLED
        )
    return execution


# ----------------------------------------------------------------------------- worker side


class Outcome(StrEnum):
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    ALREADY_DONE = "already_done"  # a duplicate delivery of a finished execution
    LEASE_HELD = "lease_held"  # another worker runs it now
    LEASE_LOST = "lease_lost"  # our lease lapsed and someone else took over
    MISSING = "missing"


@dataclass
class RunResult:
    outcome: Outcome
    retry_after: float = 0.0
    phases_run: int = 0
    credits: int = 0
    error: str | None = None


def _is_infrastructure_error(exc: BaseException) -> bool:
    return isinstance(exc, OperationalError | DBAPIError) and not isinstance(
        exc, sa.exc.IntegrityError
    )


def _cap_outputs(outputs: dict[str, Any], limit: int) -> dict[str, Any]:
    """Keep outputs under ``limit`` bytes of JSON; replace oversized values with a note."""
    try:
        encoded = json.dumps(outputs, default=str)
    except (TypeError, ValueError):
        return {"_error": "outputs are not JSON serialisable"}
    if len(encoded) <= limit:
        return json.loads(encoded) if _needs_roundtrip(outputs) else outputs
    capped: dict[str, Any] = {}
    budget = limit
    for key, value in outputs.items():
        size = len(json.dumps(value, default=str))
        if size + len(key) + 8 <= budget:
            capped[key] = value
            budget -= size + len(key) + 8
        else:
            capped[key] = {"_truncated": True, "size_bytes": size}
    capped["_truncated"] = True
    return json.loads(json.dumps(capped, default=str))


def _needs_roundtrip(outputs: dict[str, Any]) -> bool:
    # Cheap check: only dicts/lists/str/int/float/bool/None go into JSON columns as-is.
    stack: list[Any] = [outputs]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif not isinstance(item, str | int | float | bool | type(None)):
            return True
    return False


class _Heartbeat(threading.Thread):
    """Renews the lease while a node runs; notices cancellation and a lost lease."""

    def __init__(self, engine: Engine, execution_id: uuid.UUID, owner: str, lease: float) -> None:
        super().__init__(name=f"lease-{execution_id}", daemon=True)
        self.engine, self.execution_id, self.owner, self.lease = engine, execution_id, owner, lease
        self.stop_event = threading.Event()
        self.cancelled = threading.Event()
        self.lost = threading.Event()

    def run(self) -> None:
        interval = max(0.2, self.lease / 3)
        while not self.stop_event.wait(interval):
            try:
                with unit_of_work(self.engine) as s:
                    held, cancel = execution_crud.renew_lease(
                        session=s,
                        execution_id=self.execution_id,
                        owner=self.owner,
                        lease_seconds=self.lease,
                    )
            except Exception as exc:  # noqa: BLE001 - a blip; the next beat tries again
                logger.warning("lease_renew_failed", error=type(exc).__name__)
                continue
            if cancel:
                self.cancelled.set()
            if not held:
                self.lost.set()
                return

    def stop(self) -> None:
        self.stop_event.set()


# Nodes of one phase that run at the same time (per worker process).
NODE_CONCURRENCY = 8
# One pool for node calls: a node gets a thread so its timeout can be enforced from
# outside even when the node itself ignores its deadline. Larger than NODE_CONCURRENCY so
# that a few timed-out nodes still running in the background do not starve new ones.
_node_pool = concurrent.futures.ThreadPoolExecutor(
    max_workers=NODE_CONCURRENCY * 2, thread_name_prefix="node"
)


@dataclass
class _RunState:
    execution_id: uuid.UUID
    user_id: uuid.UUID
    workflow_id: uuid.UUID | None
    owner: str
    lease: float
    deadline: float
    plan: Any
    phases: list[ExecutionPhase]
    outputs_by_node: dict[str, dict[str, Any]] = field(default_factory=dict)
    next_seq: int = 1
    phases_run: int = 0


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
    try:
        state_or_result = _claim(engine, execution_id, owner, settings.LEASE_SECONDS)
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
            heartbeat = _Heartbeat(engine, execution_id, owner, settings.LEASE_SECONDS)
            heartbeat.start()
            try:
                result = _run_phases(engine, state, heartbeat, on_phase_started)
            finally:
                heartbeat.stop()
            logger.info(
                "execution_finished",
                outcome=result.outcome.value,
                phases_run=result.phases_run,
                credits=result.credits,
                error=result.error,
            )
    except Exception as exc:
        if _is_infrastructure_error(exc):
            _release_quietly(engine, execution_id, owner)
            raise TransientError(f"database unavailable while running {execution_id}") from exc
        raise
    return result


def _release_quietly(engine: Engine, execution_id: uuid.UUID, owner: str) -> None:
    try:
        with unit_of_work(engine) as s:
            execution_crud.release_lease(session=s, execution_id=execution_id, owner=owner)
    except Exception:  # noqa: BLE001 - the lease then lapses on its own
        logger.warning("lease_release_failed", execution_id=str(execution_id))


def _claim(
    engine: Engine, execution_id: uuid.UUID, owner: str, lease: float
) -> _RunState | RunResult:
    from flowbuilder.platform.plan import ExecutionPlan

    with unit_of_work(engine) as s:
        execution = s.get(WorkflowExecution, execution_id)
        if execution is None:
            return RunResult(Outcome.MISSING, error="no such execution")
        if execution.status.is_terminal:
            return RunResult(Outcome.ALREADY_DONE)
        if not execution_crud.acquire_lease(
            session=s, execution_id=execution_id, owner=owner, lease_seconds=lease
        ):
            s.refresh(execution)
            remaining = lease
            if execution.lease_expires_at is not None:
                remaining = max(0.5, (execution.lease_expires_at - utcnow()).total_seconds())
            return RunResult(Outcome.LEASE_HELD, retry_after=remaining)
        s.refresh(execution)
        if execution.cancel_requested:
            _finish(s, execution.id, ExecutionStatus.CANCELLED, "cancelled", PhaseStatus.CANCELLED)
            return RunResult(Outcome.CANCELLED)
        version = (
            s.get(WorkflowVersion, execution.workflow_version_id)
            if execution.workflow_version_id
            else None
        )
        if version is None or not version.plan:
            _finish(
                s,
                execution.id,
                ExecutionStatus.FAILED,
                "the workflow version was deleted before the run",
                PhaseStatus.SKIPPED,
            )
            return RunResult(Outcome.FAILED, error="workflow version missing")
        if execution.status == ExecutionStatus.PENDING:
            execution_crud.update_execution_status(
                session=s, execution_id=execution.id, status=ExecutionStatus.RUNNING
            )
        phases = list(
            s.exec(
                select(ExecutionPhase)
                .where(ExecutionPhase.execution_id == execution.id)
                .order_by(ExecutionPhase.number, ExecutionPhase.position)
            )
        )
        state = _RunState(
            execution_id=execution.id,
            user_id=execution.user_id,
            workflow_id=execution.workflow_id,
            owner=owner,
            lease=lease,
            deadline=time.monotonic() + get_settings().EXECUTION_TIMEOUT_SECONDS,
            plan=ExecutionPlan.from_dict(version.plan),
            phases=phases,
            next_seq=log_crud.next_log_seq(session=s, execution_id=execution.id),
        )
        for phase in phases:
            if phase.status == PhaseStatus.COMPLETED:
                state.outputs_by_node[phase.node_id] = phase.outputs or {}
        return state


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
    engine: Engine,
    state: _RunState,
    heartbeat: _Heartbeat,
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
        with unit_of_work(engine) as s:
            held, cancel = _renew(s, state)
            if not held:
                return RunResult(Outcome.LEASE_LOST, phases_run=state.phases_run)
            if previous is not None:
                ended = _record_group(s, state, previous, settings)
                if ended is not None:
                    return ended
            if group is None:
                return _complete(s, state)
            if cancel or heartbeat.cancelled.is_set():
                return _cancel_run(s, state)
            if state.deadline - time.monotonic() <= 0:
                return _fail_run(s, state, _timeout_message(settings))
            current = _GroupRun()
            for phase in group:
                s.add(phase)
                try:
                    current.inputs[phase.id] = state.plan.resolve_inputs(
                        phase.node_id, state.outputs_by_node
                    )
                except FlowBuilderError as exc:  # a required input upstream did not produce
                    phase_crud.update_phase(
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
                )
                if current.refusal is not None:
                    # The rest of this phase does not start; what started still runs.
                    break
            if current.refusal is not None and not current.started:
                return _fail_run(s, state, current.refusal)
        if on_phase_started is not None:
            for phase, _node, _credential in current.started:
                on_phase_started(phase)
        # The nodes themselves, concurrently, outside any transaction.
        current.outcomes = _invoke_all(current.started, current.inputs, state, heartbeat)
        state.phases_run += len(current.started)
        previous = current
    raise AssertionError("unreachable")  # the loop always returns


_OPEN_PHASE = (PhaseStatus.CREATED, PhaseStatus.RUNNING)


@dataclass
class _GroupRun:
    """One phase in flight: what started, with which inputs, and how each node ended."""

    started: list[tuple[ExecutionPhase, Any, Any]] = field(default_factory=list)
    inputs: dict[uuid.UUID, dict[str, Any]] = field(default_factory=dict)
    outcomes: list[_NodeOutcome] = field(default_factory=list)
    refusal: str | None = None


def _record_group(s: Session, state: _RunState, run: _GroupRun, settings: Any) -> RunResult | None:
    """Store a finished phase's logs and results. Returns the run's end if it ends here."""
    failure: str | None = None
    cancelled = False
    for (phase, _node, _credential), outcome in zip(run.started, run.outcomes, strict=True):
        s.add(phase)
        state.next_seq = log_crud.append_logs(
            session=s,
            execution_id=state.execution_id,
            phase_id=phase.id,
            entries=outcome.logs,
            first_seq=state.next_seq,
        )
        if outcome.error is None:
            outputs = _cap_outputs(outcome.outputs, settings.PHASE_OUTPUT_MAX_BYTES)
            phase_crud.update_phase(
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


def _fail_run(s: Session, state: _RunState, error: str) -> RunResult:
    _finish(s, state.execution_id, ExecutionStatus.FAILED, error, PhaseStatus.SKIPPED)
    return RunResult(Outcome.FAILED, phases_run=state.phases_run, error=error)


def _complete(s: Session, state: _RunState) -> RunResult:
    _finish(s, state.execution_id, ExecutionStatus.COMPLETED, None, PhaseStatus.SKIPPED)
    credits = s.get(WorkflowExecution, state.execution_id).credits_consumed
    return RunResult(Outcome.COMPLETED, phases_run=state.phases_run, credits=credits)


def _renew(s: Session, state: _RunState) -> tuple[bool, bool]:
    """Fence a transaction: renew our lease; ``(still held, cancel requested)``."""
    return execution_crud.renew_lease(
        session=s, execution_id=state.execution_id, owner=state.owner, lease_seconds=state.lease
    )


def _cancel_run(s: Session, state: _RunState) -> RunResult:
    _finish(
        s,
        state.execution_id,
        ExecutionStatus.CANCELLED,
        "cancelled by the user",
        PhaseStatus.CANCELLED,
    )
    return RunResult(Outcome.CANCELLED, phases_run=state.phases_run)


def _start_phase(
    s: Session,
    state: _RunState,
    phase: ExecutionPhase,
    node: Any,
    inputs: dict[str, Any],
    started: list[tuple[ExecutionPhase, Any, Any]],
) -> str | None:
    """Load the credential, debit, mark running. Returns why the run must stop, or None."""
    credential = None
    error = run_error = None
    if node.credential_id is not None:
        try:
            credential = _load_credential(s, node.credential_id, state.user_id)
        except NotFound:
            # Deleted after the run was enqueued: fail cleanly, charge nothing.
            error = f"credential {node.credential_id} is no longer available"
            run_error = f"phase {phase.node_id} ({phase.node_type}) failed: {error}"
        except SecretError as exc:
            # It cannot be read (a ciphertext moved from another row, a key no longer
            # configured, the backend refusing): retrying would fail the same way, so the
            # run ends here, charged nothing. SecretError messages never carry the value.
            error = f"credential {node.credential_id} could not be read ({exc})"
            run_error = f"phase {phase.node_id} ({phase.node_type}) failed: {error}"
    if error is None and phase.credits_cost > 0:
        try:
            balance_crud.debit_credits(
                session=s,
                user_id=state.user_id,
                amount=phase.credits_cost,
                idempotency_key=f"phase:{phase.id}",
                execution_id=state.execution_id,
                phase_id=phase.id,
                reason=f"{phase.node_type} {phase.node_id}",
            )
        except InsufficientCredits as exc:
            error = run_error = str(exc)
    if error is not None:
        phase_crud.update_phase(session=s, phase=phase, status=PhaseStatus.FAILED, error=error)
        return run_error
    phase_crud.update_phase(
        session=s,
        phase=phase,
        status=PhaseStatus.RUNNING,
        inputs=inputs,
        credits_charged=phase.credits_cost,
    )
    started.append((phase, node, credential))
    return None


def _record_failure(
    s: Session, state: _RunState, phase: ExecutionPhase, outcome: _NodeOutcome, refund: bool
) -> None:
    status = PhaseStatus.CANCELLED if outcome.cancelled else PhaseStatus.FAILED
    refunded = refund and phase.credits_charged > 0
    if refunded:
        balance_crud.refund_credits(
            session=s,
            user_id=state.user_id,
            amount=phase.credits_charged,
            idempotency_key=f"refund:{phase.id}",
            execution_id=state.execution_id,
            phase_id=phase.id,
            reason=f"{status.value} phase {phase.node_id}",
        )
    phase_crud.update_phase(
        session=s,
        phase=phase,
        status=status,
        error=outcome.error,
        credits_charged=0 if refunded else None,
    )


# Coordinates the nodes of one phase; each node itself runs on _node_pool.
_phase_pool = concurrent.futures.ThreadPoolExecutor(
    max_workers=NODE_CONCURRENCY, thread_name_prefix="phase"
)


def _invoke_all(
    started: list[tuple[ExecutionPhase, Any, Any]],
    inputs: dict[uuid.UUID, dict[str, Any]],
    state: _RunState,
    heartbeat: _Heartbeat,
) -> list[_NodeOutcome]:
    if len(started) == 1:  # the common case: no extra thread hop
        phase, node, credential = started[0]
        return [_invoke(node, phase, inputs[phase.id], credential, state, heartbeat)]
    futures = [
        _phase_pool.submit(_invoke, node, phase, inputs[phase.id], credential, state, heartbeat)
        for phase, node, credential in started
    ]
    return [f.result() for f in futures]


def _timeout_message(settings: Any) -> str:
    return f"execution timed out after {settings.EXECUTION_TIMEOUT_SECONDS:g}s"


def _load_credential(s: Session, credential_id: Any, user_id: uuid.UUID) -> Any:
    """Decrypt the node's credential for this one call (scoped to the run's user).

    NotFound when it was deleted (or its secret was) since the run was enqueued."""
    from flowbuilder.platform.crud import credentials_crud
    from flowbuilder.platform.nodes.base import NodeCredential

    cred, secret = credentials_crud.resolve_credential_value(
        session=s, credential_id=uuid.UUID(str(credential_id)), user_id=user_id
    )
    return NodeCredential(type=cred.type, secret=secret, name=cred.name)


@dataclass
class _NodeOutcome:
    outputs: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    cancelled: bool = False
    execution_timeout: bool = False
    logs: list[Any] = field(default_factory=list)


def _invoke(
    node: Any,
    phase: ExecutionPhase,
    inputs: dict[str, Any],
    credential: Any,
    state: _RunState,
    heartbeat: _Heartbeat,
) -> _NodeOutcome:
    """Run one node with its timeout and its declared retries for transient errors."""
    from flowbuilder.platform.nodes import get_node_type
    from flowbuilder.platform.nodes.base import NodeCancelled, NodeContext, NodeError, NodeLogger

    node_type = get_node_type(phase.node_type)
    node_log = NodeLogger()
    timeout = float(node.timeout_seconds or node_type.timeout_seconds)
    attempts = 1 + (int(node_type.max_retries) if node_type.retryable else 0)
    result = _NodeOutcome()
    for attempt in range(1, attempts + 1):
        left = state.deadline - time.monotonic()
        budget = min(timeout, left)
        if budget <= 0:
            result.error, result.execution_timeout = "execution time budget exhausted", True
            break
        ctx = NodeContext(
            execution_id=state.execution_id,
            user_id=state.user_id,
            node_id=phase.node_id,
            credential=credential,
            log=node_log,
            deadline=time.monotonic() + budget,
            cancelled=heartbeat.cancelled.is_set,
        )
        started = time.monotonic()
        future = _node_pool.submit(node_type.invoke, inputs, ctx)
        try:
            result.outputs = future.result(timeout=budget + 0.5)
            result.error = None
            break
        except concurrent.futures.TimeoutError:
            result.error = f"timed out after {budget:g}s"
            result.execution_timeout = budget < timeout
            node_log.error(f"node {phase.node_id} timed out after {budget:g}s")
            break
        except NodeCancelled:
            result.error, result.cancelled = "cancelled", True
            break
        except TransientError as exc:
            result.error = f"{type(exc).__name__}: {exc}"
            if attempt < attempts and not heartbeat.cancelled.is_set():
                backoff = float(node_type.retry_backoff_seconds) * (2 ** (attempt - 1))
                backoff = min(backoff, max(0.0, state.deadline - time.monotonic() - 0.1))
                node_log.warning(
                    f"attempt {attempt} of {attempts} failed ({result.error}); "
                    f"retrying in {backoff:.1f}s"
                )
                logger.info("node_retry", node_id=phase.node_id, attempt=attempt, backoff=backoff)
                time.sleep(backoff)
                continue
            if time.monotonic() - started >= budget and budget < timeout:
                result.execution_timeout = True
            break
        except NodeError as exc:
            result.error = str(exc)
            break
        except Exception as exc:  # noqa: BLE001 - a node bug must fail the phase, not the worker
            logger.error(
                "node_crashed",
                node_id=phase.node_id,
                node_type=phase.node_type,
                traceback=redacted_traceback(exc, credential_forms(credential)),
            )
            result.error = f"internal error in node type {phase.node_type} ({type(exc).__name__})"
            break
    if result.error is not None and not result.cancelled:
        node_log.error(result.error)
    result.logs = [(e.level, e.message, e.timestamp) for e in node_log.drain()]
    if credential is not None:
        # A remote server may echo the credential back (headers reflected in a body), and
        # a node may log or raise with it. Nothing the node produced is stored unredacted.
        forms = credential_forms(credential)
        result.outputs = redact(result.outputs, forms)
        result.error = redact(result.error, forms)
        result.logs = [(lvl, redact(msg, forms), ts) for lvl, msg, ts in result.logs]
    return result
