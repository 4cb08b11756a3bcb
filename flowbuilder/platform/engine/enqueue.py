"""The API side of the engine: check and record a new execution, or cancel one.

No Celery here: the caller's unit of work commits, and the task layer sends the message
(``flowbuilder.tasks.execution``), after the commit by default. On PostgreSQL it may
leave as soon as the rows are written, while the caller is still committing
(``ENQUEUE_SEND_EARLY``): the transaction that wrote them holds an advisory lock on the
execution until it ends (:func:`enqueue_lock`), and a worker that finds no row waits for
that lock before it looks again (``engine.run``). So a worker still never runs what was
not committed, and a rolled-back execution is never run: its message finds no row and is
dropped.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import json
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
import structlog
from sqlalchemy.exc import DataError
from sqlalchemy.orm import make_transient_to_detached
from sqlmodel import Session

from flowbuilder.platform.crud import (
    execution_crud,
    phase_crud,
    rate_limit_crud,
    workflow_crud,
)
from flowbuilder.platform.crud._sql import data_error_message, first_row
from flowbuilder.platform.errors import (
    Conflict,
    InsufficientCredits,
    NotFound,
    ValidationFailed,
)
from flowbuilder.platform.jsonvalues import (
    MAX_DOCUMENT_DEPTH,
    Unstorable,
    bad_string_reason,
    dumps_json,
    make_storable,
)
from flowbuilder.platform.models import (
    ExecutionPhase,
    ExecutionStatus,
    GuestSession,
    PhaseStatus,
    TriggerType,
    User,
    UserBalance,
    Workflow,
    WorkflowExecution,
    WorkflowStatus,
    WorkflowVersion,
    utcnow,
)
from flowbuilder.platform.nodes.registry import registry_generation
from flowbuilder.platform.settings import Settings, get_settings

if TYPE_CHECKING:
    from flowbuilder.platform.plan import ExecutionPlan

logger = structlog.get_logger(__name__)

# The advisory lock an enqueue's transaction holds on its execution until it ends
# (PostgreSQL's two-key form: this class, then 32 bits of the execution id). Another lock
# user picks another class; two executions sharing 32 bits only wait for each other's
# commit, which is harmless.
ENQUEUE_LOCK_CLASS = 0x466C6F77  # "Flow"


def enqueue_lock(execution_id: uuid.UUID) -> tuple[int, int]:
    """The (class, key) of ``execution_id``'s enqueue lock (``pg_advisory_xact_lock``)."""
    return ENQUEUE_LOCK_CLASS, int.from_bytes(execution_id.bytes[:4], "big", signed=True)


# The rules a cron fire shares with a manual run (``scheduling.fire_due`` applies them to
# a batch): one counter per user, guests stricter, expired guests refused.


def enqueue_limit_key(user_id: uuid.UUID) -> str:
    """The rate-limit counter of a user's enqueues, manual and cron alike."""
    return f"enqueue:{user_id}"


def enqueue_limit(settings: Settings, *, is_guest: bool) -> int:
    return settings.RATE_LIMIT_GUEST if is_guest else settings.RATE_LIMIT_USER


def guest_expired(user_id: uuid.UUID) -> Conflict:
    return Conflict(f"guest {user_id}: the guest session has expired; start a new one")


