"""Credentials CRUD on both secret backends: scoping, types, deletion without half states."""

from __future__ import annotations

import socket
import uuid

import boto3
import pytest
import sqlalchemy as sa
from pydantic import SecretStr
from sqlmodel import Session, select

from flowbuilder.platform import secrets
from flowbuilder.platform.crud import credentials_crud
from flowbuilder.platform.errors import Conflict, NotFound, SecretError, ValidationFailed
from flowbuilder.platform.models import Credential, DatabaseSecret
from flowbuilder.platform.settings import override_settings
from tests.factories import make_user


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _create(session: Session, user_id: uuid.UUID, name: str = "api", **kw) -> Credential:
    kw.setdefault("type", "bearer_token")
    kw.setdefault("secret_value", f"tok-{uuid.uuid4().hex}")
    return credentials_crud.create_credential(session=session, user_id=user_id, name=name, **kw)


def test_create_resolve_list_delete(session: Session, backend: str) -> None:
    user = make_user(session)
    credential = credentials_crud.create_credential(
        session=session,
        user_id=user.id,
        name="stripe",
        type="api_key",
        secret_value="sk_test_1234567890",
    )
    session.commit()
    scheme = "db:" if backend == "db" else "aws:arn:"
    assert credential.secret_ref.startswith(scheme)
    assert "sk_test" not in repr(credential) and "sk_test" not in credential.secret_ref

    got = credentials_crud.get_credential_by_id(
        session=session, credential_id=credential.id, user_id=user.id
    )
    assert got.id == credential.id and got.type == "api_key"
    resolved, value = credentials_crud.resolve_credential_value(
        session=session, credential_id=credential.id, user_id=user.id
    )
    assert resolved.id == credential.id
    assert isinstance(value, SecretStr) and value.get_secret_value() == "sk_test_1234567890"
    assert "sk_test" not in repr(value) and "sk_test" not in str(value)

    _create(session, user.id, name="another", type="generic")
    names = [
        c.name for c in credentials_crud.list_credentials_for_user(session=session, user_id=user.id)
    ]
    assert names == ["another", "stripe"]

    credentials_crud.delete_credential(
        session=session, credential_id=credential.id, user_id=user.id
    )
    session.commit()
    with pytest.raises(NotFound, match=f"credential {credential.id} not found"):
        credentials_crud.get_credential_by_id(
            session=session, credential_id=credential.id, user_id=user.id
        )
    # The backend secret is gone too.
    with pytest.raises(NotFound):
        secrets.retrieve_secret(credential.secret_ref, session, user.id)
    if backend != "db":
        client = boto3.client("secretsmanager", region_name="us-east-1", endpoint_url=backend)
        with pytest.raises(client.exceptions.ResourceNotFoundException):
            client.describe_secret(SecretId=credential.secret_ref[4:])


def test_another_users_credential_fails_like_a_missing_one(session: Session, backend: str) -> None:
    owner, other = make_user(session), make_user(session)
    credential = _create(session, owner.id)
    missing = uuid.uuid4()
    calls = [
        credentials_crud.get_credential_by_id,
        credentials_crud.resolve_credential_value,
        credentials_crud.delete_credential,
    ]
    for call in calls:
        with pytest.raises(NotFound) as foreign:
            call(session=session, credential_id=credential.id, user_id=other.id)
        with pytest.raises(NotFound) as absent:
            call(session=session, credential_id=missing, user_id=other.id)
        assert type(foreign.value) is type(absent.value)
        assert str(foreign.value).replace(str(credential.id), "X") == str(absent.value).replace(
            str(missing), "X"
        )
    assert credentials_crud.list_credentials_for_user(session=session, user_id=other.id) == []
    # Still the owner's, intact.
    _, value = credentials_crud.resolve_credential_value(
        session=session, credential_id=credential.id, user_id=owner.id
    )
    assert value.get_secret_value().startswith("tok-")


@pytest.mark.parametrize("type_", sorted(credentials_crud.CREDENTIAL_TYPES))
def test_every_allowed_type(session: Session, type_: str) -> None:
    user = make_user(session)
    assert _create(session, user.id, type=type_).type == type_


