"""Broker settings, measured: kombu SQS ``polling_interval``, prefetch, ``wait_time_seconds``.

For each configuration one project worker (prefork, 2 processes) is started on fresh
queues, and measured on what the settings change:

- drain: runs queued before the worker starts, runs/s from the first start to the end;
- throughput: one-phase runs sent back to back, runs/s;
- wake: the wait before a run starts, right after a busy moment;
- parent CPU while busy: CPU used by the worker's main process (the one that polls SQS)
  while both children run a 2 s node, as a fraction of one core. A polling interval of 0
  turns kombu's "cannot consume now, try again" into a busy loop.

Batch receive is not a separate knob: kombu asks SQS for as many messages as the prefetch
window has room for (at most 10), so it follows the prefetch.
"""

from __future__ import annotations

import os
import time
from typing import Any

from benchmarks.bench_worker import delays_definition, json_definition, session, summary
from benchmarks.harness import Services, Worker, wait_for

CONFIGS: list[tuple[str, dict[str, Any], int]] = [
    # (label, transport option overrides, worker_prefetch_multiplier)
    ("shipped: polling 0.5, prefetch 1", {"polling_interval": 0.5}, 1),
    ("polling 0.1, prefetch 1", {"polling_interval": 0.1}, 1),
    ("polling 0.05, prefetch 1", {"polling_interval": 0.05}, 1),
    ("polling 0.01, prefetch 1", {"polling_interval": 0.01}, 1),
    ("polling 0, prefetch 1", {"polling_interval": 0}, 1),
    ("polling 0.01, prefetch 4", {"polling_interval": 0.01}, 4),
    ("polling 0.01, prefetch 1, wait 20", {"polling_interval": 0.01, "wait_time_seconds": 20}, 1),
]
QUICK_CONFIGS = [CONFIGS[0], CONFIGS[2]]


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure_config(
    svc: Services, options: dict[str, Any], prefetch: int, *, runs: int, busy_seconds: float
) -> dict[str, Any]:
    with session(svc, project_worker=False, bare_worker=False, warm=False) as (project, _b, _w):
        from benchmarks.bench_worker import _current_prefix

        one = project.workflow("one", json_definition(1))
        slow = project.workflow("slow", delays_definition(1, busy_seconds))
        ids = [project.enqueue(one)[0] for _ in range(runs)]
        with Worker(
            svc, "project", _current_prefix(), transport_options=options, prefetch=prefetch
        ) as worker:
            rows = project.wait_done(ids)
            first = min(r[1].timestamp() for r in rows)
            drain = (runs - 1) / (max(r[2].timestamp() for r in rows) - first)

            sent = time.time()
            ids = [project.enqueue(one)[0] for _ in range(runs)]
            rows = project.wait_done(ids)
            throughput = runs / (max(r[2].timestamp() for r in rows) - sent)

            wakes = []
            for _ in range(3):
                ex_id, t0 = project.enqueue(one)
                (row,) = project.wait_done([ex_id])
                wakes.append((row[1].timestamp() - t0) * 1000)

            # Both children busy for busy_seconds: what does the polling parent burn?
            slow_ids = [project.enqueue(slow)[0] for _ in range(2)]
            wait_for(
                lambda: all(r[1] is not None for r in project.rows(slow_ids)), 60, interval=0.01
            )
            cpu0, t0 = _cpu_seconds(worker.proc.pid), time.monotonic()
            time.sleep(busy_seconds * 0.6)
            parent_cpu = (_cpu_seconds(worker.proc.pid) - cpu0) / (time.monotonic() - t0)
            project.wait_done(slow_ids)
    return {
        "drain_runs_per_s": drain,
        "throughput_runs_per_s": throughput,
        "wake_ms_samples": wakes,
        "parent_cpu_while_busy": parent_cpu,
    }


def run(svc: Services, *, quick: bool, log: Any = print, rounds: int | None = None) -> dict:
    """Every configuration, interleaved over rounds (A B C ... A B C ...); the median of
    the rounds and their range."""
    configs = QUICK_CONFIGS if quick else CONFIGS
    rounds = rounds or (1 if quick else 2)
    raw: dict[str, list[dict[str, Any]]] = {label: [] for label, _, _ in configs}
    for r in range(rounds):
        for label, options, prefetch in configs:
            log(f"broker settings, round {r + 1}: {label}")
            raw[label].append(
                measure_config(
                    svc,
                    options,
                    prefetch,
                    runs=20 if quick else 100,
                    busy_seconds=1.0 if quick else 2.0,
                )
            )
    results = {}
    for label, rows in raw.items():
        results[label] = {
            "drain_runs_per_s": summary([x["drain_runs_per_s"] for x in rows]),
            "throughput_runs_per_s": summary([x["throughput_runs_per_s"] for x in rows]),
            "wake_ms": summary([v for x in rows for v in x["wake_ms_samples"]]),
            "parent_cpu_while_busy": summary([x["parent_cpu_while_busy"] for x in rows]),
            "rounds": len(rows),
        }
    return results


def _fmt(s: dict[str, float], fmt: str) -> str:
    return f"{s['median']:{fmt}} [{s['min']:{fmt}}–{s['max']:{fmt}}]"


def format_table(results: dict[str, Any]) -> str:
    lines = [
        "| configuration | drain /s | throughput /s | wake after busy, ms | parent CPU |",
        "|---|---|---|---|---|",
    ]
    for label, r in results.items():
        lines.append(
            f"| {label} | {_fmt(r['drain_runs_per_s'], '.1f')} "
            f"| {_fmt(r['throughput_runs_per_s'], '.1f')} | {_fmt(r['wake_ms'], '.0f')} "
            f"| {_fmt(r['parent_cpu_while_busy'], '.2f')} |"
        )
    return "\n".join(lines)


def main() -> None:
    import sys

    from benchmarks.harness import services
    from flowbuilder.platform.logging import setup_logging

    setup_logging("WARNING", force=True)
    with services() as svc:
        results = run(svc, quick="--quick" in sys.argv, log=lambda m: print(m, file=sys.stderr))
    print(format_table(results))


if __name__ == "__main__":
    main()
