"""Worst cases for ``extract_text_from_html`` at the caps (issue 10, item 9).

Prints, for documents of N nested divs (``"<div>" * N``) and the costliest selectors
we know within the selector caps, how long selectolax takes in-process (holding the
GIL) and how long the node's killable child process takes (``select_text`` with a
deadline). Not a test: figures depend on the machine.

    python -m benchmarks.css_worst_case [--deadline 10] [--sizes 2000,8000,20000]
"""

from __future__ import annotations

import argparse
import time

from selectolax.lexbor import LexborHTMLParser

from flowbuilder.platform.nodes import NodeContext
from flowbuilder.platform.nodes.builtin import html_problem, select_text, selector_problem
from flowbuilder.platform.settings import get_settings

# In-process runs of these explode (seconds to hours) on deep documents; only run
# in-process up to this depth.
_IN_PROCESS_MAX_DEPTH = {"backtracking 2": 2000, ":has list": 2000, "backtracking 4": 0}


def selectors() -> dict[str, str]:
    s = get_settings()
    depth, count, length = (
        s.CSS_SELECTOR_MAX_NESTING,
        s.CSS_SELECTOR_MAX_SELECTORS,
        s.CSS_SELECTOR_MAX_CHARS,
    )
    return {
        "nested :is at max nesting": ":is(" * depth + "div p" + ")" * depth,
        "max selector list of :is": ", ".join(["div :is(div p) p"] * count),
        "max length descendant chain": ("div " * (length // 4))[: length - 2].rstrip() + " p",
        ":has list": ", ".join(["div:has(div p)"] * count),
        "backtracking 2": "section div div p",
        "backtracking 4": "section div div div div p",
    }


def in_process(html: str, selector: str) -> str:
    start = time.perf_counter()
    tree = LexborHTMLParser(html)
    parsed = time.perf_counter()
    tree.css(selector)
    return f"parse {parsed - start:.3f}s, select {time.perf_counter() - parsed:.3f}s"


def in_child(html: str, selector: str, deadline: float) -> str:
    ctx = NodeContext("bench", "bench", "bench", deadline=time.monotonic() + deadline)
    start = time.perf_counter()
    try:
        found = select_text(html, selector, every=True, ctx=ctx)
        outcome = f"{len(found)} matches"
    except Exception as exc:
        outcome = type(exc).__name__
    return f"{time.perf_counter() - start:.3f}s ({outcome})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--deadline", type=float, default=10.0)
    parser.add_argument("--sizes", default=f"2000,8000,{get_settings().HTML_MAX_ELEMENTS}")
    args = parser.parse_args()
    for size in (int(n) for n in args.sizes.split(",")):
        html = "<div>" * (size - 1) + "<p>x</p>"
        print(f"--- '<div>' * {size}  (within caps: {html_problem(html) is None})")
        for name, selector in selectors().items():
            assert selector_problem(selector) is None, (name, selector_problem(selector))
            if size <= _IN_PROCESS_MAX_DEPTH.get(name, 10**9):
                print(f"{name:30} in-process: {in_process(html, selector)}")
            print(f"{name:30} child:      {in_child(html, selector, args.deadline)}")


if __name__ == "__main__":
    main()
