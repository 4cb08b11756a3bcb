"""Alembic migrations: they build the schema from nothing, agree with the models, and rerun
as a no-op, on SQLite (the embedded default) and on PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlmodel import Session, SQLModel

from flowbuilder.platform import db, migrate, models
from flowbuilder.platform.settings import override_settings
from tests.conftest import PG_ADMIN_URL

EXPECTED_TABLES = {table.name for table in SQLModel.metadata.sorted_tables}


def _head() -> str:
    head = ScriptDirectory.from_config(migrate.alembic_config()).get_current_head()
    assert head is not None
    return head


@pytest.fixture
def fresh_pg_url() -> Iterator[str]:
    """An empty PostgreSQL database (no tables at all), dropped afterwards."""
    with db.temporary_database(PG_ADMIN_URL, "flowbuilder_migrate") as url:
        yield url


@pytest.fixture
def fresh_sqlite_url(tmp_path: Path) -> str:
    # A directory that does not exist yet: the embedded default creates it.
    return f"sqlite:///{(tmp_path / 'home' / 'flowbuilder.db').as_posix()}"


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh_url(request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue(
        f"fresh_{'pg' if request.param == 'postgresql' else 'sqlite'}_url"
    )


def _version(url: str) -> list[str]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return [
                row[0] for row in conn.exec_driver_sql("SELECT version_num FROM alembic_version")
            ]
    finally:
        engine.dispose()


def _tables(url: str) -> set[str]:
    engine = sa.create_engine(url)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _diff(url: str) -> list:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            return compare_metadata(context, SQLModel.metadata)
    finally:
        engine.dispose()


def test_metadata_has_the_core_tables() -> None:
    # Guards the comparison below against an empty metadata (which would match anything).
    assert {
        "user_account",
        "workflow",
        "workflow_version",
        "workflow_execution",
        "execution_phase",
        "execution_log",
        "balance_transaction",
        "user_balance",
        "credential",
        "database_secret",
    } <= EXPECTED_TABLES


def test_upgrade_creates_the_schema_at_head(fresh_url: str) -> None:
    if fresh_url.startswith("sqlite"):
        assert not Path(sa.make_url(fresh_url).database).parent.exists()
    else:
        assert _tables(fresh_url) == set()
    migrate.upgrade(database_url=fresh_url)
    assert _tables(fresh_url) == EXPECTED_TABLES | {"alembic_version"}
    assert _version(fresh_url) == [_head()]


def test_models_and_migrations_agree(fresh_url: str) -> None:
    """Autogenerate finds nothing to do after upgrading: no missing table, column, index,
    constraint, nullability or type change. (Checked on SQLite too: it compares cleanly,
    UTCDateTime and the JSONB variant both reflect as the types the models declare.)"""
    migrate.upgrade(database_url=fresh_url)
    diffs = _diff(fresh_url)
    assert diffs == [], "models and migrations differ:\n" + "\n".join(map(repr, diffs))


def test_comparison_does_detect_drift(fresh_sqlite_url: str) -> None:
    """The check above can fail: a column the migrations never created shows up."""
    migrate.upgrade(database_url=fresh_sqlite_url)
    engine = sa.create_engine(fresh_sqlite_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE workflow ADD COLUMN stray INTEGER")
    engine.dispose()
    diffs = _diff(fresh_sqlite_url)
    assert any(d[0] == "remove_column" and d[3].name == "stray" for d in diffs), diffs


def test_upgrade_twice_is_a_no_op(fresh_url: str) -> None:
    migrate.upgrade(database_url=fresh_url)
    engine = sa.create_engine(fresh_url)
    user_id = uuid.uuid4()
    with engine.begin() as conn:
        conn.execute(
            sa.insert(models.User.__table__).values(
                id=user_id,
                timezone="UTC",
                is_guest=False,
                created_at=models.utcnow(),
                updated_at=models.utcnow(),
            )
        )
    engine.dispose()

    migrate.upgrade(database_url=fresh_url)

    assert _version(fresh_url) == [_head()]
    assert _tables(fresh_url) == EXPECTED_TABLES | {"alembic_version"}
    assert _diff(fresh_url) == []
    engine = sa.create_engine(fresh_url)
    with engine.connect() as conn:
        ids = conn.execute(sa.select(models.User.__table__.c.id)).scalars().all()
    engine.dispose()
    assert ids == [user_id]  # the data survived


def test_upgrade_defaults_to_the_configured_database(fresh_sqlite_url: str) -> None:
    with override_settings(DATABASE_URL=fresh_sqlite_url):
        migrate.upgrade()
    assert _version(fresh_sqlite_url) == [_head()]


def test_upgrade_engine_uses_the_given_connection(fresh_pg_url: str) -> None:
    engine = db.make_engine(fresh_pg_url)
    try:
        migrate.upgrade_engine(engine)
    finally:
        engine.dispose()
    assert _version(fresh_pg_url) == [_head()]
    assert _tables(fresh_pg_url) == EXPECTED_TABLES | {"alembic_version"}


def _phase_json_columns(url: str, query: str) -> dict[str, str]:
    """``query``'s (column name, fact) rows, for execution_phase's inputs and outputs."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return {name: fact for name, fact in conn.exec_driver_sql(query)}
    finally:
        engine.dispose()


