"""The registry of node types: built-ins plus the ``flowbuilder.nodes`` entry points.

Loaded lazily, once per process (thread-safe). A third-party package adds node types
with no change here::

    [project.entry-points."flowbuilder.nodes"]
    my_node = "my_package.nodes:MyNode"     # a NodeType instance, or a zero-arg callable

A plugin that fails to load is logged and skipped: one broken package must not take
the API down. A plugin cannot replace a built-in type (the built-in wins, with a warning).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from importlib import metadata
from types import MappingProxyType
from typing import Any

import structlog

from flowbuilder.platform.nodes import builtin, http
from flowbuilder.platform.nodes.base import NodeType, UnknownNodeType

logger = structlog.get_logger(__name__)

ENTRY_POINT_GROUP = "flowbuilder.nodes"

_lock = threading.RLock()
_types: dict[str, NodeType] = {}
_loaded = False
_loading = False  # set while loading, so a plugin calling register_node_type() works


def _check(node_type: Any) -> NodeType:
    if not isinstance(node_type, NodeType):
        raise TypeError(f"expected a NodeType instance, got {type(node_type).__name__}")
    problems = node_type.spec_problems()
    if problems:
        raise ValueError(f"invalid node type {node_type.type!r}: {'; '.join(problems)}")
    return node_type


def _builtin_types() -> list[NodeType]:
    return [*builtin.BUILTIN_TYPES, *http.HTTP_TYPES]


def _load_entry_points() -> None:
    try:
        entry_points = metadata.entry_points(group=ENTRY_POINT_GROUP)
    except Exception:  # a broken distribution on sys.path
        logger.exception("node_plugins_scan_failed", group=ENTRY_POINT_GROUP)
        return
    for entry_point in sorted(entry_points, key=lambda ep: ep.name):
        try:
            loaded = entry_point.load()
            node_type = loaded if isinstance(loaded, NodeType) else loaded()
            _check(node_type)
        except Exception as exc:
            logger.error(
                "node_plugin_load_failed",
                entry_point=entry_point.name,
                value=entry_point.value,
                error=f"{type(exc).__name__}: {exc}",
            )
            continue
        if node_type.type in _types:
            logger.warning(
                "node_plugin_duplicate_type",
                entry_point=entry_point.name,
                node_type=node_type.type,
            )
            continue
        _types[node_type.type] = node_type
        logger.info("node_plugin_loaded", entry_point=entry_point.name, node_type=node_type.type)


def _ensure_loaded() -> None:
    global _loaded, _loading
    if _loaded:
        return
    with _lock:
        if _loaded or _loading:
            return
        _loading = True
        try:
            for node_type in _builtin_types():
                _types.setdefault(node_type.type, _check(node_type))
            _load_entry_points()
            _loaded = True
        finally:
            _loading = False


def register_node_type(node_type: NodeType, *, replace: bool = False) -> NodeType:
    """Add a node type to the registry (raises ValueError for a taken name)."""
    _check(node_type)
    _ensure_loaded()
    with _lock:
        if node_type.type in _types and not replace:
            raise ValueError(f"node type {node_type.type!r} is already registered")
        _types[node_type.type] = node_type
        _bump()
    return node_type


def unregister_node_type(type_name: str) -> None:
    """Remove a node type (tests)."""
    with _lock:
        _types.pop(type_name, None)
        _bump()


# Changes of the registry, counted: what was validated against it (a cached validation
# result, engine.enqueue) is checked again after a change.
_generation = 0


def _bump() -> None:
    global _generation
    _generation += 1


def registry_generation() -> int:
    """A number that changes whenever a node type is registered or removed."""
    return _generation


def get_node_type(type_name: str) -> NodeType:
    """The node type called ``type_name``; raises UnknownNodeType (a NodeError)."""
    _ensure_loaded()
    try:
        return _types[type_name]
    except (KeyError, TypeError):
        raise UnknownNodeType(str(type_name), sorted(_types)) from None


def find_node_type(type_name: Any) -> NodeType | None:
    """Like :func:`get_node_type` but returns None for an unknown (or unhashable) name."""
    _ensure_loaded()
    try:
        return _types.get(type_name)
    except TypeError:
        return None


def node_types() -> Mapping[str, NodeType]:
    """A read-only view of every registered node type, by name."""
    _ensure_loaded()
    return MappingProxyType(_types)


def reset_node_types() -> None:
    """Forget every registration; the next lookup reloads built-ins and entry points."""
    global _loaded
    with _lock:
        _types.clear()
        _loaded = False
