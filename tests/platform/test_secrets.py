"""Secret storage on both backends, user scoping, bad references and key rotation.

The database backend runs on SQLite and PostgreSQL (the ``session`` fixture); the AWS
backend talks to the real Secrets Manager API served by moto's server mode.
"""

from __future__ import annotations

import ast
import contextlib
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import sqlalchemy as sa
from sqlmodel import Session, select

from flowbuilder.platform import crypto, db, db_secrets, secrets
from flowbuilder.platform.crypto import DatabaseSecretManager
from flowbuilder.platform.errors import (
    Conflict,
    NotFound,
    SecretError,
    SecretsUnavailable,
    ValidationFailed,
)
from flowbuilder.platform.models import DatabaseSecret
from flowbuilder.platform.settings import get_settings, override_settings
from tests.factories import make_user

OLD = ("rotation-old-password-1a", "rotation-old-salt-1a")
STRAY = ("stray-password-never-configured", "stray-salt-never-configured")


def _shape(exc: BaseException, reference: str) -> tuple[type, str]:
    """An error with the reference blanked out, to compare message shapes."""
    return type(exc), str(exc).replace(reference, "<ref>")


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def aws(session: Session, moto_reset: str) -> Iterator[str]:
    """USE_DB_SECRETS=false against moto's Secrets Manager (fresh state)."""
    with override_settings(USE_DB_SECRETS=False, SECRETS_MANAGER_ENDPOINT_URL=moto_reset):
        yield moto_reset


def _sm(url: str):
    return boto3.client("secretsmanager", region_name="us-east-1", endpoint_url=url)


# --- database backend --------------------------------------------------------------------------


def test_db_round_trip(session: Session) -> None:
    user = make_user(session)
    ref = secrets.create_secret(session, "github token", "ghp_" + "a" * 36, user.id)
    assert ref.startswith("db:")
    row = session.get(DatabaseSecret, uuid.UUID(ref[3:]))
    assert row is not None and row.user_id == user.id and row.name == "github token"
    assert row.key_id == crypto.current_key_id()
    assert "ghp_" not in row.encrypted_value
    session.commit()
    assert secrets.retrieve_secret(ref, session, user.id) == "ghp_" + "a" * 36
    assert secrets.delete_secret(session, ref, user.id) is True
    session.commit()
    assert session.get(DatabaseSecret, row.id) is None
    with pytest.raises(NotFound):
        secrets.retrieve_secret(ref, session, user.id)


def test_db_another_users_secret_fails_like_a_missing_one(session: Session) -> None:
    owner, other = make_user(session), make_user(session)
    ref = secrets.create_secret(session, "k", "owner-only-value", owner.id)
    missing = f"db:{uuid.uuid4()}"
    with pytest.raises(NotFound) as foreign:
        secrets.retrieve_secret(ref, session, other.id)
    with pytest.raises(NotFound) as absent:
        secrets.retrieve_secret(missing, session, other.id)
    assert _shape(foreign.value, ref) == _shape(absent.value, missing)
    assert str(foreign.value) == f"secret {ref} not found"
    with pytest.raises(NotFound) as foreign_delete:
        secrets.delete_secret(session, ref, other.id)
    assert _shape(foreign_delete.value, ref) == _shape(absent.value, missing)
    assert secrets.delete_secret(session, ref, other.id, missing_ok=True) is False
    assert secrets.retrieve_secret(ref, session, owner.id) == "owner-only-value"


def test_db_duplicate_name_is_a_conflict(session: Session) -> None:
    user = make_user(session)
    secrets.create_secret(session, "same", "v1", user.id)
    with pytest.raises(Conflict, match="a secret named 'same' already exists"):
        secrets.create_secret(session, "same", "v2", user.id)
    # Another user may use the name; the session is still usable.
    secrets.create_secret(session, "same", "v3", make_user(session).id)
    session.commit()


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        ("", "v", "secret_name: must be a non-empty string"),
        ("n" * 201, "v", "secret_name: at most 200"),
        ("n", "", "secret_value: must not be empty"),
        ("n", 123, "secret_value: must be a string, got int"),
    ],
)
def test_create_validates_inputs(session: Session, name, value, problem: str) -> None:
    user = make_user(session)
    with pytest.raises(ValidationFailed, match=problem):
        secrets.create_secret(session, name, value, user.id)


