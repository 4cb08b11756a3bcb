"""Shared fixtures: real databases (SQLite and PostgreSQL), settings, factories.

Every database test runs twice, on SQLite (the embedded default) and on the real
PostgreSQL server at 127.0.0.1:5432. Set FLOWBUILDER_TEST_DATABASES=sqlite (or
postgresql) to run one side only. The PostgreSQL side uses a throwaway database
created for this test session and dropped at the end.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlmodel import Session, SQLModel

# Settings for the whole test run, before anything reads them. Tests never touch AWS:
# AWS-facing tests start moto's server on 127.0.0.1 and point the endpoints at it.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ["SECRET_ENCRYPTION_PASSWORD"] = "test-encryption-password-4f1c"
os.environ["SECRET_ENCRYPTION_SALT"] = "test-encryption-salt-9b2e"
os.environ.setdefault("LOG_JSON", "true")
# Workflow changes would update beat's cron schedule in the shared Redis (db 0, prefix
# "redbeat:"); tests/beat turns it on with a key prefix of its own.
os.environ.setdefault("BEAT_SYNC_ON_CHANGE", "false")

from flowbuilder.platform import db, models  # noqa: E402,F401
from flowbuilder.platform.settings import override_settings  # noqa: E402

PG_ADMIN_URL = os.environ.get(
    "FLOWBUILDER_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
BACKENDS = [
    b for b in os.environ.get("FLOWBUILDER_TEST_DATABASES", "sqlite,postgresql").split(",") if b
]


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session."""
    with db.temporary_database(PG_ADMIN_URL, "flowbuilder_test") as url:
        yield url


@pytest.fixture(scope="session")
def _pg_schema(pg_url: str) -> str:
    engine = sa.create_engine(pg_url)
    SQLModel.metadata.create_all(engine)
    engine.dispose()
    return pg_url


def _truncate(engine: sa.Engine) -> None:
    tables = [t.name for t in SQLModel.metadata.sorted_tables]
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.exec_driver_sql(
                "TRUNCATE " + ", ".join(f'"{t}"' for t in tables) + " RESTART IDENTITY CASCADE"
            )
        else:
            for table in reversed(SQLModel.metadata.sorted_tables):
                conn.execute(table.delete())


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The URL of an empty, migrated database: SQLite file or PostgreSQL."""
    if request.param == "postgresql":
        url = request.getfixturevalue("_pg_schema")
        return url
    path = tmp_path_factory.mktemp("sqlite") / "flowbuilder.db"
    return f"sqlite:///{path}"


@pytest.fixture
def settings(database_url: str, tmp_path) -> Iterator[object]:
    """Settings pointing at the test database (get_engine() follows them)."""
    with override_settings(DATABASE_URL=database_url, FLOWBUILDER_HOME=tmp_path) as s:
        db.reset_engines()
        yield s
    db.reset_engines()


@pytest.fixture
def engine(settings) -> Iterator[sa.Engine]:
    engine = db.get_engine()
    if engine.dialect.name == "sqlite":
        SQLModel.metadata.create_all(engine)
    else:
        _truncate(engine)
    yield engine


@pytest.fixture
def session(engine: sa.Engine) -> Iterator[Session]:
    """A session on the test database. Tests commit explicitly where it matters.

    On SQLite it uses its own engine whose transactions begin DEFERRED: the test's
    reads must not hold the write lock while the code under test (BEGIN IMMEDIATE,
    like production) works in other threads.
    """
    own = None
    if engine.dialect.name == "sqlite":
        own = db.make_engine(str(engine.url), sqlite_begin="DEFERRED")
    with Session(own or engine, expire_on_commit=False) as s:
        yield s
        s.rollback()
    if own is not None:
        own.dispose()


# ------------------------------------------------------------------------------ AWS (moto)


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """moto's server mode in a subprocess on 127.0.0.1: a real HTTP AWS API (SQS, SNS,
    Secrets Manager). It stands in for AWS itself, which cannot run here. (The same
    start-up as the benchmarks': ``benchmarks.harness.moto_server``.)"""
    from benchmarks.harness import moto_server as start_moto

    with start_moto() as url:
        yield url


@pytest.fixture
def moto_reset(moto_server: str) -> str:
    """Reset moto's state so each test starts with no queues or secrets."""
    import urllib.request

    req = urllib.request.Request(moto_server + "/moto-api/reset", method="POST")
    urllib.request.urlopen(req, timeout=10).read()
    return moto_server


# ------------------------------------------------------------------------------ round trips


@pytest.fixture
def pg_round_trips(_pg_schema: str, tmp_path) -> Iterator[object]:
    """Settings pointing at the test PostgreSQL database through a proxy that counts SQL
    round trips as the server sees them (BEGIN, COMMIT and pool pings included); yields
    the :class:`benchmarks.pg_roundtrips.RoundTripProxy` (``round_trips``, ``snapshot()``).

    Count a steady state: psycopg prepares a statement on its 5th execution on a
    connection, which costs one extra round trip the first time.
    """
    from benchmarks.pg_roundtrips import RoundTripProxy

    with (
        RoundTripProxy() as proxy,
        override_settings(DATABASE_URL=proxy.url_for(_pg_schema), FLOWBUILDER_HOME=tmp_path),
    ):
        db.reset_engines()
        _truncate(db.get_engine())
        yield proxy
    db.reset_engines()
