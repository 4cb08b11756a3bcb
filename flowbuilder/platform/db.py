"""Engines and sessions.

- Workers, beat and the CLI use the sync engine (psycopg 3 on PostgreSQL) through
  :func:`unit_of_work`, which commits once at the end. CRUD functions only flush.
- The API uses :func:`get_session`, an async session on psycopg's async driver (aiosqlite
  for SQLite). There is one implementation of each CRUD function; async callers run it
  with :func:`run_sync`.
- The sync pool is disposed in a child after ``fork`` (Celery's prefork pool): a socket
  inherited from the parent must never be used by two processes.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlalchemy.ext.asyncio import create_async_engine as _create_async_engine
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import NullPool, StaticPool
from sqlmodel import Session, SQLModel
from sqlmodel.ext.asyncio.session import AsyncSession

from flowbuilder.platform.jsonvalues import dumps_json
from flowbuilder.platform.settings import get_settings

T = TypeVar("T")

_lock = threading.Lock()
_engines: dict[str, Engine] = {}
_async_engines: dict[str, AsyncEngine] = {}


def _sqlite_setup(engine: Engine, begin: str = "IMMEDIATE") -> None:
    """Make SQLite behave: foreign keys on, WAL, and real transactions.

    pysqlite opens transactions lazily and not for SELECT, which breaks SAVEPOINT and
    read-then-write atomicity. The documented SQLAlchemy recipe takes transaction
    control away from the driver; ``BEGIN IMMEDIATE`` takes the write lock up front so
    two writers queue on ``busy_timeout`` instead of failing with "database is locked"
    halfway through. ``begin="DEFERRED"`` suits a reader that must not hold the lock
    (WAL readers never block writers).
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        if engine.url.database not in (None, "", ":memory:"):
            cur.execute("PRAGMA journal_mode=WAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        conn.exec_driver_sql(f"BEGIN {begin}")


def _ensure_sqlite_dir(url: sa.URL) -> None:
    if url.database and url.database != ":memory:" and not url.database.startswith("file:"):
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)


def make_engine(
    url: str | None = None, *, sqlite_begin: str = "IMMEDIATE", **kwargs: Any
) -> Engine:
    """A new sync engine for ``url`` (default: the settings' database URL)."""
    settings = get_settings()
    sa_url = sa.make_url(url or settings.database_url)
    if sa_url.get_backend_name() == "sqlite":
        _ensure_sqlite_dir(sa_url)
        options: dict[str, Any] = {
            "connect_args": {"check_same_thread": False, "timeout": 30},
            "json_serializer": dumps_json,
        }
        if sa_url.database in (None, "", ":memory:"):
            options["poolclass"] = StaticPool
        options.update(kwargs)
        engine = sa.create_engine(sa_url, **options)
        _sqlite_setup(engine, sqlite_begin)
        return engine
    options = {
        # Instead of a ping per checkout (a round trip on every unit of work): see
        # _check_idle_connection.
        "pool_pre_ping": False,
        "pool_size": settings.DB_POOL_SIZE,
        "max_overflow": settings.DB_MAX_OVERFLOW,
        # Recycle before common server/load-balancer idle cut-offs.
        "pool_recycle": 1800,
        # Node outputs arrive serialised already (jsonvalues.SerialisedJSON).
        "json_serializer": dumps_json,
    }
    options.update(kwargs)
    engine = sa.create_engine(sa_url, **options)
    if not options["pool_pre_ping"]:
        _check_connections_at_checkout(engine)
    return engine


def _check_connections_at_checkout(engine: Engine) -> None:
    """Hand out only live connections, without a round trip for the ones that are.

    A pool pre-ping costs a round trip on every checkout, that is on every unit of work
    (an enqueue, each phase of a run). This check reads the connection's socket instead,
    without waiting: an idle connection in the pool has nothing to read, unless the
    server or the network ended it. Server restart, ``pg_terminate_backend``,
    ``idle_session_timeout``, a failover or a proxy closing it all send an error message
    and/or close the socket (FIN or RST), and then the socket is readable. Only then, or
    when the state cannot be read, the connection is pinged as the pre-ping did, and a
    failed ping makes the pool replace it (DisconnectionError, SQLAlchemy's documented
    way for a checkout check). Nothing else arrives on an idle connection here (no
    LISTEN); a harmless message (a parameter change after a reload) only costs a ping.
    What neither detects is a peer that vanished silently (no FIN): the pre-ping
    blocked on it until the TCP timeout too. ``pool_recycle`` still applies.
    """

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        if idle_and_quiet(dbapi_connection):
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
            # The ping's transaction must not be the caller's.
            dbapi_connection.rollback()
        except Exception as exc:
            raise sa.exc.DisconnectionError(f"connection check failed: {exc}") from exc


def idle_and_quiet(dbapi_connection: Any) -> bool:
    """True if this psycopg connection is idle and its socket has nothing to read."""
    try:
        from psycopg import pq

        # The async driver's connection is wrapped by SQLAlchemy's adapter.
        connection = getattr(dbapi_connection, "_connection", dbapi_connection)
        pgconn = connection.pgconn
        if (
            pgconn.status != pq.ConnStatus.OK
            or pgconn.transaction_status != pq.TransactionStatus.IDLE
        ):
            return False
        poller = select.poll()
        poller.register(pgconn.socket, select.POLLIN | select.POLLPRI)
        return not poller.poll(0)
    except Exception:  # noqa: BLE001 - unknown state (or no poll()): ping instead
        return False