@pytest.mark.parametrize(
    "reference",
    [
        "",
        "db:",
        "db:123",
        "db:not-a-uuid",
        "aws:",
        "aws:arn:aws:s3:::bucket",
        "aws:arn:aws:secretsmanager:us-east-1:123:secret:x",
        "ftp:whatever",
        "sk_live_looks_like_a_value_passed_by_mistake",
        None,
        42,
        b"db:00000000-0000-0000-0000-000000000000",
    ],
)
def test_garbage_references_raise_clear_errors(session: Session, reference: object) -> None:
    user = make_user(session)
    for call in (
        lambda: secrets.retrieve_secret(reference, session, user.id),  # type: ignore[arg-type]
        lambda: secrets.delete_secret(session, reference, user.id),  # type: ignore[arg-type]
    ):
        with pytest.raises(SecretError) as info:
            call()
        assert "malformed secret reference" in str(info.value)
        if isinstance(reference, str) and len(reference) > 8:
            assert reference not in str(info.value)


def test_db_secret_that_cannot_be_decrypted_raises_secret_error(session: Session) -> None:
    user = make_user(session)
    ref = secrets.create_secret(session, "k", "value", user.id)
    row = session.get(DatabaseSecret, uuid.UUID(ref[3:]))
    row.encrypted_value = row.encrypted_value[:-4] + "AAAA"
    session.flush()
    with pytest.raises(SecretError, match="failed authentication"):
        secrets.retrieve_secret(ref, session, user.id)


def test_db_crud_scoping(session: Session) -> None:
    owner, other = make_user(session), make_user(session)
    row = db_secrets.create_db_secret(session=session, user_id=owner.id, name="n", value="v")
    assert db_secrets.get_db_secret(session=session, secret_id=row.id, user_id=owner.id) is row
    with pytest.raises(NotFound, match=f"secret {row.id} not found"):
        db_secrets.get_db_secret(session=session, secret_id=row.id, user_id=other.id)
    with pytest.raises(NotFound):
        db_secrets.delete_db_secret(session=session, secret_id=row.id, user_id=other.id)
    assert (
        db_secrets.read_db_secret_value(session=session, secret_id=row.id, user_id=owner.id) == "v"
    )


# --- AWS backend (moto server) ---------------------------------------------------------------


def test_aws_round_trip(session: Session, aws: str) -> None:
    user = make_user(session)
    ref = secrets.create_secret(session, "My API key (prod)", "aws-stored-value-1", user.id)
    assert ref.startswith("aws:arn:aws:secretsmanager:us-east-1:")
    arn = ref[4:]
    described = _sm(aws).describe_secret(SecretId=arn)
    prefix = f"{get_settings().SECRETS_MANAGER_PREFIX}{user.id}/"
    assert described["Name"].startswith(prefix + "My-API-key--prod--")
    assert {"Key": secrets.USER_TAG, "Value": str(user.id)} in described["Tags"]
    # Nothing went to the database.
    assert session.exec(select(DatabaseSecret)).first() is None
    assert secrets.retrieve_secret(ref, session, user.id) == "aws-stored-value-1"
    assert secrets.delete_secret(session, ref, user.id) is True
    with pytest.raises(_sm(aws).exceptions.ResourceNotFoundException):
        _sm(aws).describe_secret(SecretId=arn)
    with pytest.raises(NotFound, match="not found"):
        secrets.retrieve_secret(ref, session, user.id)
    with pytest.raises(NotFound):
        secrets.delete_secret(session, ref, user.id)
    assert secrets.delete_secret(session, ref, user.id, missing_ok=True) is False


def test_aws_names_get_a_random_suffix(session: Session, aws: str) -> None:
    user = make_user(session)
    first = secrets.create_secret(session, "same", "one", user.id)
    second = secrets.create_secret(session, "same", "two", user.id)
    assert first != second
    assert secrets.retrieve_secret(first, session, user.id) == "one"
    assert secrets.retrieve_secret(second, session, user.id) == "two"


