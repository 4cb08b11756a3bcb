"""Authenticated encryption of secret values stored in the database.

Format of a stored value (one ASCII line)::

    v2:<key_id>:<base64url(nonce || ciphertext || tag), no padding>

- AES-256-GCM with a random 96-bit nonce per value.
- The key is derived with PBKDF2-HMAC-SHA256 (``PBKDF2_ITERATIONS`` rounds) from
  SECRET_ENCRYPTION_PASSWORD and SECRET_ENCRYPTION_SALT, once per process per
  (password, salt): the derivation is deliberately slow, so it is cached. Weak material
  is refused (see :mod:`flowbuilder.platform.key_material`).
- ``key_id`` is a short fingerprint of the derived key (HMAC-SHA256(key, "key-id"), first
  16 hex digits). It tells decryption which key to use and cannot be turned back into
  the key.
- **Binding.** A ``v2`` value is bound to the secret it belongs to: the AES-GCM associated
  data is ``v2:<key_id>:<secret id>:<owner id>`` (a :class:`Binding`). The ids are not in
  the token; they come from the row being read. So a ciphertext copied into another row,
  or another user's row, fails the tag check instead of decrypting as that row's secret.
- ``v1`` (associated data ``v1:<key_id>``) is the unbound format written before binding.
  It is still read while ``flowbuilder secrets rotate-key`` moves rows to ``v2``, unless
  SECRET_ACCEPT_V1_CIPHERTEXT is false (set it once rotation has finished: an old v1
  ciphertext copied into another row is then refused too). A value encrypted without a
  binding (no row to bind to) is still written as ``v1``; database secrets never are.
- Decryption accepts the current key and, when SECRET_ENCRYPTION_OLD_PASSWORD is set,
  the previous one, chosen by key id. That is what lets ``rotate-key`` re-encrypt rows
  while the platform keeps running.

Errors: every failure raises :class:`SecretError` (tampering, truncation, malformed
token, unknown key, wrong binding). A missing password or salt raises
:class:`EncryptionKeyMissing` and weak material :class:`WeakKeyMaterial`, both a
``SecretError`` and a ``ConfigurationError`` so either ``except`` catches them. Text that
cannot be encoded (lone surrogates) raises ``ValidationFailed``. No message ever
contains a plaintext, a password, a salt or key bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import threading
import uuid
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC
from pydantic import SecretStr

from flowbuilder.platform.errors import ConfigurationError, SecretError
from flowbuilder.platform.key_material import password_problem, salt_problem
from flowbuilder.platform.settings import get_settings
from flowbuilder.platform.text import require_encodable

__all__ = [
    "FORMAT_VERSION",
    "UNBOUND_VERSION",
    "Binding",
    "WeakKeyMaterial",
    "token_version",
    "PBKDF2_ITERATIONS",
    "DatabaseSecretManager",
    "EncryptionKeyMissing",
    "current_key_id",
    "decrypt_secret",
    "encrypt_secret",
    "token_key_id",
]

FORMAT_VERSION = "v2"  # bound to (secret id, owner id)
UNBOUND_VERSION = "v1"  # read during the move to v2; written only without a binding
_VERSIONS = (FORMAT_VERSION, UNBOUND_VERSION)
# OWASP's 2023 recommendation for PBKDF2-HMAC-SHA256.
PBKDF2_ITERATIONS = 600_000
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
KEY_ID_HEX = 16

_KEY_ID_RE = re.compile(rf"[0-9a-f]{{{KEY_ID_HEX}}}")
_B64URL_RE = re.compile(r"[A-Za-z0-9_-]+")


class EncryptionKeyMissing(SecretError, ConfigurationError):
    """SECRET_ENCRYPTION_PASSWORD or SECRET_ENCRYPTION_SALT (or an old-key half) is unset."""


class WeakKeyMaterial(SecretError, ConfigurationError):
    """The password or salt given for the current key is too weak (see key_material)."""


@dataclass(frozen=True, slots=True)
class Binding:
    """What a v2 ciphertext belongs to: the secret's id and its owner's id."""

    secret_id: uuid.UUID
    owner_id: uuid.UUID

    def associated(self) -> str:
        return f"{uuid.UUID(str(self.secret_id))}:{uuid.UUID(str(self.owner_id))}"


@dataclass(frozen=True, slots=True, repr=False)
class _Key:
    """A derived key ready for use. Its repr shows the key id only."""

    key_id: str
    aead: AESGCM

    def __repr__(self) -> str:
        return f"<key {self.key_id}>"


# The cache is keyed by an HMAC of (password, salt) under a random per-process key, so
# neither the password nor a brute-forceable plain hash of it is ever held as a key.
_CACHE_PEPPER = os.urandom(32)
_KEY_CACHE: dict[bytes, _Key] = {}
_KEY_CACHE_MAX = 16
_cache_lock = threading.Lock()


def _as_text(value: str | SecretStr) -> str:
    return value.get_secret_value() if isinstance(value, SecretStr) else value


def _cache_key(password: str, salt: str) -> bytes:
    pw = password.encode("utf-8")
    sl = salt.encode("utf-8")
    material = len(pw).to_bytes(4, "big") + pw + sl
    return hmac.new(_CACHE_PEPPER, material, hashlib.sha256).digest()


def _fingerprint(raw_key: bytes) -> str:
    return hmac.new(raw_key, b"key-id", hashlib.sha256).hexdigest()[:KEY_ID_HEX]


def _derive(password: str, salt: str) -> _Key:
    """The key for (password, salt), derived at most once per process."""
    ck = _cache_key(password, salt)
    key = _KEY_CACHE.get(ck)
    if key is not None:
        return key
    with _cache_lock:
        key = _KEY_CACHE.get(ck)
        if key is None:
            kdf = PBKDF2HMAC(
                algorithm=SHA256(),
                length=KEY_BYTES,
                salt=salt.encode("utf-8"),
                iterations=PBKDF2_ITERATIONS,
            )
            raw = kdf.derive(password.encode("utf-8"))
            key = _Key(key_id=_fingerprint(raw), aead=AESGCM(raw))
            del raw
            if len(_KEY_CACHE) >= _KEY_CACHE_MAX:
                _KEY_CACHE.pop(next(iter(_KEY_CACHE)))
            _KEY_CACHE[ck] = key
    return key


def _aad(version: str, key_id: str, binding: Binding | None) -> bytes:
    if version == UNBOUND_VERSION:
        return f"{version}:{key_id}".encode("ascii")
    assert binding is not None
    return f"{version}:{key_id}:{binding.associated()}".encode("ascii")


def token_version(token: str) -> str:
    """The format version a stored token names (no decryption; SecretError if malformed)."""
    version, _key_id, _body = _parse(token)
    return version


def _b64decode_strict(text: str) -> bytes:
    """Decode unpadded base64url, refusing anything but the one canonical encoding.

    The lenient decoders skip unknown characters and ignore stray trailing bits, which
    would let two different tokens decrypt to the same value.
    """
    if not _B64URL_RE.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("not base64url")
    raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") != text:
        raise ValueError("non-canonical base64url")
    return raw


def token_key_id(token: str) -> str:
    """The key id a stored token names (no decryption; raises SecretError if malformed)."""
    _version, key_id, _body = _parse(token)
    return key_id


def _parse(token: object) -> tuple[str, str, bytes]:
    if not isinstance(token, str):
        raise SecretError(
            f"malformed encrypted secret: expected a string token, got {type(token).__name__}"
        )
    parts = token.split(":")
    if len(parts) != 3:
        raise SecretError(
            f"malformed encrypted secret: expected '{FORMAT_VERSION}:<key id>:<data>'"
        )
    version, key_id, body = parts
    if version not in _VERSIONS:
        raise SecretError(
            "malformed encrypted secret: unsupported format version "
            f"(expected {' or '.join(map(repr, _VERSIONS))})"
        )
    if not _KEY_ID_RE.fullmatch(key_id):
        raise SecretError(
            f"malformed encrypted secret: key id must be {KEY_ID_HEX} lowercase hex digits"
        )
    try:
        raw = _b64decode_strict(body)
    except (ValueError, binascii.Error):
        raise SecretError("malformed encrypted secret: data is not valid base64url") from None
    if len(raw) < NONCE_BYTES + TAG_BYTES:
        raise SecretError("encrypted secret is truncated: too short to hold a nonce and a tag")
    return version, key_id, raw


class DatabaseSecretManager:
    """Encrypts and decrypts secret values with the current key (and the old one).

    Without arguments the keys come from the settings. Explicit values override them
    one by one; pass ``old_password=""`` to say "no old key" regardless of settings.
    When an old password is set without an old salt, the current salt is used with it
    (rotating only the password is the common case). ``accept_v1`` overrides
    SECRET_ACCEPT_V1_CIPHERTEXT (whether bound reads accept the unbound v1 format).

    A weak current password or salt raises :class:`WeakKeyMaterial` here (settings refuse
    it at load already). The old key is not judged: it is only read, while rotate-key
    moves away from it.

    Construction is cheap; the key is derived on first use, then cached per process.
    """

    __slots__ = ("_password", "_salt", "_old_password", "_old_salt", "_accept_v1")

    def __init__(
        self,
        password: str | SecretStr | None = None,
        salt: str | SecretStr | None = None,
        *,
        old_password: str | SecretStr | None = None,
        old_salt: str | SecretStr | None = None,
        accept_v1: bool | None = None,
    ) -> None:
        settings = None
        if (
            password is None
            or salt is None
            or old_password is None
            or old_salt is None
            or accept_v1 is None
        ):
            settings = get_settings()

        def pick(given: str | SecretStr | None, setting: SecretStr | None) -> SecretStr | None:
            if given is not None:
                text = _as_text(given)
                return SecretStr(text) if text else None
            return setting

        self._password = pick(password, settings.SECRET_ENCRYPTION_PASSWORD if settings else None)
        self._salt = pick(salt, settings.SECRET_ENCRYPTION_SALT if settings else None)
        explicit_no_old = old_password is not None and _as_text(old_password) == ""
        self._old_password = (
            None
            if explicit_no_old
            else pick(old_password, settings.SECRET_ENCRYPTION_OLD_PASSWORD if settings else None)
        )
        self._old_salt = (
            None
            if explicit_no_old
            else pick(old_salt, settings.SECRET_ENCRYPTION_OLD_SALT if settings else None)
        )
        self._accept_v1 = (
            bool(accept_v1) if accept_v1 is not None else settings.SECRET_ACCEPT_V1_CIPHERTEXT
        )
        self._check_material()

    def _check_material(self) -> None:
        """Refuse weak current key material with one line naming the half at fault."""
        pw = self._password.get_secret_value() if self._password is not None else None
        sl = self._salt.get_secret_value() if self._salt is not None else None
        # Text that cannot be encoded is invalid input first (ValidationFailed), like
        # everywhere else; only then is its strength judged.
        require_encodable(
            "encryption key", SECRET_ENCRYPTION_PASSWORD=pw, SECRET_ENCRYPTION_SALT=sl
        )
        for name, problem in (
            ("SECRET_ENCRYPTION_PASSWORD", password_problem(pw, sl) if pw is not None else None),
            ("SECRET_ENCRYPTION_SALT", salt_problem(sl, pw) if sl is not None else None),
        ):
            if problem is not None:
                raise WeakKeyMaterial(f"weak encryption key: {name} {problem}")
        for name, value in (
            ("SECRET_ENCRYPTION_OLD_PASSWORD", self._old_password),
            ("SECRET_ENCRYPTION_OLD_SALT", self._old_salt),
        ):
            if value is not None:
                require_encodable("encryption key", **{name: value.get_secret_value()})

    def __repr__(self) -> str:
        old = ", old key configured" if self._old_password is not None else ""
        return f"<DatabaseSecretManager{old}>"

    # --- keys -----------------------------------------------------------------------

    def _current(self) -> _Key:
        missing = [
            name
            for name, value in (
                ("SECRET_ENCRYPTION_PASSWORD", self._password),
                ("SECRET_ENCRYPTION_SALT", self._salt),
            )
            if value is None
        ]
        if missing:
            raise EncryptionKeyMissing(
                f"{' and '.join(missing)} not set: database secrets cannot be encrypted "
                "or decrypted"
            )
        assert self._password is not None and self._salt is not None
        return _derive(self._password.get_secret_value(), self._salt.get_secret_value())

    def _old(self) -> _Key | None:
        if self._old_password is None:
            if self._old_salt is not None:
                raise EncryptionKeyMissing(
                    "SECRET_ENCRYPTION_OLD_SALT is set but SECRET_ENCRYPTION_OLD_PASSWORD is not"
                )
            return None
        salt = self._old_salt if self._old_salt is not None else self._salt
        if salt is None:
            raise EncryptionKeyMissing(
                "SECRET_ENCRYPTION_OLD_PASSWORD is set but neither SECRET_ENCRYPTION_OLD_SALT "
                "nor SECRET_ENCRYPTION_SALT is"
            )
        return _derive(self._old_password.get_secret_value(), salt.get_secret_value())

    @property
    def key_id(self) -> str:
        """The id of the key new values are encrypted with."""
        return self._current().key_id

    @property
    def old_key_id(self) -> str | None:
        old = self._old()
        return old.key_id if old is not None else None

    def accepted_key_ids(self) -> tuple[str, ...]:
        ids = [self.key_id]
        old = self.old_key_id
        if old is not None and old not in ids:
            ids.append(old)
        return tuple(ids)

    def _key_for(self, key_id: str) -> _Key:
        current = self._current()
        if key_id == current.key_id:
            return current
        old = self._old()
        if old is not None and key_id == old.key_id:
            return old
        accepted = ", ".join(self.accepted_key_ids())
        raise SecretError(
            f"encrypted secret uses unknown key {key_id} (accepted: {accepted}); "
            "wrong SECRET_ENCRYPTION_PASSWORD/SALT, or an old key that is no longer configured"
        )

    # --- values ---------------------------------------------------------------------

    def encrypt_secret(self, plaintext: str, *, bound_to: Binding | None = None) -> str:
        """Encrypt ``plaintext`` with the current key; returns a self-describing token.

        With ``bound_to`` (what database secrets always pass) the token is v2 and only
        decrypts with the same binding; without it, the unbound v1 format.
        """
        if isinstance(plaintext, SecretStr):
            plaintext = plaintext.get_secret_value()
        if not isinstance(plaintext, str):
            raise SecretError(f"only text can be encrypted, got {type(plaintext).__name__}")
        require_encodable("secret", plaintext=plaintext)
        key = self._current()
        version = UNBOUND_VERSION if bound_to is None else FORMAT_VERSION
        nonce = os.urandom(NONCE_BYTES)
        sealed = key.aead.encrypt(
            nonce, plaintext.encode("utf-8"), _aad(version, key.key_id, bound_to)
        )
        body = base64.urlsafe_b64encode(nonce + sealed).rstrip(b"=").decode("ascii")
        return f"{version}:{key.key_id}:{body}"

    def decrypt_secret(self, token: str, *, bound_to: Binding | None = None) -> str:
        """Decrypt a token made by :meth:`encrypt_secret` with the current or old key.

        A v2 token needs the binding it was made with. A v1 token read for a bound secret
        (``bound_to`` given) is refused when v1 is no longer accepted.
        """
        version, key_id, raw = _parse(token)
        if version == FORMAT_VERSION and bound_to is None:
            raise SecretError(
                "encrypted secret is bound to its secret and owner: decrypt it with its binding"
            )
        if version == UNBOUND_VERSION and bound_to is not None and not self._accept_v1:
            raise SecretError(
                "encrypted secret is in the unbound v1 format, which is no longer accepted "
                "(SECRET_ACCEPT_V1_CIPHERTEXT=false); it must be re-encrypted by rotate-key "
                "while v1 is accepted, or stored again"
            )
        key = self._key_for(key_id)
        nonce, sealed = raw[:NONCE_BYTES], raw[NONCE_BYTES:]
        try:
            data = key.aead.decrypt(nonce, sealed, _aad(version, key_id, bound_to))
        except InvalidTag:
            raise SecretError(
                f"encrypted secret failed authentication (key {key_id}): the data was "
                "altered, truncated or moved from another secret, or it was encrypted with "
                "a different key"
            ) from None
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:  # pragma: no cover - only our own encrypt made it
            raise SecretError("decrypted secret is not valid UTF-8") from None

    def reencrypt_secret(self, token: str, *, bound_to: Binding | None = None) -> str:
        """Decrypt with whichever accepted key the token names; encrypt with the current.

        With ``bound_to`` the result is the bound v2 form (a v1 token is bound on the way).
        """
        return self.encrypt_secret(self.decrypt_secret(token, bound_to=bound_to), bound_to=bound_to)


def current_key_id() -> str:
    """The key id of the configured SECRET_ENCRYPTION_PASSWORD/SALT."""
    return DatabaseSecretManager().key_id


def encrypt_secret(plaintext: str, *, bound_to: Binding | None = None) -> str:
    """Encrypt with the configured key (see :class:`DatabaseSecretManager`)."""
    return DatabaseSecretManager().encrypt_secret(plaintext, bound_to=bound_to)


def decrypt_secret(token: str, *, bound_to: Binding | None = None) -> str:
    """Decrypt with the configured current or old key."""
    return DatabaseSecretManager().decrypt_secret(token, bound_to=bound_to)
