"""The execution path end to end, each figure next to a bare baseline measured in the same run.

Every measure runs A B A B: the project, then its baseline, for several rounds; a figure
is the median of its rounds with the range, and the ratio is computed per round.
Baselines (see ``worker_apps``):

- a bare Celery chain of the same steps, on the same broker with the project's settings;
- the floor: one bare task doing all the steps' work itself;
- the same phase SQL in raw psycopg, and in SQLAlchemy Core with statements built once;
- bare no-op tasks: throughput, drain and wake-up on the same broker;
- one bare ``apply_async`` (one SQS send through kombu) for enqueue latency (what the
  caller waits, and the time until the message is in the queue).

The harness only uses ``flowbuilder.tasks.enqueue_execution`` and the worker task, never
the engine's internals.
"""

from __future__ import annotations

import json
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlmodel import Session

from benchmarks.harness import Services, Worker, wait_for
from flowbuilder.platform import db
from flowbuilder.platform.settings import override_settings

# ----------------------------------------------------------------------------- statistics


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def interleaved(rounds: int, project: Callable[[], float], baseline: Callable[[], float]) -> dict:
    """A B A B ...: ``rounds`` of each, ratio per round."""
    a, b = [], []
    for _ in range(rounds):
        a.append(project())
        b.append(baseline())
    return {
        "project": summary(a),
        "baseline": summary(b),
        "ratio": summary([x / y for x, y in zip(a, b, strict=True) if y]),
        "rounds": rounds,
    }


# ----------------------------------------------------------------------------- workloads


def delays_definition(
    phases: int, seconds: float, data: Any = None, node_type: str = "delay"
) -> dict[str, Any]:
    """``phases`` delay nodes chained through their data passthrough: one phase each."""
    nodes: list[dict[str, Any]] = []
    for i in range(phases):
        inputs: dict[str, Any] = {"seconds": seconds}
        if i == 0 and data is not None:
            inputs["data"] = data
        nodes.append({"id": f"d{i}", "type": node_type, "inputs": inputs})
    edges = [
        {"source": f"d{i - 1}", "sourceHandle": "data", "target": f"d{i}", "targetHandle": "data"}
        for i in range(1, phases)
    ]
    return {"version": 1, "nodes": nodes, "edges": edges}


def json_definition(phases: int) -> dict[str, Any]:
    """``phases`` add_property_to_json nodes in a chain (microseconds of work each)."""
    nodes, edges = [], []
    for i in range(phases):
        inputs: dict[str, Any] = {"property_path": f"step{i}", "value": i}
        if i == 0:
            inputs["json"] = {"start": True}
        nodes.append({"id": f"n{i}", "type": "add_property_to_json", "inputs": inputs})
        if i:
            edges.append(
                {
                    "source": f"n{i - 1}",
                    "sourceHandle": "json",
                    "target": f"n{i}",
                    "targetHandle": "json",
                }
            )
    return {"version": 1, "nodes": nodes, "edges": edges}