def test_aws_another_users_secret_fails_like_a_missing_one(session: Session, aws: str) -> None:
    owner, other = make_user(session), make_user(session)
    ref = secrets.create_secret(session, "k", "owner-only-aws-value", owner.id)
    region_account = ref.split(":secret:")[0]
    prefix = get_settings().SECRETS_MANAGER_PREFIX
    missing = f"{region_account}:secret:{prefix}{other.id}/ghost-0000-AbCdEf"
    with pytest.raises(NotFound) as foreign:
        secrets.retrieve_secret(ref, session, other.id)
    with pytest.raises(NotFound) as absent:
        secrets.retrieve_secret(missing, session, other.id)
    assert _shape(foreign.value, ref) == _shape(absent.value, missing)
    with pytest.raises(NotFound) as foreign_delete:
        secrets.delete_secret(session, ref, other.id)
    assert _shape(foreign_delete.value, ref) == _shape(absent.value, missing)
    # The owner's secret is untouched.
    assert secrets.retrieve_secret(ref, session, owner.id) == "owner-only-aws-value"


def test_aws_ownership_is_also_checked_by_tag(session: Session, aws: str) -> None:
    """A secret under the user's name prefix but not tagged for them is not theirs."""
    user, other = make_user(session), make_user(session)
    prefix = f"{get_settings().SECRETS_MANAGER_PREFIX}{user.id}/"
    client = _sm(aws)
    mistagged = client.create_secret(
        Name=prefix + "planted",
        SecretString="planted-value",
        Tags=[{"Key": secrets.USER_TAG, "Value": str(other.id)}],
    )["ARN"]
    untagged = client.create_secret(Name=prefix + "untagged", SecretString="x")["ARN"]
    for arn in (mistagged, untagged):
        with pytest.raises(NotFound):
            secrets.retrieve_secret(f"aws:{arn}", session, user.id)
        with pytest.raises(NotFound):
            secrets.delete_secret(session, f"aws:{arn}", user.id)
    assert client.get_secret_value(SecretId=mistagged)["SecretString"] == "planted-value"


def test_aws_unreachable_endpoint_raises_secret_error(session: Session, aws: str) -> None:
    user = make_user(session)
    ref = secrets.create_secret(session, "k", "reachable-value", user.id)
    with override_settings(SECRETS_MANAGER_ENDPOINT_URL=_closed_port_url()):
        with pytest.raises(SecretError) as created:
            secrets.create_secret(session, "k2", "unreachable-value-xyz", user.id)
        assert "create_secret failed: EndpointConnectionError" in str(created.value)
        # An outage, not a refusal: callers may retry it (a worker retries the run).
        assert isinstance(created.value, SecretsUnavailable)
        assert "unreachable-value-xyz" not in repr(created.value)
        assert isinstance(created.value.__cause__, Exception)
        with pytest.raises(SecretError, match="describe_secret failed"):
            secrets.retrieve_secret(ref, session, user.id)
        with pytest.raises(SecretError):
            secrets.delete_secret(session, ref, user.id)
    assert secrets.retrieve_secret(ref, session, user.id) == "reachable-value"


def test_references_keep_working_after_the_backend_setting_changes(
    session: Session, aws: str
) -> None:
    user = make_user(session)
    aws_ref = secrets.create_secret(session, "in-aws", "aws-value", user.id)
    with override_settings(USE_DB_SECRETS=True):
        db_ref = secrets.create_secret(session, "in-db", "db-value", user.id)
        assert secrets.retrieve_secret(aws_ref, session, user.id) == "aws-value"
    assert secrets.retrieve_secret(db_ref, session, user.id) == "db-value"


def test_client_is_cached_per_region_and_endpoint(aws: str) -> None:
    assert secrets.secrets_manager_client() is secrets.secrets_manager_client()
    assert secrets.secrets_manager_client("eu-west-1") is not secrets.secrets_manager_client()
    with override_settings(SECRETS_MANAGER_ENDPOINT_URL=aws + "/"):
        assert secrets.secrets_manager_client() is not secrets._client("us-east-1", aws)


# --- key rotation ------------------------------------------------------------------------------


def _uow(engine: sa.Engine):
    return lambda: db.unit_of_work(engine)


def _seed(session: Session, count: int, manager: DatabaseSecretManager) -> dict[str, str]:
    """``count`` committed secrets (two users) encrypted with ``manager``; ref → value."""
    users = [make_user(session), make_user(session)]
    refs = {}
    for i in range(count):
        user = users[i % 2]
        value = f"value-{i}-{uuid.uuid4().hex}"
        row = db_secrets.create_db_secret(
            session=session, user_id=user.id, name=f"s{i}", value=value, manager=manager
        )
        refs[f"db:{row.id}|{user.id}"] = value
    session.commit()
    return refs


def _check_all(session: Session, refs: dict[str, str]) -> None:
    session.expire_all()
    for key, value in refs.items():
        ref, user_id = key.split("|")
        assert secrets.retrieve_secret(ref, session, uuid.UUID(user_id)) == value


