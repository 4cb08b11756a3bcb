"""Text that can be stored and sent: the check every public entry point runs on strings.

A Python ``str`` may hold lone surrogates (``"\\ud800"``), which no encoding accepts:
``str.encode("utf-8")``, PostgreSQL, SQLite and HTTP libraries all fail on them, deep in
the call, with ``UnicodeEncodeError``. Such text usually comes from undecodable bytes
(``surrogateescape``) or a hostile client. It is refused where it enters, with the
project's :class:`~flowbuilder.platform.errors.ValidationFailed`.
"""

from __future__ import annotations

from flowbuilder.platform.errors import ValidationFailed

__all__ = ["is_encodable", "require_encodable", "unencodable_problem"]


def is_encodable(text: str) -> bool:
    """True when ``text`` encodes as UTF-8 (it holds no lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def unencodable_problem(field: str, value: object) -> str | None:
    """A problem line when ``value`` is a string that cannot be encoded, else None."""
    if isinstance(value, str) and not is_encodable(value):
        return f"{field}: is not valid Unicode text (it holds a lone surrogate)"
    return None


def require_encodable(what: str, **fields: object) -> None:
    """Raise ValidationFailed naming every field whose string value cannot be encoded.

    Never echoes the value: it may be a secret.
    """
    problems = [p for name, value in fields.items() if (p := unencodable_problem(name, value))]
    if problems:
        raise ValidationFailed(problems, what=what)
