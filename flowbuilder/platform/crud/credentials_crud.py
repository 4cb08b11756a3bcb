"""Credentials: a user's named secrets for workflow nodes (API keys, tokens, passwords).

A ``Credential`` row keeps the name, the type and an opaque reference into the secret
backend (:mod:`flowbuilder.platform.secrets`), never the value. The value is decrypted
in one place only, :func:`resolve_credential_value`, which the worker calls to hand a
node its credential as a ``SecretStr``.
"""

from __future__ import annotations

import uuid

import structlog
from pydantic import SecretStr
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from flowbuilder.platform import secrets
from flowbuilder.platform.errors import Conflict, NotFound, ValidationFailed
from flowbuilder.platform.models import Credential
from flowbuilder.platform.text import unencodable_problem

logger = structlog.get_logger(__name__)

CREDENTIAL_TYPES: tuple[str, ...] = ("bearer_token", "basic_auth", "api_key", "header", "generic")
MAX_NAME_CHARS = 200


def _validate(name: object, type: object, secret_value: object) -> str:
    problems = []
    if not isinstance(name, str) or not name.strip():
        problems.append("name: must be a non-empty string")
    elif len(name) > MAX_NAME_CHARS:
        problems.append(f"name: at most {MAX_NAME_CHARS} characters")
    elif problem := unencodable_problem("name", name):
        problems.append(problem)
    if type not in CREDENTIAL_TYPES:
        shown = repr(type) if isinstance(type, str) else f"of type {type.__class__.__name__}"
        problems.append(
            f"type: unknown credential type {shown[:60]} (allowed: {', '.join(CREDENTIAL_TYPES)})"
        )
    if isinstance(secret_value, SecretStr):
        secret_value = secret_value.get_secret_value()
    if not isinstance(secret_value, str) or not secret_value:
        problems.append("secret_value: must be a non-empty string")
    elif problem := unencodable_problem("secret_value", secret_value):
        problems.append(problem)
    if problems:
        raise ValidationFailed(problems, what="credential")
    assert isinstance(secret_value, str)
    return secret_value


def _name_taken(session: Session, user_id: uuid.UUID, name: str) -> bool:
    return (
        session.exec(
            select(Credential.id).where(Credential.user_id == user_id, Credential.name == name)
        ).first()
        is not None
    )


def create_credential(
    *,
    session: Session,
    user_id: uuid.UUID,
    name: str,
    type: str,
    secret_value: str | SecretStr,
) -> Credential:
    """Store the value in the secret backend and keep only its reference.

    Unknown type → ValidationFailed; a name the user already uses → Conflict. If the
    row cannot be written after the secret was stored, the secret is deleted again.
    """
    value = _validate(name, type, secret_value)
    conflict = f"a credential named {name!r} already exists"
    if _name_taken(session, user_id, name):
        raise Conflict(conflict)
    reference = secrets.create_secret(session, name, value, user_id)
    credential = Credential(user_id=user_id, name=name, type=type, secret_ref=reference)
    try:
        # Added inside the SAVEPOINT (begin_nested() first flushes what is pending).
        with session.begin_nested():
            session.add(credential)
            session.flush()
    except IntegrityError as exc:
        # Lost a race for the name: do not leave the stored secret behind.
        _forget(session, credential)
        _discard_secret(session, reference, user_id)
        raise Conflict(conflict) from exc
    except BaseException:
        _forget(session, credential)
        _discard_secret(session, reference, user_id)
        raise
    logger.info(
        "credential_created",
        credential_id=str(credential.id),
        user_id=str(user_id),
        type=type,
    )
    return credential


def _forget(session: Session, credential: Credential) -> None:
    if credential in session:
        session.expunge(credential)


def _discard_secret(session: Session, reference: str, user_id: uuid.UUID) -> None:
    """Best-effort cleanup of a secret whose credential row was never written."""
    try:
        secrets.delete_secret(session, reference, user_id, missing_ok=True)
    except Exception as exc:
        logger.warning(
            "credential_secret_orphaned", ref=reference, user_id=str(user_id), error=str(exc)
        )


def get_credential_by_id(
    *, session: Session, credential_id: uuid.UUID, user_id: uuid.UUID
) -> Credential:
    """The user's credential. Another user's id raises NotFound exactly like a missing one."""
    credential = session.exec(
        select(Credential).where(Credential.id == credential_id, Credential.user_id == user_id)
    ).first()
    if credential is None:
        raise NotFound("credential", credential_id)
    return credential


def list_credentials_for_user(*, session: Session, user_id: uuid.UUID) -> list[Credential]:
    stmt = (
        select(Credential)
        .where(Credential.user_id == user_id)
        .order_by(Credential.name, Credential.id)
    )
    return list(session.exec(stmt))


def delete_credential(*, session: Session, credential_id: uuid.UUID, user_id: uuid.UUID) -> None:
    """Delete the credential and its secret, or neither.

    The row is deleted inside a SAVEPOINT, then the backend secret. If the backend
    fails (SecretError), the savepoint is rolled back: row and secret are both kept and
    the caller may retry. A secret that is already gone does not block the delete.
    For the database backend both deletes are in the caller's transaction anyway; for
    Secrets Manager the secret is gone once this returns, before the caller commits.
    """
    credential = get_credential_by_id(session=session, credential_id=credential_id, user_id=user_id)
    reference = credential.secret_ref
    nested = session.begin_nested()
    try:
        session.delete(credential)
        session.flush()
        deleted = secrets.delete_secret(session, reference, user_id, missing_ok=True)
    except BaseException:
        nested.rollback()
        logger.warning(
            "credential_delete_failed", credential_id=str(credential_id), user_id=str(user_id)
        )
        raise
    nested.commit()
    if not deleted:
        logger.warning(
            "credential_secret_already_gone",
            credential_id=str(credential_id),
            user_id=str(user_id),
        )
    logger.info("credential_deleted", credential_id=str(credential_id), user_id=str(user_id))


def resolve_credential_value(
    *, session: Session, credential_id: uuid.UUID, user_id: uuid.UUID
) -> tuple[Credential, SecretStr]:
    """The credential and its decrypted value, for the worker to hand to one node.

    Only the owner's executions get it: ``user_id`` must be the execution's user.
    """
    credential = get_credential_by_id(session=session, credential_id=credential_id, user_id=user_id)
    value = secrets.retrieve_secret(credential.secret_ref, session, user_id)
    logger.info(
        "credential_resolved",
        credential_id=str(credential_id),
        user_id=str(user_id),
        type=credential.type,
    )
    return credential, SecretStr(value)
