"""The ``flowbuilder`` command.

- ``flowbuilder demo``: the main job on the embedded default (SQLite + a file-system
  broker): migrate, publish a sample workflow, enqueue it, run it on a real Celery
  worker, print what was recorded.
- ``flowbuilder db upgrade``: Alembic migrations.
- ``flowbuilder sqs ensure-queues``: create or update the SQS queues (visibility
  timeout, dead-letter queue, redrive policy).
- ``flowbuilder secrets rotate-key``: re-encrypt database secrets with the new key.
- ``flowbuilder sweep``: re-send executions whose message may be lost.
- ``flowbuilder settings``: check the configuration (secrets masked).

Errors print one line and exit with status 2.
"""

from __future__ import annotations

import sys
import threading
import time
import uuid
from typing import Any

import typer

from flowbuilder.platform.errors import FlowBuilderError

cli = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__.split("\n\n")[0])
db_cli = typer.Typer(no_args_is_help=True, help="Database schema.")
sqs_cli = typer.Typer(no_args_is_help=True, help="Amazon SQS queues.")
secrets_cli = typer.Typer(no_args_is_help=True, help="Stored secrets.")
cli.add_typer(db_cli, name="db")
cli.add_typer(sqs_cli, name="sqs")
cli.add_typer(secrets_cli, name="secrets")
cli.add_typer(__import__("flowbuilder.beat.cli", fromlist=["beat_app"]).beat_app, name="beat")


@db_cli.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head", help="Target revision.")) -> None:
    """Create or upgrade the schema (PostgreSQL or SQLite) to REVISION."""
    from flowbuilder.platform.migrate import upgrade
    from flowbuilder.platform.settings import get_settings

    settings = get_settings()
    upgrade(revision)
    typer.echo(f"database at {_safe_url(settings.database_url)} is at {revision}")


@sqs_cli.command("ensure-queues")
def sqs_ensure_queues() -> None:
    """Create or update the executions queue and its dead-letter queue."""
    from flowbuilder.tasks.app import ensure_execution_queues

    for name, url in ensure_execution_queues().items():
        typer.echo(f"{name}: {url}")


@secrets_cli.command("rotate-key")
def secrets_rotate_key(
    batch_size: int = typer.Option(100, min=1, max=10_000, help="Rows per transaction."),
) -> None:
    """Re-encrypt every database secret from SECRET_ENCRYPTION_OLD_* to the current key.

    Resumable: run it again after an interruption. While it runs, workers decrypt with
    both keys (set the OLD_* variables on them too).
    """
    from flowbuilder.platform.db import unit_of_work
    from flowbuilder.platform.secrets import rotate_database_key

    report = rotate_database_key(unit_of_work, batch_size=batch_size)
    typer.echo(
        f"rotated={report.rotated} failed={report.failed} remaining={report.remaining} "
        f"key_id={report.key_id}"
    )
    if report.failed_ids:
        typer.echo("could not decrypt: " + ", ".join(str(i) for i in report.failed_ids), err=True)
        raise typer.Exit(1)


@cli.command("sweep")
def sweep() -> None:
    """Re-send executions whose task message may have been lost."""
    from flowbuilder.tasks.execution import sweep_stale_executions

    typer.echo(f"re-sent {sweep_stale_executions.apply().get()} executions")


@cli.command("settings")
def show_settings() -> None:
    """Validate the configuration and print it, secrets masked."""
    from flowbuilder.platform.settings import get_settings

    settings = get_settings()
    for name, value in settings.model_dump().items():
        if name.endswith("_URL") and isinstance(value, str):
            value = _safe_url(value)  # URLs may carry a password
        typer.echo(f"{name}={value}")
    typer.echo(f"database_url={_safe_url(settings.database_url)}")


DEMO_HTML = (
    "<html><body><h1>Flow Builder</h1>"
    '<p class="price">42</p><p class="stock">in stock</p></body></html>'
)

DEMO_DEFINITION: dict[str, Any] = {
    "version": 1,
    "nodes": [
        {
            "id": "extract_price",
            "type": "extract_text_from_html",
            "inputs": {"html": DEMO_HTML, "selector": "p.price"},
        },
        {
            "id": "build_record",
            "type": "add_property_to_json",
            "inputs": {"json": {"product": "demo"}, "property_path": "price"},
        },
        {
            "id": "read_price",
            "type": "read_property_from_json",
            "inputs": {"property_path": "price"},
        },
    ],
    "edges": [
        {
            "source": "extract_price",
            "sourceHandle": "text",
            "target": "build_record",
            "targetHandle": "value",
        },
        {
            "source": "build_record",
            "sourceHandle": "json",
            "target": "read_price",
            "targetHandle": "json",
        },
    ],
}


