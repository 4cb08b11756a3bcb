"""Removing a credential from what a node produced: outputs, errors, log lines.

A credential leaves the platform in a request (see ``nodes/http.py``); a remote server may
echo it back (headers reflected in a body), and a node may log or raise with it. The
engine redacts everything a node produced with the forms of its credential before
anything is stored or logged:

    forms = credential_forms(credential)          # once per node call
    outputs = redact(outputs, forms)              # any JSON-like value, any depth

:func:`credential_forms` lists every spelling the secret can take when sent, per
credential type, plus the encodings a server may echo it in (URL-encoded as in a query
string, JSON-escaped inside a text body). :func:`redact` walks the value without
recursion, so a 2,000-deep output cannot crash the worker.

Forms shorter than :data:`MIN_FORM_CHARS` are not redacted: replacing every ``"ab"``
in an output would destroy it, and a secret that short is no secret.
"""

from __future__ import annotations

import base64
import contextlib
import json
import traceback
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, quote_plus

from pydantic import SecretStr

__all__ = [
    "MIN_FORM_CHARS",
    "REDACTED",
    "credential_forms",
    "redact",
    "redacted_traceback",
    "secret_forms",
]

REDACTED = "[redacted]"
MIN_FORM_CHARS = 4


def _b64_forms(raw: bytes) -> list[str]:
    std = base64.b64encode(raw).decode("ascii")
    url = base64.urlsafe_b64encode(raw).decode("ascii")
    return [std, std.rstrip("="), url, url.rstrip("=")]


def _encodings(text: str) -> list[str]:
    """``text`` as sent or echoed: as is, URL-encoded (query strings, form bodies) and
    JSON-escaped (a JSON document held as a string)."""
    forms = [text, json.dumps(text)[1:-1], json.dumps(text, ensure_ascii=False)[1:-1]]
    with contextlib.suppress(UnicodeEncodeError):  # a lone surrogate is never in a URL
        forms += [quote(text, safe=""), quote_plus(text), quote(text)]
    return forms


def _sent_values(kind: str | None, value: str) -> list[str]:
    """The secret parts of ``value`` as a credential of type ``kind`` sends them."""
    stripped = value.strip()
    parts = [value, stripped]
    # bearer_token ("Bearer <stripped>") and api_key (<stripped>) send the stripped value
    # itself, so the scheme word stays readable in an echo: "Bearer [redacted]".
    if kind == "header" or (kind is None and ":" in value):
        # "Name: value" is sent as header "Name" with the value stripped: the value
        # without its leading space is the form a server echoes (issue 11).
        _name, sep, header_value = value.partition(":")
        if sep:
            parts.append(header_value.strip())
    if kind == "basic_auth" or (kind is None and ":" in value):
        # "user:password" is sent base64-encoded; a server may echo the decoded halves.
        raw = value.encode("utf-8", "surrogatepass")
        parts.extend(_b64_forms(raw))
        # The user name is an identifier, not the secret: only the password half.
        _user, sep, password = value.partition(":")
        if sep:
            parts.append(password)
            parts.extend(_b64_forms(password.encode("utf-8", "surrogatepass")))
    return parts


def secret_forms(value: str | SecretStr, kind: str | None = None) -> list[str]:
    """Every form of a secret ``value`` sent as a credential of type ``kind``.

    ``kind`` is a credential type (``bearer_token``, ``basic_auth``, ``api_key``,
    ``header``, ``generic``); None assumes any. Longest first, so that replacing one form
    never leaves a fragment of a longer one.
    """
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    forms: set[str] = set()
    for part in _sent_values(kind, value):
        forms.update(_encodings(part))
    return sorted((f for f in forms if len(f) >= MIN_FORM_CHARS), key=len, reverse=True)


def credential_forms(credential: Any) -> list[str]:
    """The forms of a node's credential (``NodeCredential``: ``type`` and ``secret``)."""
    if credential is None:
        return []
    return secret_forms(credential.secret, getattr(credential, "type", None))


def _scrub(text: str, forms: Iterable[str]) -> str:
    for form in forms:
        if form in text:
            text = text.replace(form, REDACTED)
    return text


def redact(value: Any, forms: list[str]) -> Any:
    """A copy of ``value`` with every form replaced by ``[redacted]``, at any depth.

    Strings, dict keys and values, lists and tuples (returned as lists) are walked with an
    explicit stack, not recursion. Shared or cyclic containers are copied once (the copy
    keeps the sharing). Other values are returned as they are.
    """
    if not forms:
        return value
    if isinstance(value, str):
        return _scrub(value, forms)
    if not isinstance(value, dict | list | tuple):
        return value
    copies: dict[int, Any] = {}

    def copy_of(container: Any) -> tuple[Any, bool]:
        """The (possibly new) copy of a container, and whether it still needs filling."""
        existing = copies.get(id(container))
        if existing is not None:
            return existing, False
        fresh: Any = {} if isinstance(container, dict) else []
        copies[id(container)] = fresh
        return fresh, True

    root, _ = copy_of(value)
    stack: list[tuple[Any, Any]] = [(value, root)]
    while stack:
        source, target = stack.pop()
        items = source.items() if isinstance(source, dict) else enumerate(source)
        for key, item in items:
            if isinstance(item, dict | list | tuple):
                new, fill = copy_of(item)
                if fill:
                    stack.append((item, new))
            elif isinstance(item, str):
                new = _scrub(item, forms)
            else:
                new = item
            if isinstance(target, dict):
                target[_scrub(key, forms) if isinstance(key, str) else key] = new
            else:
                target.append(new)
    return root


def redacted_traceback(exc: BaseException, forms: list[str]) -> str:
    """The formatted traceback of ``exc`` with every form redacted, for a log line.

    A node that raises with its credential in the message would otherwise put it in the
    worker's log through ``logger.exception``.
    """
    return redact("".join(traceback.format_exception(exc)), forms)
