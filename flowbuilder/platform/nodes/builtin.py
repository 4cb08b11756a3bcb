"""Built-in node types that make no network call: HTML text extraction, JSON property
read/write, and delay. (The HTTP ones live in :mod:`flowbuilder.platform.nodes.http`.)
"""

from __future__ import annotations

import copy
import json
import math
import re
import time
from collections.abc import Mapping
from typing import Any

import structlog
from selectolax.lexbor import LexborHTMLParser, SelectolaxError

from flowbuilder.platform.nodes.base import (
    InputProblem,
    NodeCancelled,
    NodeContext,
    NodeError,
    NodeTimeout,
    NodeType,
    PortSpec,
    describe_type,
)
from flowbuilder.platform.settings import get_settings

logger = structlog.get_logger(__name__)

# --- property paths ---------------------------------------------------------------------

_PATH_TOKEN = re.compile(r"\[(-?\d+)\]|([^.\[\]]+)")
PathPart = str | int


def parse_property_path(path: str) -> list[PathPart]:
    """``items.0.name`` or ``items[0].name`` -> ``["items", "0", "name"]`` / ``[.., 0, ..]``.

    Dotted parts stay strings (``"0"`` indexes a list, or is a key of an object);
    bracketed parts are list indexes. Raises ValueError for a malformed path.
    """
    if not isinstance(path, str) or not path.strip():
        raise ValueError("property path is empty")
    parts: list[PathPart] = []
    pos = 0
    expect_part = True  # at the start, or just after a dot
    while pos < len(path):
        if path[pos] == "." and not expect_part:
            pos += 1
            expect_part = True
            continue
        match = _PATH_TOKEN.match(path, pos)
        if match is None or (match.group(2) is not None and not expect_part):
            raise ValueError(f"malformed property path {path!r} at position {pos}")
        if match.group(1) is not None:
            if expect_part and parts:
                raise ValueError(f"malformed property path {path!r} at position {pos}")
            parts.append(int(match.group(1)))
        else:
            parts.append(match.group(2))
        expect_part = False
        pos = match.end()
    if expect_part:
        raise ValueError(f"property path {path!r} ends with a dot")
    return parts


def _display(parts: list[PathPart]) -> str:
    return ".".join(str(p) for p in parts) or "(root)"


def _list_index(part: PathPart, size: int, *, allow_end: bool = False) -> int | None:
    if isinstance(part, int):
        index = part
    elif re.fullmatch(r"-?\d+", part):
        index = int(part)
    else:
        return None
    if index < 0:
        index += size
    if 0 <= index < size or (allow_end and index == size):
        return index
    return None