def prepare_execution(
    *,
    session: Session,
    workflow_id: uuid.UUID,
    user_id: uuid.UUID,
    trigger: TriggerType = TriggerType.MANUAL,
    inputs: dict[str, Any] | None = None,
    correlation_id: str | None = None,
    on_written: Callable[[Written], None] | None = None,
) -> WorkflowExecution:
    """Checks and records a new execution (pending, with its planned phases).

    ``on_written(Written(...))`` is called once every check has held and the rows are
    written, before anything else: what the task layer needs to send the message (see
    :class:`Written`). Never called when a check refuses.

    In order: ownership and a published, valid definition (NotFound, Conflict,
    ValidationFailed); the rate limit (RateLimited); the balance covers the plan
    (InsufficientCredits). Flushes only; the caller's unit of work commits.

    A fixed number of statements whatever the number of phases (this is the API's
    latency). The plan of a version and the result of its validation are kept in memory
    (:class:`_VersionCache`). On PostgreSQL, when this process has enqueued the
    workflow's published version before: ONE statement that reads, checks (credential
    ownership included) and writes (the rate-limit hit, the execution, its phases), writing
    only if every check holds. Otherwise (first enqueue of a version, credentials to
    check, a refusal), one read of everything the checks need, the checks here in the
    order above, then one write. SQLite: the read, the hit, the two inserts.
    """
    settings = get_settings()
    _check_inputs(inputs, settings.MAX_DEFINITION_BYTES)
    if correlation_id is not None and (
        len(correlation_id) > 100 or bad_string_reason(correlation_id) or not correlation_id
    ):
        raise ValidationFailed(["correlation_id: 1 to 100 storable characters"])
    # What the caller left pending is written first (what an ORM query's autoflush does).
    session.flush()
    connection = session.connection()
    postgres = connection.dialect.name == "postgresql"
    now = utcnow()
    key = enqueue_limit_key(user_id)
    # The row's values; the ORM object is made from them once the row is written (on
    # PostgreSQL after ``on_written``: making one costs as much as the statement's wait).
    execution: Any = _NewExecution(
        id=uuid.uuid4(),
        user_id=user_id,
        workflow_id=workflow_id,
        trigger=trigger,
        inputs=inputs,
        correlation_id=correlation_id,
        created_at=now,
    )
    # Sent now; the sweep re-sends it if it is still pending this much later.
    execution_crud.mark_sent(
        execution=execution, resend_after_seconds=settings.SWEEP_PENDING_AFTER_SECONDS, now=now
    )
    if not postgres:
        execution = execution.model()
    try:
        if postgres:
            # One statement when this process knows the workflow's published version: the
            # checks and the writes together. Otherwise (or when a check fails) it writes
            # nothing and the checks below run on what it read.
            expected = _versions.expected(workflow_id, settings)
            row, count = _enqueue_postgres(connection, execution, expected, key, settings, now)
        else:
            expected, count = None, None
            row = connection.execute(
                _READ, {"b_workflow_id": workflow_id, "b_user_id": user_id, "b_now": now}
            ).first()
        if row is None:
            # Another user's workflow reads exactly like a missing one.
            raise NotFound("workflow", workflow_id)
        status, published_version, version_id, is_guest, available, guest_alive = row
        limit = enqueue_limit(settings, is_guest=is_guest)
        check_count = functools.partial(
            rate_limit_crud.check_count,
            key=key,
            limit=limit,
            window_seconds=settings.RATE_LIMIT_WINDOW_SECONDS,
            now=now,
        )
        if count is not None and expected is not None:
            # Every check held and the rows are written, unless past the rate limit.
            check_count(count=count)
            version = expected[1]
            if on_written is not None:
                on_written(Written(execution.id, True, version.plan.worst_case_seconds()))
        else:
            status = WorkflowStatus(status)
            if status != WorkflowStatus.PUBLISHED or published_version == 0:
                raise Conflict(f"workflow {workflow_id} is {status.value}, not published")
            if version_id is None:
                raise NotFound("published version of workflow", workflow_id)
            # The plan frozen with the version: the same one the worker runs, so the
            # phases recorded here (and their credit costs) are exactly what will be run
            # and debited.
            version = _versions.checked(session, version_id, workflow_id, user_id, settings)
            if is_guest and not guest_alive:
                raise guest_expired(user_id)
            available = int(available or 0)
            hit = functools.partial(
                rate_limit_crud.hit,
                session=session,
                key=key,
                limit=limit,
                window_seconds=settings.RATE_LIMIT_WINDOW_SECONDS,
                now=now,
            )
            if available < version.plan.total_credits:
                # Refused for credits, after the rate limit (which counts the hit as
                # always: the caller's unit of work rolls it back with the rest).
                hit()
                raise InsufficientCredits(user_id, version.plan.total_credits, available)
            execution.workflow_version_id = version_id
            if postgres:
                check_count(
                    count=_write_postgres(connection, execution, version, key, limit, settings, now)
                )
                if on_written is not None:
                    on_written(Written(execution.id, True, version.plan.worst_case_seconds()))
            else:
                hit()
                connection.execute(_INSERT_EXECUTION, _execution_row(execution))
                connection.execute(
                    _INSERT_PHASE, phase_crud.phase_rows(execution, version.plan.nodes)
                )
                if on_written is not None:
                    on_written(Written(execution.id, False, version.plan.worst_case_seconds()))
            _versions.remember(workflow_id, version_id)
    except DataError as exc:
        # Checked above, so this is a gap in the checks; still the caller's input, and
        # never a raw driver error. The caller's unit of work rolls back: nothing recorded.
        raise ValidationFailed([data_error_message(exc)]) from exc
    if isinstance(execution, _NewExecution):
        execution = execution.model()
    # The object stands for the row just written: in the session like a flushed one (the
    # identity map, no further INSERT), with nothing left to load.
    make_transient_to_detached(execution)
    session.add(execution)
    logger.info(
        "execution_prepared",
        execution_id=str(execution.id),
        workflow_id=str(workflow_id),
        user_id=str(user_id),
        phases=len(version.plan.nodes),
        credits=version.plan.total_credits,
    )
    return execution


