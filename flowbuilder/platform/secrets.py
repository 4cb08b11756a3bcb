"""Secret storage: the database (encrypted) or AWS Secrets Manager, behind opaque references.

``create_secret`` stores a value and returns a reference; only the reference is kept
anywhere else (``Credential.secret_ref``). References name their backend, so a secret
stays readable after USE_DB_SECRETS changes:

- ``db:<DatabaseSecret uuid>``: AES-256-GCM ciphertext in ``database_secret``, bound to
  its row id and owner (:mod:`flowbuilder.platform.db_secrets`), so a ciphertext copied
  into another row does not decrypt.
- ``aws:<secret ARN>``: a Secrets Manager secret named
  ``{SECRETS_MANAGER_PREFIX}{user_id}/{name}-{random}`` and tagged with the user id. On
  every read and delete both are verified: the name (from the reference and as Secrets
  Manager reports it) must be under the user's prefix and the tag must name the user, so
  another user's ARN put into a credential row is refused like a missing secret.

Every read and delete is scoped by user id. Another user's reference fails exactly like
a missing one (``NotFound("secret", reference)``); a reference that is not even shaped
like one raises ``SecretError`` without echoing it (it might be a value passed by mistake).
No message, log line or exception cause ever carries a secret value.

:func:`rotate_database_key` re-encrypts database secrets from the old key to the new one.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import secrets as _random
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import boto3
import structlog
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ParamValidationError,
    ReadTimeoutError,
)
from pydantic import SecretStr
from sqlmodel import Session

from flowbuilder.platform import db_secrets
from flowbuilder.platform.crypto import DatabaseSecretManager
from flowbuilder.platform.errors import NotFound, SecretError, SecretsUnavailable, ValidationFailed
from flowbuilder.platform.settings import get_settings
from flowbuilder.platform.text import unencodable_problem

logger = structlog.get_logger(__name__)

__all__ = [
    "RotationReport",
    "create_secret",
    "delete_secret",
    "retrieve_secret",
    "rotate_database_key",
    "secrets_manager_client",
]

DB_SCHEME = "db"
AWS_SCHEME = "aws"
USER_TAG = "flowbuilder:user_id"
MAX_NAME_CHARS = 200

# arn:<partition>:secretsmanager:<region>:<account>:secret:<name>
_ARN_RE = re.compile(
    r"arn:(aws[a-z-]*):secretsmanager:([a-z0-9-]{1,32}):(\d{12}):secret:([A-Za-z0-9/_+=.@-]{1,600})"
)
_AWS_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_+=.@-]")


# --- botocore debug logging ---------------------------------------------------------------
# At DEBUG, botocore logs request parameters and response bodies, which for Secrets
# Manager include SecretString. These filters withhold such records at the source.


class _WithholdSecretPayloads(logging.Filter):
    _MARKERS = ("SecretString", "SecretBinary")

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # a record that cannot be formatted is not our concern
            return True
        if any(marker in text for marker in self._MARKERS):
            record.msg = "botocore debug record withheld: it carries a secret payload"
            record.args = ()
        return True


_withhold = _WithholdSecretPayloads()
for _name in ("botocore.endpoint", "botocore.parsers", "botocore.awsrequest"):
    _log = logging.getLogger(_name)
    if not any(isinstance(f, _WithholdSecretPayloads) for f in _log.filters):
        _log.addFilter(_withhold)


# --- references -----------------------------------------------------------------------------


def _malformed() -> SecretError:
    return SecretError(
        "malformed secret reference: expected 'db:<uuid>' or 'aws:<secrets manager ARN>'"
    )


@dataclass(frozen=True, slots=True)
class _Ref:
    scheme: str
    db_id: uuid.UUID | None = None
    arn: str | None = None
    region: str | None = None
    name: str | None = None


def _parse_reference(reference: object) -> _Ref:
    if not isinstance(reference, str):
        raise _malformed()
    scheme, sep, rest = reference.partition(":")
    if not sep:
        raise _malformed()
    if scheme == DB_SCHEME:
        try:
            return _Ref(DB_SCHEME, db_id=uuid.UUID(rest))
        except ValueError:
            raise _malformed() from None
    if scheme == AWS_SCHEME:
        match = _ARN_RE.fullmatch(rest)
        if match is None:
            raise _malformed()
        return _Ref(AWS_SCHEME, arn=rest, region=match.group(2), name=match.group(4))
    raise _malformed()


def _user_prefix(user_id: uuid.UUID) -> str:
    return f"{get_settings().SECRETS_MANAGER_PREFIX}{user_id}/"


def _check_inputs(secret_name: object, secret_value: object) -> str:
    problems = []
    if not isinstance(secret_name, str) or not secret_name.strip():
        problems.append("secret_name: must be a non-empty string")
    elif problem := unencodable_problem("secret_name", secret_name):
        problems.append(problem)
    elif len(secret_name) > MAX_NAME_CHARS:
        problems.append(f"secret_name: at most {MAX_NAME_CHARS} characters")
    if isinstance(secret_value, SecretStr):
        secret_value = secret_value.get_secret_value()
    if not isinstance(secret_value, str):
        problems.append(f"secret_value: must be a string, got {type(secret_value).__name__}")
    elif not secret_value:
        problems.append("secret_value: must not be empty")
    elif problem := unencodable_problem("secret_value", secret_value):
        problems.append(problem)
    if problems:
        raise ValidationFailed(problems, what="secret")
    assert isinstance(secret_value, str)
    return secret_value


# --- AWS Secrets Manager ---------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _client(region: str, endpoint_url: str | None) -> Any:
    config = Config(
        retries={"max_attempts": 3, "mode": "standard"},
        connect_timeout=5,
        read_timeout=15,
    )
    return boto3.session.Session().client(
        "secretsmanager", region_name=region, endpoint_url=endpoint_url, config=config
    )


def secrets_manager_client(region: str | None = None) -> Any:
    """The boto3 Secrets Manager client for (region, SECRETS_MANAGER_ENDPOINT_URL), cached."""
    settings = get_settings()
    return _client(region or settings.AWS_REGION, settings.SECRETS_MANAGER_ENDPOINT_URL)


# Answers that say "not now" rather than "no": throttling and the service's own faults.
_RETRYABLE_CODES = frozenset(
    {
        "ThrottlingException",
        "Throttling",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "InternalServiceError",
        "InternalFailure",
        "ServiceUnavailable",
        "ServiceUnavailableException",
    }
)


_UNREACHABLE = (
    EndpointConnectionError,
    ConnectionClosedError,
    ConnectTimeoutError,
    ReadTimeoutError,
)


def _aws_error(operation: str, exc: Exception) -> SecretError:
    """SecretError naming the operation and the error code, never a value. An outage or
    throttling is SecretsUnavailable (also a TransientError): a run retries it later."""
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "Unknown")
        kind = SecretsUnavailable if code in _RETRYABLE_CODES else SecretError
        return kind(f"secrets manager {operation} failed: {code}")
    kind = SecretsUnavailable if isinstance(exc, _UNREACHABLE) else SecretError
    return kind(f"secrets manager {operation} failed: {type(exc).__name__}")


def _is_not_found(exc: Exception) -> bool:
    if not isinstance(exc, ClientError):
        return False
    code = exc.response.get("Error", {}).get("Code", "")
    # A secret scheduled for deletion answers InvalidRequestException on reads.
    return code in ("ResourceNotFoundException", "InvalidRequestException")


def _aws_name(secret_name: str, user_id: uuid.UUID) -> str:
    safe = _AWS_NAME_UNSAFE.sub("-", secret_name.strip())[:MAX_NAME_CHARS]
    return f"{_user_prefix(user_id)}{safe}-{_random.token_hex(4)}"


def _create_aws(secret_name: str, value: str, user_id: uuid.UUID) -> str:
    name = _aws_name(secret_name, user_id)
    try:
        response = secrets_manager_client().create_secret(
            Name=name,
            SecretString=value,
            Tags=[{"Key": USER_TAG, "Value": str(user_id)}],
        )
    except ParamValidationError as exc:
        # Its message may quote parameter values: never chain it.
        raise SecretError(
            f"secrets manager create_secret rejected its parameters ({type(exc).__name__})"
        ) from None
    except (ClientError, BotoCoreError) as exc:
        raise _aws_error("create_secret", exc) from exc
    return f"{AWS_SCHEME}:{response['ARN']}"


def _owned_aws_secret(ref: _Ref, reference: str, user_id: uuid.UUID) -> tuple[Any, str]:
    """Check that the ARN names this user's secret, then confirm with its name and tag.

    Returns the client and the secret's full ARN as Secrets Manager reports it; later
    calls use that exact ARN, never the reference's text again.
    """
    assert ref.name is not None and ref.arn is not None
    if not ref.name.startswith(_user_prefix(user_id)):
        raise NotFound("secret", reference)
    client = secrets_manager_client(ref.region)
    try:
        described = client.describe_secret(SecretId=ref.arn)
    except (ClientError, BotoCoreError) as exc:
        if _is_not_found(exc):
            raise NotFound("secret", reference) from None
        raise _aws_error("describe_secret", exc) from exc
    tags = {t.get("Key"): t.get("Value") for t in described.get("Tags") or []}
    # The name as Secrets Manager knows it, not only as the reference spells it: a
    # partial ARN may resolve to a secret other than the one its text suggests.
    actual_name = described.get("Name")
    if (
        tags.get(USER_TAG) != str(user_id)
        or not isinstance(actual_name, str)
        or not actual_name.startswith(_user_prefix(user_id))
        or described.get("DeletedDate") is not None
    ):
        logger.warning("secret_owner_mismatch", ref=reference, user_id=str(user_id))
        raise NotFound("secret", reference)
    arn = described.get("ARN")
    if not isinstance(arn, str) or not arn:
        raise SecretError("secrets manager describe_secret returned no ARN")
    return client, arn


def _retrieve_aws(ref: _Ref, reference: str, user_id: uuid.UUID) -> str:
    client, arn = _owned_aws_secret(ref, reference, user_id)
    try:
        response = client.get_secret_value(SecretId=arn)
    except (ClientError, BotoCoreError) as exc:
        if _is_not_found(exc):
            raise NotFound("secret", reference) from None
        raise _aws_error("get_secret_value", exc) from exc
    if response.get("ARN") != arn:
        # The value must come from the very secret whose owner was just verified.
        logger.warning("secret_owner_mismatch", ref=reference, user_id=str(user_id))
        raise NotFound("secret", reference)
    value = response.get("SecretString")
    if value is None:
        raise SecretError(f"secret {reference} holds binary data, not text")
    return value


def _delete_aws(ref: _Ref, reference: str, user_id: uuid.UUID) -> None:
    client, arn = _owned_aws_secret(ref, reference, user_id)
    try:
        client.delete_secret(SecretId=arn, ForceDeleteWithoutRecovery=True)
    except (ClientError, BotoCoreError) as exc:
        if _is_not_found(exc):
            raise NotFound("secret", reference) from None
        raise _aws_error("delete_secret", exc) from exc


# --- public API ------------------------------------------------------------------------------


def create_secret(
    session: Session, secret_name: str, secret_value: str | SecretStr, user_id: uuid.UUID
) -> str:
    """Store ``secret_value`` for ``user_id``; returns an opaque reference.

    USE_DB_SECRETS=true encrypts it into ``database_secret`` (flushed, not committed;
    a duplicate name raises Conflict). Otherwise it goes to AWS Secrets Manager, which
    is outside the transaction: a caller that rolls back should delete the reference.
    """
    value = _check_inputs(secret_name, secret_value)
    if get_settings().USE_DB_SECRETS:
        row = db_secrets.create_db_secret(
            session=session, user_id=user_id, name=secret_name, value=value
        )
        reference = f"{DB_SCHEME}:{row.id}"
    else:
        reference = _create_aws(secret_name, value, user_id)
    logger.info("secret_created", ref=reference, user_id=str(user_id))
    return reference


def retrieve_secret(reference: str, session: Session, user_id: uuid.UUID) -> str:
    """The plaintext of the user's secret. Another user's reference raises NotFound."""
    ref = _parse_reference(reference)
    if ref.scheme == DB_SCHEME:
        assert ref.db_id is not None
        try:
            row = db_secrets.get_db_secret(session=session, secret_id=ref.db_id, user_id=user_id)
        except NotFound:
            raise NotFound("secret", reference) from None
        value = db_secrets.decrypt_row(row)
    else:
        value = _retrieve_aws(ref, reference, user_id)
    logger.debug("secret_retrieved", ref=reference, user_id=str(user_id))
    return value


def delete_secret(
    session: Session, reference: str, user_id: uuid.UUID, *, missing_ok: bool = False
) -> bool:
    """Delete the user's secret; True when it was deleted.

    A missing (or another user's) secret raises NotFound, or returns False with
    ``missing_ok=True``. A backend failure raises SecretError and deletes nothing.
    Secrets Manager deletes at once (no recovery window): the reference is the only
    handle the platform has, and the credential row is gone with it.
    """
    ref = _parse_reference(reference)
    try:
        if ref.scheme == DB_SCHEME:
            assert ref.db_id is not None
            try:
                db_secrets.delete_db_secret(session=session, secret_id=ref.db_id, user_id=user_id)
            except NotFound:
                raise NotFound("secret", reference) from None
        else:
            _delete_aws(ref, reference, user_id)
    except NotFound:
        if missing_ok:
            logger.info("secret_delete_missing", ref=reference, user_id=str(user_id))
            return False
        raise
    logger.info("secret_deleted", ref=reference, user_id=str(user_id))
    return True


# --- key rotation ----------------------------------------------------------------------------


@dataclass
class RotationReport:
    """What a :func:`rotate_database_key` run did.

    ``failed_ids`` lists rows that neither key could decrypt (left untouched);
    ``remaining`` counts rows still not on the new key, or still in the unbound v1 format,
    when the run ended (failed rows, plus rows another transaction held locked, which a
    rerun picks up). Once it is 0, SECRET_ACCEPT_V1_CIPHERTEXT can be set to false.
    """

    key_id: str
    rotated: int = 0
    failed: int = 0
    failed_ids: list[uuid.UUID] = field(default_factory=list)
    batches: int = 0
    remaining: int = 0

    @property
    def complete(self) -> bool:
        return self.remaining == 0


KeySpec = tuple[str | SecretStr, str | SecretStr]


def rotate_database_key(
    session_factory: Callable[[], contextlib.AbstractContextManager[Session]],
    *,
    batch_size: int = 100,
    old: KeySpec | None = None,
    new: KeySpec | None = None,
) -> RotationReport:
    """Re-encrypt every database secret not on the new key or not bound, in committed batches.

    ``new`` defaults to SECRET_ENCRYPTION_PASSWORD/SALT and ``old`` to
    SECRET_ENCRYPTION_OLD_PASSWORD/OLD_SALT. Each batch is one transaction from
    ``session_factory()`` (which commits on exit): lock up to ``batch_size`` rows whose
    key id is not the new one or whose ciphertext is still the unbound v1 format (SKIP
    LOCKED on PostgreSQL), decrypt with the old (or new) key, encrypt with the new one
    bound to the row's id and owner (v2), commit. An interrupted run loses at most its
    current batch, and rerunning simply continues with the rows still to do. The
    platform keeps running meanwhile: reads accept both formats and both keys.
    A row neither key decrypts is reported and skipped, never overwritten; so is a v1
    row once SECRET_ACCEPT_V1_CIPHERTEXT is false.
    """
    if batch_size < 1:
        raise ValidationFailed([f"batch_size: must be at least 1, got {batch_size}"], "rotation")
    kwargs: dict[str, Any] = {}
    if new is not None:
        kwargs["password"], kwargs["salt"] = new
    if old is not None:
        kwargs["old_password"], kwargs["old_salt"] = old
    manager = DatabaseSecretManager(**kwargs)
    target = manager.key_id
    report = RotationReport(key_id=target)
    logger.info(
        "secret_rotation_started", key_id=target, old_key_id=manager.old_key_id, batch=batch_size
    )
    cursor: uuid.UUID | None = None
    while True:
        with session_factory() as session:
            rows = db_secrets.lock_db_secrets_not_on_key(
                session=session, key_id=target, limit=batch_size, after_id=cursor
            )
            if not rows:
                break
            rotated = 0
            for row in rows:
                try:
                    token = manager.reencrypt_secret(
                        row.encrypted_value, bound_to=db_secrets.binding_of(row.id, row.user_id)
                    )
                except SecretError as exc:
                    report.failed += 1
                    report.failed_ids.append(row.id)
                    logger.warning(
                        "secret_rotation_row_failed",
                        row_id=str(row.id),
                        stored_key_id=row.key_id,
                        error=str(exc),
                    )
                    continue
                db_secrets.set_db_secret_ciphertext(
                    session=session, row=row, encrypted_value=token, key_id=target
                )
                rotated += 1
            cursor = rows[-1].id
        # Counted only once the batch's transaction has committed.
        report.rotated += rotated
        report.batches += 1
        logger.info(
            "secret_rotation_batch_committed",
            batch=report.batches,
            rotated=rotated,
            total_rotated=report.rotated,
        )
    with session_factory() as session:
        report.remaining = db_secrets.count_db_secrets_not_on_key(session=session, key_id=target)
    logger.info(
        "secret_rotation_finished",
        key_id=target,
        rotated=report.rotated,
        failed=report.failed,
        remaining=report.remaining,
    )
    return report
