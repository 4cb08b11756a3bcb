"""Credential forms and depth-safe redaction (the proof against real echoes is in
test_no_leaks.py)."""

from __future__ import annotations

import base64
import json
from urllib.parse import quote, quote_plus

from pydantic import SecretStr

from flowbuilder.platform.nodes.base import NodeCredential
from flowbuilder.platform.redaction import (
    REDACTED,
    credential_forms,
    redact,
    redacted_traceback,
    secret_forms,
)


def _cred(kind: str, value: str) -> NodeCredential:
    return NodeCredential(type=kind, secret=SecretStr(value), name="c")


def test_header_credential_value_without_its_leading_space() -> None:
    """Issue 11: 'X-Custom-Auth: <v>' is sent as the header value '<v>'."""
    forms = credential_forms(_cred("header", "X-Custom-Auth: hdr-secret-77"))
    assert "hdr-secret-77" in forms
    echoed = {"headers": {"X-Custom-Auth": "hdr-secret-77"}}
    assert redact(echoed, forms) == {"headers": {"X-Custom-Auth": REDACTED}}


def test_basic_auth_forms() -> None:
    value = "svc:pa ss/w+rd"
    forms = credential_forms(_cred("basic_auth", value))
    token = base64.b64encode(value.encode()).decode()
    for form in (value, token, token.rstrip("="), "pa ss/w+rd", quote("pa ss/w+rd", safe="")):
        assert form in forms
    assert "svc" not in forms  # the user name alone is not the secret
    assert redact(f"Authorization: Basic {token}", forms) == f"Authorization: Basic {REDACTED}"


def test_bearer_and_api_key_forms_include_url_and_json_encodings() -> None:
    for kind in ("bearer_token", "api_key", "generic"):
        value = ' tok/en+"x y" '
        forms = credential_forms(_cred(kind, value))
        stripped = value.strip()
        for form in (stripped, quote(stripped, safe=""), quote_plus(stripped)):
            assert form in forms, (kind, form)
        assert json.dumps(stripped)[1:-1] in forms
        text = f"/cb?token={quote_plus(stripped)}&x=1"
        assert stripped not in redact(text, forms) and REDACTED in redact(text, forms)


def test_forms_are_longest_first_and_skip_very_short_ones() -> None:
    forms = secret_forms("ab:cd")
    assert "cd" not in forms and "ab:cd" in forms
    assert forms == sorted(forms, key=len, reverse=True)
    assert credential_forms(None) == []


def test_redact_is_depth_safe_and_copies() -> None:
    value: dict = {}
    cursor = value
    for _ in range(5000):  # far deeper than the recursion limit
        cursor["next"] = [{"tok": "deep-secret-1"}]
        cursor = cursor["next"][0]
    out = redact(value, ["deep-secret-1"])
    cursor = out
    for _ in range(5000):
        cursor = cursor["next"][0]
    assert cursor == {"tok": REDACTED}
    assert value["next"][0]["tok"] == "deep-secret-1"  # the input is not changed
    assert out["next"][0]["tok"] == REDACTED


def test_redact_keys_tuples_cycles_and_other_values() -> None:
    shared = ["s3cret-value"]
    value: dict = {"s3cret-value": shared, "again": shared, "t": ("s3cret-value", 1, None, 2.5)}
    value["self"] = value
    out = redact(value, ["s3cret-value"])
    assert out[REDACTED] == [REDACTED] and out["again"] is out[REDACTED]
    assert out["t"] == [REDACTED, 1, None, 2.5]
    assert out["self"] is out
    assert redact(42, ["x"]) == 42 and redact("no forms", []) == "no forms"


def test_redacted_traceback() -> None:
    try:
        raise RuntimeError("failed with tb-secret-9")
    except RuntimeError as exc:
        text = redacted_traceback(exc, ["tb-secret-9"])
    assert "tb-secret-9" not in text and f"failed with {REDACTED}" in text
