"""The cron schedule in Redis: one sorted set, workflow id -> next fire time.

The database is the source of truth (``Workflow.next_run_at`` of published workflows
with a cron). This sorted set, ``<REDBEAT_KEY_PREFIX>flowbuilder:cron``, mirrors it so
that beat finds what is due, and when to wake up next, with one Redis command instead of
a query per tick. It follows the database three ways:

- right after a workflow change commits (publish, cron or time zone change, unpublish,
  delete), like the task send after commit: :func:`note_change` records the change on the
  session and an ``after_commit`` hook applies it when Redis is reachable;
- after every fire, beat writes each fired workflow's new next fire time;
- :func:`reconcile` compares the whole set with the database and repairs any drift
  (missing entries after a Redis restart or eviction, stale or changed ones). It reads
  two columns of the scheduled workflows and the set itself: a few tens of milliseconds
  at 10,000 workflows.

No Celery here; redis-py only.
"""

from __future__ import annotations

import functools
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import redis
import sqlalchemy as sa
import structlog
from sqlalchemy import event
from sqlalchemy.orm import Session as OrmSession
from sqlmodel import Session

from flowbuilder.platform.models import Workflow, WorkflowStatus
from flowbuilder.platform.settings import Settings, get_settings

logger = structlog.get_logger(__name__)

_CHANGES = "flowbuilder.cron_schedule_changes"


def schedule_key(settings: Settings | None = None) -> str:
    settings = settings or get_settings()
    return f"{settings.REDBEAT_KEY_PREFIX}flowbuilder:cron"


@functools.lru_cache(maxsize=8)
def _client(url: str) -> redis.Redis:
    # Short timeouts: the API must not hang on a commit because Redis is away; the
    # reconciliation repairs whatever a failed update missed.
    return redis.Redis.from_url(
        url, decode_responses=True, socket_timeout=2, socket_connect_timeout=2
    )


def get_client(settings: Settings | None = None) -> redis.Redis:
    settings = settings or get_settings()
    return _client(settings.REDIS_URL)


def _score(moment: datetime) -> float:
    return moment.timestamp()


def apply(
    next_runs: dict[uuid.UUID, datetime | None],
    *,
    client: redis.Redis | None = None,
    settings: Settings | None = None,
) -> None:
    """Write next fire times (None removes the entry) in one round trip."""
    if not next_runs:
        return
    client = client or get_client(settings)
    key = schedule_key(settings)
    add = {str(wid): _score(at) for wid, at in next_runs.items() if at is not None}
    remove = [str(wid) for wid, at in next_runs.items() if at is None]
    with client.pipeline(transaction=False) as pipe:
        if add:
            pipe.zadd(key, add)
        if remove:
            pipe.zrem(key, *remove)
        pipe.execute()


def due(
    now: datetime, limit: int, *, client: redis.Redis, settings: Settings | None = None
) -> dict[uuid.UUID, float]:
    """Up to ``limit`` workflows whose fire time has come, oldest first, with their score
    (for :func:`apply_if_unchanged`)."""
    members = client.zrangebyscore(
        schedule_key(settings), "-inf", _score(now), 0, limit, withscores=True
    )
    out: dict[uuid.UUID, float] = {}
    for member, score in members:
        try:
            out[uuid.UUID(member)] = score
        except ValueError:
            # Not ours (hand-written junk): drop it rather than trip on it every tick.
            client.zrem(schedule_key(settings), member)
    return out


# Compare-and-set per member: a fire writes a workflow's next fire time only if its entry
# still holds the score the fire read. A workflow changed (or deleted) while the batch was
# being recorded keeps what its change wrote after its own commit.
_APPLY_IF_UNCHANGED = """
local changed = 0
for i = 1, #ARGV, 3 do
  local current = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if current and math.abs(tonumber(current) - tonumber(ARGV[i + 1])) < 0.001 then
    if ARGV[i + 2] == '' then
      redis.call('ZREM', KEYS[1], ARGV[i])
    else
      redis.call('ZADD', KEYS[1], ARGV[i + 2], ARGV[i])
    end
    changed = changed + 1
  end
end
return changed
"""


