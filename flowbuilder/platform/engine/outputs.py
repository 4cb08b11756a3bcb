"""Node outputs made storable: the boundary between what a node returns and the database.

A node's outputs come from the outside world (an HTTP body, a webhook's JSON) and must
never wedge a run. Outputs that need nothing are copied by a JSON round trip in C;
otherwise one iterative pass (:func:`flowbuilder.platform.jsonvalues.make_storable`)
repairs what can be repaired (NUL and lone surrogates in strings and keys become U+FFFD,
NaN and Infinity become null, other objects their text) and refuses nesting deeper than
PHASE_OUTPUT_MAX_DEPTH: the node then fails with that reason, refunded per the policy.
The result is serialised once to measure it, and that text is what the database stores
(:class:`~flowbuilder.platform.jsonvalues.SerialisedJSON`, with the text of each
top-level value, from which the next phase's inputs are composed); above
PHASE_OUTPUT_MAX_BYTES the largest values are replaced by a note
(``{"_truncated": true, "size_bytes": n}``).
"""

from __future__ import annotations

import gc
import json
from itertools import accumulate
from typing import Any

from flowbuilder.platform.jsonvalues import (
    SerialisedJSON,
    Unstorable,
    make_storable,
    object_text,
)

__all__ = ["Unstorable", "storable_outputs", "storable_outputs_text"]

_SEPARATORS = (",", ":")
# Outputs with more keys than this are serialised by one json.dumps call, without the
# text of each value (one call per value would cost more than it saves downstream).
_MAX_PARTS = 64
# The depth check on the text: its quotes and brackets only, both kinds as "[" and "]".
_BRACKETS = bytes.maketrans(b"{}", b"[]")
_NOT_MARKS = bytes(sorted(set(range(256)) - set(b'[]{}"')))
_STEP = [0] * 256
_STEP[ord("[")], _STEP[ord("]")] = 1, -1
# Levels peeled with bytes.replace before counting the rest in one pass: typical outputs
# are a few levels deep (a few C passes); a deep value is counted, never peeled 500 times.
_PEEL_PASSES = 8
# Values stored as they are, with no copy, when the encoder took them: exactly these
# types (a subclass of int or float may carry state, or serialise differently).
_SCALARS = frozenset({int, float, bool, type(None)})


# json.dumps with these options, the encoders built once: json.dumps builds one per call
# when given any option (a few Python calls each time, on every phase's path).
_text = json.JSONEncoder(ensure_ascii=False, separators=_SEPARATORS).encode
_dumps = json.JSONEncoder(ensure_ascii=False, separators=_SEPARATORS, allow_nan=False).encode


def _text_and_parts(
    outputs: dict[Any, Any], known: dict[str, str] | None = None
) -> tuple[str, dict[str, str] | None]:
    """The compact JSON text of ``outputs`` and, when its keys are all plain strings (and
    not too many), the text of each value as it appears in it; ``known`` gives the text
    of some values already (not serialised again). Raises what json.dumps raises
    (ValueError for NaN, TypeError for an object, RecursionError)."""
    if _has_parts(outputs):
        known = known or {}
        parts = {
            key: known[key] if key in known else _dumps(value) for key, value in outputs.items()
        }
        return object_text(parts), parts
    return _dumps(outputs), None


def _has_parts(outputs: dict[Any, Any]) -> bool:
    return len(outputs) <= _MAX_PARTS and all(type(key) is str for key in outputs)


def _too_deep(data: bytes, max_depth: int) -> bool:
    """Whether ``data``, JSON text as json.dumps writes it (UTF-8), nests more than
    ``max_depth`` containers deep: read from its brackets with C bytes methods (no
    per-container Python work), innermost pairs removed level by level."""
    if b"\\" in data:
        # Escaped backslashes first (the \ before a closing quote is not an escaped
        # quote), then escaped quotes: every quote left delimits a string.
        data = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    # Quotes and brackets only; then the strings with no bracket inside (nearly all) go
    # as "" pairs. A pair may also be one string's end and the next one's start, with
    # nothing between them: that merges two strings into one, which changes nothing.
    marks = data.translate(_BRACKETS, _NOT_MARKS).replace(b'""', b"")
    if b'"' in marks:  # strings holding brackets: keep what is outside them
        marks = b"".join(marks.split(b'"')[::2])
    removed = 0  # levels removed from the bottom: what is left is that much less deep
    while marks:
        if removed == max_depth:
            return True
        if removed == _PEEL_PASSES:
            return removed + max(accumulate(map(_STEP.__getitem__, marks))) > max_depth
        marks = marks.replace(b"[]", b"")
        removed += 1
    return False


def _loads(text: str) -> Any:
    """json.loads without the cyclic collector's pauses: 100 KB of small records are
    thousands of new containers, which trigger collections that walk every container the
    run holds (the earlier phases' outputs), several times per call. JSON makes no cycles,
    so nothing is left for the collector; counting resumes when it is enabled again.
    Nodes of one phase run in threads: another thread's collection is at most delayed,
    and the collector ends enabled, as found (nothing in the project disables it)."""
    if not gc.isenabled():
        return json.loads(text)
    gc.disable()
    try:
        return json.loads(text)
    finally:
        gc.enable()


