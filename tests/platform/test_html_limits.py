"""extract_text_from_html cannot stall the process (issue 10, item 9).

The selector is bounded (length, parenthesis nesting, number of selectors) when a
definition is validated and when the node runs; the HTML is bounded (bytes, tags); and
the matching itself runs in a child process that is killed at the node's deadline, so a
costly selector never holds this process's GIL. (Figures: ``python -m
benchmarks.css_worst_case``; no duration is asserted here.)
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from flowbuilder.platform.definitions import validate_definition
from flowbuilder.platform.errors import ValidationFailed
from flowbuilder.platform.nodes import (
    NodeCancelled,
    NodeContext,
    NodeError,
    NodeTimeout,
    get_node_type,
)
from flowbuilder.platform.settings import get_settings, override_settings


def make_ctx(seconds: float = 20.0, cancelled: Any = None) -> NodeContext:
    return NodeContext(
        "exec-1", "user-1", "n1", deadline=time.monotonic() + seconds, cancelled=cancelled
    )


def extract(html: str, selector: str, ctx: NodeContext | None = None, **extra: Any) -> Any:
    node_type = get_node_type("extract_text_from_html")
    return node_type.invoke({"html": html, "selector": selector, **extra}, ctx or make_ctx())


def definition(selector: str, html: str = "<p>x</p>") -> dict[str, Any]:
    return {
        "version": 1,
        "nodes": [
            {
                "id": "x",
                "type": "extract_text_from_html",
                "inputs": {"html": html, "selector": selector},
            }
        ],
        "edges": [],
    }


def over_caps() -> dict[str, tuple[str, str]]:
    s = get_settings()
    return {
        "length": ("div " * s.CSS_SELECTOR_MAX_CHARS + "p", "CSS_SELECTOR_MAX_CHARS"),
        "nesting": (":is(" * 50_000 + "p" + ")" * 50_000, "CSS_SELECTOR_MAX_CHARS"),
        "nesting within length": (
            ":is(" * (s.CSS_SELECTOR_MAX_NESTING + 1)
            + "p"
            + ")" * (s.CSS_SELECTOR_MAX_NESTING + 1),
            "CSS_SELECTOR_MAX_NESTING",
        ),
        "selectors": (
            ",".join(["p"] * (s.CSS_SELECTOR_MAX_SELECTORS + 1)),
            "CSS_SELECTOR_MAX_SELECTORS",
        ),
    }


@pytest.mark.parametrize("case", ["length", "nesting", "nesting within length", "selectors"])
def test_selector_caps_refuse_at_definition_validation(case: str) -> None:
    selector, setting = over_caps()[case]
    with pytest.raises(ValidationFailed) as info:
        validate_definition(definition(selector), owned_credential_ids=None)
    problems = [str(p) for p in info.value.problems]
    assert any("nodes[0].inputs.selector" in p and setting in p for p in problems), problems


@pytest.mark.parametrize("case", ["length", "nesting", "nesting within length", "selectors"])
def test_selector_caps_refuse_at_the_node(case: str) -> None:
    """A selector that arrives through an edge is checked by the node itself."""
    selector, setting = over_caps()[case]
    with pytest.raises(NodeError, match=setting):
        extract("<p>x</p>", selector)


def test_html_caps_refuse_at_the_node_and_in_definitions() -> None:
    with override_settings(HTML_MAX_BYTES=2048):
        with pytest.raises(NodeError, match="HTML_MAX_BYTES"):
            extract("<p>" + "x" * 5000 + "</p>", "p")
        with pytest.raises(ValidationFailed, match="HTML_MAX_BYTES"):
            validate_definition(definition("p", "<p>" + "x" * 5000), owned_credential_ids=None)
    with (
        override_settings(HTML_MAX_ELEMENTS=100),
        pytest.raises(NodeError, match="HTML_MAX_ELEMENTS"),
    ):
        extract("<div>" * 101 + "<p>x</p>", "p")


def test_selectors_at_the_caps_are_accepted_and_work() -> None:
    s = get_settings()
    nested = ":is(" * s.CSS_SELECTOR_MAX_NESTING + "p" + ")" * s.CSS_SELECTOR_MAX_NESTING
    listed = ",".join(["p"] * s.CSS_SELECTOR_MAX_SELECTORS)
    validate_definition(definition(nested), owned_credential_ids=None)
    validate_definition(definition(listed), owned_credential_ids=None)
    assert extract("<div><p> a  b </p></div>", nested) == {"text": "a b"}
    assert extract("<p>1</p><p>2</p>", listed, all=True) == {"text": ["1", "2"]}


def test_worst_case_at_the_caps_completes() -> None:
    """Deep nesting at HTML_MAX_ELEMENTS with the costliest selectors we know (nested
    :is at the nesting cap, a full list of :has, backtracking descendant chains): each
    call ends, with its text or with a timeout at the node's deadline."""
    s = get_settings()
    html = "<div>" * (s.HTML_MAX_ELEMENTS - 1) + "<p>x</p>"
    selectors = [
        ":is(" * s.CSS_SELECTOR_MAX_NESTING + "div p" + ")" * s.CSS_SELECTOR_MAX_NESTING,
        ", ".join(["div:has(div p)"] * s.CSS_SELECTOR_MAX_SELECTORS),
        "section div div div p",
    ]
    for selector in selectors:
        try:
            result = extract(html, selector, make_ctx(seconds=3), all=True)
        except NodeTimeout:
            continue
        assert isinstance(result["text"], list)


def test_a_costly_selection_does_not_stall_other_threads() -> None:
    """selectolax holds the GIL while matching; in-process, a ticking thread would stop
    for the whole call. The selection runs in a child: the thread keeps ticking, and
    the node ends with a timeout at its deadline."""
    ticks = 0
    stop = threading.Event()

    def tick() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            time.sleep(0.01)

    html = "<div>" * 3000 + "<p>x</p>"
    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        with pytest.raises(NodeTimeout):
            extract(html, "section div div div div p", make_ctx(seconds=1.5))
    finally:
        stop.set()
        thread.join()
    assert ticks >= 20  # ~150 at 10 ms; 0 if the GIL had been held for the whole call


def test_cancellation_stops_a_costly_selection() -> None:
    cancelled = threading.Event()
    threading.Timer(0.5, cancelled.set).start()
    with pytest.raises(NodeCancelled):
        extract(
            "<div>" * 3000 + "<p>x</p>",
            "section div div div div p",
            make_ctx(seconds=30, cancelled=cancelled.is_set),
        )


def test_quadratic_text_output_is_refused() -> None:
    """Every one of N nested divs 'contains' all the text: N copies of it with all=True."""
    limits = override_settings(HTML_MAX_BYTES=100_000)
    with limits, pytest.raises(NodeError, match="matched text exceeds"):
        extract("<div>" * 2000 + "x" * 50_000, "div", all=True)