def _key_ids(session: Session) -> dict[uuid.UUID, str]:
    session.expire_all()
    return {row.id: row.key_id for row in session.exec(select(DatabaseSecret))}


@contextlib.contextmanager
def _rotating_settings() -> Iterator[None]:
    """The live process during rotation: new key current, old key accepted."""
    with override_settings(
        SECRET_ENCRYPTION_OLD_PASSWORD=get_settings().SECRET_ENCRYPTION_PASSWORD,
        SECRET_ENCRYPTION_OLD_SALT=get_settings().SECRET_ENCRYPTION_SALT,
        SECRET_ENCRYPTION_PASSWORD="rotation-new-password-2b",
        SECRET_ENCRYPTION_SALT="rotation-new-salt-2b",
    ):
        yield


def test_rotation_from_settings(session: Session, engine: sa.Engine) -> None:
    refs = _seed(session, 7, DatabaseSecretManager())
    old_id = crypto.current_key_id()
    with _rotating_settings():
        new_id = crypto.current_key_id()
        assert new_id != old_id
        # Before rotation the live process reads old rows with the old key.
        _check_all(session, refs)
        session.commit()
        report = secrets.rotate_database_key(_uow(engine), batch_size=3)
        assert report.key_id == new_id
        assert (report.rotated, report.failed, report.batches, report.remaining) == (7, 0, 3, 0)
        assert report.complete
        assert set(_key_ids(session).values()) == {new_id}
        _check_all(session, refs)
        session.commit()
        # Nothing left to do: a rerun changes nothing.
        again = secrets.rotate_database_key(_uow(engine), batch_size=3)
        assert (again.rotated, again.batches, again.remaining) == (0, 0, 0)
        # The old key can now be dropped from the settings.
        with override_settings(
            SECRET_ENCRYPTION_OLD_PASSWORD=None, SECRET_ENCRYPTION_OLD_SALT=None
        ):
            _check_all(session, refs)


def test_rotation_with_explicit_keys(session: Session, engine: sa.Engine) -> None:
    refs = _seed(session, 4, DatabaseSecretManager(*OLD, old_password=""))
    password = get_settings().SECRET_ENCRYPTION_PASSWORD.get_secret_value()
    salt = get_settings().SECRET_ENCRYPTION_SALT.get_secret_value()
    report = secrets.rotate_database_key(_uow(engine), old=OLD, new=(password, salt))
    assert (report.rotated, report.failed, report.batches, report.remaining) == (4, 0, 1, 0)
    assert set(_key_ids(session).values()) == {crypto.current_key_id()}
    _check_all(session, refs)  # no old key configured any more


def test_rotation_reports_and_skips_undecryptable_rows(session: Session, engine: sa.Engine) -> None:
    refs = _seed(session, 5, DatabaseSecretManager())
    user = make_user(session)
    stray = db_secrets.create_db_secret(
        session=session,
        user_id=user.id,
        name="stray",
        value="encrypted with a key nobody has",
        manager=DatabaseSecretManager(*STRAY, old_password=""),
    )
    tampered = db_secrets.create_db_secret(
        session=session, user_id=user.id, name="tampered", value="will be altered"
    )
    tampered.encrypted_value = tampered.encrypted_value[:-6] + "AAAAAA"
    garbage = DatabaseSecret(
        user_id=user.id, name="garbage", encrypted_value="not-a-token", key_id="legacy"
    )
    session.add(garbage)
    session.commit()
    bad = {
        stray.id: stray.encrypted_value,
        tampered.id: tampered.encrypted_value,
        garbage.id: garbage.encrypted_value,
    }
    with _rotating_settings():
        report = secrets.rotate_database_key(_uow(engine), batch_size=2)
        assert report.rotated == 5
        assert report.failed == 3 and set(report.failed_ids) == set(bad)
        assert report.remaining == 3 and not report.complete
        session.expire_all()
        for row_id, ciphertext in bad.items():
            row = session.get(DatabaseSecret, row_id)
            assert row.encrypted_value == ciphertext  # never overwritten
        _check_all(session, refs)
        session.commit()
        # A rerun reports the same rows again and still does not crash.
        again = secrets.rotate_database_key(_uow(engine), batch_size=2)
        assert (again.rotated, again.failed, again.remaining) == (0, 3, 3)