def _handed_in(outputs: dict[Any, Any], inputs: Any) -> dict[str, str]:
    """The output keys whose value is the very object the engine handed in as one of the
    node's inputs (identity), with that input's text (its part, see
    :class:`SerialisedJSON`). Such values are storable already (made so upstream, or
    validated static inputs), and the engine owns them."""
    if type(inputs) is not SerialisedJSON or not inputs.parts or not _has_parts(outputs):
        return {}
    known = {id(value): inputs.parts.get(key) for key, value in inputs.items()}
    return {
        key: text for key, value in outputs.items() if (text := known.get(id(value))) is not None
    }


def _plain_copy(
    outputs: dict[Any, Any], max_depth: int, inputs: Any = None, keeps_inputs: bool = False
) -> tuple[dict[str, Any], str, dict[str, str] | None] | None:
    """The fast path for outputs that need no repair (nearly all): serialised and read
    back by the C encoder and decoder, about twice as fast as make_storable's Python pass
    on 100 KB of small records, with the same result. None when something may need a
    repair or a refusal, which that pass then decides: NaN or an object (the encoder
    raises), a NUL (escaped as \\u0000; a string holding that escape's text also lands
    there, harmlessly), a lone surrogate (not UTF-8), or nesting deeper than
    ``max_depth`` (checked on the text, before anything reads it back). Tuples become
    lists and int, float, bool and None keys their JSON text, as make_storable does.

    A value the node passes on from its ``inputs`` unchanged (see :func:`_handed_in`) is
    kept, not read back: a run that hands 100 KB along a chain parses nothing again.
    Unchanged means serialising to the text it came with; a node type that never changes
    its inputs in place (``keeps_inputs``: the built-in delay) is taken at its word, and
    the value is not even serialised again. Returns the copy, its text and the text of
    each value (see :func:`_text_and_parts`).
    """
    handed = _handed_in(outputs, inputs)
    try:
        text, parts = _text_and_parts(outputs, handed if keeps_inputs else None)
    except (ValueError, TypeError, RecursionError):
        return None
    same = {key for key, part in handed.items() if parts is not None and parts[key] == part}
    if (
        parts is not None
        and all(key in same or type(value) in _SCALARS for key, value in outputs.items())
        and _plain_keys(outputs)
    ):
        # Nothing to read back: numbers, booleans and nulls are immutable, and the
        # encoder refused what JSON cannot hold (NaN); the rest was handed in as it came.
        return dict(outputs), text, parts
    rest = text
    if same:
        assert parts is not None  # _handed_in finds nothing without them
        rest = object_text({key: part for key, part in parts.items() if key not in same})
    if "\\u0000" in rest:
        return None
    try:
        data = rest.encode()
    except UnicodeEncodeError:
        return None
    if _too_deep(data, max_depth):
        return None
    if not same:
        return _loads(text), text, parts
    fresh = _loads(rest)
    return {key: outputs[key] if key in same else fresh[key] for key in outputs}, text, parts


def _plain_keys(outputs: dict[str, Any]) -> bool:
    """Whether the (string) keys hold no NUL and no lone surrogate: nothing to repair."""
    keys = "".join(outputs)
    if "\x00" in keys:
        return False
    try:
        keys.encode()
    except UnicodeEncodeError:
        return False
    return True


def _size(value: Any) -> int:
    return len(_text(value).encode())


def storable_outputs(outputs: Any, *, max_bytes: int, max_depth: int) -> dict[str, Any]:
    """A JSON-only copy of ``outputs`` that the database stores, capped at ``max_bytes``.

    Raises :class:`Unstorable` when it cannot be made storable (not an object, too deep).
    """
    return storable_outputs_text(outputs, max_bytes=max_bytes, max_depth=max_depth)[0]


def storable_outputs_text(
    outputs: Any,
    *,
    max_bytes: int,
    max_depth: int,
    inputs: Any = None,
    keeps_inputs: bool = False,
) -> tuple[dict[str, Any], str]:
    """:func:`storable_outputs` and its JSON text (what the database stores). The copy is
    a :class:`SerialisedJSON` carrying that text (and its values' texts when known).
    ``inputs``: what the node was called with (the engine's SerialisedJSON), whose values
    it may pass on unchanged; ``keeps_inputs``: the node type never changes its inputs in
    place (see :func:`_plain_copy`)."""
    if not isinstance(outputs, dict):
        raise Unstorable("", f"outputs must be an object, not {type(outputs).__name__}")
    fast = _plain_copy(outputs, max_depth, inputs, keeps_inputs)
    if fast is not None:
        clean, text, parts = fast
    else:
        clean = make_storable(outputs, max_depth=max_depth, repair=True)
        text, parts = _text_and_parts(clean)
    if len(text) <= max_bytes // 4 or len(text.encode()) <= max_bytes:
        return SerialisedJSON(clean, text, parts), text
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
    capped_text = _text(capped)
    return SerialisedJSON(capped, capped_text), capped_text
