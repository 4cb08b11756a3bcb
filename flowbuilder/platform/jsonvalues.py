"""JSON values that the database can store: the checks shared by definitions, execution
inputs and node outputs.

PostgreSQL's ``json``/``jsonb`` refuse a NUL character (``\\u0000``) and the drivers
refuse lone surrogates (not UTF-8); no JSON column stores NaN or Infinity; and anything
that walks a value recursively (``json.dumps``, ``copy.deepcopy``) raises RecursionError
on deep enough nesting. Everything here is iterative (an explicit stack), so a
100,000-deep value is reported, never a crash.
"""

from __future__ import annotations

import json
import math
from typing import Any

REPLACEMENT = "\ufffd"
# A stored document (a definition, execution inputs) nests at most this deep: static
# inputs nest up to 64 levels (definitions.MAX_INPUT_DEPTH), plus the document's own
# structure. Checked iteratively before anything recursive walks it.
MAX_DOCUMENT_DEPTH = 80


class Unstorable(ValueError):
    """A value the database cannot store, with a path naming where."""

    def __init__(self, path: str, problem: str) -> None:
        shown = path if len(path) <= 120 else f"{path[:60]}...{path[-40:]}"
        super().__init__(f"{shown or '(root)'}: {problem}")
        self.path, self.problem = path, problem


class SerialisedJSON(dict):  # type: ignore[type-arg]
    """A JSON object that comes with its serialisation: the engines' JSON serialiser
    (:func:`dumps_json`) writes ``text`` instead of serialising the object a second time
    (node outputs are serialised once already, to measure them). To everything else it is
    the plain dict it holds, so an engine without that serialiser still stores it right.

    ``parts``, when known, maps each key to the JSON text of its value as it appears in
    ``text``: a phase's inputs are composed from these instead of serialising the
    upstream outputs again (:meth:`~flowbuilder.platform.plan.ExecutionPlan.resolve_inputs`).
    Wrapping a SerialisedJSON again with its own text keeps its parts.
    """

    __slots__ = ("text", "parts")

    def __init__(
        self, value: dict[str, Any], text: str, parts: dict[str, str] | None = None
    ) -> None:
        super().__init__(value)
        self.text = text
        if parts is None and type(value) is SerialisedJSON and value.text == text:
            parts = value.parts
        self.parts = parts


# json.dumps(key, ensure_ascii=False) and json.dumps(item, separators=(",", ":")), their
# encoders built once (json.dumps builds one per call when given an option).
_key_text = json.JSONEncoder(ensure_ascii=False).encode
_compact_text = json.JSONEncoder(separators=(",", ":")).encode


def object_text(parts: dict[str, str]) -> str:
    """The JSON text of an object whose values' texts are ``parts`` (key: value text),
    compact, keys written as the node boundary writes them (not ASCII-escaped)."""
    members = [_key_text(key) + ":" + part for key, part in parts.items()]
    return "{" + ",".join(members) + "}"


def serialised_object(value: dict[str, Any], known: dict[str, str]) -> SerialisedJSON:
    """``value`` (a dict with string keys) with its JSON text, taking the text of the
    values named in ``known`` from there (e.g. the upstream outputs' parts, see
    :class:`SerialisedJSON`) instead of serialising them again; the others are
    serialised as :func:`dumps_json` does. Raises what json.dumps raises."""
    parts = {
        key: known[key] if key in known else _compact_text(item) for key, item in value.items()
    }
    return SerialisedJSON(value, object_text(parts), parts)


def dumps_json(value: Any) -> str:
    """The database engines' ``json_serializer``: json.dumps, except for SerialisedJSON."""
    if type(value) is SerialisedJSON:
        return value.text
    return json.dumps(value)


def bad_string_reason(text: str) -> str | None:
    """Why ``text`` cannot be stored as is (NUL, a lone surrogate), or None."""
    if "\x00" in text:
        return "contains a NUL character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "contains a lone surrogate (not valid Unicode)"
    return None


def clean_string(text: str) -> str:
    """``text`` with NUL characters and lone surrogates replaced by U+FFFD."""
    if "\x00" in text:
        text = text.replace("\x00", REPLACEMENT)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
        # A surrogate pair written as two code points is valid once re-encoded; a lone one
        # becomes U+FFFD (one per byte of it: good enough to show where it was).
    return text


def _path(parent: str, key: Any) -> str:
    return f"{parent}[{key}]" if isinstance(key, int) else (f"{parent}.{key}" if parent else key)