def test_rotation_is_resumable_after_an_interruption(session: Session, engine: sa.Engine) -> None:
    refs = _seed(session, 10, DatabaseSecretManager())
    calls = {"n": 0}

    @contextlib.contextmanager
    def crashing_uow() -> Iterator[Session]:
        calls["n"] += 1
        with db.unit_of_work(engine) as s:
            yield s
            if calls["n"] == 2:
                # The batch did its work but the process dies before the commit.
                raise RuntimeError("simulated crash in batch 2")

    with _rotating_settings():
        new_id = crypto.current_key_id()
        with pytest.raises(RuntimeError, match="simulated crash"):
            secrets.rotate_database_key(crashing_uow, batch_size=4)
        ids = _key_ids(session)
        assert sum(1 for k in ids.values() if k == new_id) == 4  # batch 1 committed only
        # Mid-rotation the live process reads both keys.
        _check_all(session, refs)
        session.commit()
        report = secrets.rotate_database_key(_uow(engine), batch_size=4)
        assert (report.rotated, report.failed, report.remaining) == (6, 0, 0)
        assert set(_key_ids(session).values()) == {new_id}
        _check_all(session, refs)


def test_rotation_interrupted_mid_row(session: Session, engine: sa.Engine) -> None:
    """An exception raised while re-encrypting a row rolls back that batch only."""
    refs = _seed(session, 6, DatabaseSecretManager())
    sessions = {"n": 0}

    class Boom(Exception):
        pass

    @contextlib.contextmanager
    def uow_failing_on_third_row() -> Iterator[Session]:
        sessions["n"] += 1
        with db.unit_of_work(engine) as s:
            if sessions["n"] == 2:
                seen = {"rows": 0}

                @sa.event.listens_for(s, "before_flush")
                def _explode(sess, *_):
                    seen["rows"] += 1
                    if seen["rows"] == 2:
                        raise Boom("disk full")

            yield s

    with _rotating_settings():
        with pytest.raises(Boom):
            secrets.rotate_database_key(uow_failing_on_third_row, batch_size=3)
        assert sum(1 for k in _key_ids(session).values() if k == crypto.current_key_id()) == 3
        session.commit()
        report = secrets.rotate_database_key(_uow(engine), batch_size=3)
        assert (report.rotated, report.remaining) == (3, 0)
        _check_all(session, refs)


def test_rotation_skips_rows_locked_by_another_transaction(
    session: Session, engine: sa.Engine
) -> None:
    if engine.dialect.name != "postgresql":
        pytest.skip("row locks (FOR UPDATE SKIP LOCKED) are a PostgreSQL feature")
    refs = _seed(session, 4, DatabaseSecretManager())
    locked_id = sorted(_key_ids(session))[1]
    session.commit()
    with _rotating_settings():
        with engine.connect() as other:
            tx = other.begin()
            other.execute(
                sa.select(DatabaseSecret.id).where(DatabaseSecret.id == locked_id).with_for_update()
            )
            report = secrets.rotate_database_key(_uow(engine), batch_size=10)
            assert (report.rotated, report.failed, report.remaining) == (3, 0, 1)
            tx.rollback()
        assert _key_ids(session)[locked_id] != crypto.current_key_id()
        session.commit()
        report = secrets.rotate_database_key(_uow(engine), batch_size=10)
        assert (report.rotated, report.remaining) == (1, 0)
        _check_all(session, refs)


def test_rotation_rejects_a_bad_batch_size(engine: sa.Engine) -> None:
    with pytest.raises(ValidationFailed, match="batch_size"):
        secrets.rotate_database_key(_uow(engine), batch_size=0)


# --- binding: a ciphertext belongs to its row and owner (issue 11, item 1) ----------------------


def _row(session: Session, ref: str) -> DatabaseSecret:
    row = session.get(DatabaseSecret, uuid.UUID(ref[3:]))
    assert row is not None
    return row


def _plant_v1(session: Session, user_id: uuid.UUID, name: str, value: str) -> str:
    """A row as written before binding: the unbound v1 format."""
    manager = DatabaseSecretManager()
    row = DatabaseSecret(
        user_id=user_id,
        name=name,
        encrypted_value=manager.encrypt_secret(value),
        key_id=manager.key_id,
    )
    assert row.encrypted_value.startswith("v1:")
    session.add(row)
    session.flush()
    return f"db:{row.id}"


