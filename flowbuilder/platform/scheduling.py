"""Cron fires in batches: the scheduler's side of "a fire is a run like a manual one".

:func:`fire_due` turns up to a batch of due workflows into executions in ONE transaction
with a fixed number of statements, whatever the batch size: no per-workflow round trips.
It applies the same rules as :func:`flowbuilder.platform.runner.prepare_execution`, in
the same order (published and valid definition, rate limit, credits), in batch form:

- ownership holds by construction (a cron run is the workflow owner's run);
- published: status ``published`` and a published version row;
- the definition validated again (a credential may have been deleted since publishing);
- the rate limit: the same counter (``enqueue:<user id>``) and fixed window as manual runs,
  counted with one upsert per batch; a fire past the limit is skipped, not counted;
- credits: the balance covers the plan, checked per fire like a manual enqueue.

A fire that fails a rule is recorded as an execution in status ``skipped`` with the reason
in ``error``: the user sees it next to the runs that happened.

Exactly once: each execution carries ``scheduled_for`` (the fire time) and the table has a
unique constraint on (workflow_id, scheduled_for). Rows are inserted with ON CONFLICT DO
NOTHING, so two beats, a beat restarted mid-tick or a retried tick insert one row per fire
time. Only inserted rows are sent. On PostgreSQL the due workflows are also locked with
SKIP LOCKED, so a second scheduler does not even try the same rows at the same time.

Missed fires (beat down through several fire times) follow BEAT_MISSED_FIRE_POLICY:
``run_once`` (default) runs the latest missed fire time once and lists the earlier ones in
``skipped_fire_times``; ``skip`` records the missed fires as one skipped execution and
waits for the next regular fire time. A fire up to BEAT_MISFIRE_GRACE_SECONDS late is on
time, not missed.

No Celery here: the caller sends the returned execution ids after the commit.
"""

from __future__ import annotations

import json
import uuid
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
import structlog
from sqlmodel import Session

from flowbuilder.platform.cron import get_next_run_date
from flowbuilder.platform.cron_schedule import scheduled_next_runs
from flowbuilder.platform.crud._sql import is_postgres, upsert
from flowbuilder.platform.crud.rate_limit_crud import window_start
from flowbuilder.platform.engine.enqueue import enqueue_limit, enqueue_limit_key, guest_expired
from flowbuilder.platform.errors import (
    FlowBuilderError,
    InsufficientCredits,
    RateLimited,
)
from flowbuilder.platform.models import (
    Credential,
    ExecutionPhase,
    ExecutionStatus,
    GuestSession,
    PhaseStatus,
    RateLimitEntry,
    TriggerType,
    User,
    UserBalance,
    Workflow,
    WorkflowExecution,
    WorkflowStatus,
    WorkflowVersion,
    utcnow,
)
from flowbuilder.platform.settings import Settings, get_settings

logger = structlog.get_logger(__name__)

# Missed fire times listed on one execution at most; a cron "* * * * *" missed for a week
# would otherwise be 10,080 timestamps (and as many croniter steps) per workflow.
MAX_RECORDED_MISSED = 200


@dataclass
class FireOutcome:
    """What one call of :func:`fire_due` did."""

    # (execution id, correlation id, the run's worst case in seconds: which queue) to
    # send once the transaction has committed.
    to_send: list[tuple[uuid.UUID, str, float]] = field(default_factory=list)
    # The schedule after this batch: workflow id -> next fire time (None: not scheduled).
    next_runs: dict[uuid.UUID, datetime | None] = field(default_factory=dict)
    skipped: int = 0
    duplicates: int = 0
    # The earliest fire time among the due workflows (fire lag = commit time - this).
    earliest_fire: datetime | None = None

    @property
    def fired(self) -> int:
        return len(self.to_send)


