"""Housekeeping that beat runs periodically (task ``flowbuilder.housekeeping``).

- expired guest sessions are deleted (the guest user and what it owns stay: a guest
  converts to a user by signing up, and its data is the user's to delete);
- rate-limit windows that ended are deleted (the counters only matter in their window);
- execution logs older than EXECUTION_LOG_RETENTION_DAYS are deleted, when set (off by
  default: 0 keeps them).

Each deletion is bounded per run, so one run never holds a long transaction; a backlog
is worked off over the following runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
import structlog
from sqlmodel import Session

from flowbuilder.platform.models import ExecutionLog, GuestSession, RateLimitEntry, utcnow
from flowbuilder.platform.settings import Settings, get_settings

logger = structlog.get_logger(__name__)

MAX_ROWS_PER_RUN = 50_000


@dataclass
class HousekeepingReport:
    guest_sessions: int = 0
    rate_limit_entries: int = 0
    execution_logs: int = 0


def _delete_bounded(session: Session, table: sa.Table, condition: sa.ColumnElement) -> int:
    ids = sa.select(table.c.id).where(condition).limit(MAX_ROWS_PER_RUN).scalar_subquery()
    result = session.execute(sa.delete(table).where(table.c.id.in_(ids)))
    return result.rowcount or 0


def run_housekeeping(
    *, session: Session, now: datetime | None = None, settings: Settings | None = None
) -> HousekeepingReport:
    settings = settings or get_settings()
    now = now or utcnow()
    report = HousekeepingReport()
    report.guest_sessions = _delete_bounded(
        session, GuestSession.__table__, GuestSession.__table__.c.expires_at < now
    )
    # A window is over once the next one has started; one spare window for clock skew.
    # Entries carry no window length, so the longest one any limit uses decides (guest
    # creation counts per hour: pruning it after a minute would reset that limit).
    window = max(
        settings.RATE_LIMIT_WINDOW_SECONDS, settings.RATE_LIMIT_GUEST_CREATION_WINDOW_SECONDS
    )
    report.rate_limit_entries = _delete_bounded(
        session,
        RateLimitEntry.__table__,
        RateLimitEntry.__table__.c.window_start < now - timedelta(seconds=2 * window),
    )
    if settings.EXECUTION_LOG_RETENTION_DAYS > 0:
        cutoff = now - timedelta(days=settings.EXECUTION_LOG_RETENTION_DAYS)
        report.execution_logs = _delete_bounded(
            session, ExecutionLog.__table__, ExecutionLog.__table__.c.timestamp < cutoff
        )
    session.flush()
    logger.info("housekeeping_done", **asdict(report))
    return report
