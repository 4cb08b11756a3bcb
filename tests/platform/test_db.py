"""Engines and sessions: fork safety and the unit of work."""

from __future__ import annotations

import os

import pytest
import sqlalchemy as sa

from flowbuilder.platform import db


def test_pool_is_disposed_in_a_child_after_fork(engine: sa.Engine) -> None:
    """Celery's prefork pool forks workers: a child must never reuse the parent's sockets."""
    with engine.connect() as conn:
        conn.execute(sa.text("select 1"))
    assert engine.pool.checkedin() >= 1
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what its pool holds, then use the database afresh
        os.close(read)
        try:
            held = engine.pool.checkedin()
            with db.get_engine().connect() as conn:
                ok = conn.execute(sa.text("select 1")).scalar() == 1
            os.write(write, f"{held}:{ok}".encode())
        finally:
            os._exit(0)
    os.close(write)
    report = os.read(read, 100).decode()
    os.waitpid(pid, 0)
    assert report == "0:True"
    # The parent's pooled connection is untouched and still works.
    with engine.connect() as conn:
        assert conn.execute(sa.text("select 1")).scalar() == 1


def _terminate_pooled_backend(engine: sa.Engine) -> int:
    """Put one connection in the pool, end its server process from outside, and wait
    until the server has closed it. Returns the pool's idle connections."""
    import time

    with engine.connect() as conn:
        pid = conn.execute(sa.text("select pg_backend_pid()")).scalar()
    # Autocommit: pg_stat_activity is read afresh by each statement, not once per transaction.
    admin = sa.create_engine(engine.url, poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            assert conn.execute(sa.text("select pg_terminate_backend(:p)"), {"p": pid}).scalar()
            deadline = time.monotonic() + 10
            while conn.execute(
                sa.text("select count(*) from pg_stat_activity where pid = :p"), {"p": pid}
            ).scalar():
                assert time.monotonic() < deadline
                time.sleep(0.01)
    finally:
        admin.dispose()
    return engine.pool.checkedin()


def test_a_connection_the_server_ended_is_never_handed_out(engine: sa.Engine) -> None:
    """No ping per checkout, yet a pooled connection whose server process was ended
    (restart, failover, pg_terminate_backend) is replaced before use: the next unit of
    work just works."""
    if engine.dialect.name != "postgresql":
        pytest.skip("PostgreSQL connections")
    engine.dispose()
    assert _terminate_pooled_backend(engine) == 1
    with db.unit_of_work(engine) as session:
        assert session.execute(sa.text("select 1")).scalar() == 1
    # The same through the API's async engine.
    import asyncio

    async def scenario() -> None:
        async_engine = db.create_async_engine(str(engine.url.render_as_string(False)))
        try:
            async with async_engine.connect() as conn:
                pid = (await conn.execute(sa.text("select pg_backend_pid()"))).scalar()
            with engine.connect() as conn:
                conn.execute(sa.text("select pg_terminate_backend(:p)"), {"p": pid})
            await asyncio.sleep(0.2)
            async with db.get_session(async_engine) as session:
                conn = await session.connection()
                assert (await conn.execute(sa.text("select 1"))).scalar() == 1
        finally:
            await async_engine.dispose()

    asyncio.run(scenario())


def test_a_healthy_pooled_connection_is_not_pinged(engine: sa.Engine) -> None:
    if engine.dialect.name != "postgresql":
        pytest.skip("PostgreSQL connections")
    with engine.connect() as conn:
        conn.execute(sa.text("select 1"))
    pings: list[object] = []
    original = engine.dialect.do_ping
    engine.dialect.do_ping = lambda c: pings.append(c) or original(c)  # type: ignore[method-assign]
    try:
        for _ in range(3):
            with engine.connect() as conn:
                conn.execute(sa.text("select 1"))
    finally:
        del engine.dialect.do_ping
    assert pings == []
