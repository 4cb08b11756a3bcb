"""Small SQL helpers shared by the CRUD modules."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError
from sqlmodel import Session

from flowbuilder.platform.errors import Conflict, ValidationFailed


def upsert(session: Session, model: Any) -> Any:
    """An INSERT that supports ``on_conflict_*`` on PostgreSQL and SQLite alike."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(model)
    if dialect == "sqlite":
        return sqlite.insert(model)
    raise NotImplementedError(f"upsert is not supported on {dialect}")


def is_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


@contextlib.contextmanager
def conflict_on_duplicate(session: Session, message: str) -> Iterator[None]:
    """Run the block's changes in a SAVEPOINT; a unique violation becomes Conflict.

    Make the changes inside the block: ``begin_nested`` flushes what is already
    pending first, outside the savepoint. On a violation only the block is rolled back
    and the caller's transaction stays usable.
    """
    try:
        with session.begin_nested():
            yield
            session.flush()
    except IntegrityError as exc:
        raise Conflict(message) from exc
    except DataError as exc:
        # A value the database refuses (too long, not storable): the caller's input, so a
        # clear refusal rather than a raw driver error. The caller's transaction stays usable.
        raise ValidationFailed([data_error_message(exc)]) from exc


def data_error_message(exc: DataError) -> str:
    """What the database refused, without the statement or its parameters (user data)."""
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip().splitlines()
    return f"the database refused a value: {text[0][:200] if text else type(orig).__name__}"


# --- statements sent in a batch on psycopg -----------------------------------------------
#
# psycopg's pipeline mode sends statements without waiting for each answer: a batch of
# them costs one round trip. SQLAlchemy queues a statement that returns no rows there
# (``Connection.execute``), but cannot read a result it has not received yet; a statement
# whose result is needed later in the batch goes through :func:`send_returning`, which
# queues it on the driver's own cursor, compiled once by SQLAlchemy for this dialect.


def pipelines(connection: Connection) -> bool:
    """Whether ``connection``'s driver can send statements in a batch (psycopg 3, sync:
    the async connection under an AsyncSession has an async pipeline)."""
    return connection.dialect.driver == "psycopg" and not connection.dialect.is_async


_COMPILED: dict[tuple[int, str], Any] = {}


def send_returning(connection: Connection, statement: Any, params: dict[str, Any]) -> Any:
    """Queue ``statement`` (built once, module level) on the driver's cursor and return
    that cursor: its rows arrive with the batch (``fetchone`` waits for them).

    Parameters are processed as SQLAlchemy would (its bind processors: enums, JSON);
    errors surface when the batch is sent, as psycopg errors: run the batch under
    :func:`driver_errors`."""
    # An UPDATE without .values() sets the columns its parameters name: compiled per set.
    key = (id(statement), connection.dialect.name, tuple(params))
    compiled = _COMPILED.get(key)
    if compiled is None:
        compiled = _COMPILED[key] = statement.compile(
            dialect=connection.dialect, column_keys=list(params)
        )
    values = compiled.construct_params(params)
    for name, process in compiled._bind_processors.items():
        if name in values and values[name] is not None:
            values[name] = process(values[name])
    cursor = connection.connection.driver_connection.cursor()
    _execute(connection, cursor, compiled.string, values)
    return cursor


def send_statement(connection: Connection, statement: Any, params: dict[str, Any]) -> None:
    """Queue ``statement`` (built once) in the batch being built, its result unread: on the
    driver's cursor like :func:`send_returning` (SQLAlchemy's own execute costs several
    times more in Python), or through SQLAlchemy when it has an expanding parameter (an
    IN list), which that cursor cannot carry. Run it under :func:`driver_errors`."""
    key = (id(statement), connection.dialect.name, tuple(params))
    compiled = _COMPILED.get(key)
    if compiled is None:
        compiled = _COMPILED[key] = statement.compile(
            dialect=connection.dialect, column_keys=list(params)
        )
    if compiled.post_compile_params:
        connection.execute(statement, params)
    else:
        send_returning(connection, statement, params)


def in_batch(connection: Connection) -> bool:
    """Whether a batch is being built on ``connection`` (psycopg's pipeline mode is on)."""
    if not pipelines(connection):
        return False
    return bool(connection.connection.driver_connection.pgconn.pipeline_status)


def send_command(connection: Connection, command: str) -> None:
    """A statement without parameters or result (BEGIN, COMMIT) on the driver's cursor."""
    _execute(connection, connection.connection.driver_connection.cursor(), command, None)


def first_row(connection: Connection, statement: str, params: dict[str, Any]) -> Any:
    """The first row of a driver-level ``statement`` (psycopg's ``%(name)s`` parameters).

    On psycopg it goes in a batch: when it is the transaction's first statement, the BEGIN
    the driver sends before it travels with it, one round trip instead of two."""
    if not pipelines(connection):
        return connection.exec_driver_sql(statement, params).first()
    driver = connection.connection.driver_connection
    with driver_errors(connection):
        cursor = driver.cursor()
        with driver.pipeline():
            _execute(connection, cursor, statement, params)
        return cursor.fetchone()


def _execute(connection: Connection, cursor: Any, statement: str, params: Any) -> None:
    # SQLAlchemy's cursor events fire for these too, as for its own statements: whatever
    # watches them (tracing, statement counts, the tests' fault injection) sees them all.
    dispatch = connection.dispatch
    if dispatch.before_cursor_execute:
        dispatch.before_cursor_execute(connection, cursor, statement, params, None, False)
    cursor.execute(statement, params)
    if dispatch.after_cursor_execute:
        dispatch.after_cursor_execute(connection, cursor, statement, params, None, False)


@contextlib.contextmanager
def driver_errors(connection: Connection) -> Iterator[None]:
    """Errors raised by the driver itself (a batch sent outside SQLAlchemy) become the
    SQLAlchemy errors the rest of the code classifies (OperationalError, DataError...),
    and a lost connection is invalidated, as SQLAlchemy does for its own statements."""
    try:
        yield
    except Exception as exc:
        module = connection.dialect.loaded_dbapi
        if not isinstance(exc, module.Error):
            raise
        lost = connection.dialect.is_disconnect(exc, connection.connection.dbapi_connection, None)
        if lost:
            connection.invalidate(exc)
        raise DBAPIError.instance(
            None,
            None,
            exc,
            module.Error,
            hide_parameters=True,
            connection_invalidated=lost,
            dialect=connection.dialect,
        ) from exc
