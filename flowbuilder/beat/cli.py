"""``flowbuilder beat ...``: the cron schedule by hand.

- ``flowbuilder beat sync``: reconcile the Redis schedule with the database now and print
  what changed (beat does the same at start-up and every
  BEAT_RECONCILE_INTERVAL_SECONDS).
- ``flowbuilder beat next``: the next fire times of the scheduled workflows.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import typer

beat_app = typer.Typer(no_args_is_help=True, help="The cron scheduler (beat on RedBeat).")


@beat_app.command("sync")
def sync() -> None:
    """Make the Redis schedule match the database; print what changed."""
    import redis

    from flowbuilder.cli import _progress  # here: flowbuilder.cli registers this sub-app
    from flowbuilder.platform import cron_schedule
    from flowbuilder.platform.db import unit_of_work
    from flowbuilder.platform.errors import TransientError
    from flowbuilder.platform.settings import get_settings

    try:
        with _progress("reconciling the cron schedule"), unit_of_work() as session:
            report = cron_schedule.reconcile(session=session)
    except (redis.RedisError, OSError) as exc:
        url = redis.connection.parse_url(get_settings().REDIS_URL)
        where = f"{url.get('host', '?')}:{url.get('port', 6379)}"
        raise TransientError(f"Redis unreachable at {where}: {type(exc).__name__}") from exc
    for label, ids in (("added", report.added), ("updated", report.updated)):
        for wid in ids:
            typer.echo(f"{label} {wid}")
    for wid in report.removed:
        typer.echo(f"removed {wid}")
    typer.echo(
        f"{report.scheduled} scheduled workflows; {len(report.added)} added, "
        f"{len(report.updated)} updated, {len(report.removed)} removed"
    )


@beat_app.command("next")
def next_fires(
    limit: int = typer.Option(20, min=1, max=1000, help="How many workflows to show."),
) -> None:
    """The scheduled workflows with their next fire time, soonest first."""
    import sqlalchemy as sa

    from flowbuilder.platform.db import unit_of_work
    from flowbuilder.platform.models import Workflow, WorkflowStatus

    with unit_of_work() as session:
        rows = session.execute(
            sa.select(Workflow.id, Workflow.cron, Workflow.timezone, Workflow.next_run_at)
            .where(Workflow.status == WorkflowStatus.PUBLISHED, Workflow.next_run_at.is_not(None))
            .order_by(Workflow.next_run_at)
            .limit(limit)
        ).all()
    for wid, cron, tz, at in rows:
        typer.echo(f"{at.isoformat()}  {wid}  {cron!r} ({tz})")


def schedule_lines(workflow_id: uuid.UUID, count: int = 3) -> list[str]:
    """Describe a workflow's schedule: its cron, next fire times (local and UTC), and
    whether beat's Redis schedule has it. Used by ``flowbuilder demo``."""
    import redis

    from flowbuilder.platform import cron_schedule
    from flowbuilder.platform.cron import get_next_run_date, get_timezone
    from flowbuilder.platform.db import unit_of_work
    from flowbuilder.platform.models import Workflow

    with unit_of_work() as session:
        workflow = session.get(Workflow, workflow_id)
        if workflow is None or workflow.next_run_at is None:
            return ["schedule:  none (not published with a cron)"]
        cron, tz, first = workflow.cron, workflow.timezone, workflow.next_run_at
    zone = get_timezone(tz)
    lines = [f"schedule:  cron {cron!r} in {tz}; next fire times:"]
    at: datetime = first
    for i in range(count):
        if i:
            at = get_next_run_date(cron, timezone=tz, after=at)
        local = at.astimezone(zone).strftime("%Y-%m-%d %H:%M %Z")
        lines.append(f"  {local}  ({at.astimezone(UTC).strftime('%H:%M UTC')})")
    try:
        score = cron_schedule.get_client().zscore(cron_schedule.schedule_key(), str(workflow_id))
        where = "on beat's Redis schedule" if score is not None else "not on the Redis schedule"
        lines.append(f"  {where} (`celery -A flowbuilder.tasks beat` fires it)")
    except (redis.RedisError, OSError):
        lines.append("  Redis unreachable: beat adds it when it starts (`flowbuilder beat sync`)")
    return lines
