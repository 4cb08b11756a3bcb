"""Cutting database connections the way a server restart or an administrator does."""

from __future__ import annotations

import time

import sqlalchemy as sa


def terminate_other_backends(engine: sa.Engine, timeout: float = 10) -> int:
    """Terminate every other connection to ``engine``'s database and wait until those
    backends are gone; returns how many were terminated.

    It runs on a connection of its own, outside the pool, so that it is not among those
    cut. pg_terminate_backend only signals a backend: waiting until it is gone means its
    goodbye is on each client's socket before the caller reads on, as for a connection
    that died while idle (the pool's checkout check then replaces it), instead of a race
    with the connection being cut."""
    with engine.pool._creator() as raw:  # type: ignore[attr-defined]
        raw.autocommit = True  # every look at pg_stat_activity is a fresh snapshot
        cur = raw.cursor()
        cur.execute(
            "SELECT coalesce(array_agg(pid), '{}') FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        pids = cur.fetchone()[0]
        cur.execute("SELECT count(pg_terminate_backend(pid)) FROM unnest(%s::int[]) pid", (pids,))
        cut = int(cur.fetchone()[0])
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,))
            if cur.fetchone()[0] == 0:
                break
            time.sleep(0.01)
        return cut
