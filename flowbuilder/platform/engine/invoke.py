"""Calling a node: on its own thread, with its timeout and its declared retries."""

from __future__ import annotations

import concurrent.futures
import contextvars
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog
from sqlmodel import Session

from flowbuilder.platform.engine.lease import Heartbeat
from flowbuilder.platform.engine.outputs import Unstorable, storable_outputs_text
from flowbuilder.platform.engine.state import RunState, is_time_limit
from flowbuilder.platform.errors import (
    TransientError,
)
from flowbuilder.platform.jsonvalues import clean_string
from flowbuilder.platform.models import (
    ExecutionPhase,
)
from flowbuilder.platform.nodes import find_node_type, get_node_type
from flowbuilder.platform.nodes.base import NodeCancelled, NodeContext, NodeError, NodeLogger
from flowbuilder.platform.redaction import credential_forms, redact, redacted_traceback
from flowbuilder.platform.settings import get_settings
from flowbuilder.platform.threadpools import ThreadPool

logger = structlog.get_logger(__name__)

_T = TypeVar("_T")


NODE_CONCURRENCY = 8
# One pool for node calls: a node gets a thread so its timeout can be enforced from
# outside even when the node itself ignores its deadline. Larger than NODE_CONCURRENCY so
# that a few timed-out nodes still running in the background do not starve new ones.
_node_pool = ThreadPool(max_workers=NODE_CONCURRENCY * 2, thread_name_prefix="node")


_phase_pool = ThreadPool(max_workers=NODE_CONCURRENCY, thread_name_prefix="phase")


def invoke_all(
    started: list[tuple[ExecutionPhase, Any, Any]],
    inputs: dict[uuid.UUID, dict[str, Any]],
    state: RunState,
    heartbeat: Heartbeat,
    early: Early | None = None,
) -> list[NodeOutcome]:
    """Run a phase's nodes, concurrently, and return how each ended; ``early``: the
    calls :func:`start_early` started, carried on."""
    if early is not None:
        calls = early.calls
    else:
        calls = [
            _NodeCall(node, phase, inputs[phase.id], credential, state, heartbeat)
            for phase, node, credential in started
        ]
    if len(calls) == 1:  # the common case: no extra thread hop
        return [_invoke(calls[0])]
    futures = [_phase_pool.submit(_invoke, call) for call in calls]
    return [f.result() for f in futures]


@dataclass
class Early:
    """A phase's nodes started before its start was committed, and what stops them."""

    calls: list[_NodeCall]
    abort: threading.Event
    # The phase's one node is to run on the run's own thread (NodeType.inline), beside
    # its transaction: not started yet (see run_inline).
    inline: bool = False


def start_early(
    started: list[tuple[ExecutionPhase, Any, Any]],
    inputs: dict[uuid.UUID, dict[str, Any]],
    state: RunState,
    heartbeat: Heartbeat,
) -> Early:
    """Start the first attempt of each node now; :func:`invoke_all` carries them on. For
    pure nodes only (``NodeType.pure``), before their phase's start is committed: the
    transaction that starts them (and records the phase before) is built, sent and
    committed while they work, instead of before. Setting ``abort`` tells them they are
    cancelled (their results are thrown away)."""
    abort = threading.Event()
    calls = [
        _NodeCall(node, phase, inputs[phase.id], credential, state, heartbeat, abort)
        for phase, node, credential in started
    ]
    if len(calls) == 1 and getattr(calls[0].node_type, "inline", False):
        return Early(calls, abort, inline=True)  # started by run_inline, on this thread
    begun = [threading.Event() for _ in calls]
    try:
        for call, event in zip(calls, begun, strict=True):
            call.first = call.submit(begun=event)
        # Wait (briefly) for the nodes to be running. The caller's own work (its
        # transaction) is Python that holds the GIL until it waits on the database: a
        # node thread woken meanwhile would start only then. A node that waits (I/O, a
        # delay) then lets the caller go on at once; one busy computing shares the GIL
        # either way.
        until = time.monotonic() + _BEGIN_WAIT_SECONDS
        for call, event in zip(calls, begun, strict=True):
            if call.first is None:  # not submitted: the run's time is out
                continue
            if not event.wait(max(0.0, until - time.monotonic())):
                break  # the pool is busy (timed-out nodes still running): go on anyway
    except BaseException:
        # A full pool (interpreter shutdown), or the worker's time limit while waiting:
        # what did start stops, and the phase's nodes run the common way or not at all.
        abort.set()
        raise
    return Early(calls, abort)