def test_unknown_type_is_named(session: Session) -> None:
    user = make_user(session)
    with pytest.raises(ValidationFailed) as info:
        _create(session, user.id, type="oauth_magic")
    assert "unknown credential type 'oauth_magic'" in str(info.value)
    assert "bearer_token" in str(info.value)
    assert session.exec(select(DatabaseSecret)).first() is None


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        ("", "v", "name: must be a non-empty string"),
        ("   ", "v", "name: must be a non-empty string"),
        ("n" * 201, "v", "name: at most 200"),
        ("n", "", "secret_value: must be a non-empty string"),
        ("n", None, "secret_value: must be a non-empty string"),
    ],
)
def test_invalid_input(session: Session, name: str, value: object, problem: str) -> None:
    user = make_user(session)
    with pytest.raises(ValidationFailed, match=problem):
        _create(session, user.id, name=name, secret_value=value)


def test_secretstr_value_is_accepted(session: Session) -> None:
    user = make_user(session)
    credential = _create(session, user.id, secret_value=SecretStr("wrapped-value"))
    _, value = credentials_crud.resolve_credential_value(
        session=session, credential_id=credential.id, user_id=user.id
    )
    assert value.get_secret_value() == "wrapped-value"


def test_duplicate_name_is_a_conflict(session: Session, backend: str) -> None:
    user = make_user(session)
    _create(session, user.id, name="dup")
    session.commit()
    with pytest.raises(Conflict, match="a credential named 'dup' already exists"):
        _create(session, user.id, name="dup")
    # Another user may use the same name; the session is still usable.
    _create(session, make_user(session).id, name="dup")
    session.commit()
    assert session.exec(select(Credential).where(Credential.name == "dup")).all().__len__() == 2
    if backend != "db":
        client = boto3.client("secretsmanager", region_name="us-east-1", endpoint_url=backend)
        assert len(client.list_secrets()["SecretList"]) == 2  # no orphan from the conflict


def test_db_backend_delete_removes_the_secret_row_in_the_same_transaction(
    session: Session,
) -> None:
    user = make_user(session)
    credential = _create(session, user.id)
    session.commit()
    secret_id = uuid.UUID(credential.secret_ref[3:])
    credentials_crud.delete_credential(
        session=session, credential_id=credential.id, user_id=user.id
    )
    assert session.get(DatabaseSecret, secret_id) is None
    session.rollback()  # the caller's unit of work fails: both come back
    session.expire_all()
    assert session.get(Credential, credential.id) is not None
    assert session.get(DatabaseSecret, secret_id) is not None


def test_credential_whose_secret_is_already_gone_can_be_deleted(
    session: Session, backend: str
) -> None:
    user = make_user(session)
    credential = _create(session, user.id)
    secrets.delete_secret(session, credential.secret_ref, user.id)
    session.commit()
    with pytest.raises(NotFound):
        credentials_crud.resolve_credential_value(
            session=session, credential_id=credential.id, user_id=user.id
        )
    credentials_crud.delete_credential(
        session=session, credential_id=credential.id, user_id=user.id
    )
    session.commit()
    assert credentials_crud.list_credentials_for_user(session=session, user_id=user.id) == []


def test_aws_delete_failure_keeps_row_and_secret(session: Session, moto_reset: str) -> None:
    """A real connection error from the backend: nothing is half deleted."""
    with override_settings(USE_DB_SECRETS=False, SECRETS_MANAGER_ENDPOINT_URL=moto_reset):
        user = make_user(session)
        credential = _create(session, user.id, secret_value="survives-the-outage")
        keep = _create(session, user.id, name="unrelated")
        session.commit()
        with (
            override_settings(SECRETS_MANAGER_ENDPOINT_URL=_closed_port_url()),
            pytest.raises(SecretError, match="secrets manager .* failed"),
        ):
            credentials_crud.delete_credential(
                session=session, credential_id=credential.id, user_id=user.id
            )
        # The savepoint was rolled back: the row is still there, in this transaction...
        assert (
            credentials_crud.get_credential_by_id(
                session=session, credential_id=credential.id, user_id=user.id
            ).id
            == credential.id
        )
        session.commit()
        # ...and after the commit, seen from a fresh session.
        with Session(session.get_bind()) as fresh:
            assert fresh.get(Credential, credential.id) is not None
            assert fresh.get(Credential, keep.id) is not None
        # With the endpoint back, the secret is still retrievable.
        _, value = credentials_crud.resolve_credential_value(
            session=session, credential_id=credential.id, user_id=user.id
        )
        assert value.get_secret_value() == "survives-the-outage"
        # And the delete can simply be retried.
        credentials_crud.delete_credential(
            session=session, credential_id=credential.id, user_id=user.id
        )
        session.commit()
        with pytest.raises(NotFound):
            secrets.retrieve_secret(credential.secret_ref, session, user.id)


