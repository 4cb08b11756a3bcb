"""The benchmark suite runs and reports what it promises (``--quick``; no timing asserted)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks import __main__ as bench_main

ROOT = Path(__file__).resolve().parents[1]


def _figure(value: Any) -> bool:
    """A summary {median, min, max} of positive finite numbers, ordered."""
    return (
        isinstance(value, dict)
        and all(isinstance(value[k], int | float) and math.isfinite(value[k]) for k in value)
        and 0 < value["min"] <= value["median"] <= value["max"]
    )


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_quick_run_prints_a_table_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=560,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "project/baseline" in proc.stdout and "throughput" in proc.stdout
    results = json.loads(out.read_text())
    assert results["quick"] is True and results["machine"]["cpus"]
    w = results["worker"]
    for measure, keys in {
        "phase_overhead": [
            "chain_ms_per_step",
            "ratio_to_chain",
            "floor_total_s",
            "project_total_s",
            "ratio_total_to_floor",
        ],
        "phase_overhead_large_outputs": ["chain_ms_per_step", "project_total_s"],
        # The same delays declared not pure: they wait for their phase's commit.
        "phase_overhead_not_pure": ["project_ms_per_phase", "project_total_s"],
        "throughput": ["project_runs_per_s", "bare_tasks_per_s", "ratio"],
        "drain": ["project_runs_per_s", "bare_tasks_per_s", "ratio", "short_worker_runs_per_s"],
        "wake_after_busy": ["project_ms", "bare_ms"],
        "phase_sql": [
            "project_ms_per_phase",
            "raw_psycopg_ms_per_phase",
            "core_ms_per_phase",
            "ratio_to_raw",
            "round_trips_per_phase",
        ],
    }.items():
        for key in keys:
            assert _figure(w[measure][key]), (measure, key, w[measure][key])
    # The wake-up from the message in the queue: finite and ordered, not always positive
    # (a worker may start a task a moment before its sender has read SQS's answer).
    for key in ("project_from_queue_ms", "bare_from_queue_ms"):
        f = w["wake_after_busy"][key]
        assert all(math.isfinite(f[k]) for k in f) and f["min"] <= f["median"] <= f["max"]
    assert any("from the message in the queue" in line for line in proc.stdout.splitlines())
    assert w["phase_overhead_large_outputs"]["payload_bytes"] > 1000
    assert any("nodes not pure" in line for line in proc.stdout.splitlines())
    # Round trips per phase are a whole number: every extra phase costs the same.
    per_phase = w["phase_sql"]["round_trips_per_phase"]
    assert per_phase["min"] == per_phase["max"] == int(per_phase["median"])
    e = w["enqueue"]
    assert 0 < e["one_send_ms"]["p50"] <= e["one_send_ms"]["p99"]
    assert 0 < e["project_1_phase_ms"]["p50"] <= e["project_1_phase_ms"]["p99"]
    assert results["definitions"]["nodes"] == 200
    # A quick run writes no report.
    assert "wrote" not in proc.stdout.replace(f"wrote {out}", "")


def test_optional_benchmark_absent_is_reported_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_main, "OPTIONAL", {"scheduler": "benchmarks.no_such_bench_xyz"})
    results = bench_main.run_all(quick=True, only=("scheduler",))
    assert results["scheduler"] == {"skipped": "benchmarks.no_such_bench_xyz is not present"}


def test_optional_benchmark_present_is_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "fake_sched_bench.py").write_text(
        "def run(quick):\n    return {'quick': quick, 'ticks_per_s': 12.5}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(bench_main, "OPTIONAL", {"scheduler": "fake_sched_bench"})
    results = bench_main.run_all(quick=True, only=("scheduler",))
    assert results["scheduler"] == {"quick": True, "ticks_per_s": 12.5}
    assert ("scheduler: ticks_per_s", "", "12.5", "") in bench_main.rows(results)


def test_unknown_benchmark_name_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        bench_main.main(["--only", "nonsense"])
    assert "unknown benchmark(s): nonsense" in capsys.readouterr().err