# How long start_early waits for its nodes' threads to be running.
_BEGIN_WAIT_SECONDS = 0.05


# The phases' transactions that run beside an inline node (see run_inline). A pool of
# its own: one shared with the nodes could have them all busy with nodes that wait.
_transaction_pool = ThreadPool(max_workers=NODE_CONCURRENCY, thread_name_prefix="phase-transaction")


def start_beside(start: Callable[[], None], what: str) -> None:
    """``start()`` on a thread of the transactions' pool, this thread going on at once.

    Meant for starting a thread: ``Thread.start`` waits until the new thread runs (~0.4
    ms after an idle, on the way from a run's claim to its first node). A failure is
    logged as ``<what>_not_started``; ``start()`` runs here if no pool thread can start
    (interpreter shutdown)."""

    def starting() -> None:
        try:
            start()
        except Exception as exc:  # noqa: BLE001 - no thread left: said, not raised unseen
            logger.error(f"{what}_not_started", error=f"{type(exc).__name__}: {exc}")

    try:
        _transaction_pool.submit(contextvars.copy_context().run, starting)
    except RuntimeError:
        start()


def run_inline(early: Early, transaction: Callable[[], _T]) -> _T:
    """Run ``transaction`` (the phase's, which starts it) on another thread while the
    phase's one inline node runs on this one; return what the transaction returned.

    A node on a thread of its own costs two hand-overs per phase, each a wake-up of a
    sleeping thread: the run's thread waking when the node ends, the node's thread when
    the next one starts. Here the node runs where its result is read, and the thread
    that is woken is the transaction's, while the node works. ``transaction`` sets
    ``early.abort`` itself when it fails or does not start the node (as
    the engine's step does), so that the node stops within its slice instead of
    running to its end. The transaction always ends before this returns or raises: it
    holds the run's connection."""
    context = contextvars.copy_context()  # the run's bound log fields, on that thread too
    try:
        future = _transaction_pool.submit(context.run, transaction)
    except RuntimeError:
        # No thread can start (interpreter shutdown): the transaction, then the node.
        made = transaction()
        if not early.abort.is_set():
            early.calls[0].run_here()
        return made
    try:
        early.calls[0].run_here()
        return future.result()
    except BaseException:
        # The worker's time limit, while the node ran or while its transaction was read.
        early.abort.set()
        concurrent.futures.wait([future])
        raise


def all_pure(started: list[tuple[ExecutionPhase, Any, Any]]) -> bool:
    """Whether every node of a phase may start before the phase's start is committed."""
    # An unknown type (unregistered since the plan was made) is not pure: it fails on the
    # common path, after its phase's start, as before.
    return all(
        credential is None and getattr(find_node_type(phase.node_type), "pure", False)
        for phase, _node, credential in started
    )


def load_credential(s: Session, credential_id: Any, user_id: uuid.UUID) -> Any:
    """Decrypt the node's credential for this one call (scoped to the run's user).

    NotFound when it was deleted (or its secret was) since the run was enqueued."""
    from flowbuilder.platform.crud import credentials_crud
    from flowbuilder.platform.nodes.base import NodeCredential

    cred, secret = credentials_crud.resolve_credential_value(
        session=s, credential_id=uuid.UUID(str(credential_id)), user_id=user_id
    )
    return NodeCredential(type=cred.type, secret=secret, name=cred.name)


@dataclass
class NodeOutcome:
    outputs: dict[str, Any] = field(default_factory=dict)
    # The outputs' JSON text, made once at the node boundary (None: serialise them).
    outputs_json: str | None = None
    error: str | None = None
    cancelled: bool = False
    execution_timeout: bool = False
    logs: list[Any] = field(default_factory=list)