@cli.command("demo")
def demo(timeout: float = typer.Option(60.0, help="Seconds to wait for the run.")) -> None:
    """Run a sample workflow end to end on the configured database and broker."""
    from sqlmodel import select

    from flowbuilder.platform.crud import (
        balance_crud,
        log_crud,
        phase_crud,
        user_crud,
        workflow_crud,
    )
    from flowbuilder.platform.db import unit_of_work
    from flowbuilder.platform.logging import setup_logging
    from flowbuilder.platform.migrate import upgrade
    from flowbuilder.platform.models import (
        User,
        UserCreate,
        WorkflowCreate,
        WorkflowExecution,
    )
    from flowbuilder.platform.settings import get_settings
    from flowbuilder.tasks import app, enqueue_execution

    settings = get_settings()
    setup_logging(level="WARNING", json=False)
    upgrade()
    typer.echo(f"database: {_safe_url(settings.database_url)} (migrated)")
    typer.echo(f"broker:   {_safe_url(app.conf.broker_url)}")

    with unit_of_work() as session:
        user = session.exec(select(User).where(User.email == "demo@flowbuilder.local")).first()
        if user is None:
            user = user_crud.create_user(
                session=session, data=UserCreate(email="demo@flowbuilder.local")
            )
            balance_crud.grant_credits(
                session=session, user_id=user.id, amount=100, idempotency_key="demo-grant"
            )
        workflow = workflow_crud.create_workflow(
            session=session,
            user_id=user.id,
            data=WorkflowCreate(
                name=f"demo-{uuid.uuid4().hex[:8]}",
                definition=DEMO_DEFINITION,
                cron="0 9 * * 1-5",
                timezone="Europe/Paris",
            ),
        )
        workflow_crud.publish_workflow(session=session, workflow_id=workflow.id, user_id=user.id)
    from flowbuilder.beat.cli import schedule_lines

    typer.echo("\n".join(schedule_lines(workflow.id)))
    with unit_of_work() as session:
        execution = enqueue_execution(
            session, workflow.id, user.id, correlation_id=f"demo-{uuid.uuid4().hex[:8]}"
        )
    typer.echo(f"enqueued execution {execution.id}")

    worker = app.Worker(
        pool="solo",
        concurrency=1,
        loglevel="WARNING",
        without_heartbeat=True,
        without_mingle=True,
        without_gossip=True,
        hostname=f"demo-{uuid.uuid4().hex[:6]}@localhost",
        quiet=True,
    )
    thread = threading.Thread(target=worker.start, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while True:
            with unit_of_work() as session:
                done = session.get(WorkflowExecution, execution.id)
                if done is not None and done.status.is_terminal:
                    break
            if time.monotonic() > deadline:
                typer.echo("the execution did not finish in time", err=True)
                raise typer.Exit(1)
            time.sleep(0.2)
    finally:
        worker.stop()
        thread.join(timeout=10)

    with unit_of_work() as session:
        phases = phase_crud.list_phases(session=session, execution_id=done.id, user_id=user.id)
        logs = log_crud.list_logs(session=session, execution_id=done.id, user_id=user.id)
        balance = balance_crud.get_balance(session=session, user_id=user.id)
    typer.echo(
        f"execution {done.id}: {done.status.value} in {done.duration_ms} ms, "
        f"{done.credits_consumed} credits"
    )
    for phase in phases:
        typer.echo(
            f"  phase {phase.number} {phase.node_id:<14} {phase.status.value:<9} "
            f"outputs={phase.outputs}"
        )
    typer.echo(f"  {len(logs)} log lines; balance now {balance} credits")
    if done.error:
        typer.echo(f"  error: {done.error}")
    if done.status.value != "completed":
        raise typer.Exit(1)


def _safe_url(url: str) -> str:
    """A URL with any password masked."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not an SQLAlchemy URL (broker URLs)
        if "@" in url and "://" in url:
            scheme, rest = url.split("://", 1)
            return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
        return url


def main(argv: list[str] | None = None) -> None:
    """Console entry point: domain and configuration errors become one line, exit 2."""
    try:
        cli(args=argv, standalone_mode=False)
    except FlowBuilderError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
