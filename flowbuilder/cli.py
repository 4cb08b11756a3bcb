"""The ``flowbuilder`` command.

- ``flowbuilder demo``: the main job on the embedded default (SQLite + a file-system
  broker): migrate, publish a sample workflow, enqueue it, run it on a real Celery
  worker, print what was recorded.
- ``flowbuilder status``: workers (monitoring channel), queue depths, executions by state.
- ``flowbuilder executions list|show|cancel``, ``flowbuilder run FILE --user U --wait``,
  ``flowbuilder credits grant|show``: operator commands (rich tables).
- ``flowbuilder db upgrade|downgrade|current``: Alembic migrations.
- ``flowbuilder sqs ensure-queues``: create or update the SQS queues (visibility
  timeout, dead-letter queue, redrive policy).
- ``flowbuilder secrets rotate-key``: re-encrypt database secrets with the new key.
- ``flowbuilder sweep``: re-send executions whose message may be lost.
- ``flowbuilder settings``: check the configuration (secrets masked).

Every failure exits non-zero with one line on stderr that names what is wrong (the
variable, the host, the revision) and never a secret: 2 for bad input or configuration,
1 for a command that ran and failed (a run that did not complete, a row not rotated, a
send that failed), 3 for a service that cannot be reached.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer

from flowbuilder.platform.errors import FlowBuilderError

EXIT_FAILED = 1  # the command ran and what it did failed
EXIT_USAGE = 2  # bad arguments, settings or input
EXIT_UNREACHABLE = 3  # a service (database, SQS, Redis) cannot be reached or refused us

cli = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help=__doc__.split("\n\n")[0],
)


def _sub(help_text: str) -> typer.Typer:
    return typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, help=help_text)


db_cli = _sub("Database schema.")
sqs_cli = _sub("Amazon SQS queues.")
secrets_cli = _sub("Stored secrets.")
executions_cli = _sub("Executions: list, show, cancel.")
credits_cli = _sub("Credits: grant, show.")
# Sub-apps: one line each (other packages add theirs here, e.g. `beat`).
cli.add_typer(db_cli, name="db")
cli.add_typer(sqs_cli, name="sqs")
cli.add_typer(secrets_cli, name="secrets")
cli.add_typer(executions_cli, name="executions")
cli.add_typer(credits_cli, name="credits")
cli.add_typer(__import__("flowbuilder.beat.cli", fromlist=["beat_app"]).beat_app, name="beat")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"flowbuilder {version('flowbuilder')}")
        except PackageNotFoundError:  # a source checkout that was never installed
            typer.echo("flowbuilder (not installed)")
        raise typer.Exit(0)


@cli.callback()
def _root(
    _version_flag: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Flow Builder execution core: operator commands."""
    import logging

    from flowbuilder.platform.logging import setup_logging

    # Every command logs like the services do (LOG_JSON, LOG_LEVEL); settings are
    # validated here, so a bad variable stops any command with one line.
    setup_logging()
    # Alembic announces each of its plugins at INFO: noise in front of the answer.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    out = sys.stderr if stderr else sys.stdout
    # Piped output (tests, logs) gets a wide fixed width so ids are never cut.
    return Console(file=out, width=None if out.isatty() else 200, highlight=False)


def _table(title: str, *columns: str) -> Any:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