def test_db_writes_are_bound(session: Session) -> None:
    user = make_user(session)
    ref = secrets.create_secret(session, "k", "bound-value", user.id)
    token = _row(session, ref).encrypted_value
    assert crypto.token_version(token) == crypto.FORMAT_VERSION == "v2"
    # Without its binding (or with another one) the token does not decrypt.
    with pytest.raises(SecretError, match="bound"):
        DatabaseSecretManager().decrypt_secret(token)
    other = crypto.Binding(secret_id=uuid.uuid4(), owner_id=user.id)
    with pytest.raises(SecretError, match="failed authentication"):
        DatabaseSecretManager().decrypt_secret(token, bound_to=other)


def test_ciphertext_moved_to_another_users_row_fails(session: Session) -> None:
    """Issue 11: copying Bob's encrypted_value into Alice's row must not give Alice Bob's value."""
    alice, bob = make_user(session), make_user(session)
    alice_ref = secrets.create_secret(session, "token", "alice-token-value", alice.id)
    bob_ref = secrets.create_secret(session, "token", "bob-token-value", bob.id)
    session.commit()
    alice_row, bob_row = _row(session, alice_ref), _row(session, bob_ref)
    alice_row.encrypted_value, alice_row.key_id = bob_row.encrypted_value, bob_row.key_id
    session.commit()
    with pytest.raises(SecretError, match="failed authentication") as info:
        secrets.retrieve_secret(alice_ref, session, alice.id)
    assert "bob-token-value" not in str(info.value)
    assert secrets.retrieve_secret(bob_ref, session, bob.id) == "bob-token-value"


def test_ciphertext_moved_between_rows_of_one_user_fails(session: Session) -> None:
    user = make_user(session)
    first = secrets.create_secret(session, "first", "first-value", user.id)
    second = secrets.create_secret(session, "second", "second-value", user.id)
    _row(session, second).encrypted_value = _row(session, first).encrypted_value
    session.flush()
    with pytest.raises(SecretError, match="failed authentication"):
        secrets.retrieve_secret(second, session, user.id)


def test_ciphertext_moved_with_its_owner_changed_fails(session: Session) -> None:
    """Re-pointing a row at another owner breaks it too (the owner is in the binding)."""
    owner, thief = make_user(session), make_user(session)
    ref = secrets.create_secret(session, "k", "owned-value", owner.id)
    _row(session, ref).user_id = thief.id
    session.flush()
    with pytest.raises(SecretError, match="failed authentication"):
        secrets.retrieve_secret(ref, session, thief.id)


def test_v1_rows_are_read_during_the_transition_and_rotated_to_the_bound_form(
    session: Session, engine: sa.Engine
) -> None:
    users = [make_user(session), make_user(session)]
    refs = {}
    for i in range(5):
        user = users[i % 2]
        refs[f"{_plant_v1(session, user.id, f'legacy{i}', f'legacy-{i}')}|{user.id}"] = (
            f"legacy-{i}"
        )
    bound = secrets.create_secret(session, "new", "new-value", users[0].id)
    refs[f"{bound}|{users[0].id}"] = "new-value"
    session.commit()
    _check_all(session, refs)  # no downtime: both formats are read
    session.commit()
    # Same key, but v1 rows still count as work for rotate-key.
    report = secrets.rotate_database_key(_uow(engine), batch_size=2)
    assert (report.rotated, report.failed, report.remaining) == (5, 0, 0)
    session.expire_all()
    tokens = [row.encrypted_value for row in session.exec(select(DatabaseSecret))]
    assert tokens and all(crypto.token_version(t) == "v2" for t in tokens)
    with override_settings(SECRET_ACCEPT_V1_CIPHERTEXT=False):
        _check_all(session, refs)
    session.commit()
    again = secrets.rotate_database_key(_uow(engine))
    assert (again.rotated, again.remaining) == (0, 0)