@dataclass(frozen=True, slots=True)
class Written:
    """What :func:`prepare_execution` tells its caller once an execution is written."""

    execution_id: uuid.UUID
    # PostgreSQL: the caller's transaction holds the execution's enqueue_lock until it
    # ends, so its message may leave now (a worker waits for the commit). SQLite: send it
    # after the commit.
    locked: bool
    # How long the run can take at most (ExecutionPlan.worst_case_seconds).
    worst_case_seconds: float


@dataclass(slots=True)
class _NewExecution:
    """The values of the execution row an enqueue writes (WorkflowExecution's defaults
    for the rest)."""

    id: uuid.UUID
    user_id: uuid.UUID
    workflow_id: uuid.UUID
    trigger: TriggerType
    inputs: dict[str, Any] | None
    correlation_id: str | None
    created_at: datetime
    workflow_version_id: uuid.UUID | None = None
    enqueued_at: datetime | None = None
    resend_after: datetime | None = None

    def model(self) -> WorkflowExecution:
        """The table model of these values. A shallow copy (``dataclasses.asdict`` would
        deep-copy every id and timestamp); only the inputs are copied, so the caller's
        dict is not the one the object holds."""
        values = {field.name: getattr(self, field.name) for field in _NEW_EXECUTION_FIELDS}
        if self.inputs is not None:
            values["inputs"] = copy.deepcopy(self.inputs)
        return WorkflowExecution(**values)


_NEW_EXECUTION_FIELDS = dataclasses.fields(_NewExecution)


# ------------------------------------------------------------------ the statements
#
# Built once. The read joins the workflow (scoped to its owner), its published version
# (the id only: the plan and definition are cached), the owner, the balance and whether a
# guest session is alive.

_W = Workflow.__table__
_V = WorkflowVersion.__table__
_U = User.__table__
_B = UserBalance.__table__
_G = GuestSession.__table__
_E = WorkflowExecution.__table__
_READ = (
    sa.select(
        _W.c.status,
        _W.c.published_version,
        _V.c.id,
        _U.c.is_guest,
        _B.c.credits,
        sa.exists()
        .where(
            _G.c.user_id == _U.c.id,
            _G.c.expires_at > sa.bindparam("b_now", type_=_G.c.expires_at.type),
        )
        .label("guest_alive"),
    )
    .select_from(
        _W.join(_U, _U.c.id == _W.c.user_id)
        .outerjoin(_V, sa.and_(_V.c.workflow_id == _W.c.id, _V.c.version == _W.c.published_version))
        .outerjoin(_B, _B.c.user_id == _U.c.id)
    )
    .where(_W.c.id == sa.bindparam("b_workflow_id"), _W.c.user_id == sa.bindparam("b_user_id"))
)
_READ_VERSION = sa.select(_V.c.definition, _V.c.plan).where(_V.c.id == sa.bindparam("b_id"))
_INSERT_EXECUTION = sa.insert(_E)
_INSERT_PHASE = sa.insert(ExecutionPhase.__table__)

