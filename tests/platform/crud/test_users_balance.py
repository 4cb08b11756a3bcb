"""Users, guests, balances and the ledger, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import uuid
from datetime import timedelta

import pytest
from sqlmodel import Session, select

from flowbuilder.platform.crud import balance_crud, user_crud
from flowbuilder.platform.errors import (
    Conflict,
    InsufficientCredits,
    NotFound,
    RateLimited,
    ValidationFailed,
)
from flowbuilder.platform.models import (
    BalanceTransaction,
    GuestSession,
    LedgerKind,
    RateLimitEntry,
    User,
    UserCreate,
    Workflow,
    utcnow,
)
from flowbuilder.platform.settings import override_settings
from tests.factories import make_user, make_workflow


def test_create_and_get_user(session: Session) -> None:
    user = user_crud.create_user(session=session, data=UserCreate(email="a@example.com"))
    session.commit()
    assert user_crud.get_user(session=session, user_id=user.id).email == "a@example.com"
    assert balance_crud.get_balance(session=session, user_id=user.id) == 0
    with pytest.raises(NotFound):
        user_crud.get_user(session=session, user_id=uuid.uuid4())


def test_duplicate_email_is_conflict_and_keeps_session_usable(session: Session) -> None:
    user_crud.create_user(session=session, data=UserCreate(email="dup@example.com"))
    with pytest.raises(Conflict, match="dup@example.com"):
        user_crud.create_user(session=session, data=UserCreate(email="dup@example.com"))
    # The savepoint rolled back only the duplicate.
    session.commit()
    assert make_user(session).id


def test_guest_token_stored_hashed_and_resolves_until_expiry(session: Session) -> None:
    user, token = user_crud.create_guest(session=session, client_key="203.0.113.7")
    session.commit()
    stored = session.exec(select(GuestSession).where(GuestSession.user_id == user.id)).one()
    assert stored.token_hash != token and token not in stored.token_hash
    assert stored.token_hash == user_crud.hash_token(token)
    assert user_crud.resolve_guest_token(session=session, token=token).id == user.id
    with pytest.raises(NotFound):
        user_crud.resolve_guest_token(session=session, token=token + "x")
    stored.expires_at = utcnow() - timedelta(seconds=1)
    session.add(stored)
    session.commit()
    with pytest.raises(NotFound):
        user_crud.resolve_guest_token(session=session, token=token)


def test_convert_guest_keeps_everything(session: Session) -> None:
    guest = make_user(session, guest=True, credits=7)
    workflow = make_workflow(session, guest)
    session.commit()
    user = user_crud.convert_guest(
        session=session, user_id=guest.id, email="conv@example.com", display_name="C"
    )
    session.commit()
    assert user.id == guest.id and not user.is_guest and user.email == "conv@example.com"
    assert balance_crud.get_balance(session=session, user_id=user.id) == 7
    assert session.get(Workflow, workflow.id).user_id == user.id
    assert session.exec(select(GuestSession).where(GuestSession.user_id == user.id)).all() == []
    with pytest.raises(Conflict):
        user_crud.convert_guest(session=session, user_id=user.id, email="x@example.com")


def test_convert_guest_to_taken_email_is_conflict(session: Session) -> None:
    make_user(session, email="taken@example.com")
    guest = make_user(session, guest=True)
    session.commit()
    with pytest.raises(Conflict, match="taken@example.com"):
        user_crud.convert_guest(session=session, user_id=guest.id, email="taken@example.com")


def test_grant_debit_refund_and_ledger_agree(session: Session) -> None:
    user = make_user(session)
    balance_crud.grant_credits(session=session, user_id=user.id, amount=10, idempotency_key="g1")
    balance_crud.grant_credits(session=session, user_id=user.id, amount=10, idempotency_key="g1")
    row, created = balance_crud.debit_credits(
        session=session, user_id=user.id, amount=3, idempotency_key="d1"
    )
    assert created and row.amount == -3 and row.balance_after == 7
    again, created_again = balance_crud.debit_credits(
        session=session, user_id=user.id, amount=3, idempotency_key="d1"
    )
    assert not created_again and again.id == row.id
    balance_crud.refund_credits(session=session, user_id=user.id, amount=3, idempotency_key="r1")
    session.commit()
    assert balance_crud.get_balance(session=session, user_id=user.id) == 10
    assert balance_crud.ledger_total(session=session, user_id=user.id) == 10
    kinds = sorted(r.kind for r in balance_crud.list_ledger(session=session, user_id=user.id))
    assert kinds == sorted([LedgerKind.GRANT, LedgerKind.DEBIT, LedgerKind.REFUND])


def test_debit_never_goes_negative(session: Session) -> None:
    user = make_user(session, credits=2)
    session.commit()
    with pytest.raises(InsufficientCredits) as info:
        balance_crud.debit_credits(session=session, user_id=user.id, amount=3, idempotency_key="k")
    assert info.value.available == 2
    session.commit()
    assert balance_crud.get_balance(session=session, user_id=user.id) == 2
    assert (
        session.exec(
            select(BalanceTransaction).where(BalanceTransaction.idempotency_key == "k")
        ).first()
        is None
    )


def test_non_positive_amounts_refused(session: Session) -> None:
    user = make_user(session)
    with pytest.raises(ValidationFailed, match="amount"):
        balance_crud.debit_credits(session=session, user_id=user.id, amount=0, idempotency_key="z")
    with pytest.raises(ValidationFailed, match="amount"):
        balance_crud.grant_credits(session=session, user_id=user.id, amount=-5)


def test_idempotency_key_of_another_user_is_conflict(session: Session) -> None:
    a = make_user(session, credits=5)
    b = make_user(session, credits=5)
    balance_crud.debit_credits(session=session, user_id=a.id, amount=1, idempotency_key="shared")
    with pytest.raises(Conflict):
        balance_crud.debit_credits(
            session=session, user_id=b.id, amount=1, idempotency_key="shared"
        )


def test_concurrent_debits_from_threads(engine, session: Session) -> None:
    """Many threads debit one balance: no lost update, never negative, one row per key."""
    user = make_user(session, credits=25)
    session.commit()
    threads_n, per_thread = 8, 10
    errors: list[BaseException] = []
    insufficient = []

    def worker(t: int) -> None:
        for i in range(per_thread):
            # Every key is used by two threads at once: it must debit once.
            key = f"k-{(t // 2)}-{i}"
            try:
                with Session(engine) as s:
                    balance_crud.debit_credits(
                        session=s, user_id=user.id, amount=1, idempotency_key=key
                    )
                    s.commit()
            except InsufficientCredits:
                insufficient.append(key)
            except BaseException as exc:  # noqa: BLE001 - surfaced below
                errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    session.expire_all()
    balance = balance_crud.get_balance(session=session, user_id=user.id)
    debits = session.exec(
        select(BalanceTransaction).where(
            BalanceTransaction.user_id == user.id, BalanceTransaction.kind == LedgerKind.DEBIT
        )
    ).all()
    keys = [d.idempotency_key for d in debits]
    assert len(keys) == len(set(keys))
    assert balance >= 0
    # 40 distinct keys wanted 40 credits; 25 existed: exactly 25 debits went through.
    assert len(debits) == 25 and balance == 0
    assert balance_crud.ledger_total(session=session, user_id=user.id) == balance


def test_racing_debit_with_the_same_key_debits_once(engine, session: Session) -> None:
    """A second transaction debits a key that the first has recorded but not committed:
    it waits for the first, then records nothing and takes nothing."""
    user = make_user(session, credits=5)
    session.commit()
    outcome: dict[str, object] = {}

    def second() -> None:
        try:
            with Session(engine, expire_on_commit=False) as s2:
                outcome["result"] = balance_crud.debit_credits(
                    session=s2, user_id=user.id, amount=2, idempotency_key="race"
                )
                s2.commit()
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            outcome["error"] = exc

    with Session(engine) as s1:
        first, created = balance_crud.debit_credits(
            session=s1, user_id=user.id, amount=2, idempotency_key="race"
        )
        assert created
        thread = threading.Thread(target=second)
        thread.start()
        thread.join(0.3)  # the second one now waits on the balance row (or write lock)
        s1.commit()
    thread.join(30)
    assert "error" not in outcome, outcome.get("error")
    row, created_again = outcome["result"]
    assert created_again is False and row.id == first.id
    session.expire_all()
    assert balance_crud.get_balance(session=session, user_id=user.id) == 3
    assert balance_crud.ledger_total(session=session, user_id=user.id) == 3


def test_debit_is_one_round_trip_on_postgresql(pg_round_trips) -> None:
    """The decrement and its ledger row go to the server together; a redelivered key and
    an insufficient balance change nothing."""
    from flowbuilder.platform import db

    with db.unit_of_work() as s:
        user = make_user(s, credits=10)
    for i in range(6):  # past psycopg's prepare threshold: a steady state is counted
        with db.unit_of_work() as s:
            balance_crud.debit_credits(
                session=s, user_id=user.id, amount=1, idempotency_key=f"warm-{i}"
            )
    with db.unit_of_work() as s:
        # BEGIN (sent by psycopg before the transaction's first statement) and the
        # pool's ping happen here, not in the debit.
        balance_crud.get_balance(session=s, user_id=user.id)
        before = pg_round_trips.round_trips
        row, created = balance_crud.debit_credits(
            session=s, user_id=user.id, amount=1, idempotency_key="counted"
        )
        assert pg_round_trips.round_trips - before == 1
    assert created and row.balance_after == 3
    with db.unit_of_work() as s:
        again, created = balance_crud.debit_credits(
            session=s, user_id=user.id, amount=1, idempotency_key="counted"
        )
        assert not created and again.id == row.id
        with pytest.raises(InsufficientCredits):
            balance_crud.debit_credits(session=s, user_id=user.id, amount=4, idempotency_key="x")
    with db.unit_of_work() as s:
        assert balance_crud.get_balance(session=s, user_id=user.id) == 3
        assert balance_crud.ledger_total(session=s, user_id=user.id) == 3


# --- guest creation limit and unencodable text (issue 11) ------------------------------------


def _guest_count(session: Session) -> int:
    return len(session.exec(select(User).where(User.is_guest)).all())


def test_guest_creation_is_rate_limited_per_client_key(session: Session) -> None:
    """New guests per client key are limited, so the per-guest limit cannot be sidestepped."""
    with override_settings(RATE_LIMIT_GUEST_CREATION=3):
        for _ in range(3):
            user_crud.create_guest(session=session, client_key="198.51.100.4")
            session.commit()
        with pytest.raises(RateLimited, match="retry after"):
            user_crud.create_guest(session=session, client_key="198.51.100.4")
        session.rollback()  # the caller's unit of work: nothing of the refused call stays
        assert _guest_count(session) == 3
        # Another client is not affected.
        user_crud.create_guest(session=session, client_key="198.51.100.5")
        session.commit()
        assert _guest_count(session) == 4
        # The key is hashed: no client address is stored in clear.
        keys = [row.key for row in session.exec(select(RateLimitEntry))]
        assert keys and not any("198.51.100" in key for key in keys)
        with pytest.raises(RateLimited):
            user_crud.create_guest(session=session, client_key="198.51.100.4")
        session.rollback()


@pytest.mark.parametrize("client_key", ["", "   ", "k" * 513, "ip\ud800", None])
def test_guest_creation_needs_a_valid_client_key(session: Session, client_key: object) -> None:
    with pytest.raises(ValidationFailed, match="client_key"):
        user_crud.create_guest(session=session, client_key=client_key)  # type: ignore[arg-type]
    session.rollback()
    assert _guest_count(session) == 0


def test_lone_surrogates_are_validation_errors(session: Session) -> None:
    with pytest.raises(ValidationFailed, match="token: is not valid Unicode"):
        user_crud.resolve_guest_token(session=session, token="\ud800")
    with pytest.raises(ValidationFailed, match="token"):
        user_crud.resolve_guest_token(session=session, token=None)  # type: ignore[arg-type]
    guest = make_user(session, guest=True)
    session.commit()
    with pytest.raises(ValidationFailed, match="email"):
        user_crud.convert_guest(session=session, user_id=guest.id, email="a\udc80@example.com")
    with pytest.raises(ValidationFailed, match="display_name"):
        user_crud.convert_guest(
            session=session, user_id=guest.id, email="ok@example.com", display_name="\ud83d"
        )
    assert session.get(User, guest.id).is_guest
