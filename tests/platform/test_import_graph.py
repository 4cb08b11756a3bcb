"""``flowbuilder.platform`` has no import cycles, and each of its modules imports on its
own in a fresh interpreter.

The static check reads every import statement, at module level AND inside functions
(a function-local import is the usual way to dodge a cycle at import time: the cycle is
still there). It checks two graphs: modules, and platform's parts (each subpackage such
as ``crud`` or ``nodes`` counted as one unit, since a package is one unit to its users).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import flowbuilder.platform
from flowbuilder.platform.definitions import strongly_connected

PACKAGE = "flowbuilder.platform"
ROOT = Path(flowbuilder.platform.__file__).resolve().parent


def platform_modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join([PACKAGE, *parts])] = path
    return modules


def _imported_names(path: Path, module: str) -> Iterable[str]:
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):  # every statement, including those inside functions
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            yield base
            for alias in node.names:
                yield f"{base}.{alias.name}"  # kept below only if it names a module


def import_graph() -> dict[str, set[str]]:
    """Module -> the platform modules it imports (a package's __init__ counts when
    imported from outside that package)."""
    modules = platform_modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for module, path in modules.items():
        for name in _imported_names(path, module):
            if name not in modules or name == module or module.startswith(name + "."):
                continue  # not platform, itself, or its own (already running) package
            graph[module].add(name)
            # Importing a.b.c runs a.b's __init__ too, unless the importer lives inside a.b.
            parent = name.rpartition(".")[0]
            while parent.startswith(PACKAGE + ".") and not module.startswith(parent + "."):
                if parent != module:
                    graph[module].add(parent)
                parent = parent.rpartition(".")[0]
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components with more than one node (the validator's Tarjan)."""
    nodes = set(graph)
    successors = {node: sorted(graph[node]) for node in nodes}
    return [frozenset(c) for c in strongly_connected(nodes, successors) if len(c) > 1]


def part_of(module: str) -> str:
    rest = module[len(PACKAGE) + 1 :] if module != PACKAGE else "__init__"
    return rest.split(".", 1)[0]


def part_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    parts: dict[str, set[str]] = {}
    for module, targets in graph.items():
        edges = parts.setdefault(part_of(module), set())
        edges.update(part_of(t) for t in targets if part_of(t) != part_of(module))
    return parts


def test_cycle_finder_finds_cycles() -> None:
    """The checker itself: it must report a cycle through a function-local import."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [frozenset({"a", "b", "c"})]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_import_graph_sees_function_local_and_relative_imports(tmp_path: Path) -> None:
    source = "def f():\n    from flowbuilder.platform import ssrf\n\nfrom . import base\n"
    path = tmp_path / "mod.py"
    path.write_text(source)
    names = set(_imported_names(path, "flowbuilder.platform.nodes.mod"))
    assert "flowbuilder.platform.ssrf" in names
    assert "flowbuilder.platform.nodes.base" in names


def test_no_module_import_cycles() -> None:
    assert cycles(import_graph()) == []


def test_no_import_cycles_between_platform_parts() -> None:
    found = cycles(part_graph(import_graph()))
    assert found == [], f"import cycles between parts of flowbuilder.platform: {found}"


def test_ssrf_and_nodes_are_not_in_a_cycle() -> None:
    parts = part_graph(import_graph())
    assert "ssrf" in parts["nodes"]  # the HTTP nodes use ssrf...
    assert "nodes" not in parts["ssrf"]  # ...and ssrf needs nothing from nodes


def test_platform_never_imports_celery() -> None:
    for module, path in platform_modules().items():
        names = set(_imported_names(path, module))
        assert not any(n == "celery" or n.startswith("celery.") for n in names), module


def test_every_platform_module_imports_alone_in_a_fresh_interpreter() -> None:
    """Import order hides cycles: each module is imported first, on its own."""
    procs = {
        module: subprocess.Popen(
            [sys.executable, "-c", f"import {module}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for module in platform_modules()
    }
    failed = {}
    for module, proc in procs.items():
        output, _ = proc.communicate(timeout=120)
        if proc.returncode != 0:
            failed[module] = output[-2000:]
    assert failed == {}