def fire_times_until(
    cron: str, timezone: str, first: datetime, now: datetime, cap: int = MAX_RECORDED_MISSED
) -> tuple[list[datetime], datetime]:
    """The fire times from ``first`` (a fire time) up to ``now``, and the next one after.

    At most ``cap`` times are returned, the latest ones (the run that happens stands for
    the latest). After a very long outage of a frequent cron the walk stops after
    ``10 * cap`` steps; the run then stands for the last time walked, and the next fire
    time is the first one after ``now``.
    """
    times = [first]
    nxt = get_next_run_date(cron, timezone=timezone, after=first)
    steps = 0
    while nxt <= now:  # missed fires; the common case never enters the loop
        times.append(nxt)
        if len(times) > cap:
            times.pop(0)
        steps += 1
        if steps >= 10 * cap:
            nxt = get_next_run_date(cron, timezone=timezone, after=now)
            break
        nxt = get_next_run_date(cron, timezone=timezone, after=nxt)
    return times, nxt


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def correlation_for(workflow_id: uuid.UUID, fire_time: datetime) -> str:
    return f"cron:{workflow_id}:{_iso(fire_time)}"


def fire_due(
    *,
    session: Session,
    now: datetime | None = None,
    workflow_ids: list[uuid.UUID] | None = None,
    limit: int | None = None,
    settings: Settings | None = None,
) -> FireOutcome:
    """Record the executions of the due cron workflows (all of them, or of ``workflow_ids``).

    Flushes only; the caller commits, then sends ``outcome.to_send`` and applies
    ``outcome.next_runs`` to the Redis schedule.
    """
    settings = settings or get_settings()
    now = now or utcnow()
    limit = limit or settings.BEAT_FIRE_BATCH_SIZE
    outcome = FireOutcome()

    # 1. The due workflows with their published version (one statement, rows locked).
    stmt = (
        sa.select(
            Workflow.id,
            Workflow.user_id,
            Workflow.cron,
            Workflow.timezone,
            Workflow.next_run_at,
            WorkflowVersion.id,
        )
        .outerjoin(
            WorkflowVersion,
            sa.and_(
                WorkflowVersion.workflow_id == Workflow.id,
                WorkflowVersion.version == Workflow.published_version,
            ),
        )
        .where(
            Workflow.status == WorkflowStatus.PUBLISHED,
            Workflow.cron.is_not(None),
            Workflow.next_run_at.is_not(None),
            Workflow.next_run_at <= now,
        )
        .order_by(Workflow.next_run_at)
        .limit(limit)
    )
    if workflow_ids is not None:
        stmt = stmt.where(Workflow.id.in_(workflow_ids))
    if is_postgres(session):
        stmt = stmt.with_for_update(of=Workflow, skip_locked=True)
    rows = session.execute(stmt).all()

    if workflow_ids is not None:
        # Entries the schedule thought due that are not (unpublished, deleted, moved):
        # report their true state so the caller corrects the schedule.
        found = {row[0] for row in rows}
        missing = [wid for wid in workflow_ids if wid not in found]
        if missing:
            outcome.next_runs.update(scheduled_next_runs(session=session, workflow_ids=missing))
    if not rows:
        return outcome

    user_ids = {row[1] for row in rows}
    # 2. Users, balances and credentials of every owner in the batch (three statements).
    guests = _pairs(session.execute(sa.select(User.id, User.is_guest).where(User.id.in_(user_ids))))
    # Guests whose session is still alive (an expired guest cannot enqueue, cron or not).
    live_guests = set(
        session.execute(
            sa.select(GuestSession.user_id)
            .where(
                GuestSession.user_id.in_([u for u, is_guest in guests.items() if is_guest]),
                GuestSession.expires_at > now,
            )
            .distinct()
        ).scalars()
    )
    balances = _pairs(
        session.execute(
            sa.select(UserBalance.user_id, UserBalance.credits).where(
                UserBalance.user_id.in_(user_ids)
            )
        )
    )
    owned: dict[uuid.UUID, set[uuid.UUID]] = defaultdict(set)
    for cred_user, cred_id in session.execute(
        sa.select(Credential.user_id, Credential.id).where(Credential.user_id.in_(user_ids))
    ):
        owned[cred_user].add(cred_id)

    # 3. Each fire: its fire times, the checks that do not depend on other fires.
    policy = settings.BEAT_MISSED_FIRE_POLICY
    grace = timedelta(seconds=settings.BEAT_MISFIRE_GRACE_SECONDS)
    candidates: list[dict[str, Any]] = []
    # Popular schedules ("0 9 * * *", "*/5 * * * *") share their fire times: computed
    # once per (cron, zone, fire time) in a batch.
    walked: dict[tuple[str, str, datetime], tuple[list[datetime], datetime]] = {}
    versions = _VersionChecks(session, owned)
    versions.load([(row[5], row[1]) for row in rows])
    for wf_id, user_id, cron, tz, next_run_at, version_id in rows:
        try:
            memo = (cron, tz, next_run_at)
            if memo not in walked:
                walked[memo] = fire_times_until(cron, tz, next_run_at, now)
            times, following = walked[memo]
            bad_schedule = None
        except Exception as exc:  # noqa: BLE001 - one workflow must never block the batch
            # A cron or zone that stopped being valid (tzdata change, a row edited by
            # hand): this fire is recorded as skipped and the workflow unscheduled until
            # its owner fixes the schedule (which reschedules it).
            logger.warning(
                "cron_fire_invalid_schedule", workflow_id=str(wf_id), error=type(exc).__name__
            )
            times, following = [next_run_at], None
            bad_schedule = f"not runnable: schedule {cron!r} in {tz!r} is invalid ({exc})"
        fire_time = times[-1]
        outcome.next_runs[wf_id] = following
        if outcome.earliest_fire is None or times[0] < outcome.earliest_fire:
            outcome.earliest_fire = times[0]
        fire = {
            "workflow_id": wf_id,
            "user_id": user_id,
            "version_id": version_id,
            "scheduled_for": fire_time,
            "missed": [_iso(t) for t in times[:-1]],
            "reason": None,
            "cost": 0,
        }
        candidates.append(fire)
        if bad_schedule is not None:
            fire["reason"] = bad_schedule[:1000]
            continue
        late = now - fire_time > grace
        if late and policy == "skip":
            fire["reason"] = (
                f"missed: beat was not running at {_iso(fire_time)} (BEAT_MISSED_FIRE_POLICY=skip)"
            )
            fire["missed"].append(_iso(fire_time))
            continue
        if version_id is None:
            fire["reason"] = f"not runnable: published version of workflow {wf_id} not found"
            continue
        problem, plan = versions.check(version_id, user_id)
        if problem is not None:
            fire["reason"] = problem
            continue
        fire["cost"] = plan.total_credits

    # 4. Rate limit and credits, per user in fire order, exactly as sequential manual
    # enqueues would see them: a rate-limited fire is refused first; a fire refused for
    # credits does not use up a rate-limit slot (its hit is undone with its transaction).
    runnable = [f for f in candidates if f["reason"] is None]
    per_user: dict[uuid.UUID, list[dict[str, Any]]] = defaultdict(list)
    for fire in runnable:
        per_user[fire["user_id"]].append(fire)
    if per_user:
        start = window_start(now, settings.RATE_LIMIT_WINDOW_SECONDS)
        counts = _hit_many(
            session, {enqueue_limit_key(u): len(f) for u, f in per_user.items()}, start
        )
        undo: dict[str, int] = {}
        retry_after = max(
            (start + timedelta(seconds=settings.RATE_LIMIT_WINDOW_SECONDS) - now).total_seconds(),
            0.0,
        )
        for user_id, fires in per_user.items():
            key = enqueue_limit_key(user_id)
            limit_ = enqueue_limit(settings, is_guest=bool(guests.get(user_id)))
            used = counts[key] - len(fires)  # the window's count before this batch
            available = balances.get(user_id, 0)
            expired = guests.get(user_id) and user_id not in live_guests
            for fire in fires:
                if expired:
                    fire["reason"] = str(guest_expired(user_id))
                elif used >= limit_:
                    fire["reason"] = f"rate limited: {RateLimited(key, limit_, retry_after)}"
                elif available < fire["cost"]:
                    fire["reason"] = str(InsufficientCredits(user_id, fire["cost"], available))
                else:
                    used += 1
            refused = counts[key] - used
            if refused:
                undo[key] = refused
        for key, refused in undo.items():
            session.execute(
                sa.update(RateLimitEntry)
                .where(RateLimitEntry.key == key, RateLimitEntry.window_start == start)
                .values(count=RateLimitEntry.count - refused)
            )

    # 5. The executions: one INSERT ... ON CONFLICT DO NOTHING for the batch.
    created = utcnow()
    exec_rows = []
    for fire in candidates:
        skipped = fire["reason"] is not None
        exec_rows.append(
            {
                "id": uuid.uuid4(),
                "user_id": fire["user_id"],
                "workflow_id": fire["workflow_id"],
                "workflow_version_id": fire["version_id"],
                "status": (ExecutionStatus.SKIPPED if skipped else ExecutionStatus.PENDING).value,
                "trigger": TriggerType.CRON.value,
                "error": fire["reason"][:4000] if skipped else None,
                "credits_consumed": 0,
                "correlation_id": correlation_for(fire["workflow_id"], fire["scheduled_for"]),
                "cancel_requested": False,
                "attempts": 0,
                "created_at": created,
                "completed_at": created if skipped else None,
                "enqueued_at": None if skipped else created,
                # As at a manual enqueue: the sweep re-sends it if still pending then.
                "resend_after": None
                if skipped
                else created + timedelta(seconds=settings.SWEEP_PENDING_AFTER_SECONDS),
                "scheduled_for": fire["scheduled_for"],
                "skipped_fire_times": fire["missed"] or None,
            }
        )
    inserted = _insert_executions(session, exec_rows)
    outcome.duplicates = len(exec_rows) - len(inserted)

    # 6. The planned phases of every new pending execution: one executemany.
    phase_rows = []
    for fire, row in zip(candidates, exec_rows, strict=True):
        if row["id"] not in inserted:
            continue
        if fire["reason"] is not None:
            outcome.skipped += 1
            continue
        plan = versions.plan(fire["version_id"])
        for position, node in enumerate(plan.nodes):
            phase_rows.append(
                {
                    "id": uuid.uuid4(),
                    "execution_id": row["id"],
                    "user_id": fire["user_id"],
                    "number": node.number,
                    "position": position,
                    "node_id": node.node_id,
                    "node_type": node.node_type,
                    "status": PhaseStatus.CREATED.value,
                    "credits_cost": node.credits,
                    "credits_charged": 0,
                    "attempts": 0,
                }
            )
        outcome.to_send.append((row["id"], row["correlation_id"], plan.worst_case_seconds()))
    _insert_phases(session, phase_rows)

    # 7. next_run_at and last_run_at: one executemany UPDATE by primary key.
    ran = {row["workflow_id"] for row in exec_rows if row["id"] in inserted and not row["error"]}
    updates = [
        {
            "wid": wf_id,
            "next_run_at": outcome.next_runs[wf_id],
            "last_run_at": now if wf_id in ran else None,
        }
        for wf_id in (fire["workflow_id"] for fire in candidates)
    ]
    _update_workflows(session, updates)
    session.flush()
    logger.info(
        "cron_fired",
        due=len(candidates),
        fired=outcome.fired,
        skipped=outcome.skipped,
        duplicates=outcome.duplicates,
    )
    return outcome


