"""``validate_definition`` + ``build_plan`` of a large definition vs ``json.loads`` of its text."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from benchmarks.bench_worker import json_definition


def _per_call(fn: Callable[[], Any], min_seconds: float) -> float:
    fn()  # warm up
    calls, started = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds:
            return elapsed / calls


def run(quick: bool = False, nodes: int = 200) -> dict[str, Any]:
    from flowbuilder.platform.definitions import validate_definition
    from flowbuilder.platform.plan import build_plan

    text = json.dumps(json_definition(nodes))

    def validate_and_plan() -> None:
        build_plan(validate_definition(text, owned_credential_ids=None))

    rounds = 1 if quick else 5
    loads = [_per_call(lambda: json.loads(text), 0.02) for _ in range(rounds)]
    checked = [_per_call(validate_and_plan, 0.05) for _ in range(rounds)]
    ratios = sorted(c / lo for c, lo in zip(checked, loads, strict=True))
    return {
        "nodes": nodes,
        "bytes": len(text),
        "json_loads_ms": min(loads) * 1000,
        "validate_and_plan_ms": min(checked) * 1000,
        "ratio": {"median": ratios[len(ratios) // 2], "min": ratios[0], "max": ratios[-1]},
        "definitions_per_second": 1 / min(checked),
    }
