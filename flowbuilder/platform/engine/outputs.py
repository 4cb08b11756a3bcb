"""Node outputs made storable: the boundary between what a node returns and the database.

A node's outputs come from the outside world (an HTTP body, a webhook's JSON) and must
never wedge a run. Outputs that need nothing are copied by a JSON round trip in C;
otherwise one iterative pass (:func:`flowbuilder.platform.jsonvalues.make_storable`)
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


def _too_deep(value: Any, max_depth: int) -> bool:
    """Whether ``value`` (plain dicts and lists, as json.loads returns) nests more than
    ``max_depth`` containers deep: level by level, containers only (no per-scalar work)."""
    level = [value]
    depth = 1
    while level:
        if depth > max_depth:
            return True
        below: list[Any] = []
        for container in level:
            children = container.values() if type(container) is dict else container
            below += [c for c in children if type(c) is dict or type(c) is list]
        level = below
        depth += 1
    return False


def _plain_copy(outputs: dict[str, Any], max_depth: int) -> tuple[dict[str, Any], str] | None:
    """The fast path for outputs that need no repair (nearly all): serialised and read
    back by the C encoder and decoder, about twice as fast as make_storable's Python pass
    on 100 KB of small records, with the same result. None when something may need a
    repair or a refusal, which that pass then decides: NaN or an object (the encoder
    raises), a NUL (escaped as \\u0000; a string holding that escape's text also lands
    there, harmlessly), a lone surrogate (not UTF-8), or nesting deeper than
    ``max_depth``. Tuples become lists and int, float, bool and None keys their JSON
    text, as make_storable does.
    """
    try:
        text = json.dumps(outputs, ensure_ascii=False, separators=_SEPARATORS, allow_nan=False)
    except (ValueError, TypeError, RecursionError):
        return None
    if "\\u0000" in text:
        return None
    try:
        text.encode()
    except UnicodeEncodeError:
        return None
    clean = json.loads(text)
    if _too_deep(clean, max_depth):
        return None
    return clean, text


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
    fast = _plain_copy(outputs, max_depth)
    if fast is not None:
        clean, text = fast
    else:
        clean = make_storable(outputs, max_depth=max_depth, repair=True)
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
