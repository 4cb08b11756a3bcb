"""``python -m benchmarks [--quick] [--json PATH] [--report] [--only NAME,...]``.

Runs every benchmark on the services the tests use (moto's SQS server on a free port,
a throwaway PostgreSQL database, Redis), prints a table and writes JSON when asked.
A full run (not ``--quick``) also writes a Markdown report and a PNG chart under
``benchmarks/results/`` with the machine and versions it ran on.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).with_name("results")
# Benchmarks written elsewhere, included by name when their module is present. Each
# exposes ``run(quick: bool) -> dict``.
OPTIONAL = {"scheduler": "benchmarks.bench_scheduler"}
# "enqueue": only the worker suite's enqueue latency (enqueue vs one bare send, interleaved).
NAMES = ("worker", "definitions", "broker", "enqueue", *OPTIONAL)
# The broker settings sweep starts a worker per configuration and round (~7 min): run it
# with --only broker (or list it) when the settings are in question.
DEFAULT = ("worker", "definitions", *OPTIONAL)


def machine() -> dict[str, Any]:
    from importlib.metadata import version

    versions = {}
    for dist in ("celery", "kombu", "sqlalchemy", "psycopg", "moto", "redis", "boto3"):
        with contextlib.suppress(Exception):  # not installed: not reported
            versions[dist] = version(dist)
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "versions": versions,
    }
    try:
        import sqlalchemy as sa

        from benchmarks.harness import PG_ADMIN_URL

        engine = sa.create_engine(PG_ADMIN_URL)
        with engine.connect() as conn:
            info["postgresql"] = conn.exec_driver_sql("SHOW server_version").scalar()
        engine.dispose()
    except Exception:  # noqa: BLE001
        pass
    try:
        with open("/proc/loadavg") as f:
            info["loadavg_at_start"] = f.read().split()[:3]
    except OSError:
        pass
    return info


def run_all(quick: bool, only: tuple[str, ...] = DEFAULT) -> dict[str, Any]:
    results: dict[str, Any] = {
        "quick": quick,
        "machine": machine(),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"... {message}", file=sys.stderr, flush=True)

    if "worker" in only or "broker" in only or "enqueue" in only:
        from benchmarks import bench_broker, bench_worker
        from benchmarks.harness import services

        with services() as svc:
            if "enqueue" in only and "worker" not in only:
                results["worker"] = {
                    "enqueue": bench_worker.measure_enqueue(
                        svc, samples=40 if quick else 200, long_phases=40
                    )
                }
            if "worker" in only:
                results["worker"] = bench_worker.run(svc, quick=quick, log=log)
            if "broker" in only:
                results["broker"] = bench_broker.run(svc, quick=quick, log=log)
    if "definitions" in only:
        from benchmarks import bench_definitions

        results["definitions"] = bench_definitions.run(quick=quick)
    for name, module in OPTIONAL.items():
        if name not in only:
            continue
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            results[name] = {"skipped": f"{module} is not present"}
            continue
        print(f"... {name}", file=sys.stderr, flush=True)
        results[name] = mod.run(quick)
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    return results


# ----------------------------------------------------------------------------- table


def _r(s: dict[str, float], fmt: str = ".2f") -> str:
    return f"{s['median']:{fmt}} [{s['min']:{fmt}}–{s['max']:{fmt}}]"


def rows(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(measure, baseline, project, ratio) lines."""
    out: list[tuple[str, str, str, str]] = []
    w = results.get("worker")
    if w and "phase_overhead" in w:
        o = w["phase_overhead"]
        out.append(
            (
                f"overhead/phase, {o['phases']} phases of {o['node_seconds'] * 1000:g} ms (ms)",
                f"chain {_r(o['chain_ms_per_step'])}",
                _r(o["project_ms_per_phase"]),
                _r(o["ratio_to_chain"]),
            )
        )
        out.append(
            (
                f"  whole run vs floor (one task doing the {o['phases']} steps) (s)",
                f"floor {_r(o['floor_total_s'], '.3f')}",
                _r(o["project_total_s"], ".3f"),
                _r(o["ratio_total_to_floor"]),
            )
        )
        by_count = w.get("phase_overhead_by_count") or {}
        for n, c in sorted(by_count.items(), key=lambda item: int(item[0])):
            if int(n) == o["phases"]:
                continue
            out.append(
                (
                    f"  overhead/phase, {n} phase{'' if int(n) == 1 else 's'} of 10 ms (ms)",
                    f"chain {_r(c['chain_ms_per_step'])}",
                    _r(c["project_ms_per_phase"]),
                    _r(c["ratio_to_chain"]),
                )
            )
        n = w.get("phase_overhead_not_pure")
        if n:
            out.append(
                (
                    f"  overhead/phase, {n['phases']} phases of 10 ms, nodes not pure (ms)",
                    f"chain {_r(n['chain_ms_per_step'])}",
                    _r(n["project_ms_per_phase"]),
                    _r(n["ratio_to_chain"]),
                )
            )
        g = w["phase_overhead_large_outputs"]
        out.append(
            (
                f"overhead/phase, {g['phases']} phases, "
                f"{g['payload_bytes'] // 1000} KB outputs (ms)",
                f"chain {_r(g['chain_ms_per_step'])}",
                _r(g["project_ms_per_phase"]),
                _r(g["ratio_to_chain"]),
            )
        )
        s = w["phase_sql"]
        out.append(
            (
                "one phase's database work in the worker task (ms)",
                f"raw psycopg {_r(s['raw_psycopg_ms_per_phase'])}",
                _r(s["project_ms_per_phase"]),
                _r(s["ratio_to_raw"]),
            )
        )
        out.append(
            (
                "  same, vs SQLAlchemy Core built once (ms)",
                f"Core {_r(s['core_ms_per_phase'])}",
                _r(s["project_ms_per_phase"]),
                _r(s["ratio_to_core"]),
            )
        )
        out.append(
            (
                "  SQL round trips per phase, server side (BEGIN/COMMIT/pings incl.)",
                f"raw {s['raw_round_trips_per_phase']}",
                _r(s["round_trips_per_phase"], ".1f"),
                f"{s['round_trips_per_phase']['median'] / s['raw_round_trips_per_phase']:.2f}",
            )
        )
        t = w["throughput"]
        out.append(
            (
                f"throughput, {t['runs']} one-phase runs back to back (/s)",
                f"no-op {_r(t['bare_tasks_per_s'], '.1f')}",
                _r(t["project_runs_per_s"], ".1f"),
                _r(t["ratio"]),
            )
        )
        d = w["drain"]
        out.append(
            (
                f"drain of {d['runs']} queued one-phase runs (/s)",
                f"no-op {_r(d['bare_tasks_per_s'], '.1f')}",
                _r(d["project_runs_per_s"], ".1f"),
                _r(d["ratio"]),
            )
        )
        for key, value in d.items():
            if (
                key.startswith("bare_")
                and key.endswith("_tasks_per_s")
                and key != "bare_tasks_per_s"
            ):
                label = key[len("bare_") : -len("_tasks_per_s")]
                out.append(
                    (
                        f"  drain vs bare {label} (/s)",
                        f"no-op {_r(value, '.1f')}",
                        _r(d["project_runs_per_s"], ".1f"),
                        _r(d[f"ratio_to_bare_{label}"]),
                    )
                )
                if f"short_worker_ratio_to_bare_{label}" in d:
                    out.append(
                        (
                            f"  drain by worker-short (prefetch 4) vs bare {label} (/s)",
                            f"no-op {_r(value, '.1f')}",
                            _r(d["short_worker_runs_per_s"], ".1f"),
                            _r(d[f"short_worker_ratio_to_bare_{label}"]),
                        )
                    )
        k = w["wake_after_busy"]
        out.append(
            (
                "wait before the first run after a busy moment (ms)",
                f"no-op {_r(k['bare_ms'], '.0f')}",
                _r(k["project_ms"], ".0f"),
                _r(k["ratio"]),
            )
        )
        if "project_from_queue_ms" in k:  # results written before it was measured
            out.append(
                (
                    "  the same, from the message in the queue (ms)",
                    f"no-op {_r(k['bare_from_queue_ms'], '.1f')}",
                    _r(k["project_from_queue_ms"], ".1f"),
                    _r(k["ratio_from_queue"]),
                )
            )
    if w and "enqueue" in w:
        e = w["enqueue"]
        n = e["long_phases"]
        for label, key, rk in (
            ("1 phase", "project_1_phase_ms", "1_phase"),
            (f"{n} phases", f"project_{n}_phases_ms", "long"),
            ("1 phase, until in the queue", "project_1_phase_queued_ms", "1_phase_queued"),
            (f"{n} phases, until in the queue", f"project_{n}_phases_queued_ms", "long_queued"),
        ):
            if key not in e:  # results written before the send left the caller's wait
                continue
            out.append(
                (
                    f"enqueue p50 / p99, {label} (ms)",
                    f"one send {e['one_send_ms']['p50']:.1f} / {e['one_send_ms']['p99']:.1f}",
                    f"{e[key]['p50']:.1f} / {e[key]['p99']:.1f}",
                    f"{e[f'ratio_{rk}_p50']:.2f} / {e[f'ratio_{rk}_p99']:.2f}",
                )
            )
    d = results.get("definitions")
    if d:
        out.append(
            (
                f"validate+plan of {d['nodes']} nodes (ms)",
                f"json.loads {d['json_loads_ms']:.3f}",
                f"{d['validate_and_plan_ms']:.2f}",
                _r(d["ratio"], ".1f"),
            )
        )
    sched = results.get("scheduler")
    if isinstance(sched, dict) and "skipped" not in sched:
        for key, value in sched.items():
            if isinstance(value, int | float):
                out.append((f"scheduler: {key}", "", f"{value:g}", ""))
    return out