class _LRU(OrderedDict):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def put(self, key: Any, value: Any) -> None:
        self[key] = value
        self.move_to_end(key)
        if len(self) > self.size:
            self.popitem(last=False)


# A published version is immutable, so what beat derives from it can be kept between
# ticks: its plan, and whether it validates against a given set of owned credentials (a
# deleted credential changes the set, so it is checked again). The node registry is fixed
# for the life of the process. Bounded; a workflow that fires every minute is validated
# once, not 1,440 times a day.
_PLANS: _LRU = _LRU(20_000)
_VALIDITY: _LRU = _LRU(50_000)


class _VersionChecks:
    """The "valid definition" rule of prepare_execution for a batch of versions."""

    def __init__(self, session: Session, owned: dict[uuid.UUID, set[uuid.UUID]]) -> None:
        self.session = session
        self.owned = {user: frozenset(ids) for user, ids in owned.items()}

    def _key(self, version_id: uuid.UUID, user_id: uuid.UUID) -> tuple[Any, ...]:
        return (version_id, self.owned.get(user_id, frozenset()))

    def load(self, pairs: list[tuple[uuid.UUID | None, uuid.UUID]]) -> None:
        """Validate the versions not validated yet (one statement for all of them)."""
        from flowbuilder.platform.definitions import validate_definition
        from flowbuilder.platform.plan import ExecutionPlan

        needed = {v: u for v, u in pairs if v is not None and (self._key(v, u) not in _VALIDITY)}
        needed_plans = {v for v, _ in pairs if v is not None and v not in _PLANS}
        ids = list(set(needed) | needed_plans)
        if not ids:
            return
        stmt = sa.select(WorkflowVersion.id, WorkflowVersion.definition, WorkflowVersion.plan)
        rows = self.session.execute(stmt.where(WorkflowVersion.id.in_(ids))).all()
        users_of: dict[uuid.UUID, set[uuid.UUID]] = defaultdict(set)
        for v, u in pairs:
            users_of[v].add(u)
        for version_id, definition, plan_dict in rows:
            if version_id not in _PLANS:
                try:
                    _PLANS.put(version_id, ExecutionPlan.from_dict(plan_dict))
                except (KeyError, TypeError, ValueError) as exc:
                    _PLANS.put(version_id, f"stored plan unreadable ({type(exc).__name__})")
            for user_id in users_of[version_id]:
                key = self._key(version_id, user_id)
                if key in _VALIDITY:
                    continue
                try:
                    validate_definition(definition, owned_credential_ids=key[1])
                    _VALIDITY.put(key, None)
                except FlowBuilderError as exc:
                    _VALIDITY.put(key, str(exc))

    def check(self, version_id: uuid.UUID, user_id: uuid.UUID) -> tuple[str | None, Any]:
        """(None, plan) when runnable, else (the reason, None)."""
        problem = _VALIDITY.get(self._key(version_id, user_id))
        plan = _PLANS.get(version_id)
        if problem is None and isinstance(plan, str):
            problem = plan
        if problem is not None:
            return f"not runnable: {problem}", None
        if plan is None:  # evicted between load and check: not in this batch's sizes
            return "not runnable: published version not found", None
        return None, plan

    def plan(self, version_id: uuid.UUID) -> Any:
        return _PLANS[version_id]