def apply_if_unchanged(
    next_runs: dict[uuid.UUID, datetime | None],
    expected: dict[uuid.UUID, float],
    *,
    client: redis.Redis,
    settings: Settings | None = None,
) -> int:
    """Like :func:`apply`, for entries whose score is still ``expected[id]``; how many
    were written. One round trip per 1,000 entries."""
    items = [(wid, at) for wid, at in next_runs.items() if wid in expected]
    key = schedule_key(settings)
    changed = 0
    for i in range(0, len(items), 1000):
        args: list[Any] = []
        for wid, at in items[i : i + 1000]:
            args += [str(wid), repr(expected[wid]), "" if at is None else repr(_score(at))]
        changed += int(client.eval(_APPLY_IF_UNCHANGED, 1, key, *args))
    return changed


def next_fire(*, client: redis.Redis, settings: Settings | None = None) -> datetime | None:
    first = client.zrange(schedule_key(settings), 0, 0, withscores=True)
    if not first:
        return None
    return datetime.fromtimestamp(first[0][1], UTC)


def entries(*, client: redis.Redis, settings: Settings | None = None) -> dict[str, float]:
    return dict(client.zrange(schedule_key(settings), 0, -1, withscores=True))


@dataclass
class ReconcileReport:
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    scheduled: int = 0

    @property
    def changed(self) -> int:
        return len(self.added) + len(self.updated) + len(self.removed)


def reconcile(
    *, session: Session, client: redis.Redis | None = None, settings: Settings | None = None
) -> ReconcileReport:
    """Make the Redis schedule equal to the database's; report what changed."""
    client = client or get_client(settings)
    truth = {str(wid): _score(at) for wid, at in scheduled_next_runs(session=session).items()}
    current = entries(client=client, settings=settings)
    report = ReconcileReport(scheduled=len(truth))
    for wid, score in truth.items():
        have = current.get(wid)
        if have is None:
            report.added.append(wid)
        elif abs(have - score) > 1e-3:
            report.updated.append(wid)
    report.removed = [wid for wid in current if wid not in truth]
    key = schedule_key(settings)
    with client.pipeline(transaction=False) as pipe:
        changed = [(wid, truth[wid]) for wid in (*report.added, *report.updated)]
        for i in range(0, len(changed), 1000):
            pipe.zadd(key, dict(changed[i : i + 1000]))
        for i in range(0, len(report.removed), 1000):
            pipe.zrem(key, *report.removed[i : i + 1000])
        pipe.execute()
    if report.changed:
        logger.info(
            "cron_schedule_reconciled",
            added=len(report.added),
            updated=len(report.updated),
            removed=len(report.removed),
            scheduled=report.scheduled,
        )
    return report


# ------------------------------------------------------------------ follow workflow changes


def note_change(session: Session, workflow_id: uuid.UUID, next_run_at: datetime | None) -> None:
    """Update the Redis schedule of ``workflow_id`` once ``session`` commits."""
    session.info.setdefault(_CHANGES, {})[workflow_id] = next_run_at


@event.listens_for(OrmSession, "after_commit")
def _apply_changes(session: OrmSession) -> None:
    if session.in_nested_transaction():
        # SQLAlchemy emits after_commit when a SAVEPOINT is released too; only the
        # outer commit makes the change real.
        return
    changes = session.info.pop(_CHANGES, None)
    if not changes:
        return
    settings = get_settings()
    if not settings.BEAT_SYNC_ON_CHANGE:
        return
    try:
        apply(changes, settings=settings)
    except (redis.RedisError, OSError) as exc:
        # Committed; beat's reconciliation puts the schedule right later.
        logger.warning(
            "cron_schedule_update_failed", workflows=len(changes), error=type(exc).__name__
        )


@event.listens_for(OrmSession, "after_soft_rollback")
def _drop_changes(session: OrmSession, previous_transaction: Any) -> None:
    if previous_transaction.parent is None:
        session.info.pop(_CHANGES, None)


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
        return {wid: at for wid, at in session.execute(stmt)}
    result: dict[uuid.UUID, datetime | None] = dict.fromkeys(workflow_ids)
    for i in range(0, len(workflow_ids), 1000):
        chunk = workflow_ids[i : i + 1000]
        result.update({wid: at for wid, at in session.execute(stmt.where(Workflow.id.in_(chunk)))})
    return result