class _NodeCall:
    """One node's call: its type, its log, what cancels it, its attempts."""

    def __init__(
        self,
        node: Any,
        phase: ExecutionPhase,
        inputs: dict[str, Any],
        credential: Any,
        state: RunState,
        heartbeat: Heartbeat,
        abort: threading.Event | None = None,
    ) -> None:
        self.phase, self.inputs, self.credential, self.state = phase, inputs, credential, state
        self.heartbeat = heartbeat
        self.node_type = get_node_type(phase.node_type)
        self.log = NodeLogger()
        self.timeout = float(node.timeout_seconds or self.node_type.timeout_seconds)
        self.abort = abort
        # The first attempt, when it was started ahead (see start_early).
        self.first: tuple[concurrent.futures.Future[Any], float, float] | None = None

    def cancelled(self) -> bool:
        return self.heartbeat.cancelled.is_set() or (self.abort is not None and self.abort.is_set())

    def _context(self) -> tuple[Any, float] | None:
        """An attempt's context and its budget; None when the run's time is out."""
        budget = min(self.timeout, self.state.deadline - time.monotonic())
        if budget <= 0:
            return None
        ctx = NodeContext(
            execution_id=self.state.execution_id,
            user_id=self.state.user_id,
            node_id=self.phase.node_id,
            credential=self.credential,
            log=self.log,
            deadline=time.monotonic() + budget,
            cancelled=self.cancelled,
        )
        return ctx, budget

    def run_here(self) -> None:
        """The first attempt, on this thread (``NodeType.inline``), kept as ``first``:
        done already (:class:`_Done`), and read by :func:`invoke_all` as a thread's."""
        made = self._context()
        if made is None:
            return  # invoke_all finds the run's time out
        ctx, budget = made
        started = time.monotonic()
        try:
            done = _Done(self.node_type.invoke(self.inputs, ctx))
        except Exception as exc:  # noqa: BLE001 - read by _invoke as a thread's would be
            done = _Done(error=exc)
        self.first = done, started, budget  # type: ignore[assignment]

    def submit(
        self, begun: threading.Event | None = None
    ) -> tuple[concurrent.futures.Future[Any], float, float] | None:
        """One attempt on its own thread: ``(future, started, budget)``; None when the
        run's time is out. ``begun`` is set when the thread starts the node."""
        made = self._context()
        if made is None:
            return None
        ctx, budget = made
        started = time.monotonic()
        invoke = self.node_type.invoke
        if begun is not None:
            node_invoke = invoke

            def invoke(inputs: dict[str, Any], ctx: NodeContext) -> Any:
                begun.set()
                return node_invoke(inputs, ctx)

        return _node_pool.submit(invoke, self.inputs, ctx), started, budget


class _Done:
    """An inline node's result, read as a thread's future is (``result``): no lock, no
    condition, nothing to wait for."""

    __slots__ = ("value", "error")

    def __init__(self, value: Any = None, error: BaseException | None = None) -> None:
        self.value, self.error = value, error

    def result(self, timeout: float | None = None) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


def _invoke(call: _NodeCall) -> NodeOutcome:
    """Run one node with its timeout and its declared retries for transient errors."""
    settings = get_settings()
    phase, inputs, credential, state = call.phase, call.inputs, call.credential, call.state
    node_type, node_log, timeout = call.node_type, call.log, call.timeout
    attempts = 1 + (int(node_type.max_retries) if node_type.retryable else 0)
    result = NodeOutcome()
    for attempt in range(1, attempts + 1):
        first, call.first = call.first, None
        submitted = first or call.submit()
        if submitted is None:
            result.error, result.execution_timeout = "execution time budget exhausted", True
            break
        future, started, budget = submitted
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
            if attempt < attempts and not call.cancelled():
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
            if is_time_limit(exc):
                # The worker's own time limit, not a node bug: the run ends as timed out.
                raise
            # The traceback is redacted: a node may raise with its credential in the text.
            logger.error(
                "node_crashed",
                node_id=phase.node_id,
                node_type=phase.node_type,
                traceback=redacted_traceback(exc, credential_forms(credential)),
            )
            result.error = f"internal error in node type {phase.node_type} ({type(exc).__name__})"
            break
    if result.error is None:
        # The node boundary: what the node returned becomes storable here, or the node
        # fails with the reason (never a database write that fails on the data).
        try:
            result.outputs, result.outputs_json = storable_outputs_text(
                result.outputs,
                max_bytes=settings.PHASE_OUTPUT_MAX_BYTES,
                max_depth=settings.PHASE_OUTPUT_MAX_DEPTH,
                inputs=inputs,
                keeps_inputs=node_type.keeps_inputs,
            )
        except Unstorable as exc:
            result.outputs, result.error = {}, f"its outputs cannot be stored: {exc}"
    else:
        result.outputs = {}
        result.error = clean_string(result.error)
    if result.error is not None and not result.cancelled:
        node_log.error(result.error)
    result.logs = [(e.level, clean_string(e.message), e.timestamp) for e in node_log.drain()]
    if credential is not None:
        # A remote server may echo the credential back (headers reflected in a body), and
        # a node may log or raise with it. Nothing the node produced is stored unredacted.
        forms = credential_forms(credential)
        result.outputs = redact(result.outputs, forms)
        result.outputs_json = None  # the text is of the unredacted outputs
        result.error = redact(result.error, forms)
        result.logs = [(lvl, redact(msg, forms), ts) for lvl, msg, ts in result.logs]
    return result