def test_aws_create_failure_leaves_no_row(session: Session, moto_reset: str) -> None:
    with override_settings(USE_DB_SECRETS=False, SECRETS_MANAGER_ENDPOINT_URL=_closed_port_url()):
        user = make_user(session)
        with pytest.raises(SecretError) as info:
            _create(session, user.id, secret_value="never-stored-value")
        assert "never-stored-value" not in str(info.value)
        session.flush()
        assert credentials_crud.list_credentials_for_user(session=session, user_id=user.id) == []


def test_resolve_wraps_an_undecryptable_db_secret(session: Session) -> None:
    user = make_user(session)
    credential = _create(session, user.id)
    row = session.get(DatabaseSecret, uuid.UUID(credential.secret_ref[3:]))
    row.encrypted_value = row.encrypted_value.replace("v2:", "v9:")
    session.flush()
    with pytest.raises(SecretError, match="unsupported format version"):
        credentials_crud.resolve_credential_value(
            session=session, credential_id=credential.id, user_id=user.id
        )


def test_lost_name_race_leaves_no_orphan_secret(
    session: Session, engine: sa.Engine, backend: str
) -> None:
    """Another transaction takes the name between the check and the insert (PostgreSQL)."""
    if engine.dialect.name != "postgresql":
        pytest.skip("needs two concurrent writers; SQLite serialises them")
    user = make_user(session)
    session.commit()

    done: list[bool] = []

    def take_the_name(sess: Session, *_: object) -> None:
        if not done and any(isinstance(obj, Credential) for obj in sess.new):
            done.append(True)
            with Session(engine) as racer:
                racer.add(
                    Credential(user_id=user.id, name="raced", type="generic", secret_ref="db:x")
                )
                racer.commit()

    sa.event.listen(session, "before_flush", take_the_name)
    with pytest.raises(Conflict, match="a credential named 'raced' already exists"):
        _create(session, user.id, name="raced")
    sa.event.remove(session, "before_flush", take_the_name)
    assert done
    session.commit()
    assert session.exec(select(DatabaseSecret)).all() == []
    if backend != "db":
        client = boto3.client("secretsmanager", region_name="us-east-1", endpoint_url=backend)
        assert client.list_secrets()["SecretList"] == []


@pytest.mark.parametrize(
    ("name", "value", "field"),
    [("api\ud800", "fine-value", "name"), ("api", "tok\udfff", "secret_value")],
)
def test_lone_surrogates_are_validation_errors(
    session: Session, backend: str, name: str, value: str, field: str
) -> None:
    """Issue 11: refused with the project's error before anything is stored."""
    user = make_user(session)
    with pytest.raises(ValidationFailed, match=f"{field}: is not valid Unicode"):
        credentials_crud.create_credential(
            session=session, user_id=user.id, name=name, type="api_key", secret_value=value
        )
    with pytest.raises(ValidationFailed, match="is not valid Unicode"):
        secrets.create_secret(session, name, value, user.id)
    assert credentials_crud.list_credentials_for_user(session=session, user_id=user.id) == []
    with pytest.raises(SecretError, match="malformed secret reference"):
        secrets.retrieve_secret("db:\ud800", session, user.id)