# PostgreSQL. The write: the rate-limit hit (the same upsert as rate_limit_crud.hit),
# then the execution and its phases only if the hit is within the limit: one round trip.
# The execution's row comes from a join with the enqueue lock: written, it is locked (the
# lock is taken whenever the row is, and held until the transaction ends).
# The phase rows come from arrays (one parameter per column whatever the phase count,
# rendered once per version); their ids are made by the server (version 4 UUIDs, like
# uuid.uuid4()). Data-modifying CTEs always run to completion, read or not.
_EXECUTION_AND_PHASES = """\
execution AS (
    INSERT INTO workflow_execution (
        id, user_id, workflow_id, workflow_version_id, status, trigger, inputs,
        credits_consumed, correlation_id, cancel_requested, attempts, created_at,
        enqueued_at, resend_after
    )
    SELECT %(id)s, %(user_id)s, %(workflow_id)s, %(workflow_version_id)s,
        %(status)s::varchar, %(trigger)s::varchar, %(inputs)s::jsonb, 0,
        %(correlation_id)s::varchar, false, 0, %(created_at)s, %(enqueued_at)s,
        %(resend_after)s
    FROM {tables},
        LATERAL (SELECT pg_advisory_xact_lock(%(lock_class)s::int, %(lock_key)s::int)) AS locked
    WHERE {condition}
    RETURNING id
), phases AS (
    INSERT INTO execution_phase (
        id, execution_id, user_id, number, position, node_id, node_type, status,
        credits_cost, credits_charged, attempts
    )
    SELECT gen_random_uuid(), execution.id, %(user_id)s, p.number, p.position - 1,
        p.node_id, p.node_type, %(phase_status)s::varchar, p.credits, 0, 0
    FROM execution, unnest(
        %(numbers)s::int[], %(node_ids)s::varchar[], %(node_types)s::varchar[],
        %(credits)s::int[]
    ) WITH ORDINALITY AS p(number, node_id, node_type, credits, position)
)"""
_HIT = """\
    INSERT INTO rate_limit_entry (id, key, window_start, count)
    SELECT %(hit_id)s, %(key)s::varchar, %(window_start)s, 1 {gate}
    ON CONFLICT (key, window_start) DO UPDATE SET count = rate_limit_entry.count + 1
    RETURNING count"""
_WRITE_POSTGRES = (
    "WITH hit AS (\n"
    + _HIT.format(gate="")
    + "\n), "
    + _EXECUTION_AND_PHASES.format(tables="hit", condition="hit.count <= %(limit)s::int")
    + "\nSELECT count FROM hit"
)
# The enqueue in one statement: what _READ reads, and the write above gated on every
# check of prepare_execution passing for the version this process expects (validated,
# and the user still owns every credential it names). A check that fails writes
# nothing: no hit either.
_ENQUEUE_POSTGRES = (
    """\
WITH ctx AS (
    SELECT w.status, w.published_version, v.id AS version_id, u.is_guest, b.credits,
        EXISTS (
            SELECT 1 FROM guest_session g WHERE g.user_id = u.id AND g.expires_at > %(now)s
        ) AS guest_alive
    FROM workflow w
    JOIN user_account u ON u.id = w.user_id
    LEFT JOIN workflow_version v ON v.workflow_id = w.id AND v.version = w.published_version
    LEFT JOIN user_balance b ON b.user_id = u.id
    WHERE w.id = %(workflow_id)s AND w.user_id = %(user_id)s
), hit AS (
"""
    + _HIT.format(
        gate="""FROM ctx
    WHERE ctx.version_id = %(workflow_version_id)s
        AND ctx.status = %(published)s::varchar AND ctx.published_version <> 0
        AND (NOT ctx.is_guest OR ctx.guest_alive)
        AND coalesce(ctx.credits, 0) >= %(total_credits)s::int
        AND NOT EXISTS (
            SELECT 1 FROM unnest(%(credential_ids)s::uuid[]) AS named(id)
            WHERE NOT EXISTS (
                SELECT 1 FROM credential c WHERE c.id = named.id AND c.user_id = %(user_id)s
            )
        )"""
    )
    + "\n), "
    + _EXECUTION_AND_PHASES.format(
        tables="hit, ctx",
        condition="hit.count <= "
        "CASE WHEN ctx.is_guest THEN %(guest_limit)s::int ELSE %(user_limit)s::int END",
    )
    + """
SELECT ctx.status, ctx.published_version, ctx.version_id, ctx.is_guest, ctx.credits,
    ctx.guest_alive, hit.count
FROM ctx LEFT JOIN hit ON true"""
)
_NO_PHASES = {"numbers": "{}", "node_ids": "{}", "node_types": "{}", "credits": "{}"}


def _write_params(
    execution: _NewExecution,
    version: _Version | None,
    key: str,
    settings: Settings,
    now: datetime,
) -> dict[str, Any]:
    lock_class, lock_key = enqueue_lock(execution.id)
    return {
        "lock_class": lock_class,
        "lock_key": lock_key,
        "hit_id": uuid.uuid4(),
        "key": key,
        "window_start": rate_limit_crud.window_start(now, settings.RATE_LIMIT_WINDOW_SECONDS),
        "id": execution.id,
        "user_id": execution.user_id,
        "workflow_id": execution.workflow_id,
        "workflow_version_id": execution.workflow_version_id,
        "status": ExecutionStatus.PENDING.value,
        "trigger": TriggerType(execution.trigger).value,
        # SQL NULL without inputs (as the cron path writes), not a JSON null.
        "inputs": None if execution.inputs is None else dumps_json(execution.inputs),
        "correlation_id": execution.correlation_id,
        "created_at": execution.created_at,
        "enqueued_at": execution.enqueued_at,
        "resend_after": execution.resend_after,
        "phase_status": PhaseStatus.CREATED.value,
        **(version.phase_columns if version is not None else _NO_PHASES),
    }


