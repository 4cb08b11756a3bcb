"""Credits: balances and their ledger.

Every change is a BalanceTransaction row, so ``balance == sum(ledger.amount)`` can be
audited. Debits are atomic (a conditional UPDATE that never goes below zero, backed by a
CHECK constraint, and the ledger row in the same statement on PostgreSQL) and idempotent
by key (a UNIQUE ledger key: the same key twice debits once, also when two workers race
with it).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlmodel import Session, select

from flowbuilder.platform.crud._sql import send_returning, upsert
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


# --- the debit: one statement on PostgreSQL -------------------------------------------
#
# Built once at import: a phase debits on every start, and rebuilding (and re-compiling)
# the statements on each call was a third of a phase's database time.
_BAL, _LED = UserBalance.__table__, BalanceTransaction.__table__
_DEBIT_PARAMS = (
    sa.bindparam("id", type_=_LED.c.id.type),
    sa.bindparam("user_id", type_=_LED.c.user_id.type),
    sa.bindparam("amount", type_=sa.Integer()),
    sa.bindparam("neg_amount", type_=sa.Integer()),
    sa.bindparam("key", type_=_LED.c.idempotency_key.type),
    sa.bindparam("execution_id", type_=_LED.c.execution_id.type),
    sa.bindparam("phase_id", type_=_LED.c.phase_id.type),
    sa.bindparam("reason", type_=_LED.c.reason.type),
    sa.bindparam("now", type_=_LED.c.created_at.type),
)
_LEDGER_COLUMNS = (
    "id, user_id, kind, amount, balance_after, idempotency_key, execution_id, phase_id, "
    "reason, created_at"
)

# PostgreSQL: the conditional decrement and the ledger row in one statement (one round
# trip). The UPDATE takes the balance row's lock and skips a key already recorded; the
# INSERT records the row from the UPDATE's result. ``debited`` without ``recorded`` means
# a racing transaction recorded the same key after this statement's snapshot was taken
# (its commit released the row lock we waited on): the caller undoes the decrement.
_PG_DEBIT_CTE = f"""
WITH upd AS (
    UPDATE user_balance SET credits = credits - :amount, updated_at = :now
    WHERE user_id = :user_id AND credits >= :amount
      AND NOT EXISTS (SELECT 1 FROM balance_transaction WHERE idempotency_key = :key)
    RETURNING credits
), ins AS (
    INSERT INTO balance_transaction ({_LEDGER_COLUMNS})
    SELECT :id, :user_id, 'debit', :neg_amount, upd.credits, :key, :execution_id,
           :phase_id, :reason, :now
    FROM upd
    ON CONFLICT (idempotency_key) DO NOTHING
    RETURNING balance_after
)"""
_PG_DEBIT = (
    sa.text(
        _PG_DEBIT_CTE
        + """
SELECT (SELECT credits FROM upd) AS debited, (SELECT balance_after FROM ins) AS recorded
"""
    )
    .bindparams(*_DEBIT_PARAMS)
    .columns(debited=sa.Integer(), recorded=sa.Integer())
)
# The same debit for a transaction sent whole, COMMIT included, before any answer is read
# (see engine.run): anything but "debited now, and recorded" fails the statement, which
# aborts the transaction (division by zero, at run time: the count is not a constant the
# planner could fold). The engine then rolls back and takes the path that reads answers.
_PG_DEBIT_OR_ABORT = (
    sa.text(_PG_DEBIT_CTE + "\nSELECT 1 / (SELECT count(*) FROM ins)::int AS debited\n")
    .bindparams(*_DEBIT_PARAMS)
    .columns(debited=sa.Integer())
)

# SQLite has no data-modifying CTE. Its writers are serialised (the engine begins
# transactions IMMEDIATE, and any write statement takes the database's write lock until
# commit), so the ledger row first, with the balance it leaves, then the decrement under
# the same lock, is just as atomic: nobody can change the balance in between.
_SQLITE_RECORD = (
    sa.text(
        f"""
