"""The rule for encryption key material (SECRET_ENCRYPTION_PASSWORD and _SALT).

The database secrets key is derived from a password and a salt with PBKDF2. PBKDF2 slows
down a guess; it cannot make a guessable password safe. So weak material is refused where
it enters: at settings load and in :class:`~flowbuilder.platform.crypto.DatabaseSecretManager`.

The rule (also in the README):

- the password has at least :data:`MIN_PASSWORD_CHARS` characters and an estimated
  :data:`MIN_PASSWORD_BITS` bits of entropy (see :func:`estimated_bits`);
- the salt has at least :data:`MIN_SALT_CHARS` characters and is not the password;
- neither is a known weak value, a repetition of a shorter piece (``abcabcabc...``), nor
  made only of common words (``password``, ``changeme``, ``secret`` ...) with digits and
  punctuation around them (``Password123!``).

Good material: ``python -c "import secrets; print(secrets.token_urlsafe(32))"``.

No message here ever contains the material itself. This module imports nothing from the
package, so settings, crypto and anything else may use it.
"""

from __future__ import annotations

import math

__all__ = [
    "GENERATE_HINT",
    "MIN_PASSWORD_BITS",
    "MIN_PASSWORD_CHARS",
    "MIN_SALT_CHARS",
    "estimated_bits",
    "password_problem",
    "salt_problem",
]

MIN_PASSWORD_CHARS = 16
MIN_PASSWORD_BITS = 64
MIN_SALT_CHARS = 8
GENERATE_HINT = 'generate one with: python -c "import secrets; print(secrets.token_urlsafe(32))"'

# Words that make up most leaked, default and example passwords. A value made only of
# these (with digits and punctuation) is refused whatever its length.
_WEAK_WORDS = (
    "password",
    "passwd",
    "pass",
    "changeme",
    "changethis",
    "change",
    "secret",
    "admin",
    "root",
    "letmein",
    "welcome",
    "qwertyuiop",
    "asdfghjkl",
    "zxcvbnm",
    "qwerty",
    "asdf",
    "default",
    "example",
    "test",
    "salt",
    "key",
    "encryption",
    "flowbuilder",
    "todo",
    "xxx",
    "abc",
    "me",
    "my",
)
MAX_MATERIAL_CHARS = 1024


def _only_weak_words(letters: str) -> bool:
    """Whether ``letters`` splits into weak words (linear-time word break, no regex
    backtracking: ``changeme`` also splits as ``change`` + ``me``)."""
    ends = [True] + [False] * len(letters)
    for i in range(1, len(letters) + 1):
        ends[i] = any(
            len(word) <= i and ends[i - len(word)] and letters.startswith(word, i - len(word))
            for word in _WEAK_WORDS
        )
    return ends[-1]


def _repeated(value: str) -> bool:
    """Whether ``value`` is a shorter piece repeated (``abcabcabc``)."""
    return len(value) > 1 and value in (value + value)[1:-1]


def estimated_bits(value: str) -> float:
    """A conservative entropy estimate in bits.

    Each character counts log2 of the size of the character classes the value uses
    (lower, upper, digits, other), except a character that repeats or continues a run
    from the one before it (``aa``, ``ab``, ``21``), which counts one bit.
    """
    if not value:
        return 0.0
    pool = 0
    if any(c.islower() for c in value):
        pool += 26
    if any(c.isupper() for c in value):
        pool += 26
    if any(c.isdigit() for c in value):
        pool += 10
    if any(not c.isalnum() for c in value):
        pool += 33
    per_char = math.log2(max(pool, 2))
    bits = per_char
    for prev, char in zip(value, value[1:], strict=False):
        bits += 1.0 if abs(ord(char) - ord(prev)) <= 1 else per_char
    return bits


def _encodable(value: str) -> bool:
    # Lone surrogates (undecodable environment bytes) cannot be encoded for PBKDF2.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _known_weak(value: str) -> bool:
    letters = "".join(c for c in value.lower() if c.isalpha())
    if _only_weak_words(letters):
        return True  # only weak words (or no letters at all) padded with digits/punctuation
    return _repeated(value)


def password_problem(password: str, salt: str | None = None) -> str | None:
    """Why ``password`` is not acceptable key material, or None when it is."""
    if not _encodable(password):
        return "is not valid Unicode text (it holds a lone surrogate)"
    if len(password) > MAX_MATERIAL_CHARS:
        return f"is too long (at most {MAX_MATERIAL_CHARS} characters)"
    if len(password) < MIN_PASSWORD_CHARS:
        return f"is too short (at least {MIN_PASSWORD_CHARS} characters); {GENERATE_HINT}"
    if _known_weak(password):
        return f"is a known weak or patterned value; {GENERATE_HINT}"
    if estimated_bits(password) < MIN_PASSWORD_BITS:
        return (
            f"has too little entropy (at least {MIN_PASSWORD_BITS} bits estimated); {GENERATE_HINT}"
        )
    if salt is not None and password == salt:
        return f"must differ from the salt; {GENERATE_HINT}"
    return None


def salt_problem(salt: str, password: str | None = None) -> str | None:
    """Why ``salt`` is not acceptable, or None when it is."""
    if not _encodable(salt):
        return "is not valid Unicode text (it holds a lone surrogate)"
    if len(salt) > MAX_MATERIAL_CHARS:
        return f"is too long (at most {MAX_MATERIAL_CHARS} characters)"
    if len(salt) < MIN_SALT_CHARS:
        return f"is too short (at least {MIN_SALT_CHARS} characters); {GENERATE_HINT}"
    if _known_weak(salt) or len(set(salt)) < 4:
        return f"is a known weak or patterned value; {GENERATE_HINT}"
    if password is not None and salt == password:
        return f"must differ from the password; {GENERATE_HINT}"
    return None
