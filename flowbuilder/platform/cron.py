"""Cron expressions evaluated in a user's time zone.

A schedule "0 9 * * 1-5" in Europe/Paris means 09:00 Paris time, across DST changes.
Every returned datetime is timezone-aware UTC, which is what the database stores.
"""

from __future__ import annotations

import functools
from datetime import UTC, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadCronError, CroniterBadDateError, croniter

from flowbuilder.platform.errors import ValidationFailed


def get_timezone(name: str) -> ZoneInfo:
    """The IANA zone called ``name``, or ValidationFailed naming it."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValidationFailed([f"timezone: unknown time zone {name!r}"], what="schedule") from exc


def validate_cron_expression(expression: str) -> bool:
    """True for a valid five-field cron expression."""
    if not isinstance(expression, str) or len(expression.split()) != 5:
        return False
    return _valid_expression(expression)


# A pure function of the string, and beat asks it for every fire: cached, so a batch of
# 1,000 fires pays for croniter's parsing once per distinct expression. Bounded.
@functools.lru_cache(maxsize=4096)
def _valid_expression(expression: str) -> bool:
    try:
        # get_next: an expression that never fires ("0 0 31 2 *") is invalid too.
        croniter(expression, datetime(2026, 1, 1, tzinfo=UTC)).get_next(datetime)
    except (CroniterBadCronError, CroniterBadDateError, ValueError, KeyError):
        return False
    return True


def check_schedule(expression: str, timezone: str = "UTC") -> None:
    """Raise ValidationFailed naming what is wrong with a cron schedule."""
    problems = []
    if not validate_cron_expression(expression):
        problems.append(f"cron: invalid cron expression {expression!r}")
    try:
        get_timezone(timezone)
    except ValidationFailed as exc:
        problems.extend(exc.problems)
    if problems:
        raise ValidationFailed(problems, what="schedule")


def get_next_run_date(
    expression: str, *, timezone: str = "UTC", after: datetime | None = None
) -> datetime:
    """The next time ``expression`` fires after ``after`` (default now), in UTC."""
    check_schedule(expression, timezone)
    zone = get_timezone(timezone)
    start = (after or datetime.now(UTC)).astimezone(zone)
    hour_field = expression.split()[1]
    fixed_hours = not hour_field.startswith("*")
    try:
        it = croniter(expression, start)
        nxt = it.get_next(datetime)
        # When clocks go back, a wall-clock time such as 02:30 happens twice. A schedule
        # at fixed hours means "once at 02:30", so the repeated occurrence is skipped;
        # "*/15 * * * *" keeps both, as they are distinct real times.
        for _ in range(3):
            if not (fixed_hours and nxt.astimezone(UTC).astimezone(zone).fold == 1):
                break
            nxt = it.get_next(datetime)
    except CroniterBadDateError as exc:
        raise ValidationFailed(
            [f"cron: expression {expression!r} never fires"], what="schedule"
        ) from exc
    return nxt.astimezone(UTC)