INSERT INTO balance_transaction ({_LEDGER_COLUMNS})
SELECT :id, :user_id, 'debit', :neg_amount, credits - :amount, :key, :execution_id,
       :phase_id, :reason, :now
FROM user_balance WHERE user_id = :user_id AND credits >= :amount
ON CONFLICT (idempotency_key) DO NOTHING
RETURNING balance_after
"""
    )
    .bindparams(*_DEBIT_PARAMS)
    .columns(balance_after=sa.Integer())
)
_SQLITE_DECREMENT = (
    sa.update(_BAL)
    .where(_BAL.c.user_id == sa.bindparam("b_user_id"), _BAL.c.credits >= sa.bindparam("b_amount"))
    .values(credits=_BAL.c.credits - sa.bindparam("b_amount"), updated_at=sa.bindparam("b_now"))
)
_UNDO_DECREMENT = (
    sa.update(_BAL)
    .where(_BAL.c.user_id == sa.bindparam("b_user_id"))
    .values(credits=_BAL.c.credits + sa.bindparam("b_amount"))
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
    when the balance does not cover the amount; Conflict when the key is another user's.

    One round trip on the common path on PostgreSQL (two statements on SQLite, where a
    statement is a function call, not a round trip). The balance never goes below zero
    (a conditional decrement, backed by a CHECK constraint), the key is recorded at most
    once (UNIQUE), and the balance always equals the ledger's sum: a decrement without its
    ledger row is undone in the same transaction.
    """
    row_id, now, balance_after = _debit(
        session, user_id, amount, idempotency_key, execution_id, phase_id, reason
    )
    if balance_after is not None:
        row = BalanceTransaction(
            id=row_id,
            user_id=user_id,
            kind=LedgerKind.DEBIT,
            amount=-amount,
            balance_after=balance_after,
            idempotency_key=idempotency_key,
            execution_id=execution_id,
            phase_id=phase_id,
            reason=reason,
            created_at=now,
        )
        return row, True
    return _already_debited(session, user_id, amount, idempotency_key), False


def debit_once(
    *,
    session: Session,
    user_id: uuid.UUID,
    amount: int,
    idempotency_key: str,
    execution_id: uuid.UUID | None = None,
    phase_id: uuid.UUID | None = None,
    reason: str | None = None,
) -> bool:
    """:func:`debit_credits` for the engine's hot path: True when debited now, False when
    the key was debited already. Same statement, same guarantees and errors; it only does
    not build the ledger row object (a measurable part of a phase's cost)."""
    _row_id, _now, balance_after = _debit(
        session, user_id, amount, idempotency_key, execution_id, phase_id, reason
    )
    return _debited_now(session, user_id, amount, idempotency_key, balance_after)


def _debited_now(
    session: Session, user_id: uuid.UUID, amount: int, key: str, balance_after: int | None
) -> bool:
    if balance_after is not None:
        return True
    _already_debited(session, user_id, amount, key)
    return False


def send_debit_once(
    *,
    connection: Connection,
    user_id: uuid.UUID,
    amount: int,
    idempotency_key: str,
    execution_id: uuid.UUID | None = None,
    phase_id: uuid.UUID | None = None,
    reason: str | None = None,
) -> Callable[[Session], bool]:
    """:func:`debit_once` queued in a batch (PostgreSQL on psycopg, see
    ``_sql.send_returning``): the same statement. Returns the function that finishes it
    once the batch is answered, as debit_once does: True when debited now, False when the
    key was debited already, InsufficientCredits when the balance is short."""
    _row_id, _now, params, undo = _debit_params(
        user_id, amount, idempotency_key, execution_id, phase_id, reason
    )
    cursor = send_returning(connection, _PG_DEBIT, params)

    def finish(session: Session) -> bool:
        debited, recorded = cursor.fetchone()
        recorded = _undo_unrecorded(session.connection(), undo, debited, recorded)
        return _debited_now(session, user_id, amount, idempotency_key, recorded)

    return finish