def _after_create_all(facts: Any) -> dict[str, str]:
    """``facts(url)`` on a database made by create_all (as tests and benchmarks make it)."""
    with db.temporary_database(PG_ADMIN_URL, "flowbuilder_create_all") as url:
        engine = sa.create_engine(url)
        try:
            SQLModel.metadata.create_all(engine)
        finally:
            engine.dispose()
        return facts(url)


def _phase_json_compression(url: str) -> dict[str, str]:
    return _phase_json_columns(
        url,
        "SELECT attname, attcompression FROM pg_attribute "
        "WHERE attrelid = 'execution_phase'::regclass AND attname IN ('inputs', 'outputs')",
    )


def _phase_json_types(url: str) -> dict[str, str]:
    return _phase_json_columns(
        url,
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_name = 'execution_phase' AND column_name IN ('inputs', 'outputs')",
    )


def test_phase_inputs_and_outputs_are_compressed_with_lz4(fresh_pg_url: str) -> None:
    """perf_0001 (PostgreSQL): lz4, faster than the default pglz for large documents;
    its downgrade returns to the default; create_all (tests, benchmarks) matches."""
    migrate.upgrade(database_url=fresh_pg_url)
    assert _phase_json_compression(fresh_pg_url) == {"inputs": "l", "outputs": "l"}
    migrate.downgrade("beat_0001", database_url=fresh_pg_url)
    assert _phase_json_compression(fresh_pg_url) == {"inputs": "", "outputs": ""}
    migrate.upgrade(database_url=fresh_pg_url)
    assert _phase_json_compression(fresh_pg_url) == {"inputs": "l", "outputs": "l"}
    assert _after_create_all(_phase_json_compression) == {"inputs": "l", "outputs": "l"}


def test_the_compression_migration_is_a_no_op_on_sqlite(fresh_sqlite_url: str) -> None:
    migrate.upgrade("beat_0001", database_url=fresh_sqlite_url)
    migrate.upgrade(database_url=fresh_sqlite_url)
    assert _version(fresh_sqlite_url) == [_head()]
    migrate.downgrade("beat_0001", database_url=fresh_sqlite_url)
    assert _version(fresh_sqlite_url) == ["beat_0001"]


def test_phase_inputs_and_outputs_are_json_text_and_survive_the_type_change(
    fresh_pg_url: str,
) -> None:
    """perf_0002 (PostgreSQL): ``json``, kept as sent (key order), several times cheaper
    to write than ``jsonb``; down and up again keep every stored document."""
    from tests.factories import json_definition, make_user, make_workflow

    migrate.upgrade("perf_0001", database_url=fresh_pg_url)
    assert _phase_json_types(fresh_pg_url) == {"inputs": "jsonb", "outputs": "jsonb"}
    engine = db.make_engine(fresh_pg_url)
    try:
        with Session(engine) as session:
            user = make_user(session)
            workflow = make_workflow(session, user, definition=json_definition(1))
            execution = models.WorkflowExecution(workflow_id=workflow.id, user_id=user.id)
            session.add(execution)
            session.flush()
            session.add(
                models.ExecutionPhase(
                    execution_id=execution.id,
                    user_id=user.id,
                    number=1,
                    node_id="n1",
                    node_type="add_property_to_json",
                    inputs={"z": 1, "a": [1, {"y": None}]},
                    outputs={"z": "last", "a": "first"},
                )
            )
            session.commit()
        migrate.upgrade(database_url=fresh_pg_url)
        assert _phase_json_types(fresh_pg_url) == {"inputs": "json", "outputs": "json"}
        assert _phase_json_compression(fresh_pg_url) == {"inputs": "l", "outputs": "l"}
        with engine.connect() as conn:
            conn.exec_driver_sql(
                'UPDATE execution_phase SET outputs = \'{"z": "last", "a": 1}\'::json'
            )
            conn.commit()
            # As sent: z before a (jsonb would have sorted the keys).
            assert conn.exec_driver_sql("SELECT outputs::text FROM execution_phase").scalar() == (
                '{"z": "last", "a": 1}'
            )
        migrate.downgrade("perf_0001", database_url=fresh_pg_url)
        assert _phase_json_types(fresh_pg_url) == {"inputs": "jsonb", "outputs": "jsonb"}
        migrate.upgrade(database_url=fresh_pg_url)
        with engine.connect() as conn:
            row = conn.exec_driver_sql("SELECT inputs, outputs FROM execution_phase").one()
        assert row == ({"z": 1, "a": [1, {"y": None}]}, {"z": "last", "a": 1})
    finally:
        engine.dispose()
    # create_all (tests, benchmarks) matches the migrations.
    assert _after_create_all(_phase_json_types) == {"inputs": "json", "outputs": "json"}
