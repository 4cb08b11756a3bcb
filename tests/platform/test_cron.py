"""Cron expressions in a user's time zone, across daylight-saving changes, returned in UTC."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import pairwise
from zoneinfo import ZoneInfo

import pytest

from flowbuilder.platform.cron import (
    check_schedule,
    get_next_run_date,
    get_timezone,
    validate_cron_expression,
)
from flowbuilder.platform.errors import ValidationFailed


@pytest.mark.parametrize(
    "expression",
    [
        "* * * * *",
        "*/15 9-17 * * 1-5",
        "0 9 * * MON-FRI",
        "0 0 1 1 *",
        "30 2 29 2 *",
        "5,35 */2 1-15 1,6,12 0",
    ],
)
def test_valid_expressions(expression: str) -> None:
    assert validate_cron_expression(expression) is True


@pytest.mark.parametrize(
    "expression",
    [
        "",
        "   ",
        "* * * *",  # four fields
        "* * * * * *",  # six fields (seconds) are not accepted
        "@daily",  # nicknames are not five fields
        "60 * * * *",
        "0 24 * * *",
        "0 0 0 * *",
        "0 0 * 13 *",
        "0 0 * * 8",
        "*/0 * * * *",
        "abc def ghi jkl mno",
        None,
        42,
    ],
)
def test_invalid_expressions(expression: object) -> None:
    assert validate_cron_expression(expression) is False  # type: ignore[arg-type]


def _at(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


def test_next_run_in_utc() -> None:
    nxt = get_next_run_date("0 9 * * *", after=_at(2026, 3, 10, 8, 59))
    assert nxt == _at(2026, 3, 10, 9)
    assert nxt.tzinfo is UTC
    # Strictly after: a run exactly at 09:00 schedules the next day's.
    assert get_next_run_date("0 9 * * *", after=_at(2026, 3, 10, 9)) == _at(2026, 3, 11, 9)


def test_next_run_weekdays_only() -> None:
    # 2026-03-13 is a Friday: the next weekday 09:00 after it is Monday the 16th.
    assert get_next_run_date("0 9 * * 1-5", after=_at(2026, 3, 13, 10)) == _at(2026, 3, 16, 9)


@pytest.mark.parametrize(
    ("timezone", "after", "expected"),
    [
        # Europe: CET (UTC+1) until 2026-03-29 01:00 UTC, then CEST (UTC+2).
        ("Europe/Paris", _at(2026, 3, 27, 12), _at(2026, 3, 28, 8)),
        ("Europe/Paris", _at(2026, 3, 28, 12), _at(2026, 3, 29, 7)),  # the DST day itself
        ("Europe/Paris", _at(2026, 3, 30, 12), _at(2026, 3, 31, 7)),
        # And back on 2026-10-25.
        ("Europe/Paris", _at(2026, 10, 24, 12), _at(2026, 10, 25, 8)),
        # US: EST (UTC-5) until 2026-03-08 07:00 UTC, then EDT (UTC-4).
        ("America/New_York", _at(2026, 3, 6, 20), _at(2026, 3, 7, 14)),
        ("America/New_York", _at(2026, 3, 7, 20), _at(2026, 3, 8, 13)),  # the DST day itself
        ("America/New_York", _at(2026, 3, 9, 20), _at(2026, 3, 10, 13)),
        ("UTC", _at(2026, 3, 28, 12), _at(2026, 3, 29, 9)),
    ],
)
def test_nine_local_maps_to_the_right_utc_hour_across_dst(
    timezone: str, after: datetime, expected: datetime
) -> None:
    nxt = get_next_run_date("0 9 * * *", timezone=timezone, after=after)
    assert nxt == expected
    assert nxt.utcoffset() == timedelta(0)
    assert nxt.tzinfo is UTC
    local = nxt.astimezone(ZoneInfo(timezone))
    assert (local.hour, local.minute) == (9, 0)


def test_consecutive_runs_keep_local_wall_time_across_dst() -> None:
    runs = []
    after = _at(2026, 3, 26)
    for _ in range(6):
        after = get_next_run_date("0 9 * * *", timezone="Europe/Paris", after=after)
        runs.append(after)
    assert [r.hour for r in runs] == [8, 8, 8, 7, 7, 7]
    assert all(r.astimezone(ZoneInfo("Europe/Paris")).hour == 9 for r in runs)
    assert all(b - a in (timedelta(hours=23), timedelta(hours=24)) for a, b in pairwise(runs))


def test_after_given_in_another_zone_is_the_same_instant() -> None:
    paris_time = datetime(2026, 3, 28, 13, 0, tzinfo=ZoneInfo("Europe/Paris"))  # 12:00 UTC
    assert get_next_run_date("0 9 * * *", timezone="Europe/Paris", after=paris_time) == _at(
        2026, 3, 29, 7
    )


def test_default_after_is_now() -> None:
    before = datetime.now(UTC)
    nxt = get_next_run_date("* * * * *")
    assert nxt.tzinfo is UTC
    assert before < nxt <= before + timedelta(minutes=1, seconds=1)


@pytest.mark.parametrize("timezone", ["Mars/Olympus", "", "../etc/passwd", "Europe/Paris "])
def test_unknown_timezone_raises_validation_failed_naming_it(timezone: str) -> None:
    with pytest.raises(ValidationFailed) as excinfo:
        get_next_run_date("0 9 * * *", timezone=timezone, after=_at(2026, 1, 1))
    assert repr(timezone) in str(excinfo.value)
    assert any(str(p).startswith("timezone:") for p in excinfo.value.problems)
    with pytest.raises(ValidationFailed):
        get_timezone(timezone)


def test_invalid_expression_raises_validation_failed_naming_it() -> None:
    with pytest.raises(ValidationFailed) as excinfo:
        get_next_run_date("61 9 * * *", after=_at(2026, 1, 1))
    assert "'61 9 * * *'" in str(excinfo.value)
    assert [str(p).split(":")[0] for p in excinfo.value.problems] == ["cron"]


def test_check_schedule_reports_every_problem() -> None:
    check_schedule("0 9 * * *", "America/New_York")  # valid: no exception
    with pytest.raises(ValidationFailed) as excinfo:
        check_schedule("nope", "Nowhere/Town")
    assert len(excinfo.value.problems) == 2
    assert "'nope'" in str(excinfo.value) and "'Nowhere/Town'" in str(excinfo.value)


def test_expression_that_never_fires_is_a_validation_failure() -> None:
    with pytest.raises(ValidationFailed, match="0 0 31 2"):
        get_next_run_date("0 0 31 2 *", after=_at(2026, 1, 1))
    assert not validate_cron_expression("0 0 31 2 *")


def test_fixed_time_runs_once_when_clocks_go_back() -> None:
    """02:30 happens twice in Paris on 2026-10-25; a daily 02:30 job runs once."""
    first = get_next_run_date("30 2 * * *", timezone="Europe/Paris", after=_at(2026, 10, 25))
    assert first == _at(2026, 10, 25, 0, 30)
    second = get_next_run_date("30 2 * * *", timezone="Europe/Paris", after=first)
    assert second == _at(2026, 10, 26, 1, 30)
    # A schedule over every hour keeps both real instants.
    quarter = get_next_run_date(
        "30 * * * *", timezone="Europe/Paris", after=_at(2026, 10, 25, 0, 30)
    )
    assert quarter == _at(2026, 10, 25, 1, 30)
