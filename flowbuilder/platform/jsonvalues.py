"""JSON values that the database can store: the checks shared by definitions, execution
inputs and node outputs.

PostgreSQL's ``json``/``jsonb`` refuse a NUL character (``\\u0000``) and the drivers
refuse lone surrogates (not UTF-8); no JSON column stores NaN or Infinity; and anything
that walks a value recursively (``json.dumps``, ``copy.deepcopy``) raises RecursionError
on deep enough nesting. Everything here is iterative (an explicit stack), so a
100,000-deep value is reported, never a crash.
"""

from __future__ import annotations

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
    """
    root: list[Any] = [None]
    # (value, container to put the copy in, key in that container, depth, path)
    stack: list[tuple[Any, Any, Any, int, str]] = [(value, root, 0, 0, "")]
    while stack:
        item, container, slot, depth, path = stack.pop()
        if isinstance(item, str):
            if (reason := bad_string_reason(item)) is not None:
                if not repair:
                    raise Unstorable(path, reason)
                item = clean_string(item)
            container[slot] = item
        elif item is None or isinstance(item, bool | int):
            container[slot] = item
        elif isinstance(item, float):
            if not math.isfinite(item):
                if not repair:
                    raise Unstorable(path, f"not JSON serialisable ({item} is not a JSON number)")
                item = None
            container[slot] = item
        elif isinstance(item, dict | list | tuple):
            if depth >= max_depth:
                raise Unstorable(path, f"nested deeper than {max_depth} levels")
            if isinstance(item, dict):
                copy: dict[str, Any] = {}
                for key, child in item.items():
                    if not isinstance(key, str):
                        if not repair:
                            raise Unstorable(path, f"key {key!r} is not a string")
                        key = str(key)
                    if (reason := bad_string_reason(key)) is not None:
                        if not repair:
                            raise Unstorable(path, f"a key {reason}")
                        key = clean_string(key)
                    copy[key] = None
                    stack.append((child, copy, key, depth + 1, _path(path, key)))
            else:
                copy = [None] * len(item)  # type: ignore[assignment]
                for index, child in enumerate(item):
                    stack.append((child, copy, index, depth + 1, _path(path, index)))
            container[slot] = copy
        else:
            if not repair:
                raise Unstorable(path, f"not JSON serialisable ({type(item).__name__})")
            container[slot] = clean_string(str(item))
    return root[0]


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