def payload_of(size: int) -> dict[str, Any]:
    """A JSON object of about ``size`` bytes (a list of short records)."""
    record = {"id": 0, "name": "item-000000", "tags": ["a", "b", "c"], "score": 0.5}
    per = len(json.dumps(record)) + 2
    return {
        "items": [
            {"id": i, "name": f"item-{i:06d}", "tags": ["a", "b", "c"], "score": 0.5}
            for i in range(max(1, size // per))
        ]
    }


# ----------------------------------------------------------------------------- project side


class Project:
    """Enqueues through the API's entry point and reads the results from PostgreSQL."""

    def __init__(self, svc: Services) -> None:
        from flowbuilder.platform import db, models
        from flowbuilder.platform.crud import balance_crud, user_crud

        self.svc = svc
        self.engine = db.get_engine()
        self.reader = sa.create_engine(svc.database_url, pool_size=2)
        self.session = Session(self.engine, expire_on_commit=False)
        user = user_crud.create_user(
            session=self.session,
            data=models.UserCreate(email=f"bench-{uuid.uuid4().hex[:10]}@example.com"),
        )
        balance_crud.grant_credits(session=self.session, user_id=user.id, amount=10**9)
        self.session.commit()
        self.user_id = user.id
        self._workflows: dict[str, uuid.UUID] = {}
        self.last_queued = 0.0

    def close(self) -> None:
        self.session.close()
        self.reader.dispose()

    def workflow(self, name: str, definition: dict[str, Any]) -> uuid.UUID:
        from flowbuilder.platform import models
        from flowbuilder.platform.crud import workflow_crud

        if name not in self._workflows:
            wf = workflow_crud.create_workflow(
                session=self.session,
                user_id=self.user_id,
                data=models.WorkflowCreate(
                    name=f"{name}-{uuid.uuid4().hex[:6]}", definition=definition
                ),
            )
            self.session.flush()
            workflow_crud.publish_workflow(
                session=self.session, workflow_id=wf.id, user_id=self.user_id
            )
            self.session.commit()
            self._workflows[name] = wf.id
        return self._workflows[name]

    def enqueue(self, workflow_id: uuid.UUID, *, wait_sent: bool = True) -> tuple[uuid.UUID, float]:
        """Enqueue one run; ``(id, wall time before)``. The message leaves in the
        background; by default this waits until it has, so runs reach the queue one send
        after another, as the bare sender's do (measure_enqueue times both waits)."""
        from flowbuilder.tasks import enqueue_execution

        sent = time.time()
        ex = enqueue_execution(self.session, workflow_id, self.user_id)
        self.session.commit()
        if wait_sent:
            self.wait_sent()
            # When its message was in the queue (the send returned).
            self.last_queued = time.time()
        return ex.id, sent

    @staticmethod
    def wait_sent() -> None:
        """Until this process's enqueue messages are in the queue (sent, or failed)."""
        from flowbuilder.tasks import wait_for_sends

        if not wait_for_sends(60):
            raise RuntimeError("an enqueue's send did not finish within 60 s")

    def rows(self, ids: list[uuid.UUID]) -> list[tuple[str, datetime | None, datetime | None]]:
        with self.reader.connect() as conn:
            return list(
                conn.execute(
                    sa.text(
                        "SELECT status, started_at, completed_at FROM workflow_execution "
                        "WHERE id = ANY(:ids)"
                    ),
                    {"ids": ids},
                )
            )

    def wait_done(self, ids: list[uuid.UUID], timeout: float = 300) -> list[tuple]:
        terminal = {"completed", "failed", "cancelled"}

        def done() -> list[tuple] | None:
            rows = self.rows(ids)
            if len(rows) == len(ids) and all(r[0] in terminal for r in rows):
                return rows
            return None

        rows = wait_for(done, timeout, interval=0.01)
        bad = [r for r in rows if r[0] != "completed"]
        if bad:
            raise RuntimeError(f"{len(bad)} benchmark run(s) did not complete: {bad[0]}")
        return rows

    def run_once(self, workflow_id: uuid.UUID) -> float:
        """Seconds from enqueue to the execution's completion (its completed_at)."""
        ex_id, sent = self.enqueue(workflow_id)
        (row,) = self.wait_done([ex_id])
        return row[2].timestamp() - sent


# ----------------------------------------------------------------------------- bare side


class Bare:
    """Sends bare tasks and reads the times they recorded in Redis."""

    def __init__(self, svc: Services) -> None:
        from benchmarks import worker_apps

        self.svc = svc
        self.app = worker_apps.configure_bare()
        self.tasks = worker_apps
        self.last_queued = 0.0

    def _times(self, key: str, count: int, timeout: float = 300) -> tuple[float, float]:
        r = self.svc.redis
        wait_for(lambda: int(r.get(f"{key}:count") or 0) >= count, timeout, interval=0.01)
        return float(r.get(f"{key}:first_start")), float(r.get(f"{key}:last_done"))

    def chain(self, steps: int, seconds: float, payload: Any = None) -> float:
        from celery import chain

        key = self.svc.key("chain")
        sigs = [self.tasks.step.s(payload, key, 0, steps, seconds)]
        sigs += [self.tasks.step.s(key, i, steps, seconds) for i in range(1, steps)]
        sent = time.time()
        chain(*sigs).apply_async()
        _, done = self._times(key, 1)
        return done - sent

    def floor(self, steps: int, seconds: float, payload: Any = None) -> float:
        key = self.svc.key("floor")
        sent = time.time()
        self.tasks.floor.apply_async(args=[key, steps, seconds, payload])
        _, done = self._times(key, 1)
        return done - sent

    def noops(self, count: int) -> tuple[str, float]:
        key = self.svc.key("noop")
        sent = time.time()
        for _ in range(count):
            self.tasks.noop.apply_async(args=[key])
        # When the last message was in the queue (its send returned).
        self.last_queued = time.time()
        return key, sent


# ----------------------------------------------------------------------------- sessions


@contextmanager
def session(
    svc: Services,
    *,
    project_worker: bool = True,
    bare_worker: bool = True,
    transport_options: dict[str, Any] | None = None,
    prefetch: int | None = None,
    warm: bool = True,
) -> Iterator[tuple[Project, Bare, list[Worker]]]:
    """Fresh queues, the harness reconfigured for them, and the workers running on them."""
    from flowbuilder.platform import db

    prefix = f"fbb{uuid.uuid4().hex[:8]}-"
    workers: list[Worker] = []
    with svc.settings(prefix) as _settings:
        db.reset_engines()
        project = Project(svc)
        bare = Bare(svc)
        try:
            if project_worker:
                workers.append(
                    Worker(
                        svc,
                        "project",
                        prefix,
                        transport_options=transport_options,
                        prefetch=prefetch,
                    )
                )
            if bare_worker:
                workers.append(
                    Worker(
                        svc, "bare", prefix, transport_options=transport_options, prefetch=prefetch
                    )
                )
            if warm:
                # Both workers ready (their children forked, connections made).
                if project_worker:
                    wf = project.workflow("warm", json_definition(1))
                    project.wait_done([project.enqueue(wf)[0] for _ in range(4)], 120)
                if bare_worker:
                    key, _ = bare.noops(4)
                    bare._times(key, 4, 120)
            yield project, bare, workers
        finally:
            for w in workers:
                w.stop()
            project.close()
            db.reset_engines()


# ----------------------------------------------------------------------------- measures


def measure_phase_overhead(
    svc: Services,
    project: Project,
    bare: Bare,
    *,
    phases: int,
    seconds: float,
    rounds: int,
    payload: Any = None,
    name: str = "overhead",
    node_type: str = "delay",
) -> dict:
    """Overhead per phase, enqueue -> done, of ``phases`` sequential phases of ``seconds``."""
    wf = project.workflow(f"{name}{phases}", delays_definition(phases, seconds, payload, node_type))
    work = phases * seconds
    proj, chain, floor = [], [], []
    for _ in range(rounds):
        proj.append(project.run_once(wf))
        chain.append(bare.chain(phases, seconds, payload))
        floor.append(bare.floor(phases, seconds, payload))
    per = [(t - work) / phases * 1000 for t in proj]
    per_chain = [(t - work) / phases * 1000 for t in chain]
    return {
        "phases": phases,
        "node_seconds": seconds,
        "payload_bytes": len(json.dumps(payload)) if payload is not None else 0,
        "project_ms_per_phase": summary(per),
        "chain_ms_per_step": summary(per_chain),
        "ratio_to_chain": summary([a / b for a, b in zip(per, per_chain, strict=True) if b]),
        "project_total_s": summary(proj),
        "floor_total_s": summary(floor),
        "ratio_total_to_floor": summary([a / b for a, b in zip(proj, floor, strict=True)]),
        "rounds": rounds,
    }


def measure_throughput_and_wake(
    svc: Services, project: Project, bare: Bare, *, runs: int, rounds: int, wakes: int = 3
) -> tuple[dict, dict]:
    """``runs`` one-phase runs sent back to back vs ``runs`` bare no-ops; then, right after
    each burst, the wait before one more run (or no-op) starts: from the call that
    enqueues it (the project's checks and rows included), and from the moment its
    message is in the queue (the worker's part alone: the broker's polling, the
    consumer, the pool)."""
    wf = project.workflow("one", json_definition(1))
    proj, base, wake_p, wake_b = [], [], [], []
    pick_p, pick_b = [], []
    for _ in range(rounds):
        sent = time.time()
        ids = [project.enqueue(wf)[0] for _ in range(runs)]
        rows = project.wait_done(ids)
        proj.append(runs / (max(r[2].timestamp() for r in rows) - sent))
        for _ in range(wakes):
            ex_id, t0 = project.enqueue(wf)
            queued = project.last_queued
            (row,) = project.wait_done([ex_id])
            wake_p.append((row[1].timestamp() - t0) * 1000)
            pick_p.append((row[1].timestamp() - queued) * 1000)

        key, sent = bare.noops(runs)
        _, done = bare._times(key, runs)
        base.append(runs / (done - sent))
        for _ in range(wakes):
            key, t0 = bare.noops(1)
            queued = bare.last_queued
            start, _ = bare._times(key, 1)
            wake_b.append((start - t0) * 1000)
            pick_b.append((start - queued) * 1000)
    throughput = {
        "runs": runs,
        "project_runs_per_s": summary(proj),
        "bare_tasks_per_s": summary(base),
        "ratio": summary([a / b for a, b in zip(proj, base, strict=True)]),
        "rounds": rounds,
    }
    wake = {
        "project_ms": summary(wake_p),
        "bare_ms": summary(wake_b),
        "ratio": summary([a / b for a, b in zip(wake_p, wake_b, strict=True) if b]),
        "samples": len(wake_p),
        # From the message in the queue to the start (started_at; the no-op's own clock).
        "project_from_queue_ms": summary(pick_p),
        "bare_from_queue_ms": summary(pick_b),
        "ratio_from_queue": summary([a / b for a, b in zip(pick_p, pick_b, strict=True) if b]),
    }
    return throughput, wake


def measure_drain(
    svc: Services,
    *,
    runs: int,
    rounds: int,
    transport_options: dict[str, Any] | None = None,
    prefetch: int | None = None,
    bare_options: list[tuple[str, dict | None, int | None, str | None]] | None = None,
    short_worker: bool = False,
) -> dict:
    """``runs`` runs queued while no worker runs, then a worker started: runs per second
    from the first start to the last completion. Fresh queues and workers every round.

    The project's worker is a default one (both queues, prefetch 1); with
    ``short_worker`` also the Procfile's ``worker-short`` (the short-run queue only,
    prefetch 4), where these one-phase runs are routed."""
    from flowbuilder.tasks.app import SHORT_EXECUTIONS_QUEUE

    proj, base, short = [], [], []
    extra: dict[str, list[float]] = {}
    for _ in range(rounds):
        if short_worker:
            with session(svc, project_worker=False, bare_worker=False, warm=False) as (
                project,
                _b,
                _,
            ):
                wf = project.workflow("one", json_definition(1))
                ids = [project.enqueue(wf)[0] for _ in range(runs)]
                with Worker(
                    svc, "project", _current_prefix(), prefetch=4, queue=SHORT_EXECUTIONS_QUEUE
                ):
                    rows = project.wait_done(ids)
                first = min(r[1].timestamp() for r in rows)
                short.append((runs - 1) / (max(r[2].timestamp() for r in rows) - first))
        with session(svc, project_worker=False, bare_worker=False, warm=False) as (
            project,
            bare,
            _,
        ):
            wf = project.workflow("one", json_definition(1))
            ids = [project.enqueue(wf)[0] for _ in range(runs)]
            key, _sent = bare.noops(runs)
            prefix = _current_prefix()
            with Worker(
                svc, "project", prefix, transport_options=transport_options, prefetch=prefetch
            ):
                rows = project.wait_done(ids)
            first = min(r[1].timestamp() for r in rows)
            proj.append((runs - 1) / (max(r[2].timestamp() for r in rows) - first))
            with Worker(
                svc, "bare", prefix, transport_options=transport_options, prefetch=prefetch
            ):
                start, done = bare._times(key, runs)
            base.append((runs - 1) / (done - start))
        for label, options, pf, channel in bare_options or []:
            # Fresh queues again: the bare worker above has just stopped, and its last
            # long poll may still be pending on the old queue.
            with session(svc, project_worker=False, bare_worker=False, warm=False) as (
                _p,
                bare,
                _,
            ):
                key, _sent = bare.noops(runs)
                with Worker(
                    svc,
                    "bare",
                    _current_prefix(),
                    transport_options=options,
                    prefetch=pf,
                    bare_channel=channel,
                ):
                    start, done = bare._times(key, runs)
            extra.setdefault(label, []).append((runs - 1) / (done - start))
    result = {
        "runs": runs,
        "project_runs_per_s": summary(proj),
        "bare_tasks_per_s": summary(base),
        "ratio": summary([a / b for a, b in zip(proj, base, strict=True)]),
        "rounds": rounds,
    }
    for label, values in extra.items():
        result[f"bare_{label}_tasks_per_s"] = summary(values)
        result[f"ratio_to_bare_{label}"] = summary(
            [a / b for a, b in zip(proj, values, strict=True)]
        )
        if short:
            result[f"short_worker_ratio_to_bare_{label}"] = summary(
                [a / b for a, b in zip(short, values, strict=True)]
            )
    if short:
        result["short_worker_runs_per_s"] = summary(short)
    return result


def _current_prefix() -> str:
    from flowbuilder.platform.settings import get_settings

    return get_settings().SQS_QUEUE_PREFIX


def measure_enqueue(svc: Services, *, samples: int, long_phases: int) -> dict:
    """Enqueue latency vs one bare ``apply_async``, interleaved.

    Two figures per enqueue: what the caller waits (the checks, the rows, the commit:
    ``enqueue_execution`` and ``commit()``; the message leaves in the background), and the
    time until its message is in the queue (until the send returns,
    ``wait_for_sends``). The baseline starts only once the project's send is done, so the
    two never share the machine.

    No worker consumes these queues; they are never reused. They are emptied every few
    samples: moto's SendMessage takes time in proportion to the messages already in the
    queue (about 2 ms more per 100 here; SQS itself does not), and the project's queue
    gets two sends per sample to the baseline's one, so a growing queue would count
    moto's cost against the project."""
    import boto3

    sqs = boto3.client("sqs", endpoint_url=svc.sqs_endpoint)

    def empty_queues() -> None:
        # Received and deleted (PurgeQueue is allowed once a minute per queue).
        for url in sqs.list_queues(QueueNamePrefix=_current_prefix()).get("QueueUrls", []):
            while True:
                got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages")
                if not got:
                    break
                sqs.delete_message_batch(
                    QueueUrl=url,
                    Entries=[
                        {"Id": str(n), "ReceiptHandle": m["ReceiptHandle"]}
                        for n, m in enumerate(got)
                    ],
                )

    def timed(workflow_id: uuid.UUID) -> tuple[float, float]:
        """(ms the caller waited, ms until the message was in the queue)."""
        t = time.perf_counter()
        project.enqueue(workflow_id, wait_sent=False)
        returned = time.perf_counter()
        project.wait_sent()
        return (returned - t) * 1000, (time.perf_counter() - t) * 1000

    with session(svc, project_worker=False, bare_worker=False, warm=False) as (project, bare, _):
        one = project.workflow("enq1", json_definition(1))
        many = project.workflow(f"enq{long_phases}", json_definition(long_phases))
        key = svc.key("enqueue")
        for _ in range(3):  # warm: connections, statement caches, the SQS client
            timed(one)
            timed(many)
            bare.tasks.noop.apply_async(args=[key])
        t1, tn, q1, qn, tb = [], [], [], [], []
        for i in range(samples):
            if i % 5 == 0:
                empty_queues()
            api, queued = timed(one)
            t1.append(api)
            q1.append(queued)
            t = time.perf_counter()
            bare.tasks.noop.apply_async(args=[key])
            tb.append((time.perf_counter() - t) * 1000)
            api, queued = timed(many)
            tn.append(api)
            qn.append(queued)

    def stats(values: list[float]) -> dict[str, float]:
        return {"p50": percentile(values, 50), "p99": percentile(values, 99)}

    s1, sn, sb = stats(t1), stats(tn), stats(tb)
    r1, rn = stats(q1), stats(qn)
    return {
        "samples": samples,
        "one_send_ms": sb,
        "project_1_phase_ms": s1,
        f"project_{long_phases}_phases_ms": sn,
        "project_1_phase_queued_ms": r1,
        f"project_{long_phases}_phases_queued_ms": rn,
        "long_phases": long_phases,
        "ratio_1_phase_p50": s1["p50"] / sb["p50"],
        "ratio_1_phase_p99": s1["p99"] / sb["p99"],
        "ratio_long_p50": sn["p50"] / sb["p50"],
        "ratio_long_p99": sn["p99"] / sb["p99"],
        "ratio_1_phase_queued_p50": r1["p50"] / sb["p50"],
        "ratio_1_phase_queued_p99": r1["p99"] / sb["p99"],
        "ratio_long_queued_p50": rn["p50"] / sb["p50"],
        "ratio_long_queued_p99": rn["p99"] / sb["p99"],
    }


# ----------------------------------------------------------------------------- phase SQL


def measure_phase_sql(svc: Services, *, phases: int, rounds: int) -> dict:
    """One phase's database cost inside the worker task (run in this process on the same
    code path as the worker: ``execute_workflow``), from the difference between a
    ``phases``-phase and a 1-phase run of near-zero work; round trips counted on the
    server side (BEGIN, COMMIT and pings included). Baselines: the same per-phase
    statements in raw psycopg, and in SQLAlchemy Core with the statements built once."""
    from flowbuilder.tasks import execute_workflow

    with session(svc, project_worker=False, bare_worker=False, warm=False) as (project, _b, _w):
        long_wf = project.workflow(f"sql{phases}", json_definition(phases))
        one_wf = project.workflow("sql1", json_definition(1))

        def run(wf: uuid.UUID) -> float:
            ex_id, _ = project.enqueue(wf)
            t = time.perf_counter()
            outcome = execute_workflow.apply(args=[str(ex_id)]).get()
            seconds = time.perf_counter() - t
            if outcome != "completed":
                raise RuntimeError(f"phase SQL run ended {outcome}")
            return seconds

        def counted(wf: uuid.UUID) -> int:
            before = svc.proxy.round_trips
            run(wf)
            return svc.proxy.round_trips - before

        # psycopg prepares a statement on its 5th execution on a connection (a Parse with
        # a Sync of its own): until every statement is prepared, round trips vary, so
        # both timed and counted runs start after warm-up runs.
        for _ in range(6):
            run(long_wf)
            run(one_wf)
        raw = _RawPhase(svc.database_url, project)
        core = _CorePhase(svc.database_url, project)
        proj, rt, fixed, raw_ms, core_ms = [], [], [], [], []
        for _ in range(rounds):
            tl, t1 = run(long_wf), run(one_wf)
            proj.append((tl - t1) / (phases - 1) * 1000)
            raw_ms.append(raw.per_phase_ms(phases))
            core_ms.append(core.per_phase_ms(phases))
        # Counted apart from the timed runs, on an engine through the counting proxy:
        # the proxy's threads share this process, so they must not be in a timed path.
        with override_settings(DATABASE_URL=svc.counting_database_url):
            db.reset_engines()
            try:
                for _ in range(6):
                    run(long_wf)
                    run(one_wf)
                for _ in range(2):
                    rl, r1 = counted(long_wf), counted(one_wf)
                    rt.append((rl - r1) / (phases - 1))
                    fixed.append(r1 - (rl - r1) / (phases - 1))
            finally:
                db.reset_engines()
        raw.close()
        core.close()
    return {
        "phases": phases,
        "project_ms_per_phase": summary(proj),
        "raw_psycopg_ms_per_phase": summary(raw_ms),
        "core_ms_per_phase": summary(core_ms),
        "ratio_to_raw": summary([a / b for a, b in zip(proj, raw_ms, strict=True)]),
        "ratio_to_core": summary([a / b for a, b in zip(proj, core_ms, strict=True)]),
        "round_trips_per_phase": summary(rt),
        "round_trips_fixed_per_run": summary(fixed),
        "raw_round_trips_per_phase": _RawPhase.ROUND_TRIPS,
        "rounds": rounds,
    }


class _RawPhase:
    """What a phase must do in the database, in raw psycopg: in one transaction, fence
    with the lease (and read cancel_requested), record the previous phase's outputs,
    debit (balance and ledger) and mark this phase running; then commit."""

    ROUND_TRIPS = 7  # BEGIN, 5 statements, COMMIT

    LEASE = (
        "UPDATE workflow_execution SET lease_expires_at = %s WHERE id = %s "
        "AND lease_owner = %s AND status = 'running' RETURNING cancel_requested"
    )
    DONE = (
        "UPDATE execution_phase SET status = 'completed', completed_at = %s, duration_ms = %s, "
        "outputs = %s WHERE id = %s"
    )
    BALANCE = (
        "UPDATE user_balance SET credits = credits - %s, updated_at = %s "
        "WHERE user_id = %s AND credits >= %s RETURNING credits"
    )
    LEDGER = (
        "INSERT INTO balance_transaction (id, user_id, kind, amount, balance_after, "
        "idempotency_key, execution_id, phase_id, reason, created_at) "
        "VALUES (%s, %s, 'debit', %s, %s, %s, %s, %s, %s, %s) "
        "ON CONFLICT (idempotency_key) DO NOTHING RETURNING id"
    )
    RUNNING = (
        "UPDATE execution_phase SET status = 'running', started_at = %s, "
        "attempts = attempts + 1, inputs = %s, credits_charged = %s WHERE id = %s"
    )

    def __init__(self, url: str, project: Project) -> None:
        self.conn = psycopg.connect(
            sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        )
        self.user_id = project.user_id
        # A real execution and phase rows to update (the project's own schema).
        wf = project.workflow("raw1", json_definition(1))
        ex_id, _ = project.enqueue(wf)
        self.execution_id = ex_id
        with self.conn.transaction():
            self.phase_id = self.conn.execute(
                "SELECT id FROM execution_phase WHERE execution_id = %s", (ex_id,)
            ).fetchone()[0]
            self.conn.execute(
                "UPDATE workflow_execution SET status = 'running', lease_owner = 'raw' "
                "WHERE id = %s",
                (ex_id,),
            )

    def one_phase(self) -> None:
        from psycopg.types.json import Jsonb

        now = datetime.now().astimezone()
        with self.conn.transaction():
            self.conn.execute(self.LEASE, (now, self.execution_id, "raw")).fetchone()
            self.conn.execute(self.DONE, (now, 1, Jsonb({"json": {"a": 1}}), self.phase_id))
            after = self.conn.execute(self.BALANCE, (1, now, self.user_id, 1)).fetchone()[0]
            self.conn.execute(
                self.LEDGER,
                (
                    uuid.uuid4(),
                    self.user_id,
                    -1,
                    after,
                    f"raw:{uuid.uuid4()}",
                    self.execution_id,
                    self.phase_id,
                    "raw",
                    now,
                ),
            ).fetchone()
            self.conn.execute(self.RUNNING, (now, Jsonb({"json": {"a": 1}}), 1, self.phase_id))

    def per_phase_ms(self, phases: int) -> float:
        self.one_phase()
        t = time.perf_counter()
        for _ in range(phases):
            self.one_phase()
        return (time.perf_counter() - t) / phases * 1000

    def close(self) -> None:
        self.conn.close()


class _CorePhase(_RawPhase):
    """The same statements in SQLAlchemy Core, built once, on one pooled connection."""

    def __init__(self, url: str, project: Project) -> None:
        from flowbuilder.platform.models import (
            BalanceTransaction,
            ExecutionPhase,
            UserBalance,
            WorkflowExecution,
        )

        super().__init__(url, project)
        self.conn.close()
        self.engine = sa.create_engine(url, pool_pre_ping=False)
        ex, ph = WorkflowExecution.__table__, ExecutionPhase.__table__
        bal, led = UserBalance.__table__, BalanceTransaction.__table__
        from sqlalchemy.dialects import postgresql

        b = sa.bindparam
        self.stmts = [
            sa.update(ex)
            .where(ex.c.id == b("ex_id"), ex.c.lease_owner == b("owner"), ex.c.status == "running")
            .values(lease_expires_at=b("now"))
            .returning(ex.c.cancel_requested),
            sa.update(ph)
            .where(ph.c.id == b("ph_id"))
            .values(
                status="completed",
                completed_at=b("now"),
                duration_ms=1,
                outputs=b("outputs", type_=ph.c.outputs.type),
            ),
            sa.update(bal)
            .where(bal.c.user_id == b("uid"), bal.c.credits >= 1)
            .values(credits=bal.c.credits - 1, updated_at=b("now"))
            .returning(bal.c.credits),
            postgresql.insert(led)
            .values(
                id=b("led_id"),
                user_id=b("uid"),
                kind="debit",
                amount=-1,
                balance_after=b("after"),
                idempotency_key=b("key"),
                execution_id=b("ex_id"),
                phase_id=b("ph_id"),
                reason="core",
                created_at=b("now"),
            )
            .on_conflict_do_nothing(index_elements=["idempotency_key"])
            .returning(led.c.id),
            sa.update(ph)
            .where(ph.c.id == b("ph_id"))
            .values(
                status="running",
                started_at=b("now"),
                attempts=ph.c.attempts + 1,
                inputs=b("inputs", type_=ph.c.inputs.type),
                credits_charged=1,
            ),
        ]
        self.connection = self.engine.connect()

    def one_phase(self) -> None:
        lease, done, balance, ledger, running = self.stmts
        now = datetime.now().astimezone()
        c = self.connection
        params = {
            "ex_id": self.execution_id,
            "ph_id": self.phase_id,
            "uid": self.user_id,
            "now": now,
            "owner": "raw",
        }
        with c.begin():
            c.execute(lease, params).first()
            c.execute(done, {**params, "outputs": {"json": {"a": 1}}})
            after = c.execute(balance, params).scalar_one()
            c.execute(
                ledger,
                {**params, "led_id": uuid.uuid4(), "after": after, "key": f"core:{uuid.uuid4()}"},
            ).first()
            c.execute(running, {**params, "inputs": {"json": {"a": 1}}})

    def close(self) -> None:
        self.connection.close()
        self.engine.dispose()


# ----------------------------------------------------------------------------- all


def run(svc: Services, *, quick: bool, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every measure of this module, as one JSON-friendly dict."""
    rounds = 1 if quick else 4
    phases = 8 if quick else 40
    runs = 20 if quick else 200
    results: dict[str, Any] = {}
    with session(svc) as (project, bare, _workers):
        log("overhead per phase (10 ms phases)")
        results["phase_overhead"] = measure_phase_overhead(
            svc, project, bare, phases=phases, seconds=0.01, rounds=rounds
        )
        if not quick:
            log("overhead per phase by phase count")
            results["phase_overhead_by_count"] = {
                str(n): measure_phase_overhead(
                    svc, project, bare, phases=n, seconds=0.01, rounds=rounds, name="count"
                )
                for n in (1, 5, 10, 20)
            }
            results["phase_overhead_by_count"][str(phases)] = results["phase_overhead"]
        log("overhead per phase, nodes that are not pure (10 ms phases)")
        results["phase_overhead_not_pure"] = measure_phase_overhead(
            svc,
            project,
            bare,
            phases=phases,
            seconds=0.01,
            rounds=rounds,
            name="notpure",
            node_type=bare.tasks.NOT_PURE_DELAY,
        )
        log("overhead per phase with large outputs")
        big = payload_of(8_000 if quick else 122_000)
        results["phase_overhead_large_outputs"] = measure_phase_overhead(
            svc,
            project,
            bare,
            phases=max(4, phases // 2) if quick else phases,
            seconds=0.01,
            rounds=rounds,
            payload=big,
            name="big",
        )
        log("throughput and wake-up after a busy moment")
        results["throughput"], results["wake_after_busy"] = measure_throughput_and_wake(
            svc, project, bare, runs=runs, rounds=rounds, wakes=2 if quick else 3
        )
    log("drain of queued runs")
    results["drain"] = measure_drain(
        svc,
        runs=runs,
        rounds=1 if quick else 3,
        short_worker=True,
        bare_options=None
        if quick
        else [
            ("prefetch4_polling0", {"polling_interval": 0}, 4, None),
            # No-op tasks on the project's own SQS channel (batched acknowledgements).
            ("project_channel", None, None, "project"),
        ],
    )
    log("enqueue latency")
    results["enqueue"] = measure_enqueue(svc, samples=20 if quick else 150, long_phases=phases)
    log("one phase's SQL")
    results["phase_sql"] = measure_phase_sql(svc, phases=5 if quick else 20, rounds=rounds + 1)
    return results
