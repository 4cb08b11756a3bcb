"""Built-in node types that make no network call: HTML text extraction, JSON property
read/write, and delay. (The HTTP ones live in :mod:`flowbuilder.platform.nodes.http`.)
"""

from __future__ import annotations

import copy
import json
import math
import re
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
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
    pure = True  # computes from its inputs only: may start before its phase commits
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
    pure = True  # computes from its inputs only: may start before its phase commits
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
_CSS_CHILD = Path(__file__).with_name("_css_child.py")
_START_TAG = re.compile(r"<[A-Za-z]")
# The child process's address-space limit: room for lexbor's tree of the largest
# allowed document, and a bound on what one selection can take from the machine.
_CHILD_MEMORY_BYTES = 1024 * 1024 * 1024
_POLL_SECONDS = 0.25


def selector_problem(selector: str) -> str | None:
    """What is wrong with a CSS selector (caps first, then lexbor's parser), or None.

    The caps come before any parsing: a selector of 200 KB of nested ``:is(`` costs
    seconds to compile.
    """
    if not selector.strip():
        return "CSS selector is empty"
    settings = get_settings()
    if len(selector) > settings.CSS_SELECTOR_MAX_CHARS:
        return (
            f"CSS selector is {len(selector)} characters long, more than "
            f"{settings.CSS_SELECTOR_MAX_CHARS} (CSS_SELECTOR_MAX_CHARS)"
        )
    depth = deepest = 0
    for char in selector:
        if char == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif char == ")":
            depth -= 1
    if deepest > settings.CSS_SELECTOR_MAX_NESTING:
        return (
            f"CSS selector nests parentheses {deepest} deep, more than "
            f"{settings.CSS_SELECTOR_MAX_NESTING} (CSS_SELECTOR_MAX_NESTING)"
        )
    count = selector.count(",") + 1
    if count > settings.CSS_SELECTOR_MAX_SELECTORS:
        return (
            f"CSS selector lists {count} selectors, more than "
            f"{settings.CSS_SELECTOR_MAX_SELECTORS} (CSS_SELECTOR_MAX_SELECTORS)"
        )
    try:
        LexborHTMLParser("<p></p>").css_first(selector)
    except (SelectolaxError, ValueError, TypeError):
        return f"invalid CSS selector {selector[:200]!r}"
    return None


def html_problem(html: str) -> str | None:
    """Whether ``html`` is within HTML_MAX_BYTES and HTML_MAX_ELEMENTS (start tags)."""
    settings = get_settings()
    size = len(html.encode("utf-8", errors="surrogatepass"))
    if size > settings.HTML_MAX_BYTES:
        return f"input 'html' is {size} bytes, more than {settings.HTML_MAX_BYTES} (HTML_MAX_BYTES)"
    elements = sum(1 for _ in _START_TAG.finditer(html))
    if elements > settings.HTML_MAX_ELEMENTS:
        return (
            f"input 'html' has {elements} tags, more than {settings.HTML_MAX_ELEMENTS} "
            "(HTML_MAX_ELEMENTS)"
        )
    return None


def select_text(html: str, selector: str, *, every: bool, ctx: NodeContext) -> Any:
    """Run the selector in a child process that is killed at the node's deadline.

    Even within the caps, matching can be combinatorial (``section div div p`` over
    2,000 nested divs takes seconds), and selectolax holds the GIL meanwhile: in this
    process it would stop the lease heartbeat and every other running node.
    """
    request = {
        "html": html,
        "selector": selector,
        "all": every,
        "strip": _INVISIBLE_TAGS,
        "max_output_chars": get_settings().HTML_MAX_BYTES,
        "memory_bytes": _CHILD_MEMORY_BYTES,
    }
    payload = json.dumps(request, ensure_ascii=True).encode("ascii")
    started = time.monotonic()
    # -I: the child sees neither PYTHONPATH nor the user's site directory.
    proc = subprocess.Popen(
        [sys.executable, "-I", str(_CSS_CHILD)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = proc.communicate(payload, timeout=_slice(ctx))
    except subprocess.TimeoutExpired:
        out = err = None
        while out is None:
            if ctx.is_cancelled() or ctx.remaining() <= 0:
                proc.kill()
                proc.communicate()
                seconds = time.monotonic() - started
                logger.warning(
                    "css_selection_stopped",
                    node_id=ctx.node_id,
                    seconds=round(seconds, 3),
                    cancelled=ctx.is_cancelled(),
                )
                ctx.check()  # raises NodeCancelled or NodeTimeout
                raise NodeTimeout(f"CSS selection stopped after {seconds:.1f}s") from None
            try:
                out, err = proc.communicate(timeout=_slice(ctx))
            except subprocess.TimeoutExpired:
                continue
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    try:
        answer = json.loads(out or b"")
    except ValueError:
        answer = None
    if not isinstance(answer, dict) or proc.returncode != 0:
        logger.error(
            "css_selection_crashed",
            node_id=ctx.node_id,
            returncode=proc.returncode,
            stderr=(err or b"")[-500:].decode("utf-8", "replace"),
        )
        raise NodeError("CSS selection failed (the HTML or the selector is too costly)")
    if "error" in answer:
        raise NodeError(str(answer["error"]))
    return answer.get("text")


def _slice(ctx: NodeContext) -> float:
    return max(0.01, min(_POLL_SECONDS, ctx.remaining()))


class ExtractTextFromHtmlNode(NodeType):
    type = "extract_text_from_html"
    pure = True  # computes from its inputs only: may start before its phase commits
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
        problems: list[InputProblem] = []
        selector = static_inputs.get("selector")
        problem = selector_problem(selector) if selector is not None else None
        if problem:
            problems.append(("selector", "invalid_value", problem))
        html = static_inputs.get("html")
        problem = html_problem(html) if isinstance(html, str) else None
        if problem:
            problems.append(("html", "invalid_value", problem))
        return problems

    def check_inputs(self, inputs: Mapping[str, Any]) -> None:
        super().check_inputs(inputs)
        problem = selector_problem(inputs["selector"]) or html_problem(inputs["html"])
        if problem:
            raise NodeError(problem)

    def run(self, inputs: dict[str, Any], ctx: NodeContext) -> dict[str, Any]:
        selector = inputs["selector"]
        text = select_text(inputs["html"], selector, every=bool(inputs.get("all")), ctx=ctx)
        if text is None:
            raise NodeError(f"CSS selector {selector[:200]!r} matched nothing")
        return {"text": text}


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
    keeps_inputs = True  # data is passed on untouched
    pure = True  # waits, and nothing else: may start before its phase commits
    inline = True  # sleeps in slices of at most 0.1 s, checking its deadline and a cancel

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