def test_a_run_whose_credential_ciphertext_was_moved_fails_cleanly(
    engine, session: Session
) -> None:
    """Issue 11: Bob's ciphertext copied into Alice's row does not decrypt, and her run
    ends failed with the reason, charged nothing (no endless redelivery)."""
    from flowbuilder.platform import engine as runner
    from flowbuilder.platform.crud import balance_crud
    from flowbuilder.platform.models import ExecutionStatus, WorkflowExecution
    from tests.factories import credential_definition, make_workflow

    alice, bob = make_user(session, credits=10), make_user(session)
    mine = _create(session, alice.id)
    theirs = credentials_crud.create_credential(
        session=session, user_id=bob.id, name="b", type="bearer_token", secret_value="bob-tok-9f"
    )
    definition = credential_definition(mine.id)
    workflow = make_workflow(session, alice, definition=definition, publish=True)
    session.commit()
    alice_row = session.get(DatabaseSecret, uuid.UUID(mine.secret_ref[3:]))
    bob_row = session.get(DatabaseSecret, uuid.UUID(theirs.secret_ref[3:]))
    alice_row.encrypted_value = bob_row.encrypted_value
    session.commit()
    execution = runner.prepare_execution(session=session, workflow_id=workflow.id, user_id=alice.id)
    session.commit()
    result = runner.run_execution(execution.id)
    assert result.outcome == runner.Outcome.FAILED
    session.expire_all()
    row = session.get(WorkflowExecution, execution.id)
    assert row.status == ExecutionStatus.FAILED
    assert "could not be read" in row.error and "failed authentication" in row.error
    assert "bob-tok-9f" not in row.error
    assert balance_crud.get_balance(session=session, user_id=alice.id) == 10


def test_a_run_whose_secrets_backend_is_unreachable_retries_then_completes(
    engine, session: Session, moto_reset: str
) -> None:
    """Secrets Manager down while a run loads its credential: an outage, not the run's
    fault. The run raises TransientError (the task retries it), charges nothing, keeps no
    lease, and completes once the endpoint answers again."""
    from flowbuilder.platform import engine as runner
    from flowbuilder.platform.crud import balance_crud
    from flowbuilder.platform.errors import SecretsUnavailable, TransientError
    from flowbuilder.platform.models import ExecutionStatus, WorkflowExecution
    from tests.factories import make_workflow
    from tests.platform._http_server import local_server

    with (
        local_server() as server,
        override_settings(
            USE_DB_SECRETS=False,
            SECRETS_MANAGER_ENDPOINT_URL=moto_reset,
            OUTBOUND_ALLOWLIST=["127.0.0.1"],
        ),
    ):
        server.route("/ok", body=b'{"ok": true}', headers={"Content-Type": "application/json"})
        user = make_user(session, credits=10)
        credential = _create(session, user.id, secret_value="aws-held-key-7d")
        definition = {
            "version": 1,
            "nodes": [
                {
                    "id": "call",
                    "type": "http_request",
                    "inputs": {"url": server.url("/ok")},
                    "credential_id": str(credential.id),
                }
            ],
            "edges": [],
        }
        workflow = make_workflow(session, user, definition=definition, publish=True)
        execution = runner.prepare_execution(
            session=session, workflow_id=workflow.id, user_id=user.id
        )
        session.commit()
        with override_settings(SECRETS_MANAGER_ENDPOINT_URL=_closed_port_url()):
            with pytest.raises(TransientError) as raised:
                runner.run_execution(execution.id)
            assert isinstance(raised.value, SecretsUnavailable)
        session.expire_all()
        row = session.get(WorkflowExecution, execution.id)
        assert row.status != ExecutionStatus.FAILED and row.lease_owner is None
        assert balance_crud.get_balance(session=session, user_id=user.id) == 10
        assert server.requests == []  # the node never ran without its credential
        result = runner.run_execution(execution.id)
        assert [r.path for r in server.requests] == ["/ok"]
    assert result.outcome == runner.Outcome.COMPLETED, result.error
    assert result.credits > 0  # charged once, for the attempt that ran
    session.commit()  # end this session's read snapshot (SQLite)
    assert balance_crud.get_balance(session=session, user_id=user.id) == 10 - result.credits
