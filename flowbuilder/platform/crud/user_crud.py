"""Users and guests.

A guest is a real user row with ``is_guest=True`` and a session token. Converting a guest
keeps the same row, so its workflows, executions, credentials and credits stay with it.

Guest creation is rate limited per client key (RATE_LIMIT_GUEST_CREATION per
RATE_LIMIT_GUEST_CREATION_WINDOW_SECONDS): the API passes what identifies the caller, for
example the client IP address. Without it, the per-guest enqueue limit would be sidestepped
by creating a new guest for every run.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from datetime import timedelta

import sqlalchemy as sa
from sqlmodel import Session, select

from flowbuilder.platform.crud import rate_limit_crud
from flowbuilder.platform.crud._sql import conflict_on_duplicate
from flowbuilder.platform.errors import Conflict, NotFound, ValidationFailed
from flowbuilder.platform.models import GuestSession, User, UserBalance, UserCreate, utcnow
from flowbuilder.platform.settings import get_settings
from flowbuilder.platform.text import require_encodable

MAX_CLIENT_KEY_CHARS = 512


def hash_token(token: str) -> str:
    require_encodable("guest token", token=token)
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


def get_user_and_credits(*, session: Session, user_id: uuid.UUID) -> tuple[User, int]:
    """The user and their balance (0 without a balance row), in one query."""
    row = session.exec(
        select(User, UserBalance.credits)
        .outerjoin(UserBalance, UserBalance.user_id == User.id)
        .where(User.id == user_id)
    ).first()
    if row is None:
        raise NotFound("user", user_id)
    return row[0], int(row[1] or 0)


def guest_creation_key(client_key: str) -> str:
    """The rate-limit key for guest creation by ``client_key`` (hashed: keys are bounded
    in length and no client address is stored in clear)."""
    if not isinstance(client_key, str) or not client_key.strip():
        raise ValidationFailed(["client_key: must be a non-empty string"], what="guest")
    if len(client_key) > MAX_CLIENT_KEY_CHARS:
        raise ValidationFailed(
            [f"client_key: at most {MAX_CLIENT_KEY_CHARS} characters"], what="guest"
        )
    require_encodable("guest", client_key=client_key)
    return "guest-create:" + hashlib.sha256(client_key.encode("utf-8")).hexdigest()[:40]


def create_guest(
    *, session: Session, client_key: str, ttl_seconds: int | None = None
) -> tuple[User, str]:
    """Create a guest user and return it with its session token.

    ``client_key`` identifies the caller (the API passes the client IP address, say):
    more than RATE_LIMIT_GUEST_CREATION guests per key in a window raises ``RateLimited``
    and creates nothing (the refused hit is undone with the caller's transaction).

    The token is returned once and only its SHA-256 hash is stored: a leaked database
    does not hand out live sessions.
    """
    settings = get_settings()
    rate_limit_crud.hit(
        session=session,
        key=guest_creation_key(client_key),
        limit=settings.RATE_LIMIT_GUEST_CREATION,
        window_seconds=settings.RATE_LIMIT_GUEST_CREATION_WINDOW_SECONDS,
    )
    ttl = ttl_seconds if ttl_seconds is not None else settings.GUEST_SESSION_TTL_SECONDS
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
    """The guest user of an unexpired session token; NotFound otherwise.

    A token that is not text, or holds a lone surrogate, raises ValidationFailed.
    """
    if not isinstance(token, str):
        raise ValidationFailed(["token: must be a string"], what="guest token")
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
    require_encodable("user", email=email, display_name=display_name)
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