def test_rotation_is_resumable_while_binding_v1_rows(session: Session, engine: sa.Engine) -> None:
    user = make_user(session)
    refs = {
        f"{_plant_v1(session, user.id, f'l{i}', f'v-{i}')}|{user.id}": f"v-{i}" for i in range(6)
    }
    session.commit()
    calls = {"n": 0}

    @contextlib.contextmanager
    def crashing_uow() -> Iterator[Session]:
        calls["n"] += 1
        with db.unit_of_work(engine) as s:
            yield s
            if calls["n"] == 2:
                raise RuntimeError("simulated crash in batch 2")

    with pytest.raises(RuntimeError, match="simulated crash"):
        secrets.rotate_database_key(crashing_uow, batch_size=2)
    session.expire_all()
    versions = [
        crypto.token_version(r.encrypted_value) for r in session.exec(select(DatabaseSecret))
    ]
    assert sorted(versions) == ["v1"] * 4 + ["v2"] * 2
    _check_all(session, refs)  # mixed formats, all readable
    session.commit()
    report = secrets.rotate_database_key(_uow(engine), batch_size=2)
    assert (report.rotated, report.remaining) == (4, 0)
    _check_all(session, refs)


def test_v1_refused_once_the_transition_is_over(session: Session, engine: sa.Engine) -> None:
    """With SECRET_ACCEPT_V1_CIPHERTEXT=false an old v1 copy (from a backup) is refused."""
    alice, bob = make_user(session), make_user(session)
    bob_v1 = _row(session, _plant_v1(session, bob.id, "old", "bob-old-token")).encrypted_value
    alice_ref = secrets.create_secret(session, "token", "alice-token", alice.id)
    _row(session, alice_ref).encrypted_value = bob_v1
    session.commit()
    with override_settings(SECRET_ACCEPT_V1_CIPHERTEXT=False):
        with pytest.raises(SecretError, match="SECRET_ACCEPT_V1_CIPHERTEXT=false"):
            secrets.retrieve_secret(alice_ref, session, alice.id)
        session.rollback()
        # rotate-key does not launder it into the bound form either.
        report = secrets.rotate_database_key(_uow(engine))
        assert report.failed == 2 and report.remaining == 2  # Bob's v1 row and the copy
    session.expire_all()
    assert _row(session, alice_ref).encrypted_value == bob_v1


def test_aws_another_users_arn_in_a_credential_row_is_refused(session: Session, aws: str) -> None:
    """The Secrets Manager equivalent of a moved ciphertext: Bob's ARN in Alice's row."""
    from flowbuilder.platform.crud import credentials_crud
    from flowbuilder.platform.models import Credential

    alice, bob = make_user(session), make_user(session)
    cred = credentials_crud.create_credential(
        session=session, user_id=alice.id, name="a", type="bearer_token", secret_value="alice-v"
    )
    bob_ref = secrets.create_secret(session, "b", "bob-aws-token", bob.id)
    row = session.get(Credential, cred.id)
    row.secret_ref = bob_ref
    session.commit()
    with pytest.raises(NotFound):
        credentials_crud.resolve_credential_value(
            session=session, credential_id=cred.id, user_id=alice.id
        )
    # Re-tagging Bob's secret for Alice is not enough: the name names its owner too.
    client = _sm(aws)
    arn = bob_ref.removeprefix("aws:")
    client.tag_resource(SecretId=arn, Tags=[{"Key": secrets.USER_TAG, "Value": str(alice.id)}])
    with pytest.raises(NotFound):
        credentials_crud.resolve_credential_value(
            session=session, credential_id=cred.id, user_id=alice.id
        )
    # Nor is a reference whose text claims Alice's prefix for Bob's secret.
    forged = bob_ref.replace(f"/{bob.id}/", f"/{alice.id}/")
    with pytest.raises(NotFound):
        secrets.retrieve_secret(forged, session, alice.id)


# --- layering: no secrets <-> crud cycle (issue 10) -------------------------------------------


def _imports_of(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-local imports included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_secrets_and_crud_do_not_import_each_other_in_a_cycle() -> None:
    """crud -> secrets -> db_secrets -> crypto, one way: nothing under the secrets side
    imports crud, not even inside a function."""
    import flowbuilder.platform as platform_pkg

    root = Path(platform_pkg.__file__).parent
    secrets_side = [root / "secrets.py", root / "db_secrets.py", root / "crypto.py"]
    secrets_side += [root / "key_material.py", root / "text.py", root / "redaction.py"]
    for path in secrets_side:
        crud_imports = {m for m in _imports_of(path) if m.startswith("flowbuilder.platform.crud")}
        assert crud_imports == set(), f"{path.name} imports {sorted(crud_imports)}"
    assert not (root / "crud" / "db_secret_crud.py").exists()
    # And crud reaches the secrets only through the public module.
    for path in (root / "crud").glob("*.py"):
        imported = _imports_of(path)
        assert "flowbuilder.platform.db_secrets" not in imported, path.name
