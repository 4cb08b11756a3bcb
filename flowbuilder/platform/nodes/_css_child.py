"""The child process of ``extract_text_from_html``: parse HTML and run one CSS selector.

Run as a script (``python -I _css_child.py``), never imported by the worker: selectolax
holds the GIL while it matches, and some selectors on some documents (descendant
combinators over deep nesting, ``:has``) take seconds to hours. In a child process that
cost can be stopped by killing it, and it never stalls the worker's other threads (the
lease heartbeat, other executions). Standard library and selectolax only, so it starts
in a few tens of milliseconds.

stdin: JSON ``{"html", "selector", "all", "strip", "max_output_chars", "memory_bytes"}``.
stdout: JSON ``{"text": str | list[str] | None}`` or ``{"error": str}``.
"""

from __future__ import annotations

import json
import resource
import sys
from typing import Any


def _text(node: Any) -> str:
    return " ".join(node.text(separator=" ").split())


def select(request: dict[str, Any]) -> dict[str, Any]:
    from selectolax.lexbor import LexborHTMLParser, SelectolaxError

    limit = int(request["max_output_chars"])
    try:
        tree = LexborHTMLParser(request["html"])
        tree.strip_tags(list(request["strip"]))
        if not request["all"]:
            node = tree.css_first(request["selector"])
            return {"text": None if node is None else _text(node)[: limit + 1]}
        texts, size, seen = [], 0, set()
        for node in tree.css(request["selector"]):
            # lexbor returns an element once per selector of a list that matches it; CSS
            # matches it once.
            if node.mem_id in seen:
                continue
            seen.add(node.mem_id)
            text = _text(node)
            size += len(text)
            if size > limit:
                return {"error": f"the matched text exceeds {limit} characters"}
            texts.append(text)
        return {"text": texts}
    except (SelectolaxError, ValueError, TypeError):
        return {"error": "invalid CSS selector"}
    except MemoryError:
        return {"error": "the HTML needs too much memory to parse"}


def main() -> None:
    request = json.loads(sys.stdin.buffer.read())
    memory = int(request.get("memory_bytes") or 0)
    if memory:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    json.dump(select(request), sys.stdout)


if __name__ == "__main__":
    main()