def _load_json_input(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except (ValueError, RecursionError):
            raise NodeError("input 'json' is a string that is not valid JSON") from None
    return value


def read_property(document: Any, parts: list[PathPart]) -> Any:
    current = document
    for depth, part in enumerate(parts):
        here = _display(parts[: depth + 1])
        if isinstance(current, Mapping):
            key = str(part)
            if key not in current:
                raise NodeError(f"property {here!r} not found")
            current = current[key]
        elif isinstance(current, list):
            index = _list_index(part, len(current))
            if index is None:
                raise NodeError(
                    f"property {here!r} not found (list of {len(current)} items, "
                    f"index {str(part)!r})"
                )
            current = current[index]
        else:
            raise NodeError(
                f"property {here!r} not found: {_display(parts[:depth])!r} is "
                f"{describe_type(current)}, not an object or list"
            )
    return current


def set_property(document: Any, parts: list[PathPart], value: Any) -> Any:
    """A deep copy of ``document`` with ``value`` at ``parts`` (missing objects created)."""
    result = copy.deepcopy(document)
    current = result
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        here = _display(parts[: depth + 1])
        if isinstance(current, dict):
            key = str(part)
            if last:
                current[key] = copy.deepcopy(value)
            else:
                current = current.setdefault(key, {})
        elif isinstance(current, list):
            index = _list_index(part, len(current), allow_end=last)
            if index is None:
                raise NodeError(f"cannot set {here!r}: no such list index")
            if last:
                if index == len(current):
                    current.append(copy.deepcopy(value))
                else:
                    current[index] = copy.deepcopy(value)
            else:
                current = current[index]
        else:
            raise NodeError(
                f"cannot set {here!r}: {_display(parts[:depth])!r} is "
                f"{describe_type(current)}, not an object or list"
            )
    return result


def _path_problems(static_inputs: Mapping[str, Any]) -> list[InputProblem]:
    path = static_inputs.get("property_path")
    if path is None:
        return []
    try:
        parse_property_path(path)
    except ValueError as exc:
        return [("property_path", "invalid_value", str(exc))]
    return []


def _parse_path_input(path: Any) -> list[PathPart]:
    try:
        return parse_property_path(path)
    except ValueError as exc:
        raise NodeError(f"input 'property_path': {exc}") from None


class ReadPropertyFromJsonNode(NodeType):
    type = "read_property_from_json"
    description = "Read one property (dotted path, list indexes allowed: items.0.name)."
    inputs = {
        "json": PortSpec("json", required=True, description="a JSON value, or a JSON string"),
        "property_path": PortSpec("string", required=True, description="e.g. items.0.name"),
    }
    outputs = {"value": PortSpec("any")}
    credits = 1
    timeout_seconds = 10.0

    def check_static_inputs(self, static_inputs: Mapping[str, Any]) -> list[InputProblem]:
        return _path_problems(static_inputs)

    def run(self, inputs: dict[str, Any], ctx: NodeContext) -> dict[str, Any]:
        parts = _parse_path_input(inputs["property_path"])
        document = _load_json_input(inputs["json"])
        return {"value": read_property(document, parts)}


class AddPropertyToJsonNode(NodeType):
    type = "add_property_to_json"
    description = "Return a copy of a JSON object with a property set (objects created)."
    inputs = {
        "json": PortSpec("json", required=True, description="an object, or a JSON string"),
        "property_path": PortSpec("string", required=True, description="e.g. meta.source"),
        "value": PortSpec("any", description="the value to set (null when absent)"),
    }
    outputs = {"json": PortSpec("json")}
    credits = 1
    timeout_seconds = 10.0

    def check_static_inputs(self, static_inputs: Mapping[str, Any]) -> list[InputProblem]:
        problems = _path_problems(static_inputs)
        document = static_inputs.get("json")
        if document is not None and not isinstance(document, dict | list | str):
            problems.append(("json", "invalid_value", "must be an object or a list"))
        return problems

    def run(self, inputs: dict[str, Any], ctx: NodeContext) -> dict[str, Any]:
        parts = _parse_path_input(inputs["property_path"])
        document = _load_json_input(inputs["json"])
        if not isinstance(document, dict | list):
            raise NodeError(
                f"input 'json' must be an object or a list, got {describe_type(document)}"
            )
        return {"json": set_property(document, parts, inputs.get("value"))}


# --- HTML -------------------------------------------------------------------------------

_INVISIBLE_TAGS = ["script", "style", "noscript", "template"]


def _selector_problem(selector: str) -> str | None:
    if not selector.strip():
        return "CSS selector is empty"
    try:
        LexborHTMLParser("<p></p>").css_first(selector)
    except (SelectolaxError, ValueError, TypeError):
        return f"invalid CSS selector {selector[:200]!r}"
    return None


def _text(node: Any) -> str:
    return " ".join(node.text(separator=" ").split())


class ExtractTextFromHtmlNode(NodeType):
    type = "extract_text_from_html"
    description = "Text of the first element (or every element, with all) matching a selector."
    inputs = {
        "html": PortSpec("html", required=True),
        "selector": PortSpec("string", required=True, description="a CSS selector"),
        "all": PortSpec("boolean", default=False, description="return a list of every match"),
    }
    outputs = {"text": PortSpec("any", description="a string, or a list of strings with all")}
    credits = 1
    timeout_seconds = 30.0

    def check_static_inputs(self, static_inputs: Mapping[str, Any]) -> list[InputProblem]:
        selector = static_inputs.get("selector")
        problem = _selector_problem(selector) if selector is not None else None
        return [("selector", "invalid_value", problem)] if problem else []

    def run(self, inputs: dict[str, Any], ctx: NodeContext) -> dict[str, Any]:
        selector = inputs["selector"]
        problem = _selector_problem(selector)
        if problem:
            raise NodeError(problem)
        tree = LexborHTMLParser(inputs["html"])
        tree.strip_tags(_INVISIBLE_TAGS)
        if inputs.get("all"):
            return {"text": [_text(node) for node in tree.css(selector)]}
        node = tree.css_first(selector)
        if node is None:
            raise NodeError(f"CSS selector {selector[:200]!r} matched nothing")
        return {"text": _text(node)}


# --- delay ------------------------------------------------------------------------------

_SLICE_SECONDS = 0.1


class DelayNode(NodeType):
    """Wait, then pass ``data`` on unchanged. Costs 1 credit: it holds a worker slot for
    its whole duration."""

    type = "delay"
    description = "Wait some seconds (at most MAX_DELAY_SECONDS), then pass data on."
    inputs = {
        "seconds": PortSpec("number", required=True),
        "data": PortSpec("any", description="passed through to the data output"),
    }
    outputs = {"slept_seconds": PortSpec("number"), "data": PortSpec("any")}
    credits = 1
    credential = "none"

    @property  # type: ignore[override]
    def timeout_seconds(self) -> float:
        # Room for the longest allowed delay, so the node deadline never cuts it short.
        return float(get_settings().MAX_DELAY_SECONDS) + 10.0

    def check_static_inputs(self, static_inputs: Mapping[str, Any]) -> list[InputProblem]:
        seconds = static_inputs.get("seconds")
        if seconds is None:
            return []
        limit = get_settings().MAX_DELAY_SECONDS
        if seconds < 0:
            return [("seconds", "invalid_value", "must not be negative")]
        if seconds > limit:
            return [("seconds", "invalid_value", f"must be at most {limit:g} (MAX_DELAY_SECONDS)")]
        return []

    def run(self, inputs: dict[str, Any], ctx: NodeContext) -> dict[str, Any]:
        try:
            requested = float(inputs["seconds"])
        except OverflowError:  # an integer too large for a float, from an upstream node
            requested = math.inf
        limit = float(get_settings().MAX_DELAY_SECONDS)
        seconds = min(max(requested, 0.0), limit)
        if seconds < requested:
            ctx.log.warning(f"delay of {requested:g}s shortened to {seconds:.3f}s")
            logger.info("delay_clamped", requested=requested, seconds=seconds, node_id=ctx.node_id)
        start = time.monotonic()
        end = start + seconds
        while True:
            if ctx.is_cancelled():
                raise NodeCancelled(f"delay cancelled after {time.monotonic() - start:.3f}s")
            now = time.monotonic()
            if now >= end:
                break
            if now >= ctx.deadline:
                # Reaching the deadline is a timeout, not a shorter delay that succeeded.
                raise NodeTimeout(f"delay of {seconds:g}s ran past the node's deadline")
            time.sleep(min(_SLICE_SECONDS, end - now, ctx.deadline - now))
        return {"slept_seconds": round(time.monotonic() - start, 3), "data": inputs.get("data")}


BUILTIN_TYPES: list[NodeType] = [
    ExtractTextFromHtmlNode(),
    ReadPropertyFromJsonNode(),
    AddPropertyToJsonNode(),
    DelayNode(),
]