def format_table(results: dict[str, Any]) -> str:
    header = ("measure", "baseline", "project", "project/baseline")
    lines = [header, *rows(results)]
    widths = [max(len(r[i]) for r in lines) for i in range(4)]
    text = []
    for i, r in enumerate(lines):
        text.append("  ".join(c.ljust(widths[j]) for j, c in enumerate(r)).rstrip())
        if i == 0:
            text.append("  ".join("-" * w for w in widths))
    text.append("")
    text.append("median [min–max] over rounds; ratios computed per round, A B A B interleaved")
    return "\n".join(text)


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        f"# Benchmark results ({results['started_at']})",
        "",
        f"Machine: {m['platform']}, {m['cpus']} CPUs, Python {m['python']}, "
        f"PostgreSQL {m.get('postgresql', '?')}; load average at start "
        f"{' '.join(m.get('loadavg_at_start', []))}.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".",
        "Services: moto's SQS server and PostgreSQL on 127.0.0.1; workers are "
        "`celery worker --pool=prefork --concurrency=2`.",
        "",
        "| measure | baseline | project | project / baseline |",
        "|---|---|---|---|",
    ]
    lines += [f"| {a.strip()} | {b} | {c} | {d} |" for a, b, c, d in rows(results)]
    lines += [
        "",
        "Figures: median [min–max] over the rounds; every ratio is computed per round from "
        "the project and its baseline measured one after the other (A B A B).",
        "",
        "![chart](chart.png)",
        "",
        f"Total time: {results['total_seconds']} s.",
    ]
    if "broker" in results:
        from benchmarks.bench_broker import format_table as broker_table

        lines += ["", "## Broker settings", "", broker_table(results["broker"])]
    return "\n".join(lines) + "\n"


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = results["worker"]
    by_count = w.get("phase_overhead_by_count") or {}
    fig, axes = plt.subplots(1, 3 if by_count else 2, figsize=(16 if by_count else 11, 4.2))
    if by_count:
        ax0, ax1, ax2 = axes
        counts = sorted(by_count, key=int)
        ax0.plot(
            [int(n) for n in counts],
            [by_count[n]["chain_ms_per_step"]["median"] for n in counts],
            "o-",
            label="bare Celery chain",
        )
        ax0.plot(
            [int(n) for n in counts],
            [by_count[n]["project_ms_per_phase"]["median"] for n in counts],
            "o-",
            label="project",
        )
        ax0.set_xlabel("phases (10 ms each)")
        ax0.set_ylabel("overhead per phase (ms), enqueue→done")
        ax0.set_title("overhead per phase vs phase count")
        ax0.set_ylim(bottom=0)
        ax0.legend()
    else:
        ax1, ax2 = axes
    labels = [
        "10 ms phases",
        f"{w['phase_overhead_large_outputs']['payload_bytes'] // 1000} KB outputs",
    ]
    proj = [
        w["phase_overhead"]["project_ms_per_phase"]["median"],
        w["phase_overhead_large_outputs"]["project_ms_per_phase"]["median"],
    ]
    chain = [
        w["phase_overhead"]["chain_ms_per_step"]["median"],
        w["phase_overhead_large_outputs"]["chain_ms_per_step"]["median"],
    ]
    x = range(len(labels))
    ax1.bar([i - 0.2 for i in x], chain, 0.4, label="bare Celery chain")
    ax1.bar([i + 0.2 for i in x], proj, 0.4, label="project")
    ax1.set_xticks(list(x), labels)
    ax1.set_ylabel("overhead per phase (ms)")
    ax1.set_title(f"{w['phase_overhead']['phases']} sequential phases, enqueue→done")
    ax1.legend()
    names = ["throughput", "drain"]
    bare = [w["throughput"]["bare_tasks_per_s"]["median"], w["drain"]["bare_tasks_per_s"]["median"]]
    mine = [
        w["throughput"]["project_runs_per_s"]["median"],
        w["drain"]["project_runs_per_s"]["median"],
    ]
    x = range(len(names))
    ax2.bar([i - 0.2 for i in x], bare, 0.4, label="bare no-op tasks")
    ax2.bar([i + 0.2 for i in x], mine, 0.4, label="project one-phase runs")
    ax2.set_xticks(list(x), names)
    ax2.set_ylabel("per second")
    ax2.set_title("throughput vs bare Celery (same broker, 2 processes)")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round (< 1 min)")
    parser.add_argument("--json", type=Path, help="write the results as JSON to this path")
    parser.add_argument(
        "--only", default=",".join(DEFAULT), help=f"comma-separated, of: {', '.join(NAMES)}"
    )
    parser.add_argument(
        "--no-report",
        action="store_true",
        help="a full run writes benchmarks/results/; not with this flag",
    )
    args = parser.parse_args(argv)
    only = tuple(n.strip() for n in args.only.split(",") if n.strip())
    unknown = [n for n in only if n not in NAMES]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(NAMES)}")
    from flowbuilder.platform.logging import setup_logging

    setup_logging("WARNING", force=True)  # the engine's INFO lines are not the benchmark
    results = run_all(args.quick, only)
    print(format_table(results))
    if "broker" in results:
        from benchmarks.bench_broker import format_table as broker_table

        print("\nbroker settings (project worker, prefork 2):\n" + broker_table(results["broker"]))
    print(f"\n(total {results['total_seconds']} s)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    if not args.quick and not args.no_report and "worker" in results:
        RESULTS_DIR.mkdir(exist_ok=True)
        (RESULTS_DIR / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        (RESULTS_DIR / "README.md").write_text(markdown(results))
        try:
            chart(results, RESULTS_DIR / "chart.png")
        except ModuleNotFoundError:
            print("matplotlib is not installed (pip install '.[bench]'): no chart", file=sys.stderr)
        print(f"wrote {RESULTS_DIR}/README.md, results.json, chart.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
