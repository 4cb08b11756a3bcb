"""Engines and sessions: fork safety and the unit of work."""

from __future__ import annotations

import os

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
