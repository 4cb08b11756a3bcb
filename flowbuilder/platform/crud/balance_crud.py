"""Credits: balances and their ledger.

Every change is a BalanceTransaction row, so ``balance == sum(ledger.amount)`` can be
audited. Debits are atomic (a conditional UPDATE that never goes below zero, backed by a
CHECK constraint) and idempotent by key (a UNIQUE ledger key: the same key twice debits
once, also when two workers race with it).
"""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from sqlmodel import Session, select

from flowbuilder.platform.crud._sql import upsert
from flowbuilder.platform.errors import Conflict, InsufficientCredits, ValidationFailed
from flowbuilder.platform.models import BalanceTransaction, LedgerKind, UserBalance, utcnow


def get_balance(*, session: Session, user_id: uuid.UUID) -> int:
    credits = session.exec(
        select(UserBalance.credits).where(UserBalance.user_id == user_id)
    ).first()
    return int(credits or 0)


def _existing(session: Session, key: str, user_id: uuid.UUID) -> BalanceTransaction:
    row = session.exec(
        select(BalanceTransaction).where(BalanceTransaction.idempotency_key == key)
    ).one()
    if row.user_id != user_id:
        raise Conflict(f"idempotency key {key!r} belongs to another user")
    return row


def _record(
    session: Session,
    *,
    user_id: uuid.UUID,
    kind: LedgerKind,
    amount: int,
    balance_after: int,
    key: str,
    execution_id: uuid.UUID | None,
    phase_id: uuid.UUID | None,
    reason: str | None,
) -> BalanceTransaction | None:
    """Insert a ledger row unless the key exists; None means it existed."""
    row_id = uuid.uuid4()
    values = dict(
        id=row_id,
        user_id=user_id,
        kind=kind,
        amount=amount,
        balance_after=balance_after,
        idempotency_key=key,
        execution_id=execution_id,
        phase_id=phase_id,
        reason=reason,
        created_at=utcnow(),
    )
    stmt = (
        upsert(session, BalanceTransaction)
        .values(**values)
        .on_conflict_do_nothing(index_elements=["idempotency_key"])
        .returning(BalanceTransaction.id)
    )
    if session.execute(stmt).first() is None:
        return None
    return BalanceTransaction(**values)


def _add_credits(
    session: Session,
    *,
    user_id: uuid.UUID,
    amount: int,
    kind: LedgerKind,
    idempotency_key: str,
    execution_id: uuid.UUID | None = None,
    phase_id: uuid.UUID | None = None,
    reason: str | None = None,
) -> BalanceTransaction:
    if amount <= 0:
        raise ValidationFailed([f"amount: must be positive, got {amount}"], what=kind.value)
    # Upsert the balance row: a user without one gets it here.
    stmt = (
        upsert(session, UserBalance)
        .values(id=uuid.uuid4(), user_id=user_id, credits=amount, updated_at=utcnow())
        .on_conflict_do_update(
            index_elements=["user_id"],
            set_={"credits": UserBalance.credits + amount, "updated_at": utcnow()},
        )
        .returning(UserBalance.credits)
    )
    balance_after = session.execute(stmt).scalar_one()
    row = _record(
        session,
        user_id=user_id,
        kind=kind,
        amount=amount,
        balance_after=balance_after,
        key=idempotency_key,
        execution_id=execution_id,
        phase_id=phase_id,
        reason=reason,
    )
    if row is None:
        # Already granted under this key: undo the increment we just made.
        session.execute(
            sa.update(UserBalance)
            .where(UserBalance.user_id == user_id)
            .values(credits=UserBalance.credits - amount)
        )
        return _existing(session, idempotency_key, user_id)
    return row


def grant_credits(
    *,
    session: Session,
    user_id: uuid.UUID,
    amount: int,
    idempotency_key: str | None = None,
    reason: str | None = None,
) -> BalanceTransaction:
    """Add credits. With a key, granting twice adds once."""
    return _add_credits(
        session,
        user_id=user_id,
        amount=amount,
        kind=LedgerKind.GRANT,
        idempotency_key=idempotency_key or f"grant:{uuid.uuid4()}",
        reason=reason,
    )


def refund_credits(
    *,
    session: Session,
    user_id: uuid.UUID,
    amount: int,
    idempotency_key: str,
    execution_id: uuid.UUID | None = None,
    phase_id: uuid.UUID | None = None,
    reason: str | None = None,
) -> BalanceTransaction:
    """Give back credits, once per key."""
    return _add_credits(
        session,
        user_id=user_id,
        amount=amount,
        kind=LedgerKind.REFUND,
        idempotency_key=idempotency_key,
        execution_id=execution_id,
        phase_id=phase_id,
        reason=reason,
    )


def debit_credits(
    *,
    session: Session,
    user_id: uuid.UUID,
    amount: int,
    idempotency_key: str,
    execution_id: uuid.UUID | None = None,
    phase_id: uuid.UUID | None = None,
    reason: str | None = None,
) -> tuple[BalanceTransaction, bool]:
    """Debit ``amount`` credits once per ``idempotency_key``.

    Returns ``(ledger_row, created)``: ``created`` is False when the key was already
    debited, in which case nothing changes. Raises InsufficientCredits, changing nothing,
    when the balance does not cover the amount.

    Two round trips on the common path. The conditional UPDATE takes the balance row's
    lock, so a racing debit with the same key waits for ours to commit, then finds the
    key taken and undoes its own decrement in the same transaction.
    """
    if amount <= 0:
        raise ValidationFailed([f"amount: must be positive, got {amount}"], what="debit")
    balance_after = session.execute(
        sa.update(UserBalance)
        .where(UserBalance.user_id == user_id, UserBalance.credits >= amount)
        .values(credits=UserBalance.credits - amount, updated_at=utcnow())
        .returning(UserBalance.credits)
    ).scalar_one_or_none()
    if balance_after is None:
        # Insufficient, unless this key was already debited (a redelivered phase).
        existing = session.exec(
            select(BalanceTransaction).where(BalanceTransaction.idempotency_key == idempotency_key)
        ).first()
        if existing is not None and existing.user_id == user_id:
            return existing, False
        raise InsufficientCredits(user_id, amount, get_balance(session=session, user_id=user_id))
    row = _record(
        session,
        user_id=user_id,
        kind=LedgerKind.DEBIT,
        amount=-amount,
        balance_after=balance_after,
        key=idempotency_key,
        execution_id=execution_id,
        phase_id=phase_id,
        reason=reason,
    )
    if row is None:
        session.execute(
            sa.update(UserBalance)
            .where(UserBalance.user_id == user_id)
            .values(credits=UserBalance.credits + amount)
        )
        return _existing(session, idempotency_key, user_id), False
    return row, True


def list_ledger(
    *, session: Session, user_id: uuid.UUID, limit: int = 100, offset: int = 0
) -> list[BalanceTransaction]:
    stmt = (
        select(BalanceTransaction)
        .where(BalanceTransaction.user_id == user_id)
        .order_by(BalanceTransaction.created_at.desc(), BalanceTransaction.id)
        .limit(limit)
        .offset(offset)
    )
    return list(session.exec(stmt))


def ledger_total(*, session: Session, user_id: uuid.UUID) -> int:
    total = session.exec(
        select(sa.func.coalesce(sa.func.sum(BalanceTransaction.amount), 0)).where(
            BalanceTransaction.user_id == user_id
        )
    ).one()
    return int(total)