def make_storable(value: Any, *, max_depth: int, repair: bool) -> Any:
    """A copy of ``value`` made of dict/list/str/int/float/bool/None only, storable as JSON.

    ``repair=True`` (node outputs): NUL and lone surrogates in strings and keys become
    U+FFFD, NaN and Infinity become null, tuples become lists, other objects their
    ``str()``. ``repair=False`` (definitions, execution inputs: the user's own data):
    any of these raises :class:`Unstorable`. Nesting deeper than ``max_depth`` raises
    :class:`Unstorable` either way (there is no sensible repair). One pass, iterative.

    Hot (every node's outputs, 100 KB of them and more): the children of a container
    that are plain scalars (exactly str, int, bool, None, float) are checked and copied
    in place, with the string checks done by C methods; only containers and anything
    unusual go through the stack. Paths are built only for an error.
    """
    root: list[Any] = [None]
    # (value, container to put the copy in, key in that container, depth, trail); a trail
    # is (parent trail, key), None at the root, made into a path only for an error.
    stack: list[tuple[Any, Any, Any, int, Any]] = [(value, root, 0, 0, None)]
    while stack:
        item, container, slot, depth, trail = stack.pop()
        if isinstance(item, dict | list | tuple):
            if depth >= max_depth:
                raise Unstorable(_trail_path(trail), f"nested deeper than {max_depth} levels")
            is_dict = isinstance(item, dict)
            if is_dict:
                copy: Any = {}
                pairs: Any = item.items()
            else:
                copy = [None] * len(item)
                pairs = enumerate(item)
            for key, child in pairs:
                if is_dict and (type(key) is not str or "\x00" in key or not key.isascii()):
                    key = _storable_key(key, repair, trail)
                kind = type(child)
                if kind is str:
                    if "\x00" in child or (not child.isascii() and bad_string_reason(child)):
                        if not repair:
                            raise Unstorable(
                                _trail_path((trail, key)), bad_string_reason(child) or ""
                            )
                        child = clean_string(child)
                    copy[key] = child
                elif (
                    kind is int
                    or kind is bool
                    or child is None
                    or (kind is float and math.isfinite(child))
                ):
                    copy[key] = child
                else:  # a container, a non-finite float, a subclass, an object
                    copy[key] = None
                    stack.append((child, copy, key, depth + 1, (trail, key)))
            container[slot] = copy
        elif isinstance(item, str):
            if (reason := bad_string_reason(item)) is not None:
                if not repair:
                    raise Unstorable(_trail_path(trail), reason)
                item = clean_string(item)
            container[slot] = item
        elif item is None or isinstance(item, bool | int):
            container[slot] = item
        elif isinstance(item, float):
            if not math.isfinite(item):
                if not repair:
                    raise Unstorable(
                        _trail_path(trail), f"not JSON serialisable ({item} is not a JSON number)"
                    )
                item = None
            container[slot] = item
        else:
            if not repair:
                raise Unstorable(
                    _trail_path(trail), f"not JSON serialisable ({type(item).__name__})"
                )
            container[slot] = clean_string(str(item))
    return root[0]


def _storable_key(key: Any, repair: bool, trail: Any) -> str:
    """A dict key as stored: a string without NUL or lone surrogates (or Unstorable)."""
    if not isinstance(key, str):
        if not repair:
            raise Unstorable(_trail_path(trail), f"key {key!r} is not a string")
        # JSON's own spelling (what json.dumps writes for these keys), so outputs made
        # storable here and by the engine's JSON round trip agree.
        key = (
            "true"
            if key is True
            else "false"
            if key is False
            else "null"
            if key is None
            else str(key)
        )
    if (reason := bad_string_reason(key)) is not None:
        if not repair:
            raise Unstorable(_trail_path(trail), f"a key {reason}")
        key = clean_string(key)
    return key


def _trail_path(trail: Any) -> str:
    keys: list[Any] = []
    while trail is not None:
        trail, key = trail
        keys.append(key)
    path = ""
    for key in reversed(keys):
        path = _path(path, key)
    return path


def depth_of(value: Any, limit: int) -> int:
    """The nesting depth of ``value``, counting up to ``limit + 1`` at most (iterative)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list | tuple):
            depth += 1
            deepest = max(deepest, depth)
            if depth > limit:
                return depth
            children = item.values() if isinstance(item, dict) else item
            stack.extend((c, depth) for c in children if isinstance(c, dict | list | tuple))
    return deepest


def copy_json(value: Any) -> Any:
    """A copy of a JSON value (dicts and lists copied, scalars shared), iteratively.

    Cheaper than ``copy.deepcopy`` (no memo, no reduce protocol) and never a
    RecursionError. Values here were made storable already, so they are JSON-only."""
    if not isinstance(value, dict | list):
        return value
    root: list[Any] = [None]
    stack: list[tuple[Any, Any, Any]] = [(value, root, 0)]
    while stack:
        item, container, slot = stack.pop()
        if isinstance(item, dict):
            copy: Any = dict(item)
            for key, child in item.items():
                if isinstance(child, dict | list):
                    stack.append((child, copy, key))
        elif isinstance(item, list):
            copy = list(item)
            for index, child in enumerate(item):
                if isinstance(child, dict | list):
                    stack.append((child, copy, index))
        else:
            copy = item
        container[slot] = copy
    return root[0]
