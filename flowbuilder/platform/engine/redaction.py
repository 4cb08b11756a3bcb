"""Credential redaction: nothing a node produced is stored with its credential in it.

Self-contained on purpose (it is reworked separately).
"""

from __future__ import annotations

from typing import Any

REDACTED = "[redacted]"


def _secret_forms(value: str) -> list[str]:
    """The spellings of a secret that may show up in text: as is, base64 (HTTP Basic),
    and the password half of ``user:password``. Longest first, so replacing one form
    never leaves a fragment of another."""
    import base64

    forms = {value, value.strip(), base64.b64encode(value.encode()).decode()}
    if ":" in value:
        forms.add(value.split(":", 1)[1])
    return sorted((f for f in forms if len(f) >= 4), key=len, reverse=True)


def _redact_value(value: Any, forms: list[str]) -> Any:
    if isinstance(value, str):
        for form in forms:
            if form in value:
                value = value.replace(form, REDACTED)
        return value
    if isinstance(value, dict):
        return {_redact_value(k, forms): _redact_value(v, forms) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(v, forms) for v in value]
    return value