def _enqueue_postgres(
    connection: sa.Connection,
    execution: _NewExecution,
    expected: tuple[uuid.UUID, _Version] | None,
    key: str,
    settings: Settings,
    now: datetime,
) -> tuple[tuple[Any, ...] | None, int | None]:
    """The one-statement enqueue: (what was read, the rate-limit count if it was hit)."""
    version_id, version = expected if expected is not None else (None, None)
    execution.workflow_version_id = version_id
    params = _write_params(execution, version, key, settings, now)
    params.update(
        now=now,
        published=WorkflowStatus.PUBLISHED.value,
        total_credits=version.plan.total_credits if version is not None else 0,
        credential_ids=version.credential_array if version is not None else "{}",
        guest_limit=enqueue_limit(settings, is_guest=True),
        user_limit=enqueue_limit(settings, is_guest=False),
    )
    row = first_row(connection, _ENQUEUE_POSTGRES, params)
    if row is None:
        return None, None
    return tuple(row[:6]), row[6]


def _write_postgres(
    connection: sa.Connection,
    execution: _NewExecution,
    version: _Version,
    key: str,
    limit: int,
    settings: Settings,
    now: datetime,
) -> int:
    """The hit, the execution and its phases (these only within the limit): the count."""
    params = _write_params(execution, version, key, settings, now)
    params["limit"] = limit
    return first_row(connection, _WRITE_POSTGRES, params)[0]


def _execution_row(execution: WorkflowExecution) -> dict[str, Any]:
    # Columns left out are NULL (a JSON column given None would store a JSON null).
    values = {column.name: getattr(execution, column.name) for column in _E.columns}
    return {name: value for name, value in values.items() if value is not None}


# ------------------------------------------------------------------ the version cache


@dataclass(frozen=True, slots=True)
class _Version:
    """A published version, parsed and validated once per process."""

    plan: ExecutionPlan
    # The credentials its nodes name: their ownership is checked again on every enqueue
    # (and the array literal of their ids, for the one-statement enqueue).
    credential_ids: frozenset[uuid.UUID]
    credential_array: str
    # The phase columns of the PostgreSQL write, rendered once (array literals: psycopg
    # would otherwise adapt every element of every list on every enqueue).
    phase_columns: dict[str, str]
    # Validated under these settings (limits) and this node registry: after a change of
    # either it is validated again.
    settings: Settings
    registry_generation: int


