"""Run Alembic migrations from code (the CLI and tests), against the configured database."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Engine

import flowbuilder

# migrations/ sits beside the package in a source checkout (the supported way to run
# migrations; a wheel does not carry it).
MIGRATIONS_DIR = Path(flowbuilder.__file__).resolve().parent.parent / "migrations"


def alembic_config(database_url: str | None = None) -> Config:
    ini = MIGRATIONS_DIR.parent / "alembic.ini"
    config = Config(str(ini)) if ini.exists() else Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # Keep our own logging configuration; alembic.ini's would replace it.
    config.attributes["configure_logging"] = False
    if database_url:
        config.attributes["database_url"] = database_url
    return config


def upgrade(revision: str = "head", *, database_url: str | None = None) -> None:
    command.upgrade(alembic_config(database_url), revision)


def upgrade_engine(engine: Engine, revision: str = "head") -> None:
    """Upgrade through an existing engine (tests)."""
    config = alembic_config()
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, revision)


def current_revision(*, database_url: str | None = None) -> str | None:
    """The revision the database is at (None: no schema yet). Several heads: joined by ','."""
    from alembic.runtime.migration import MigrationContext

    from flowbuilder.platform.db import make_engine

    # make_engine, like the migrations themselves: the embedded default's folder is
    # created on first use, so `db upgrade` works on a fresh machine.
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            heads = MigrationContext.configure(conn).get_current_heads()
    finally:
        engine.dispose()
    return ",".join(sorted(heads)) or None


def resolve_revision(revision: str, *, database_url: str | None = None) -> str | None:
    """The revision id that ``revision`` names ("head", a prefix, ...); None for "base".

    Raises ValidationFailed for a revision that the migrations do not know.
    """
    from alembic.script import ScriptDirectory
    from alembic.util.exc import CommandError

    from flowbuilder.platform.errors import ValidationFailed

    script = ScriptDirectory.from_config(alembic_config(database_url))
    if revision == "base":
        return None
    try:
        resolved = script.get_revisions(revision)
    except (CommandError, KeyError, ValueError) as exc:
        known = ", ".join(sorted(script.get_heads()))
        raise ValidationFailed(
            [f"unknown revision {revision!r} (head: {known})"], "Alembic revision"
        ) from exc
    if len(resolved) != 1 or resolved[0] is None:
        raise ValidationFailed([f"{revision!r} names {len(resolved)} revisions"], "revision")
    return resolved[0].revision


def is_ancestor(older: str | None, newer: str, *, database_url: str | None = None) -> bool:
    """True when ``older`` (None: base) lies strictly below ``newer``."""
    from alembic.script import ScriptDirectory

    if older == newer:
        return False
    if older is None:
        return True
    script = ScriptDirectory.from_config(alembic_config(database_url))
    return any(rev.revision == older for rev in script.iterate_revisions(newer, "base"))


def downgrade(revision: str, *, database_url: str | None = None) -> None:
    command.downgrade(alembic_config(database_url), revision)
