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
