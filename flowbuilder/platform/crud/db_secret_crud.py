"""Encrypted secret values in the ``database_secret`` table (USE_DB_SECRETS=true).

Rows hold only ciphertext (see :mod:`flowbuilder.platform.crypto`) and the id of the key
that made it. Reads are scoped by user id: another user's secret raises ``NotFound``
exactly like a missing one.
"""

from __future__ import annotations

import uuid

import sqlalchemy as sa
import structlog
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from flowbuilder.platform.crypto import DatabaseSecretManager
from flowbuilder.platform.errors import Conflict, NotFound
from flowbuilder.platform.models import DatabaseSecret, utcnow

logger = structlog.get_logger(__name__)


def create_db_secret(
    *,
    session: Session,
    user_id: uuid.UUID,
    name: str,
    value: str,
    manager: DatabaseSecretManager | None = None,
) -> DatabaseSecret:
    """Encrypt ``value`` with the current key and store it. Duplicate name → Conflict."""
    manager = manager or DatabaseSecretManager()
    token = manager.encrypt_secret(value)
    row = DatabaseSecret(
        user_id=user_id,
        name=name,
        encrypted_value=token,
        key_id=manager.key_id,
    )
    try:
        # Added inside the SAVEPOINT: begin_nested() flushes pending objects first, so a
        # duplicate added before it would fail the whole transaction instead.
        with session.begin_nested():
            session.add(row)
            session.flush()
    except IntegrityError as exc:
        raise Conflict(f"a secret named {name!r} already exists") from exc
    logger.info("db_secret_created", row_id=str(row.id), user_id=str(user_id), key_id=row.key_id)
    return row


def get_db_secret(*, session: Session, secret_id: uuid.UUID, user_id: uuid.UUID) -> DatabaseSecret:
    """The user's secret row (ciphertext). Another user's id raises NotFound."""
    row = session.exec(
        select(DatabaseSecret).where(
            DatabaseSecret.id == secret_id, DatabaseSecret.user_id == user_id
        )
    ).first()
    if row is None:
        raise NotFound("secret", secret_id)
    return row


def read_db_secret_value(
    *,
    session: Session,
    secret_id: uuid.UUID,
    user_id: uuid.UUID,
    manager: DatabaseSecretManager | None = None,
) -> str:
    """Decrypt the user's secret (current or old key). Raises SecretError if it cannot."""
    row = get_db_secret(session=session, secret_id=secret_id, user_id=user_id)
    return (manager or DatabaseSecretManager()).decrypt_secret(row.encrypted_value)


def delete_db_secret(*, session: Session, secret_id: uuid.UUID, user_id: uuid.UUID) -> None:
    row = get_db_secret(session=session, secret_id=secret_id, user_id=user_id)
    session.delete(row)
    session.flush()
    logger.info("db_secret_deleted", row_id=str(secret_id), user_id=str(user_id))


# --- rotation -----------------------------------------------------------------------------


def lock_db_secrets_not_on_key(
    *,
    session: Session,
    key_id: str,
    limit: int,
    after_id: uuid.UUID | None = None,
) -> list[DatabaseSecret]:
    """Up to ``limit`` rows not encrypted with ``key_id``, in id order after ``after_id``.

    On PostgreSQL the rows are locked ``FOR UPDATE SKIP LOCKED``, so two rotations (or a
    rotation and a user editing a secret) never work on the same row at once. SQLite
    serialises writers anyway and ignores the clause.
    """
    stmt = select(DatabaseSecret).where(DatabaseSecret.key_id != key_id)
    if after_id is not None:
        stmt = stmt.where(DatabaseSecret.id > after_id)
    stmt = stmt.order_by(DatabaseSecret.id).limit(limit).with_for_update(skip_locked=True)
    return list(session.exec(stmt))


def count_db_secrets_not_on_key(*, session: Session, key_id: str) -> int:
    return int(
        session.exec(
            select(sa.func.count())
            .select_from(DatabaseSecret)
            .where(DatabaseSecret.key_id != key_id)
        ).one()
    )


def set_db_secret_ciphertext(
    *, session: Session, row: DatabaseSecret, encrypted_value: str, key_id: str
) -> None:
    """Replace a row's ciphertext (re-encryption); the secret's value is unchanged."""
    row.encrypted_value = encrypted_value
    row.key_id = key_id
    row.updated_at = utcnow()
    session.add(row)
    session.flush()