def _pairs(result: Any) -> dict[Any, Any]:
    """Two-column rows as a dict (a Result has ``keys()``, so ``dict(result)`` misreads it)."""
    return {a: b for a, b in result}


# ----------------------------------------------------------------- batch statements
#
# On PostgreSQL each batch statement binds one array per column and unnests it: a
# handful of parameters whatever the batch size, so neither SQLAlchemy nor psycopg has to
# compile or parse a statement with 16,000 placeholders (that cost more than the database
# work). Elsewhere (SQLite, the embedded default) a Core executemany.

_EXEC_COLUMNS = {
    "id": "uuid",
    "user_id": "uuid",
    "workflow_id": "uuid",
    "workflow_version_id": "uuid",
    "status": "varchar",
    "trigger": "varchar",
    "error": "varchar",
    "credits_consumed": "int",
    "correlation_id": "varchar",
    "cancel_requested": "bool",
    "attempts": "int",
    "created_at": "timestamptz",
    "completed_at": "timestamptz",
    "enqueued_at": "timestamptz",
    "scheduled_for": "timestamptz",
    "skipped_fire_times": "jsonb",
    "resend_after": "timestamptz",
}
_PHASE_COLUMNS = {
    "id": "uuid",
    "execution_id": "uuid",
    "user_id": "uuid",
    "number": "int",
    "position": "int",
    "node_id": "varchar",
    "node_type": "varchar",
    "status": "varchar",
    "credits_cost": "int",
    "credits_charged": "int",
    "attempts": "int",
}