class _VersionCache:
    """Parsed plans and validation results by workflow version id.

    A version (definition and plan) is written once, at publish, and never changed (a
    new definition is a new version), so parsing its plan and validating its definition
    once per process is enough, as the worker does with plans (``engine.run``) and beat
    with both (``scheduling``). What can change is outside the version: whether the
    user still owns the credentials it names. That is checked on every enqueue (one
    more statement, only for versions that name credentials); a missing one is refused
    by validating the definition again, so the error is the one it always was. Only
    versions that validated are kept (a refusal is the rare path and is always checked
    afresh). Bounded, oldest dropped first; thread-safe.
    """

    def __init__(self, size: int = 1024) -> None:
        self.size = size
        self._entries: collections.OrderedDict[uuid.UUID, _Version] = collections.OrderedDict()
        # The published version last enqueued, by workflow: what the one-statement enqueue
        # expects (a hint only: the statement checks it against the workflow's row).
        self._latest: collections.OrderedDict[uuid.UUID, uuid.UUID] = collections.OrderedDict()
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._latest.clear()

    def remember(self, workflow_id: uuid.UUID, version_id: uuid.UUID) -> None:
        with self._lock:
            self._put_bounded(self._latest, workflow_id, version_id)

    def _put_bounded(self, entries: collections.OrderedDict, key: Any, value: Any) -> None:
        entries[key] = value
        entries.move_to_end(key)
        while len(entries) > self.size:
            entries.popitem(last=False)

    def expected(
        self, workflow_id: uuid.UUID, settings: Settings
    ) -> tuple[uuid.UUID, _Version] | None:
        """The version an enqueue of ``workflow_id`` can be checked against in SQL alone:
        known and validated under these settings (the ownership of the credentials it
        names is checked by the statement)."""
        version_id = self._latest.get(workflow_id)
        if version_id is None:
            return None
        entry = self._get(version_id, settings)
        if entry is None:
            return None
        return version_id, entry

    def _get(self, version_id: uuid.UUID, settings: Settings) -> _Version | None:
        with self._lock:
            entry = self._entries.get(version_id)
            if (
                entry is None
                or entry.settings is not settings
                or entry.registry_generation != registry_generation()
            ):
                return None
            self._entries.move_to_end(version_id)
            return entry

    def _put(self, version_id: uuid.UUID, entry: _Version) -> None:
        with self._lock:
            self._put_bounded(self._entries, version_id, entry)

    def checked(
        self,
        session: Session,
        version_id: uuid.UUID,
        workflow_id: uuid.UUID,
        user_id: uuid.UUID,
        settings: Settings,
    ) -> _Version:
        """The version, valid for ``user_id`` now; ValidationFailed as validate_definition
        words it otherwise."""
        from flowbuilder.platform.definitions import validate_definition
        from flowbuilder.platform.plan import ExecutionPlan

        entry = self._get(version_id, settings)
        if entry is not None:
            if not entry.credential_ids:
                return entry
            owned = workflow_crud.owned_credential_ids(session=session, user_id=user_id)
            if entry.credential_ids <= owned:
                return entry
            # A credential is gone: the full validation names it, exactly as before.
            definition, _plan = _read_version(session, version_id, workflow_id)
            validate_definition(definition, owned_credential_ids=owned)
            return entry
        definition, plan_dict = _read_version(session, version_id, workflow_id)
        generation = registry_generation()
        plan = ExecutionPlan.from_dict(plan_dict)
        # Validated again: a credential may have been deleted since the version was
        # published. Only nodes name credentials; without any, there is nothing to look up.
        credential_ids = frozenset(
            node.credential_id for node in plan.nodes if node.credential_id is not None
        )
        validate_definition(
            definition,
            owned_credential_ids=(
                workflow_crud.owned_credential_ids(session=session, user_id=user_id)
                if credential_ids
                else ()
            ),
        )
        # Valid with the user's credentials is valid without the ownership check, the one
        # part that is checked again on every enqueue.
        entry = _Version(
            plan=plan,
            credential_ids=credential_ids,
            credential_array=_array_literal(sorted(str(c) for c in credential_ids)),
            phase_columns={
                "numbers": _array_literal(node.number for node in plan.nodes),
                "node_ids": _array_literal(node.node_id for node in plan.nodes),
                "node_types": _array_literal(node.node_type for node in plan.nodes),
                "credits": _array_literal(node.credits for node in plan.nodes),
            },
            settings=settings,
            registry_generation=generation,
        )
        self._put(version_id, entry)
        return entry


_versions = _VersionCache()


def _array_literal(values: Any) -> str:
    """A PostgreSQL array literal of ints or strings (every string quoted)."""
    items = []
    for value in values:
        if isinstance(value, int):
            items.append(str(value))
        else:
            items.append('"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"')
    return "{" + ",".join(items) + "}"


def _read_version(
    session: Session, version_id: uuid.UUID, workflow_id: uuid.UUID
) -> tuple[Any, Any]:
    row = session.connection().execute(_READ_VERSION, {"b_id": version_id}).first()
    if row is None:  # deleted (with its workflow) since the first read
        raise NotFound("published version of workflow", workflow_id)
    return row[0], row[1]


def _check_inputs(inputs: Any, max_bytes: int) -> None:
    """Execution inputs are stored as JSON: refuse what cannot be, or is too large."""
    if inputs is None:
        return
    if not isinstance(inputs, dict):
        raise ValidationFailed([f"inputs: must be a JSON object, got {type(inputs).__name__}"])
    try:
        # One iterative pass: NUL, lone surrogates, NaN/Infinity, non-JSON values and
        # absurd nesting are refused by name (json.dumps alone would recurse, and accept
        # what PostgreSQL then refuses).
        make_storable(inputs, max_depth=MAX_DOCUMENT_DEPTH, repair=False)
        size = len(json.dumps(inputs, allow_nan=False))
    except Unstorable as exc:
        raise ValidationFailed([f"inputs: {exc}"]) from None
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
