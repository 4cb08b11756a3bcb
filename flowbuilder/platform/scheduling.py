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

import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
import structlog
from sqlmodel import Session

from flowbuilder.platform.cron import get_next_run_date
from flowbuilder.platform.crud._sql import is_postgres, upsert
from flowbuilder.platform.crud.rate_limit_crud import window_start
from flowbuilder.platform.errors import (
    FlowBuilderError,
    InsufficientCredits,
    RateLimited,
    ValidationFailed,
)
from flowbuilder.platform.models import (
    Credential,
    ExecutionPhase,
    ExecutionStatus,
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
# Rows per INSERT statement: 1,000 executions of ~16 columns stay under SQLite's
# 32,766 bound parameters.
_INSERT_CHUNK = 500


@dataclass
class FireOutcome:
    """What one call of :func:`fire_due` did."""

    # (execution id, correlation id) to send once the transaction has committed.
    to_send: list[tuple[uuid.UUID, str]] = field(default_factory=list)
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
    from flowbuilder.platform.definitions import validate_definition
    from flowbuilder.platform.plan import ExecutionPlan

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
            WorkflowVersion.definition,
            WorkflowVersion.plan,
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
    plans: dict[uuid.UUID, Any] = {}
    candidates: list[dict[str, Any]] = []
    for wf_id, user_id, cron, tz, next_run_at, version_id, definition, plan_dict in rows:
        try:
            times, following = fire_times_until(cron, tz, next_run_at, now)
        except ValidationFailed as exc:
            # A cron or zone that stopped being valid (tzdata change): unschedule it.
            logger.warning("cron_fire_invalid_schedule", workflow_id=str(wf_id), error=str(exc))
            times, following = [next_run_at], None
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
        try:
            validate_definition(definition, owned_credential_ids=owned.get(user_id, set()))
            plan = plans.get(version_id)
            if plan is None:
                plan = plans[version_id] = ExecutionPlan.from_dict(plan_dict)
        except FlowBuilderError as exc:
            fire["reason"] = f"not runnable: {exc}"
            continue
        except (KeyError, TypeError, ValueError) as exc:
            fire["reason"] = f"not runnable: stored plan unreadable ({type(exc).__name__})"
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
        counts = _hit_many(session, {f"enqueue:{u}": len(f) for u, f in per_user.items()}, start)
        undo: dict[str, int] = {}
        retry_after = max(
            (start + timedelta(seconds=settings.RATE_LIMIT_WINDOW_SECONDS) - now).total_seconds(),
            0.0,
        )
        for user_id, fires in per_user.items():
            key = f"enqueue:{user_id}"
            limit_ = settings.RATE_LIMIT_GUEST if guests.get(user_id) else settings.RATE_LIMIT_USER
            used = counts[key] - len(fires)  # the window's count before this batch
            available = balances.get(user_id, 0)
            for fire in fires:
                if used >= limit_:
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

    # 5. The executions: one multi-row INSERT ... ON CONFLICT DO NOTHING per chunk.
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
                "status": ExecutionStatus.SKIPPED if skipped else ExecutionStatus.PENDING,
                "trigger": TriggerType.CRON,
                "error": fire["reason"][:4000] if skipped else None,
                "credits_consumed": 0,
                "correlation_id": correlation_for(fire["workflow_id"], fire["scheduled_for"]),
                "cancel_requested": False,
                "attempts": 0,
                "created_at": created,
                "completed_at": created if skipped else None,
                "enqueued_at": None if skipped else created,
                "scheduled_for": fire["scheduled_for"],
                "skipped_fire_times": fire["missed"] or None,
            }
        )
    inserted: set[uuid.UUID] = set()
    for i in range(0, len(exec_rows), _INSERT_CHUNK):
        chunk = exec_rows[i : i + _INSERT_CHUNK]
        ins = (
            upsert(session, WorkflowExecution)
            .values(chunk)
            .on_conflict_do_nothing(index_elements=["workflow_id", "scheduled_for"])
            .returning(WorkflowExecution.id)
        )
        inserted.update(session.execute(ins).scalars())
    outcome.duplicates = len(exec_rows) - len(inserted)

    # 6. The planned phases of every new pending execution: one executemany.
    phase_rows = []
    for fire, row in zip(candidates, exec_rows, strict=True):
        if row["id"] not in inserted:
            continue
        if fire["reason"] is not None:
            outcome.skipped += 1
            continue
        for position, node in enumerate(plans[fire["version_id"]].nodes):
            phase_rows.append(
                {
                    "id": uuid.uuid4(),
                    "execution_id": row["id"],
                    "user_id": fire["user_id"],
                    "number": node.number,
                    "position": position,
                    "node_id": node.node_id,
                    "node_type": node.node_type,
                    "status": PhaseStatus.CREATED,
                    "credits_cost": node.credits,
                    "credits_charged": 0,
                    "attempts": 0,
                }
            )
        outcome.to_send.append((row["id"], row["correlation_id"]))
    if phase_rows:
        session.execute(sa.insert(ExecutionPhase), phase_rows)

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
    session.execute(
        sa.update(Workflow.__table__)
        .where(Workflow.__table__.c.id == sa.bindparam("wid"))
        .values(
            next_run_at=sa.bindparam("next_run_at", type_=Workflow.__table__.c.next_run_at.type),
            last_run_at=sa.func.coalesce(
                sa.bindparam("last_run_at", type_=Workflow.__table__.c.last_run_at.type),
                Workflow.__table__.c.last_run_at,
            ),
        ),
        updates,
    )
    session.flush()
    logger.info(
        "cron_fired",
        due=len(candidates),
        fired=outcome.fired,
        skipped=outcome.skipped,
        duplicates=outcome.duplicates,
    )
    return outcome


def _pairs(result: Any) -> dict[Any, Any]:
    """Two-column rows as a dict (a Result has ``keys()``, so ``dict(result)`` misreads it)."""
    return {a: b for a, b in result}


def _hit_many(session: Session, hits: dict[str, int], start: datetime) -> dict[str, int]:
    """Add ``hits[key]`` to each key's counter of the window; the counts after, by key."""
    if not hits:
        return {}
    stmt = upsert(session, RateLimitEntry).values(
        [
            {"id": uuid.uuid4(), "key": key, "window_start": start, "count": n}
            for key, n in sorted(hits.items())  # a fixed order: no deadlock between beats
        ]
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=["key", "window_start"],
        set_={"count": RateLimitEntry.count + stmt.excluded["count"]},
    ).returning(RateLimitEntry.key, RateLimitEntry.count)
    return _pairs(session.execute(stmt))


def scheduled_next_runs(
    *, session: Session, workflow_ids: list[uuid.UUID] | None = None
) -> dict[uuid.UUID, datetime | None]:
    """The schedule as the database says it: workflow id -> next fire time.

    With ``workflow_ids``, every given id is in the result (None: not scheduled, e.g.
    unpublished, no cron, deleted). Without, only the scheduled workflows are.
    """
    stmt = sa.select(Workflow.id, Workflow.next_run_at).where(
        Workflow.status == WorkflowStatus.PUBLISHED,
        Workflow.cron.is_not(None),
        Workflow.next_run_at.is_not(None),
    )
    if workflow_ids is None:
        return _pairs(session.execute(stmt))
    result: dict[uuid.UUID, datetime | None] = dict.fromkeys(workflow_ids)
    for i in range(0, len(workflow_ids), 1000):
        chunk = workflow_ids[i : i + 1000]
        result.update(_pairs(session.execute(stmt.where(Workflow.id.in_(chunk)))))
    return result