@contextlib.contextmanager
def _progress(description: str, total: float | None = None) -> Iterator[Any]:
    """A rich progress bar on stderr (only drawn on a terminal)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    columns: list[Any] = [SpinnerColumn(), TextColumn("{task.description}")]
    if total is not None:
        columns += [BarColumn(), MofNCompleteColumn()]
    columns.append(TimeElapsedColumn())
    console = _console(stderr=True)
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as p:
        task = p.add_task(description, total=total)
        yield lambda advance=1, **kw: p.update(task, advance=advance, **kw)


def _parse_uuid(value: str, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise typer.BadParameter(f"{value[:60]!r} is not a UUID", param_hint=what) from None


def _wait_for_sends(timeout: float = 30.0) -> None:
    """Wait for this process's execution messages to leave (they are sent in the
    background); say so if one has not, as its run then waits for the sweep."""
    from flowbuilder.tasks import wait_for_sends

    if not wait_for_sends(timeout):
        typer.echo(
            f"warning: an execution message was not sent within {timeout:g}s; "
            "the sweep sends it again later",
            err=True,
        )


def _resolve_user(session: Any, ref: str) -> Any:
    """A user by id or by e-mail address."""
    from sqlmodel import select

    from flowbuilder.platform.errors import NotFound
    from flowbuilder.platform.models import User

    try:
        user = session.get(User, uuid.UUID(ref))
    except ValueError:
        user = session.exec(select(User).where(User.email == ref)).first()
    if user is None:
        raise NotFound("user", ref[:100])
    return user


# ------------------------------------------------------------------------------ db


@db_cli.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head", help="Target revision.")) -> None:
    """Create or upgrade the schema (PostgreSQL or SQLite) to REVISION."""
    from flowbuilder.platform import migrate
    from flowbuilder.platform.settings import get_settings

    settings = get_settings()
    target = migrate.resolve_revision(revision)
    current = migrate.current_revision()
    if (
        current is not None
        and "," not in current
        and (target is None or migrate.is_ancestor(target, current))
    ):
        # Alembic's upgrade to an older revision silently does nothing.
        typer.echo(
            f"error: the database is at {current}, above {revision}; upgrade never goes "
            f"down (use `flowbuilder db downgrade {revision}`)",
            err=True,
        )
        raise typer.Exit(EXIT_USAGE)
    migrate.upgrade(revision)
    reached = migrate.current_revision()
    typer.echo(f"database at {_safe_url(settings.database_url)} is at {reached or 'base'}")


@db_cli.command("downgrade")
def db_downgrade(
    revision: str = typer.Argument(..., help="Target revision (`base` drops every table)."),
    yes: bool = typer.Option(False, "--yes", help="Confirm: data in dropped tables is lost."),
) -> None:
    """Downgrade the schema to REVISION (destructive: asks for --yes)."""
    from flowbuilder.platform import migrate
    from flowbuilder.platform.settings import get_settings

    settings = get_settings()
    migrate.resolve_revision(revision)
    if not yes:
        typer.echo(f"error: downgrading to {revision} can drop data; add --yes", err=True)
        raise typer.Exit(EXIT_USAGE)
    migrate.downgrade(revision)
    reached = migrate.current_revision()
    typer.echo(f"database at {_safe_url(settings.database_url)} is at {reached or 'base'}")


@db_cli.command("current")
def db_current() -> None:
    """Print the revision the database is at."""
    from flowbuilder.platform import migrate

    typer.echo(migrate.current_revision() or "base")


# ------------------------------------------------------------------------------ sqs


@sqs_cli.command("ensure-queues")
def sqs_ensure_queues() -> None:
    """Create or update the executions queue and its dead-letter queue."""
    from flowbuilder.tasks.app import ensure_execution_queues

    for name, url in ensure_execution_queues().items():
        typer.echo(f"{name}: {url}")


# ------------------------------------------------------------------------------ secrets


@secrets_cli.command("rotate-key")
def secrets_rotate_key(
    batch_size: int = typer.Option(100, min=1, max=10_000, help="Rows per transaction."),
) -> None:
    """Re-encrypt every database secret from SECRET_ENCRYPTION_OLD_* to the current key.

    Resumable: run it again after an interruption. While it runs, workers decrypt with
    both keys (set the OLD_* variables on them too).
    """
    from sqlmodel import func, select

    from flowbuilder.platform.crypto import DatabaseSecretManager
    from flowbuilder.platform.db import unit_of_work
    from flowbuilder.platform.models import DatabaseSecret
    from flowbuilder.platform.secrets import rotate_database_key
    from flowbuilder.platform.settings import get_settings

    settings = get_settings()
    old_password, old_salt = (
        settings.SECRET_ENCRYPTION_OLD_PASSWORD,
        settings.SECRET_ENCRYPTION_OLD_SALT,
    )
    if old_password is None and old_salt is None:
        typer.echo(
            "error: SECRET_ENCRYPTION_OLD_PASSWORD and SECRET_ENCRYPTION_OLD_SALT are not set: "
            "rotate-key re-encrypts from that old key to SECRET_ENCRYPTION_PASSWORD/SALT",
            err=True,
        )
        raise typer.Exit(EXIT_USAGE)
    for given, missing in (
        ("SECRET_ENCRYPTION_OLD_PASSWORD", "SECRET_ENCRYPTION_OLD_SALT"),
        ("SECRET_ENCRYPTION_OLD_SALT", "SECRET_ENCRYPTION_OLD_PASSWORD"),
    ):
        if getattr(settings, given) is not None and getattr(settings, missing) is None:
            typer.echo(f"error: {given} is set but {missing} is not", err=True)
            raise typer.Exit(EXIT_USAGE)
    for name in ("SECRET_ENCRYPTION_PASSWORD", "SECRET_ENCRYPTION_SALT"):
        if getattr(settings, name) is None:
            typer.echo(f"error: {name} is not set (the key to rotate to)", err=True)
            raise typer.Exit(EXIT_USAGE)

    new_key_id = DatabaseSecretManager().key_id
    with unit_of_work() as session:
        todo = session.exec(
            select(func.count())
            .select_from(DatabaseSecret)
            .where(DatabaseSecret.key_id != new_key_id)
        ).one()

    with _progress("re-encrypting secrets", total=todo or 0) as advance:

        @contextlib.contextmanager
        def batches() -> Iterator[Any]:
            # rotate_database_key opens one unit of work per batch: advance per batch.
            with unit_of_work() as session:
                yield session
            advance(min(batch_size, todo))

        report = rotate_database_key(batches, batch_size=batch_size)
    typer.echo(
        f"rotated={report.rotated} failed={report.failed} remaining={report.remaining} "
        f"key_id={report.key_id}"
    )
    if report.failed_ids:
        shown = ", ".join(str(i) for i in report.failed_ids[:20])
        more = f" (+{len(report.failed_ids) - 20} more)" if len(report.failed_ids) > 20 else ""
        typer.echo(
            f"error: {report.failed} secrets could not be decrypted with either key: {shown}{more}",
            err=True,
        )
        raise typer.Exit(EXIT_FAILED)
    if report.remaining:
        typer.echo(
            f"error: {report.remaining} secrets are still on the old key (locked by "
            "another transaction); run rotate-key again",
            err=True,
        )
        raise typer.Exit(EXIT_FAILED)


# ------------------------------------------------------------------------------ sweep


@cli.command("sweep")
def sweep(limit: int = typer.Option(100, min=1, max=10_000, help="Executions per run.")) -> None:
    """Re-send executions whose task message may have been lost."""
    from flowbuilder.tasks.execution import resend, take_stale_executions

    # Like the beat task; each send is counted, so the report says what really reached
    # the queue.
    found = take_stale_executions(limit)
    failures: list[str] = []
    with _progress("re-sending executions", total=len(found)) as advance:

        def _on_result(execution_id: Any, error: BaseException | None) -> None:
            if error is not None:
                failures.append(f"{execution_id}: {type(error).__name__}")
            advance()

        sent = resend(found, on_result=_on_result)
    typer.echo(f"re-sent {sent} of {len(found)} stale executions")
    if failures:
        typer.echo(
            f"error: {len(failures)} sends failed (the next sweep retries them): "
            + ", ".join(failures[:5]),
            err=True,
        )
        raise typer.Exit(EXIT_FAILED)


# ------------------------------------------------------------------------------ settings


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
    typer.echo(f"monitor_url={_safe_url(settings.monitor_url or 'off')}")


# ------------------------------------------------------------------------------ status


@cli.command("status")
def status(
    timeout: float = typer.Option(2.0, min=0.1, max=60, help="Seconds to wait for workers."),
) -> None:
    """Workers (monitoring channel), SQS queue and dead-letter depths, executions by state."""
    from sqlmodel import func, select

    from flowbuilder.platform.db import unit_of_work
    from flowbuilder.platform.models import WorkflowExecution
    from flowbuilder.platform.settings import get_settings
    from flowbuilder.tasks import app
    from flowbuilder.tasks.monitor import queue_depths

    settings = get_settings()
    console = _console()
    problems: list[str] = []

    workers = _table("workers", "worker", "state", "active", "processed", "pool")
    if settings.monitor_url is None:
        # Not a failure: the embedded default has no monitoring channel.
        typer.echo(
            "note: no monitoring channel (MONITOR_URL off, or the broker is not SQS)", err=True
        )
    else:
        try:
            inspect = app.control.inspect(timeout=timeout)
            replies = inspect.ping() or {}
            active = inspect.active() or {} if replies else {}
            stats = inspect.stats() or {} if replies else {}
        except Exception as exc:  # noqa: BLE001 - one line below
            host = _safe_url(settings.monitor_url)
            problems.append(f"monitoring channel {host} unreachable: {type(exc).__name__}")
            replies, active, stats = {}, {}, {}
        for name in sorted(replies):
            total = sum((stats.get(name, {}).get("total") or {}).values())
            pool = stats.get(name, {}).get("pool", {})
            # "celery.concurrency.prefork:TaskPool" -> "prefork"
            kind = str(pool.get("implementation", "?")).split(":")[0].rsplit(".", 1)[-1]
            workers.add_row(
                name,
                "online",
                str(len(active.get(name) or [])),
                str(total),
                f"{kind} x{pool.get('max-concurrency', '?')}",
            )
        if not replies and not problems:
            problems.append("no worker replied on the monitoring channel")
    console.print(workers)

    queues = _table("queues (SQS)", "queue", "visible", "in flight", "delayed")
    for row in queue_depths(settings):
        if "error" in row:
            queues.add_row(row["queue"], f"error: {row['error']}", "", "")
            problems.append(f"queue {row['queue']}: {row['error']}")
        else:
            queues.add_row(
                row["queue"], str(row["visible"]), str(row["in_flight"]), str(row["delayed"])
            )
    if not settings.broker_url.startswith("sqs://"):
        queues.add_row(_safe_url(settings.broker_url), "-", "-", "-")
    console.print(queues)

    with unit_of_work() as session:
        counts = session.exec(
            select(WorkflowExecution.status, func.count()).group_by(WorkflowExecution.status)
        ).all()
    by_state = _table("executions", "state", "count")
    for state, count in sorted(counts, key=lambda r: str(r[0])):
        by_state.add_row(str(getattr(state, "value", state)), str(count))
    console.print(by_state)
    for problem in problems:
        typer.echo(f"warning: {problem}", err=True)
    if problems:
        raise typer.Exit(EXIT_FAILED)


# ------------------------------------------------------------------------------ executions


def _execution_row(e: Any) -> list[str]:
    return [
        str(e.id),
        e.status.value,
        str(e.workflow_id or "-"),
        str(e.user_id),
        e.created_at.strftime("%Y-%m-%d %H:%M:%S") if e.created_at else "-",
        f"{e.duration_ms} ms" if e.duration_ms is not None else "-",
        str(e.credits_consumed),
    ]


@executions_cli.command("list")
def executions_list(
    user: str | None = typer.Option(None, help="Only this user's (id or e-mail)."),
    state: str | None = typer.Option(None, "--status", help="Only this status."),
    limit: int = typer.Option(20, min=1, max=500),
) -> None:
    """The newest executions, all users unless --user."""
    from sqlmodel import select

    from flowbuilder.platform.db import unit_of_work
    from flowbuilder.platform.models import ExecutionStatus, WorkflowExecution

    if state is not None and state not in {s.value for s in ExecutionStatus}:
        allowed = ", ".join(s.value for s in ExecutionStatus)
        raise typer.BadParameter(f"{state!r} is not one of {allowed}", param_hint="--status")
    with unit_of_work() as session:
        stmt = select(WorkflowExecution)
        if user is not None:
            stmt = stmt.where(WorkflowExecution.user_id == _resolve_user(session, user).id)
        if state is not None:
            stmt = stmt.where(WorkflowExecution.status == ExecutionStatus(state))
        rows = session.exec(
            stmt.order_by(WorkflowExecution.created_at.desc(), WorkflowExecution.id).limit(limit)
        ).all()
        table = _table(
            "executions", "id", "status", "workflow", "user", "created", "duration", "credits"
        )
        for e in rows:
            table.add_row(*_execution_row(e))
    _console().print(table)


def _show_execution(session: Any, execution: Any, console: Any) -> None:
    from flowbuilder.platform.crud import log_crud, phase_crud

    summary = _table(
        f"execution {execution.id}",
        "status",
        "workflow",
        "user",
        "created",
        "duration",
        "credits",
        "correlation",
        "error",
    )
    summary.add_row(
        *_execution_row(execution)[1:],
        execution.correlation_id or "-",
        (execution.error or "-")[:300],
    )
    console.print(summary)
    phases = phase_crud.list_phases(
        session=session, execution_id=execution.id, user_id=execution.user_id
    )
    table = _table("phases", "#", "node", "type", "status", "credits", "duration", "error")
    for p in phases:
        table.add_row(
            str(p.number),
            p.node_id,
            p.node_type,
            p.status.value,
            f"{p.credits_charged}/{p.credits_cost}",
            f"{p.duration_ms} ms" if p.duration_ms is not None else "-",
            (p.error or "")[:200],
        )
    console.print(table)
    logs = log_crud.list_logs(session=session, execution_id=execution.id, user_id=execution.user_id)
    log_table = _table("logs", "time", "level", "message")
    for line in logs[-50:]:
        log_table.add_row(
            line.timestamp.strftime("%H:%M:%S.%f")[:-3], line.level.value, line.message[:300]
        )
    console.print(log_table)


@executions_cli.command("show")
def executions_show(
    execution_id: str = typer.Argument(..., metavar="ID"),
    user: str | None = typer.Option(None, help="Refuse unless the execution is this user's."),
) -> None:
    """An execution with its phases, credits and logs."""
    from flowbuilder.platform.crud import execution_crud
    from flowbuilder.platform.db import unit_of_work

    exec_id = _parse_uuid(execution_id, "ID")
    with unit_of_work() as session:
        if user is not None:
            owner = _resolve_user(session, user)
            execution = execution_crud.get_execution_by_id_and_user(
                session=session, execution_id=exec_id, user_id=owner.id
            )
        else:
            execution = execution_crud.get_execution(session=session, execution_id=exec_id)
        _show_execution(session, execution, _console())


@executions_cli.command("cancel")
def executions_cancel(execution_id: str = typer.Argument(..., metavar="ID")) -> None:
    """Cancel an execution: a pending one at once, a running one before its next phase."""
    from flowbuilder.platform.crud import execution_crud
    from flowbuilder.platform.db import unit_of_work
    from flowbuilder.tasks import cancel_execution

    exec_id = _parse_uuid(execution_id, "ID")
    with unit_of_work() as session:
        owner = execution_crud.get_execution(session=session, execution_id=exec_id).user_id
        execution = cancel_execution(session, exec_id, owner)
        state = execution.status.value
    if state == "cancelled":
        typer.echo(f"execution {exec_id} cancelled")
    else:
        typer.echo(f"execution {exec_id} is {state}; it stops before its next phase")


# ------------------------------------------------------------------------------ run


@cli.command("run")
def run(
    file: Path = typer.Argument(..., help="Workflow definition (JSON), or {name, definition}."),
    user: str = typer.Option(..., "--user", help="The owner (id or e-mail)."),
    name: str | None = typer.Option(None, help="Workflow name (default: the file's stem)."),
    inputs: str | None = typer.Option(None, "--inputs", help="Execution inputs (JSON object)."),
    wait: bool = typer.Option(False, "--wait", help="Follow the phases until the run ends."),
    timeout: float = typer.Option(300.0, min=1, help="Seconds to wait with --wait."),
) -> None:
    """Create and publish a workflow from FILE, run it, and with --wait follow it live."""
    from flowbuilder.platform.crud import workflow_crud
    from flowbuilder.platform.db import unit_of_work
    from flowbuilder.platform.errors import ValidationFailed
    from flowbuilder.platform.models import WorkflowCreate
    from flowbuilder.platform.settings import get_settings
    from flowbuilder.tasks import enqueue_execution

    settings = get_settings()
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise typer.BadParameter(f"cannot read {file}: {exc.strerror}", param_hint="FILE") from None
    if len(raw) > settings.MAX_DEFINITION_BYTES:
        raise ValidationFailed([f"{file}: larger than MAX_DEFINITION_BYTES"], "definition")
    try:
        document = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = f"{file}: not JSON ({str(exc)[:120]})"
        raise ValidationFailed([reason], "definition") from None
    definition = document.get("definition", document) if isinstance(document, dict) else None
    if not isinstance(definition, dict):
        raise ValidationFailed([f"{file}: must be a JSON object"], "definition")
    run_inputs = None
    if inputs is not None:
        try:
            run_inputs = json.loads(inputs)
        except ValueError:
            raise typer.BadParameter("not JSON", param_hint="--inputs") from None
    workflow_name = name or (document.get("name") if "definition" in document else None)
    workflow_name = str(workflow_name or file.stem)[:200]

    with unit_of_work() as session:
        owner = _resolve_user(session, user)
        workflow = workflow_crud.create_workflow(
            session=session,
            user_id=owner.id,
            data=WorkflowCreate(name=workflow_name, definition=definition),
        )
        workflow_crud.publish_workflow(session=session, workflow_id=workflow.id, user_id=owner.id)
        workflow_id, owner_id = workflow.id, owner.id
    with unit_of_work() as session:
        execution = enqueue_execution(
            session,
            workflow_id,
            owner_id,
            inputs=run_inputs,
            correlation_id=f"cli-{uuid.uuid4().hex[:12]}",
        )
        execution_id = execution.id
    # Committed; its message leaves in the background: wait for it before saying so (and
    # before the process may exit).
    _wait_for_sends()
    typer.echo(f"workflow {workflow_id} published; execution {execution_id} enqueued")
    if not wait:
        return
    final = _follow(execution_id, owner_id, timeout)
    if final is None:
        typer.echo(
            f"error: execution {execution_id} did not finish within {timeout:g}s "
            "(is a worker running?)",
            err=True,
        )
        raise typer.Exit(EXIT_FAILED)
    with unit_of_work() as session:
        from flowbuilder.platform.crud import execution_crud

        done = execution_crud.get_execution(session=session, execution_id=execution_id)
        _show_execution(session, done, _console())
    if final != "completed":
        typer.echo(f"error: execution {execution_id} ended {final}", err=True)
        raise typer.Exit(EXIT_FAILED)


def _follow(execution_id: uuid.UUID, user_id: uuid.UUID, timeout: float) -> str | None:
    """Poll the execution and its phases, printing each change; its final status or None."""
    from flowbuilder.platform.crud import phase_crud
    from flowbuilder.platform.db import unit_of_work
    from flowbuilder.platform.models import WorkflowExecution

    seen: dict[Any, str] = {}
    deadline = time.monotonic() + timeout
    with _progress(f"execution {execution_id}") as advance:
        while time.monotonic() < deadline:
            with unit_of_work() as session:
                execution = session.get(WorkflowExecution, execution_id)
                phases = phase_crud.list_phases(
                    session=session, execution_id=execution_id, user_id=user_id
                )
                state = execution.status.value if execution else "missing"
                for p in phases:
                    if seen.get(p.id) != p.status.value:
                        seen[p.id] = p.status.value
                        typer.echo(f"  phase {p.number} {p.node_id}: {p.status.value}")
                if seen.get("execution") != state:
                    seen["execution"] = state
                    typer.echo(f"execution {execution_id}: {state}")
                advance(0, description=f"execution {execution_id}: {state}")
                if execution is None or execution.status.is_terminal:
                    return state
            time.sleep(0.3)
    return None


# ------------------------------------------------------------------------------ credits


@credits_cli.command("grant")
def credits_grant(
    user: str = typer.Argument(..., help="User id or e-mail."),
    amount: int = typer.Argument(..., min=1, max=10_000_000),
    key: str | None = typer.Option(
        None, help="Idempotency key: a repeated grant with the same key is not added twice."
    ),
    reason: str | None = typer.Option(None, help="Shown in the ledger."),
    create: bool = typer.Option(False, "--create", help="Create the user (by e-mail) if missing."),
) -> None:
    """Add AMOUNT credits to USER's balance."""
    from flowbuilder.platform.crud import balance_crud, user_crud
    from flowbuilder.platform.db import unit_of_work
    from flowbuilder.platform.errors import NotFound
    from flowbuilder.platform.models import UserCreate

    with unit_of_work() as session:
        try:
            owner = _resolve_user(session, user)
        except NotFound:
            if not create or "@" not in user:
                raise
            owner = user_crud.create_user(session=session, data=UserCreate(email=user))
        balance_crud.grant_credits(
            session=session,
            user_id=owner.id,
            amount=amount,
            idempotency_key=key or f"cli-grant:{uuid.uuid4()}",
            reason=reason,
        )
        balance = balance_crud.get_balance(session=session, user_id=owner.id)
        owner_id = owner.id
    typer.echo(f"user {owner_id}: granted {amount}; balance {balance} credits")


