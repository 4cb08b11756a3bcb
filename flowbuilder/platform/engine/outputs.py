"""Node outputs made storable."""

from __future__ import annotations

import json
from typing import Any

import structlog

logger = structlog.get_logger(__name__)


def cap_outputs(outputs: dict[str, Any], limit: int) -> dict[str, Any]:
    """Keep outputs under ``limit`` bytes of JSON; replace oversized values with a note."""
    try:
        encoded = json.dumps(outputs, default=str)
    except (TypeError, ValueError):
        return {"_error": "outputs are not JSON serialisable"}
    if len(encoded) <= limit:
        return json.loads(encoded) if _needs_roundtrip(outputs) else outputs
    capped: dict[str, Any] = {}
    budget = limit
    for key, value in outputs.items():
        size = len(json.dumps(value, default=str))
        if size + len(key) + 8 <= budget:
            capped[key] = value
            budget -= size + len(key) + 8
        else:
            capped[key] = {"_truncated": True, "size_bytes": size}
    capped["_truncated"] = True
    return json.loads(json.dumps(capped, default=str))


def _needs_roundtrip(outputs: dict[str, Any]) -> bool:
    # Cheap check: only dicts/lists/str/int/float/bool/None go into JSON columns as-is.
    stack: list[Any] = [outputs]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif not isinstance(item, str | int | float | bool | type(None)):
            return True
    return False
