"""What the execution engine costs on top of the nodes' own work.

Run ``python -m benchmarks.bench_engine [--phases N] [--repetitions R] [--write]``.

Speed is reported as ratios to a baseline measured in the same process, never as
absolute thresholds (machines differ; ratios move much less):

- **baseline**: the same N-node workflow (a chain of ``add_property_to_json`` nodes, one
  node per phase) run by calling each node type's ``invoke`` directly, with the plan's
  input resolution between nodes: the pure work, no database.
- **engine**: ``run_execution`` of a prepared execution of that workflow (lease,
  per-phase checkpoints, debits, log batches, the final status), on the embedded SQLite
  default (a temp file) and on PostgreSQL when one is reachable (a throwaway database).
- **statements per phase**: SQL statements (``before_cursor_execute``) and commits per
  extra phase, from a 1-phase run and an N-phase run; the fixed cost is the rest.
- **definitions**: ``validate_definition`` + ``build_plan`` of a 200-node definition
  (JSON text), relative to ``json.loads`` of the same text.

``benchmarks/results.json`` is written only with ``--write``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, SQLModel

from flowbuilder.platform import db, models
from flowbuilder.platform.crud import balance_crud, user_crud, workflow_crud
from flowbuilder.platform.definitions import validate_definition
from flowbuilder.platform.engine import Outcome, prepare_execution, run_execution
from flowbuilder.platform.nodes import get_node_type
from flowbuilder.platform.nodes.base import NodeContext
from flowbuilder.platform.plan import build_plan
from flowbuilder.platform.settings import override_settings

RESULTS_PATH = Path(__file__).with_name("results.json")
PG_ADMIN_URL = os.environ.get(
    "FLOWBUILDER_BENCH_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


# ----------------------------------------------------------------------------- workloads


def chain_definition(nodes: int) -> dict[str, Any]:
    """``nodes`` add_property_to_json nodes in a chain: one node per phase, data flowing
    along every edge (the same shape as the tests' ``json_definition``)."""
    items: list[dict[str, Any]] = []
    edges: list[dict[str, Any]] = []
    for i in range(nodes):
        inputs: dict[str, Any] = {"property_path": f"step{i}", "value": i}
        if i == 0:
            inputs["json"] = {"start": True}
        items.append({"id": f"n{i}", "type": "add_property_to_json", "inputs": inputs})
        if i:
            edges.append(
                {
                    "source": f"n{i - 1}",
                    "sourceHandle": "json",
                    "target": f"n{i}",
                    "targetHandle": "json",
                }
            )
    return {"version": 1, "nodes": items, "edges": edges}


def _per_call(fn: Callable[[], Any], min_seconds: float = 0.02) -> float:
    """Seconds per call of a fast ``fn``, looping until ``min_seconds`` have passed."""
    fn()  # warm up
    calls, started = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds:
            return elapsed / calls


# ----------------------------------------------------------------------------- baseline


def baseline_run_seconds(phases: int, repetitions: int = 3) -> float:
    """Seconds for the pure work of one run of the ``phases``-node chain (the best of
    ``repetitions`` timing loops, like ``timeit``: the least disturbed measurement)."""
    plan = build_plan(validate_definition(chain_definition(phases), owned_credential_ids=None))
    execution_id, user_id = uuid.uuid4(), uuid.uuid4()

    def one_run() -> None:
        outputs: dict[str, dict[str, Any]] = {}
        for node in plan.nodes:
            inputs = plan.resolve_inputs(node.node_id, outputs)
            ctx = NodeContext(execution_id=execution_id, user_id=user_id, node_id=node.node_id)
            outputs[node.node_id] = get_node_type(node.node_type).invoke(inputs, ctx)
        assert outputs[plan.nodes[-1].node_id]["json"][f"step{phases - 1}"] == phases - 1

    return min(_per_call(one_run, 0.05) for _ in range(max(1, repetitions)))


# ----------------------------------------------------------------------------- engine


class _StatementCounter:
    """Counts statements and commits made by the calling thread (not the heartbeat)."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine, self.thread = engine, threading.get_ident()
        self.statements = self.commits = 0

    def _on_statement(self, *_: Any) -> None:
        if threading.get_ident() == self.thread:
            self.statements += 1

    def _on_commit(self, *_: Any) -> None:
        if threading.get_ident() == self.thread:
            self.commits += 1

    def __enter__(self) -> _StatementCounter:
        sa.event.listen(self.engine, "before_cursor_execute", self._on_statement)
        sa.event.listen(self.engine, "commit", self._on_commit)
        return self

    def __exit__(self, *_: object) -> None:
        sa.event.remove(self.engine, "before_cursor_execute", self._on_statement)
        sa.event.remove(self.engine, "commit", self._on_commit)


def _prepare(session: Session, phases: int, definition: dict[str, Any] | None = None) -> uuid.UUID:
    """A user with credits, a published workflow and a pending execution (committed)."""
    user = user_crud.create_user(
        session=session, data=models.UserCreate(email=f"bench-{uuid.uuid4().hex[:10]}@example.com")
    )
    balance_crud.grant_credits(session=session, user_id=user.id, amount=phases)
    workflow = workflow_crud.create_workflow(
        session=session,
        user_id=user.id,
        data=models.WorkflowCreate(
            name=f"bench-{uuid.uuid4().hex[:8]}",
            definition=definition or chain_definition(phases),
        ),
    )
    session.flush()
    workflow_crud.publish_workflow(session=session, workflow_id=workflow.id, user_id=user.id)
    session.commit()
    execution = prepare_execution(session=session, workflow_id=workflow.id, user_id=user.id)
    session.commit()
    return execution.id


def _run_once(engine: sa.Engine, session: Session, phases: int) -> tuple[float, int, int]:
    """Seconds, statements and commits of ``run_execution`` for a fresh execution."""
    execution_id = _prepare(session, phases)
    with _StatementCounter(engine) as counter:
        started = time.perf_counter()
        result = run_execution(execution_id)
        seconds = time.perf_counter() - started
    if result.outcome != Outcome.COMPLETED or result.phases_run != phases:
        raise RuntimeError(f"benchmark run did not complete: {result}")
    return seconds, counter.statements, counter.commits


@contextlib.contextmanager
def _database(url: str, home: Path) -> Iterator[sa.Engine]:
    """Settings pointing at ``url`` (schema created) and the engine run_execution will use."""
    with override_settings(DATABASE_URL=url, FLOWBUILDER_HOME=home, RATE_LIMIT_USER=1_000_000):
        db.reset_engines()
        engine = db.get_engine()
        SQLModel.metadata.create_all(engine)
        try:
            yield engine
        finally:
            db.reset_engines()


def measure_engine(url: str, phases: int, repetitions: int, baseline_seconds: float) -> dict:
    """Engine cost of ``phases``-phase runs on ``url``, relative to ``baseline_seconds``."""
    if phases < 2:
        raise ValueError("phases must be at least 2 (statements per phase are a difference)")
    with tempfile.TemporaryDirectory() as home, _database(url, Path(home)) as engine:
        with Session(engine, expire_on_commit=False) as session:
            _run_once(engine, session, phases)  # warm up: connections, caches, imports
            _, one_statements, one_commits = _run_once(engine, session, 1)
            runs = [_run_once(engine, session, phases) for _ in range(max(1, repetitions))]
        backend = engine.dialect.name
    seconds = statistics.median(run[0] for run in runs)
    statements, commits = runs[0][1], runs[0][2]
    if any(run[1:] != (statements, commits) for run in runs):
        raise RuntimeError(f"statement counts differ between identical runs: {runs}")
    per_phase = (statements - one_statements) / (phases - 1)
    return {
        "backend": backend,
        "phases": phases,
        "repetitions": len(runs),
        "baseline_ms_per_phase": baseline_seconds / phases * 1000,
        "engine_ms_per_phase": seconds / phases * 1000,
        "overhead_ms_per_phase": (seconds - baseline_seconds) / phases * 1000,
        "ratio_engine_to_baseline": seconds / baseline_seconds,
        "statements_per_phase": round(per_phase),
        "statements_per_phase_exact": per_phase == round(per_phase),
        "statements_fixed": statements - round(per_phase) * phases,
        "commits_per_phase": round((commits - one_commits) / (phases - 1)),
        "statements_per_run": statements,
    }


# ----------------------------------------------------------------------------- concurrency


def measure_concurrency(width: int = 4, seconds: float = 0.1, repetitions: int = 3) -> dict:
    """A phase of ``width`` independent delay nodes (no path between them), on SQLite.

    The baseline is the same nodes one after another (``width * seconds`` of sleeping);
    a ratio well below 1 shows the nodes of one phase running concurrently.
    """
    definition = {
        "version": 1,
        "nodes": [
            {"id": f"wait{i}", "type": "delay", "inputs": {"seconds": seconds}}
            for i in range(width)
        ],
        "edges": [],
    }
    timings = []
    with tempfile.TemporaryDirectory() as home:
        url = f"sqlite:///{Path(home) / 'concurrency.db'}"
        with (
            _database(url, Path(home)) as engine,
            Session(engine, expire_on_commit=False) as session,
        ):
            for _ in range(max(1, repetitions)):
                execution_id = _prepare(session, width, definition)
                started = time.perf_counter()
                result = run_execution(execution_id)
                timings.append(time.perf_counter() - started)
                if result.outcome != Outcome.COMPLETED:
                    raise RuntimeError(f"concurrency run did not complete: {result}")
    sequential = width * seconds
    engine_seconds = statistics.median(timings)
    return {
        "width": width,
        "node_seconds": seconds,
        "sequential_ms": sequential * 1000,
        "engine_ms": engine_seconds * 1000,
        "ratio_engine_to_sequential": engine_seconds / sequential,
    }


# ----------------------------------------------------------------------------- definitions


def measure_definitions(nodes: int = 200, repetitions: int = 3) -> dict:
    """``validate_definition`` + ``build_plan`` of a ``nodes``-node definition (JSON text)
    relative to ``json.loads`` of the same text."""
    text = json.dumps(chain_definition(nodes))

    def validate_and_plan() -> None:
        build_plan(validate_definition(text, owned_credential_ids=None))

    reps = range(max(1, repetitions))
    loads = min(_per_call(lambda: json.loads(text), 0.05) for _ in reps)
    checked = min(_per_call(validate_and_plan, 0.1) for _ in reps)
    return {
        "nodes": nodes,
        "bytes": len(text),
        "json_loads_ms": loads * 1000,
        "validate_and_plan_ms": checked * 1000,
        "ratio_validate_plan_to_json_loads": checked / loads,
        "definitions_per_second": 1 / checked,
    }


# ----------------------------------------------------------------------------- PostgreSQL


@contextlib.contextmanager
def throwaway_postgres(admin_url: str = PG_ADMIN_URL) -> Iterator[str | None]:
    """A fresh PostgreSQL database (dropped afterwards), or None when none is reachable."""
    try:
        database = db.temporary_database(admin_url, "flowbuilder_bench")
        url = database.__enter__()
    except Exception as exc:  # noqa: BLE001 - no server, no driver, no rights: skip it
        print(f"PostgreSQL skipped: {type(exc).__name__}", file=sys.stderr)
        yield None
        return
    try:
        yield url
    finally:
        database.__exit__(None, None, None)


# ----------------------------------------------------------------------------- entry point


def run_benchmarks(
    phases: int = 20,
    repetitions: int = 5,
    backends: tuple[str, ...] = ("sqlite", "postgresql"),
    definition_nodes: int = 200,
) -> dict:
    """Every measurement, as one JSON-friendly dict."""
    baseline = baseline_run_seconds(phases, repetitions)
    engines = []
    if "sqlite" in backends:
        with tempfile.TemporaryDirectory() as folder:
            url = f"sqlite:///{Path(folder) / 'bench.db'}"
            engines.append(measure_engine(url, phases, repetitions, baseline))
    if "postgresql" in backends:
        with throwaway_postgres() as url:
            if url is not None:
                engines.append(measure_engine(url, phases, repetitions, baseline))
    return {
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "baseline_ms_per_run": baseline * 1000,
        "engine": engines,
        "definitions": measure_definitions(definition_nodes, repetitions),
        "concurrency": measure_concurrency(repetitions=min(repetitions, 3)),
    }


def format_table(results: dict) -> str:
    lines = [
        f"{'backend':<11}{'phases':>7}{'base ms/ph':>12}{'engine ms/ph':>14}"
        f"{'overhead ms/ph':>16}{'ratio':>9}{'stmts/ph':>10}{'commits/ph':>12}{'fixed':>7}",
    ]
    for row in results["engine"]:
        lines.append(
            f"{row['backend']:<11}{row['phases']:>7}{row['baseline_ms_per_phase']:>12.4f}"
            f"{row['engine_ms_per_phase']:>14.3f}{row['overhead_ms_per_phase']:>16.3f}"
            f"{row['ratio_engine_to_baseline']:>9.0f}{row['statements_per_phase']:>10}"
            f"{row['commits_per_phase']:>12}{row['statements_fixed']:>7}"
        )
    d = results["definitions"]
    lines.append("")
    lines.append(
        f"definition of {d['nodes']} nodes ({d['bytes']} bytes): json.loads "
        f"{d['json_loads_ms']:.3f} ms, validate_definition+build_plan "
        f"{d['validate_and_plan_ms']:.2f} ms = {d['ratio_validate_plan_to_json_loads']:.0f}x "
        f"json.loads ({d['definitions_per_second']:.0f} definitions/s)"
    )
    c = results["concurrency"]
    lines.append(
        f"one phase of {c['width']} independent {c['node_seconds']:g}s delays: "
        f"{c['engine_ms']:.0f} ms vs {c['sequential_ms']:.0f} ms one after another "
        f"= {c['ratio_engine_to_sequential']:.2f}x"
    )
    return "\n".join(lines)


def _quiet_logging() -> None:
    from flowbuilder.platform.logging import setup_logging

    setup_logging("WARNING", force=True)  # the engine's INFO lines are not the benchmark


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_engine")
    parser.add_argument("--phases", type=int, default=20)
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument(
        "--backends", default="sqlite,postgresql", help="comma-separated: sqlite,postgresql"
    )
    parser.add_argument("--write", action="store_true", help=f"write {RESULTS_PATH.name}")
    args = parser.parse_args(argv)

    _quiet_logging()
    started = time.perf_counter()
    results = run_benchmarks(
        phases=args.phases,
        repetitions=args.repetitions,
        backends=tuple(b.strip() for b in args.backends.split(",") if b.strip()),
    )
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    print(format_table(results))
    print(f"\n(total {results['total_seconds']} s)")
    if args.write:
        RESULTS_PATH.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {RESULTS_PATH}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