def get_engine() -> Engine:
    """The process's sync engine for the configured database (created once)."""
    url = get_settings().database_url
    engine = _engines.get(url)
    if engine is None:
        with _lock:
            engine = _engines.get(url)
            if engine is None:
                engine = _engines[url] = make_engine(url)
    return engine


def _session_factory(engine: Engine) -> sessionmaker[Session]:
    """One sessionmaker per engine, kept on the engine: building one per transaction is
    measurable on every phase of a run."""
    factory = engine.__dict__.get("_flowbuilder_sessionmaker")
    if factory is None:
        # expire_on_commit=False: objects returned by a unit of work stay readable after it.
        factory = sessionmaker(bind=engine, class_=Session, expire_on_commit=False, autoflush=True)
        engine.__dict__["_flowbuilder_sessionmaker"] = factory
    return factory


def create_engine_and_session(url: str | None = None) -> tuple[Engine, sessionmaker[Session]]:
    engine = make_engine(url)
    return engine, _session_factory(engine)


@contextlib.contextmanager
def unit_of_work(engine: Engine | None = None) -> Iterator[Session]:
    """One transaction: commit when the block ends, roll back when it raises."""
    session = _session_factory(engine or get_engine())()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


# ------------------------------------------------------------------------------ async


def _async_url(url: str) -> sa.URL:
    sa_url = sa.make_url(url)
    if sa_url.get_backend_name() == "sqlite":
        return sa_url.set(drivername="sqlite+aiosqlite")
    if sa_url.get_backend_name() == "postgresql":
        return sa_url.set(drivername="postgresql+psycopg")
    return sa_url


def create_async_engine(url: str | None = None, **kwargs: Any) -> AsyncEngine:
    settings = get_settings()
    sa_url = _async_url(url or settings.database_url)
    if sa_url.get_backend_name() == "sqlite":
        _ensure_sqlite_dir(sa_url)
        options: dict[str, Any] = {"connect_args": {"timeout": 30}}
        if sa_url.database in (None, "", ":memory:"):
            options["poolclass"] = StaticPool
        options.update(kwargs)
        engine = _create_async_engine(sa_url, **options)
        _sqlite_setup(engine.sync_engine)
        return engine
    options = {"pool_pre_ping": False, "pool_size": settings.DB_POOL_SIZE}
    options.update(kwargs)
    engine = _create_async_engine(sa_url, **options)
    if not options["pool_pre_ping"]:
        _check_connections_at_checkout(engine.sync_engine)
    return engine


def get_async_engine() -> AsyncEngine:
    url = get_settings().database_url
    engine = _async_engines.get(url)
    if engine is None:
        with _lock:
            engine = _async_engines.get(url)
            if engine is None:
                engine = _async_engines[url] = create_async_engine(url)
    return engine


@contextlib.asynccontextmanager
async def get_session(engine: AsyncEngine | None = None) -> AsyncIterator[AsyncSession]:
    """The API's unit of work: ``async with get_session() as session: ...`` commits at the end."""
    factory = async_sessionmaker(
        engine or get_async_engine(), class_=AsyncSession, expire_on_commit=False
    )
    async with factory() as session:
        try:
            yield session
            await session.commit()
        except BaseException:
            await session.rollback()
            raise


async def run_sync(session: AsyncSession, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """Call a sync CRUD function (keyword-only ``session``) from async code."""
    return await session.run_sync(lambda sync_session: fn(*args, session=sync_session, **kwargs))


def create_lambda_engine_and_session() -> tuple[AsyncEngine, async_sessionmaker[AsyncSession]]:
    """Async engine without a pool, for short-lived processes (one connection per use)."""
    engine = create_async_engine(poolclass=NullPool)
    return engine, async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)


# ------------------------------------------------------------------------------ tests


def create_test_engine_and_session(
    url: str = "sqlite://",
) -> tuple[Engine, sessionmaker[Session]]:
    """An engine on an in-memory (or given) SQLite database with the schema created."""
    from flowbuilder.platform import models  # noqa: F401  (registers the tables)

    engine = make_engine(url)
    SQLModel.metadata.create_all(engine)
    return engine, _session_factory(engine)


@contextlib.contextmanager
def temporary_database(admin_url: str, prefix: str = "flowbuilder_tmp") -> Iterator[str]:
    """A new, empty PostgreSQL database for tests and benchmarks, dropped afterwards.

    ``admin_url`` is any database on the server with the right to CREATE DATABASE.
    """
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = sa.create_engine(
        admin_url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5}
    )
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        try:
            yield sa.make_url(admin_url).set(database=name).render_as_string(hide_password=False)
        finally:
            reset_engines()
            with admin.connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.dispose()


# ------------------------------------------------------------------------------ fork safety


def dispose_engines_after_fork() -> None:
    """Drop inherited pooled connections without closing the parent's sockets."""
    for engine in list(_engines.values()):
        engine.dispose(close=False)
    # Async engines hold an event loop's connections; a child simply starts afresh.
    _async_engines.clear()


def reset_engines() -> None:
    """Dispose every cached engine (tests switching databases)."""
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
        _async_engines.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=dispose_engines_after_fork)
