"""Node outputs made storable: the boundary between what a node returns and the database.

A node's outputs come from the outside world (an HTTP body, a webhook's JSON) and must
never wedge a run. One iterative pass (:func:`flowbuilder.platform.jsonvalues.make_storable`)
repairs what can be repaired (NUL and lone surrogates in strings and keys become U+FFFD,
NaN and Infinity become null, other objects their text) and refuses nesting deeper than
PHASE_OUTPUT_MAX_DEPTH: the node then fails with that reason, refunded per the policy.
The result is serialised once to measure it, and that text is what the database stores
(:class:`~flowbuilder.platform.jsonvalues.SerialisedJSON`); above PHASE_OUTPUT_MAX_BYTES
the largest values are replaced by a note (``{"_truncated": true, "size_bytes": n}``).
"""

from __future__ import annotations

import json
from typing import Any

from flowbuilder.platform.jsonvalues import Unstorable, make_storable

__all__ = ["Unstorable", "storable_outputs", "storable_outputs_text"]

_SEPARATORS = (",", ":")


def _text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=_SEPARATORS)


def _size(value: Any) -> int:
    return len(_text(value).encode())


def storable_outputs(outputs: Any, *, max_bytes: int, max_depth: int) -> dict[str, Any]:
    """A JSON-only copy of ``outputs`` that the database stores, capped at ``max_bytes``.

    Raises :class:`Unstorable` when it cannot be made storable (not an object, too deep).
    """
    return storable_outputs_text(outputs, max_bytes=max_bytes, max_depth=max_depth)[0]


def storable_outputs_text(
    outputs: Any, *, max_bytes: int, max_depth: int
) -> tuple[dict[str, Any], str]:
    """:func:`storable_outputs` and its JSON text (what the database stores)."""
    if not isinstance(outputs, dict):
        raise Unstorable("", f"outputs must be an object, not {type(outputs).__name__}")
    clean: dict[str, Any] = make_storable(outputs, max_depth=max_depth, repair=True)
    text = _text(clean)
    if len(text) <= max_bytes // 4 or len(text.encode()) <= max_bytes:
        return clean, text
    capped: dict[str, Any] = {}
    budget = max_bytes - 32  # room for the "_truncated" marker itself
    omitted = 0
    for key, value in clean.items():
        if budget < 64 + len(key.encode()):
            omitted += 1  # not even room for a note: thousands of keys
            continue
        size = _size(value)
        cost = size + len(key.encode()) + 8
        if cost <= budget:
            capped[key] = value
            budget -= cost
        else:
            capped[key] = {"_truncated": True, "size_bytes": size}
            budget -= len(key.encode()) + 48
    capped["_truncated"] = True
    if omitted:
        capped["_omitted_keys"] = omitted
    return capped, _text(capped)