@credits_cli.command("show")
def credits_show(
    user: str = typer.Argument(..., help="User id or e-mail."),
    limit: int = typer.Option(50, min=1, max=1000, help="Ledger lines."),
) -> None:
    """USER's balance and ledger (newest first)."""
    from flowbuilder.platform.crud import balance_crud
    from flowbuilder.platform.db import unit_of_work

    with unit_of_work() as session:
        owner = _resolve_user(session, user)
        balance = balance_crud.get_balance(session=session, user_id=owner.id)
        ledger = balance_crud.list_ledger(session=session, user_id=owner.id, limit=limit)
        table = _table(
            f"user {owner.id} ({owner.email or 'no e-mail'}): balance {balance} credits",
            "time",
            "kind",
            "amount",
            "balance after",
            "execution",
            "reason",
        )
        for t in ledger:
            table.add_row(
                t.created_at.strftime("%Y-%m-%d %H:%M:%S"),
                t.kind.value,
                str(t.amount),
                str(t.balance_after),
                str(t.execution_id or "-"),
                t.reason or "",
            )
    _console().print(table)


# ------------------------------------------------------------------------------ demo

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
    from celery import signals
    from celery.worker import state as worker_state
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
    # Only warnings while the demo prints its own report (LOG_JSON still decides the shape).
    setup_logging(level="WARNING", force=True)
    with _progress("migrating the database"):
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
    _wait_for_sends()
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
    # Stopping the worker from this thread would close its connection under its consumer
    # (still declaring queues, or draining events): kombu then fails on a closed
    # connection. So the stop waits until the worker is ready, then asks its own loop to
    # shut down (the flag its signal handlers set), which it checks every cycle.
    ready = threading.Event()

    def _ready(sender: Any = None, **_: Any) -> None:
        ready.set()

    signals.worker_ready.connect(_ready, weak=False)
    thread = threading.Thread(target=worker.start, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        with _progress(f"running execution {execution.id}"):
            while True:
                with unit_of_work() as session:
                    done = session.get(WorkflowExecution, execution.id)
                    if done is not None and done.status.is_terminal:
                        break
                if time.monotonic() > deadline:
                    typer.echo(
                        f"error: execution {execution.id} did not finish within {timeout:g}s",
                        err=True,
                    )
                    raise typer.Exit(EXIT_FAILED)
                time.sleep(0.2)
    finally:
        ready.wait(timeout=10)
        worker_state.should_stop = 0  # EX_OK: a warm shutdown from inside the loop
        thread.join(timeout=15)
        if thread.is_alive():
            worker.stop()
            thread.join(timeout=10)
        worker_state.should_stop = None
        signals.worker_ready.disconnect(_ready)

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
        typer.echo(f"error: execution {done.id} ended {done.status.value}", err=True)
        raise typer.Exit(EXIT_FAILED)


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


# ------------------------------------------------------------------------------ errors


def _secret_values() -> list[str]:
    """Values that must never be printed (scrubbed from error lines as a last defence)."""
    from flowbuilder.platform.settings import get_settings

    try:
        settings = get_settings()
    except Exception:  # noqa: BLE001 - settings invalid: nothing loaded to leak
        return []
    values = []
    for name in _secret_setting_names():
        value = getattr(settings, name, None)
        if value is not None:
            raw = value.get_secret_value() if hasattr(value, "get_secret_value") else str(value)
            if len(raw) >= 4:
                values.append(raw)
    for url in (
        settings.DATABASE_URL,
        settings.BROKER_URL,
        settings.REDIS_URL,
        settings.MONITOR_URL,
    ):
        from urllib.parse import unquote, urlsplit

        with contextlib.suppress(ValueError):
            password = urlsplit(url or "").password
            if password:
                values += [password, unquote(password)]
    return values


def _secret_setting_names() -> list[str]:  # noqa: N802
    from pydantic import SecretStr

    from flowbuilder.platform.settings import Settings

    return [
        name
        for name, field in Settings.model_fields.items()
        if field.annotation is not None
        and SecretStr in getattr(field.annotation, "__args__", (field.annotation,))
    ]


def _scrub(text: str) -> str:
    for secret in _secret_values():
        text = text.replace(secret, "***")
    return " ".join(text.split())  # one line


def _describe_failure(exc: BaseException) -> tuple[str, int]:
    """One line and an exit status for an error that reached the top."""
    from flowbuilder.platform.errors import ConfigurationError, TransientError

    if isinstance(exc, ConfigurationError):
        return str(exc), EXIT_USAGE
    if isinstance(exc, TransientError):
        return str(exc), EXIT_UNREACHABLE
    if isinstance(exc, FlowBuilderError):
        return str(exc), EXIT_USAGE
    module = type(exc).__module__ or ""
    name = type(exc).__name__
    if module.startswith("sqlalchemy"):
        line = _describe_database_error(exc)
        if "no such table" in line or ("relation" in line and "does not exist" in line):
            return f"{line} (schema not migrated? run `flowbuilder db upgrade`)", EXIT_USAGE
        return line, EXIT_UNREACHABLE
    if module.startswith("alembic"):
        return f"migration failed: {str(exc).splitlines()[0] if str(exc) else name}", EXIT_USAGE
    if module.startswith(("botocore", "boto3")):
        return _describe_aws_error(exc), EXIT_UNREACHABLE
    if module.startswith(("redis", "kombu", "amqp")) or isinstance(exc, ConnectionError):
        return f"cannot reach a service: {name}: {str(exc)[:200]}", EXIT_UNREACHABLE
    return f"unexpected {name}: {str(exc)[:300]}", EXIT_FAILED


def _describe_database_error(exc: BaseException) -> str:
    from flowbuilder.platform.settings import get_settings

    where = "the database"
    with contextlib.suppress(Exception):
        from sqlalchemy.engine import make_url

        url = make_url(get_settings().database_url)
        where = (
            f"database {url.database} on {url.host}:{url.port or 5432} as {url.username}"
            if url.host
            else f"database {url.database}"
        )
    orig = getattr(exc, "orig", None) or exc
    detail = str(orig).strip().splitlines()
    # psycopg: 'connection failed: connection to server at "h" (ip), port 5432 failed: ...'
    message = " ".join(line.strip() for line in detail[:2]) or type(orig).__name__
    return f"{where}: {message[:300]}"


def _describe_aws_error(exc: BaseException) -> str:
    from flowbuilder.platform.settings import get_settings

    response = getattr(exc, "response", None)
    if isinstance(response, dict) and response.get("Error"):
        error = response["Error"]
        return f"AWS error {error.get('Code')}: {str(error.get('Message', ''))[:200]}"
    endpoint = "AWS"
    with contextlib.suppress(Exception):
        endpoint = get_settings().SQS_ENDPOINT_URL or "AWS"
    return f"cannot reach SQS at {endpoint}: {type(exc).__name__}: {str(exc)[:200]}"


def main(argv: list[str] | None = None) -> None:
    """Console entry point: every failure is one line on stderr and a non-zero status."""
    try:
        code = cli(args=argv, standalone_mode=False, prog_name="flowbuilder")
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        typer.echo("error: interrupted", err=True)
        sys.exit(130)
    except Exception as exc:
        names = {c.__name__ for c in type(exc).__mro__}
        if "Abort" in names:
            typer.echo("error: aborted", err=True)
            sys.exit(1)
        if "Exit" in names and hasattr(exc, "exit_code"):
            sys.exit(exc.exit_code)
        if "ClickException" in names:
            message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
            if "NoArgsIsHelpError" in names:
                # `flowbuilder` alone: the help text (what the person needs), status 2.
                typer.echo(exc.ctx.get_help() if getattr(exc, "ctx", None) else message)
                sys.exit(EXIT_USAGE)
            hint = ""
            ctx = getattr(exc, "ctx", None)
            if "UsageError" in names and ctx is not None:
                hint = f" (see `{ctx.command_path} --help`)"
            typer.echo(f"error: {_scrub(message)}{hint}", err=True)
            sys.exit(getattr(exc, "exit_code", EXIT_USAGE) or EXIT_USAGE)
        line, status = _describe_failure(exc)
        typer.echo(f"error: {_scrub(line)}", err=True)
        sys.exit(status)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