def send_debit_or_abort(
    *,
    connection: Connection,
    user_id: uuid.UUID,
    amount: int,
    idempotency_key: str,
    execution_id: uuid.UUID | None = None,
    phase_id: uuid.UUID | None = None,
    reason: str | None = None,
) -> None:
    """:func:`send_debit_once` for a batch that commits without reading answers: the
    debit happens now and is recorded, or the statement fails and takes the whole
    transaction with it (the key already debited, the balance short, a racing debit of
    the same key). Nothing to read back."""
    _row_id, _now, params, _undo = _debit_params(
        user_id, amount, idempotency_key, execution_id, phase_id, reason
    )
    send_returning(connection, _PG_DEBIT_OR_ABORT, params)


def _debit_params(
    user_id: uuid.UUID,
    amount: int,
    idempotency_key: str,
    execution_id: uuid.UUID | None,
    phase_id: uuid.UUID | None,
    reason: str | None,
) -> tuple[uuid.UUID, datetime, dict[str, Any], dict[str, Any]]:
    if amount <= 0:
        raise ValidationFailed([f"amount: must be positive, got {amount}"], what="debit")
    row_id, now = uuid.uuid4(), utcnow()
    params = {
        "id": row_id,
        "user_id": user_id,
        "amount": amount,
        "neg_amount": -amount,
        "key": idempotency_key,
        "execution_id": execution_id,
        "phase_id": phase_id,
        "reason": reason,
        "now": now,
    }
    undo = {"b_user_id": user_id, "b_amount": amount, "b_now": now}
    return row_id, now, params, undo


def _undo_unrecorded(
    conn: Connection, undo: dict[str, Any], debited: int | None, recorded: int | None
) -> int | None:
    if debited is not None and recorded is None:
        # The key was recorded by a racing transaction: give the credits back.
        conn.execute(_UNDO_DECREMENT, undo)
    return recorded


def _debit(
    session: Session,
    user_id: uuid.UUID,
    amount: int,
    idempotency_key: str,
    execution_id: uuid.UUID | None,
    phase_id: uuid.UUID | None,
    reason: str | None,
) -> tuple[uuid.UUID, datetime, int | None]:
    """The debit's statements: ``(ledger row id, time, balance after)``; the balance is
    None when nothing was recorded (the key exists, or the balance is short)."""
    row_id, now, params, undo = _debit_params(
        user_id, amount, idempotency_key, execution_id, phase_id, reason
    )
    # Core statements on the session's connection (the ORM's execute path adds nothing
    # here); what the session holds pending (a new balance row) is flushed first.
    session.flush()
    conn = session.connection()
    if conn.dialect.name == "postgresql":
        debited, recorded = conn.execute(_PG_DEBIT, params).one()
        return row_id, now, _undo_unrecorded(conn, undo, debited, recorded)
    balance_after = conn.execute(_SQLITE_RECORD, params).scalar_one_or_none()
    if balance_after is not None and conn.execute(_SQLITE_DECREMENT, undo).rowcount != 1:
        raise RuntimeError("debit: the balance changed under the write lock")  # pragma: no cover
    return row_id, now, balance_after


def _already_debited(
    session: Session, user_id: uuid.UUID, amount: int, idempotency_key: str
) -> BalanceTransaction:
    """Nothing was recorded: the key exists (a redelivered phase, or a racing debit), or
    the balance does not cover the amount (InsufficientCredits)."""
    existing = session.exec(
        select(BalanceTransaction).where(BalanceTransaction.idempotency_key == idempotency_key)
    ).first()
    if existing is not None:
        if existing.user_id != user_id:
            raise Conflict(f"idempotency key {idempotency_key!r} belongs to another user")
        return existing
    raise InsufficientCredits(user_id, amount, get_balance(session=session, user_id=user_id))


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
