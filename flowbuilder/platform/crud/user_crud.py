"""Users and guests.

A guest is a real user row with ``is_guest=True`` and a session token. Converting a guest
keeps the same row, so its workflows, executions, credentials and credits stay with it.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from datetime import timedelta

import sqlalchemy as sa
from sqlmodel import Session, select

from flowbuilder.platform.crud._sql import conflict_on_duplicate
from flowbuilder.platform.errors import Conflict, NotFound
from flowbuilder.platform.models import GuestSession, User, UserBalance, UserCreate, utcnow
from flowbuilder.platform.settings import get_settings


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_user(*, session: Session, data: UserCreate) -> User:
    """Create a user and its (empty) balance row."""
    user = User.model_validate(data)
    with conflict_on_duplicate(session, f"a user with email {data.email!r} already exists"):
        session.add(user)
    session.add(UserBalance(user_id=user.id, credits=0))
    session.flush()
    return user


def get_user(*, session: Session, user_id: uuid.UUID) -> User:
    user = session.get(User, user_id)
    if user is None:
        raise NotFound("user", user_id)
    return user


def create_guest(*, session: Session, ttl_seconds: int | None = None) -> tuple[User, str]:
    """Create a guest user and return it with its session token.

    The token is returned once and only its SHA-256 hash is stored: a leaked database
    does not hand out live sessions.
    """
    ttl = ttl_seconds if ttl_seconds is not None else get_settings().GUEST_SESSION_TTL_SECONDS
    user = create_user(session=session, data=UserCreate(is_guest=True))
    token = secrets.token_urlsafe(32)
    session.add(
        GuestSession(
            user_id=user.id,
            token_hash=hash_token(token),
            expires_at=utcnow() + timedelta(seconds=ttl),
        )
    )
    session.flush()
    return user, token


def has_active_guest_session(*, session: Session, user_id: uuid.UUID) -> bool:
    """Whether the guest still has an unexpired session (guests have no other login)."""
    found = session.exec(
        select(GuestSession.id)
        .where(GuestSession.user_id == user_id, GuestSession.expires_at > utcnow())
        .limit(1)
    ).first()
    return found is not None


def resolve_guest_token(*, session: Session, token: str) -> User:
    """The guest user of an unexpired session token; NotFound otherwise."""
    stmt = (
        select(User)
        .join(GuestSession, GuestSession.user_id == User.id)
        .where(GuestSession.token_hash == hash_token(token), GuestSession.expires_at > utcnow())
    )
    user = session.exec(stmt).first()
    if user is None:
        raise NotFound("guest session", "<token>")
    return user


def convert_guest(
    *, session: Session, user_id: uuid.UUID, email: str, display_name: str | None = None
) -> User:
    """Turn a guest into an authenticated user, keeping everything it owns."""
    user = get_user(session=session, user_id=user_id)
    if not user.is_guest:
        raise Conflict(f"user {user_id} is not a guest")
    with conflict_on_duplicate(session, f"a user with email {email!r} already exists"):
        user.is_guest = False
        user.email = email
        if display_name is not None:
            user.display_name = display_name
        user.updated_at = utcnow()
    session.execute(sa.delete(GuestSession).where(GuestSession.user_id == user_id))
    session.flush()
    return user
