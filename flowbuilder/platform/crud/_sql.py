"""Small SQL helpers shared by the CRUD modules."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DataError, IntegrityError
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
