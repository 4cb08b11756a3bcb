"""Fixed-window rate limits on RateLimitEntry.

``hit`` is one atomic upsert (INSERT ... ON CONFLICT DO UPDATE ... RETURNING count), so
concurrent callers on PostgreSQL each see a distinct count and none is lost.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlmodel import Session

from flowbuilder.platform.crud._sql import upsert
from flowbuilder.platform.errors import RateLimited
from flowbuilder.platform.models import RateLimitEntry, utcnow


def window_start(now: datetime, window_seconds: int) -> datetime:
    epoch = int(now.timestamp())
    return datetime.fromtimestamp(epoch - epoch % window_seconds, UTC)


def hit(
    *,
    session: Session,
    key: str,
    limit: int,
    window_seconds: int,
    now: datetime | None = None,
) -> int:
    """Count one hit for ``key`` in the current window; RateLimited past ``limit``.

    A refused hit is undone with its caller's transaction (the unit of work rolls back),
    so the count in the table is the number of allowed hits.
    """
    now = now or utcnow()
    start = window_start(now, window_seconds)
    stmt = (
        upsert(session, RateLimitEntry)
        .values(id=uuid.uuid4(), key=key, window_start=start, count=1)
        .on_conflict_do_update(
            index_elements=["key", "window_start"],
            set_={"count": RateLimitEntry.count + 1},
        )
        .returning(RateLimitEntry.count)
    )
    count = session.execute(stmt).scalar_one()
    check_count(key=key, count=count, limit=limit, window_seconds=window_seconds, now=now)
    return count


def check_count(*, key: str, count: int, limit: int, window_seconds: int, now: datetime) -> None:
    """RateLimited if ``count`` (the window's count after this hit) is past ``limit``.

    For callers that make the hit in a statement of their own (the enqueue's write)."""
    if count > limit:
        start = window_start(now, window_seconds)
        retry_after = (start + timedelta(seconds=window_seconds) - now).total_seconds()
        raise RateLimited(key, limit, max(retry_after, 0.0))


def purge_expired(*, session: Session, before: datetime) -> int:
    """Delete windows that started before ``before``; returns how many."""
    result = session.execute(sa.delete(RateLimitEntry).where(RateLimitEntry.window_start < before))
    return result.rowcount or 0
