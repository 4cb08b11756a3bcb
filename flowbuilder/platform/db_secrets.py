"""The database backend of :mod:`flowbuilder.platform.secrets`: the ``database_secret`` table.

Rows hold only ciphertext (see :mod:`flowbuilder.platform.crypto`) and the id of the key
that made it. Every ciphertext written here is bound to its row: the AES-GCM associated
data names the row's id and its owner, so a value copied into another row fails to
decrypt. Reads are scoped by user id: another user's secret raises ``NotFound`` exactly
like a missing one. Functions take a keyword-only ``session``, flush, never commit.

This module lives beside ``secrets`` rather than in ``crud``: it is the storage of one
secrets backend, and ``crud.credentials_crud`` builds on ``secrets``. Keeping it out of
``crud`` keeps the dependency one way (crud -> secrets -> db_secrets), with no cycle.
"""

from __future__ import annotations

import uuid

import sqlalchemy as sa
import structlog
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from flowbuilder.platform.crypto import UNBOUND_VERSION, Binding, DatabaseSecretManager
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
    """Encrypt ``value`` with the current key, bound to the new row; store it.

    Duplicate name → Conflict.
    """
    manager = manager or DatabaseSecretManager()
    row_id = uuid.uuid4()
    token = manager.encrypt_secret(value, bound_to=binding_of(row_id, user_id))
    row = DatabaseSecret(
        id=row_id,
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


def binding_of(secret_id: uuid.UUID, user_id: uuid.UUID) -> Binding:
    """What a row's ciphertext is bound to: its id and its owner."""
    return Binding(secret_id=secret_id, owner_id=user_id)


def decrypt_row(row: DatabaseSecret, manager: DatabaseSecretManager | None = None) -> str:
    """The row's plaintext; its ciphertext must be bound to this row (or be accepted v1)."""
    return (manager or DatabaseSecretManager()).decrypt_secret(
        row.encrypted_value, bound_to=binding_of(row.id, row.user_id)
    )


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
    return decrypt_row(row, manager)


def delete_db_secret(*, session: Session, secret_id: uuid.UUID, user_id: uuid.UUID) -> None:
    row = get_db_secret(session=session, secret_id=secret_id, user_id=user_id)
    session.delete(row)
    session.flush()
    logger.info("db_secret_deleted", row_id=str(secret_id), user_id=str(user_id))


# --- rotation -----------------------------------------------------------------------------


def _needs_rotation(key_id: str) -> sa.ColumnElement[bool]:
    # Not on the target key, or still in the unbound v1 format.
    return sa.or_(
        DatabaseSecret.key_id != key_id,
        DatabaseSecret.encrypted_value.startswith(f"{UNBOUND_VERSION}:", autoescape=True),
    )


def lock_db_secrets_not_on_key(
    *,
    session: Session,
    key_id: str,
    limit: int,
    after_id: uuid.UUID | None = None,
) -> list[DatabaseSecret]:
    """Up to ``limit`` rows to re-encrypt, in id order after ``after_id``.

    A row needs it when it is not encrypted with ``key_id`` or still holds the unbound
    v1 format.

    On PostgreSQL the rows are locked ``FOR UPDATE SKIP LOCKED``, so two rotations (or a
    rotation and a user editing a secret) never work on the same row at once. SQLite
    serialises writers anyway and ignores the clause.
    """
    stmt = select(DatabaseSecret).where(_needs_rotation(key_id))
    if after_id is not None:
        stmt = stmt.where(DatabaseSecret.id > after_id)
    stmt = stmt.order_by(DatabaseSecret.id).limit(limit).with_for_update(skip_locked=True)
    return list(session.exec(stmt))


def count_db_secrets_not_on_key(*, session: Session, key_id: str) -> int:
    """Rows not on ``key_id`` or still in the unbound v1 format."""
    return int(
        session.exec(
            select(sa.func.count()).select_from(DatabaseSecret).where(_needs_rotation(key_id))
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