def _unnest_insert(table: str, columns: dict[str, str], suffix: str) -> sa.TextClause:
    names = ", ".join(f'"{c}"' for c in columns)
    # jsonb travels as text (a list would be read as a nested array) and is cast back.
    selected = ", ".join(f'"{c}"::jsonb' if t == "jsonb" else f'"{c}"' for c, t in columns.items())
    arrays = ", ".join(
        f"CAST(:{c} AS {'text' if t == 'jsonb' else t}[])" for c, t in columns.items()
    )
    return sa.text(
        f'INSERT INTO "{table}" ({names}) SELECT {selected} '
        f"FROM unnest({arrays}) AS t({names}) {suffix}"
    )


def _columns(rows: list[dict[str, Any]], columns: dict[str, str]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for name, kind in columns.items():
        values = [row[name] for row in rows]
        if kind == "jsonb":
            values = [None if v is None else json.dumps(v) for v in values]
        out[name] = values
    return out


def _insert_executions(session: Session, rows: list[dict[str, Any]]) -> set[uuid.UUID]:
    """Insert, skipping fire times that already have an execution; the inserted ids."""
    if not rows:
        return set()
    connection = session.connection()
    if is_postgres(session):
        stmt = _unnest_insert(
            "workflow_execution",
            _EXEC_COLUMNS,
            "ON CONFLICT (workflow_id, scheduled_for) DO NOTHING RETURNING id",
        )
        return set(connection.execute(stmt, _columns(rows, _EXEC_COLUMNS)).scalars())
    stmt = (
        upsert(session, WorkflowExecution.__table__)
        .on_conflict_do_nothing(index_elements=["workflow_id", "scheduled_for"])
        .returning(WorkflowExecution.__table__.c.id)
    )
    return set(connection.execute(stmt, rows).scalars())


def _insert_phases(session: Session, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    connection = session.connection()
    if is_postgres(session):
        stmt = _unnest_insert("execution_phase", _PHASE_COLUMNS, "")
        connection.execute(stmt, _columns(rows, _PHASE_COLUMNS))
    else:
        connection.execute(ExecutionPhase.__table__.insert(), rows)


def _update_workflows(session: Session, updates: list[dict[str, Any]]) -> None:
    """next_run_at for each workflow; last_run_at where given (kept where None)."""
    if not updates:
        return
    connection = session.connection()
    if is_postgres(session):
        connection.execute(
            sa.text(
                "UPDATE workflow AS w SET next_run_at = v.next_run_at, "
                "last_run_at = COALESCE(v.last_run_at, w.last_run_at) "
                "FROM unnest(CAST(:wid AS uuid[]), CAST(:next_run_at AS timestamptz[]), "
                "CAST(:last_run_at AS timestamptz[])) AS v(id, next_run_at, last_run_at) "
                "WHERE w.id = v.id"
            ),
            {k: [u[k] for u in updates] for k in ("wid", "next_run_at", "last_run_at")},
        )
        return
    table = Workflow.__table__
    connection.execute(
        sa.update(table)
        .where(table.c.id == sa.bindparam("wid"))
        .values(
            next_run_at=sa.bindparam("next_run_at", type_=table.c.next_run_at.type),
            last_run_at=sa.func.coalesce(
                sa.bindparam("last_run_at", type_=table.c.last_run_at.type), table.c.last_run_at
            ),
        ),
        updates,
    )


def _hit_many(session: Session, hits: dict[str, int], start: datetime) -> dict[str, int]:
    """Add ``hits[key]`` to each key's counter of the window; the counts after, by key.

    Keys in a fixed order, so two schedulers never deadlock on the counter rows.
    """
    if not hits:
        return {}
    keys = sorted(hits)
    connection = session.connection()
    if is_postgres(session):
        stmt = sa.text(
            "INSERT INTO rate_limit_entry (id, key, window_start, count) "
            "SELECT id, key, CAST(:start AS timestamptz), count "
            "FROM unnest(CAST(:ids AS uuid[]), CAST(:keys AS varchar[]), CAST(:counts AS int[])) "
            "AS t(id, key, count) "
            "ON CONFLICT (key, window_start) "
            "DO UPDATE SET count = rate_limit_entry.count + excluded.count "
            "RETURNING key, count"
        )
        params = {
            "start": start,
            "ids": [uuid.uuid4() for _ in keys],
            "keys": keys,
            "counts": [hits[k] for k in keys],
        }
        return _pairs(connection.execute(stmt, params))
    table = RateLimitEntry.__table__
    stmt = upsert(session, table)
    stmt = stmt.on_conflict_do_update(
        index_elements=["key", "window_start"],
        set_={"count": table.c.count + stmt.excluded["count"]},
    ).returning(table.c.key, table.c.count)
    rows = [{"id": uuid.uuid4(), "key": k, "window_start": start, "count": hits[k]} for k in keys]
    return _pairs(connection.execute(stmt, rows))
