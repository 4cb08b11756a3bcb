"""The benchmark runs and reports what it promises (tiny sizes, SQLite only, no timings)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from benchmarks import bench_engine


def _positive_finite(value: Any) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_engine_measurement_structure(tmp_path: Path) -> None:
    baseline = bench_engine.baseline_run_seconds(3, repetitions=1)
    assert _positive_finite(baseline)
    row = bench_engine.measure_engine(
        f"sqlite:///{tmp_path / 'bench.db'}", phases=3, repetitions=1, baseline_seconds=baseline
    )
    assert row["backend"] == "sqlite" and row["phases"] == 3 and row["repetitions"] == 1
    for key in (
        "baseline_ms_per_phase",
        "engine_ms_per_phase",
        "ratio_engine_to_baseline",
    ):
        assert _positive_finite(row[key]), (key, row[key])
    assert math.isfinite(row["overhead_ms_per_phase"])
    for key in ("statements_per_phase", "commits_per_phase", "statements_fixed"):
        assert isinstance(row[key], int) and row[key] > 0, (key, row[key])
    # The engine's cost per phase is constant: the 1-phase and 3-phase runs differ by an
    # exact multiple, and the total is fixed cost + phases x per-phase cost.
    assert row["statements_per_phase_exact"] is True
    assert row["statements_per_run"] == row["statements_fixed"] + 3 * row["statements_per_phase"]


def test_measure_engine_refuses_a_single_phase(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 2"):
        bench_engine.measure_engine(f"sqlite:///{tmp_path / 'b.db'}", 1, 1, 1.0)


def test_definition_measurement_structure() -> None:
    result = bench_engine.measure_definitions(nodes=20, repetitions=1)
    assert result["nodes"] == 20 and isinstance(result["bytes"], int) and result["bytes"] > 0
    for key in (
        "json_loads_ms",
        "validate_and_plan_ms",
        "ratio_validate_plan_to_json_loads",
        "definitions_per_second",
    ):
        assert _positive_finite(result[key]), (key, result[key])


def test_concurrency_measurement_structure() -> None:
    result = bench_engine.measure_concurrency(width=2, seconds=0.05, repetitions=1)
    assert result["width"] == 2 and result["sequential_ms"] == pytest.approx(100)
    for key in ("engine_ms", "ratio_engine_to_sequential"):
        assert _positive_finite(result[key]), (key, result[key])


def test_main_prints_a_table_and_writes_only_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "results.json"
    monkeypatch.setattr(bench_engine, "RESULTS_PATH", out)
    # main() quiets the process's logging; not this test process's.
    monkeypatch.setattr(bench_engine, "_quiet_logging", lambda: None)
    args = ["--phases", "3", "--repetitions", "1", "--backends", "sqlite"]
    assert bench_engine.main(args) == 0
    assert not out.exists()
    table = capsys.readouterr().out
    assert "sqlite" in table and "json.loads" in table and "postgresql" not in table
    assert "independent" in table

    assert bench_engine.main([*args, "--write"]) == 0
    results = json.loads(out.read_text())
    assert [row["backend"] for row in results["engine"]] == ["sqlite"]
    assert results["definitions"]["nodes"] == 200
    assert _positive_finite(results["engine"][0]["ratio_engine_to_baseline"])
