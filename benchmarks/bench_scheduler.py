"""The cron scheduler against bare RedBeat, in the same run, on the same endpoints.

Run ``python -m benchmarks.bench_scheduler [--quick]`` (or ``run(quick)`` from a suite).

Set-up: a throwaway PostgreSQL database, the real Redis (a random key prefix, deleted
afterwards) and moto's SQS server (a subprocess). 10,000 published cron workflows
(2,000 with ``--quick``) of which 1,000 (200) are due at the same second.

Reported:
- **SQS requests per 1,000 fires**: ours (SendMessageBatch of 10, in parallel) and bare
  RedBeat's (one SendMessage per due entry, one after another).
- **scheduler's own time** for the batch: from the tick at the fire time until every
  execution is recorded and handed to the sender, excluding time inside SQS calls
  (botocore's ``_make_api_call`` is timed). For RedBeat: its tick minus its SQS calls.
- **fire lag** p50/p99: for each message, the moment SQS acknowledged it minus the fire
  time, on moto. moto is slow and serialises requests, so this mostly measures moto;
  hence also a **projection for real SQS**: own time + requests x latency
  (``--sqs-latency-ms``, 15 ms by default, a typical in-region round trip), sequential
  for RedBeat and BEAT_SQS_CONCURRENCY-wide for ours.
- **duplicates** with two schedulers firing the same 1,000 due workflows at the same
  instant (no lock between them, the worst case): executions per fire time, messages.
- **memory** of a real ``celery -A flowbuilder.tasks beat`` process with all the
  workflows scheduled, sampled over rounds of 1,000 fires (RSS after the first round and
  after the last).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import redis
import sqlalchemy as sa
from sqlmodel import Session, SQLModel

from benchmarks.harness import moto_server

PG_ADMIN_URL = os.environ.get(
    "FLOWBUILDER_BENCH_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("FLOWBUILDER_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
ZONES = ["UTC", "Europe/Paris", "America/New_York", "Asia/Tokyo"]


# ------------------------------------------------------------------------------ helpers


class _SqsTimer:
    """Time spent inside botocore API calls (all threads), while installed."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls: dict[str, int] = {}
        self._lock = threading.Lock()
        self._original: Any = None

    def __enter__(self) -> _SqsTimer:
        import botocore.client

        self._original = original = botocore.client.BaseClient._make_api_call
        timer = self

        def timed(client: Any, operation: str, params: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(client, operation, params)
            finally:
                with timer._lock:
                    timer.seconds += time.perf_counter() - started
                    timer.calls[operation] = timer.calls.get(operation, 0) + 1

        botocore.client.BaseClient._make_api_call = timed
        return self

    def __exit__(self, *_: object) -> None:
        import botocore.client

        botocore.client.BaseClient._make_api_call = self._original

    def reset(self) -> None:
        with self._lock:
            self.seconds = 0.0
            self.calls = {}


def _fresh_queues(moto_url: str, *settings_list: Any) -> None:
    """Empty queues for the next measurement: moto's cost per request grows with the
    queue's depth (and it allows one PurgeQueue a minute), so state is reset and the
    queues are created again under the same names (and URLs)."""
    from flowbuilder.tasks.app import ensure_execution_queues

    request = urllib.request.Request(moto_url + "/moto-api/reset", method="POST")
    urllib.request.urlopen(request, timeout=30).read()
    for settings in settings_list:
        ensure_execution_queues(settings)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def _sleep_until(moment: datetime) -> None:
    delay = (moment - datetime.now(UTC)).total_seconds()
    if delay > 0:
        time.sleep(delay)


def _lags(acked: list[tuple[int, float]], fire: datetime) -> list[float]:
    base = fire.timestamp()
    out: list[float] = []
    for count, at in acked:
        out.extend([at - base] * count)
    return out


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# ------------------------------------------------------------------------------ data


def _populate(engine: sa.Engine, workflows: int, due: int, fire: datetime) -> list[uuid.UUID]:
    """``workflows`` published cron workflows (10 per user), ``due`` of them due at
    ``fire``; the others next fire on 1 January. Returns the due ids."""
    from flowbuilder.platform.crud import balance_crud, user_crud, workflow_crud
    from flowbuilder.platform.models import (
        User,
        UserBalance,
        UserCreate,
        Workflow,
        WorkflowCreate,
        WorkflowVersion,
    )
    from tests.factories import json_definition

    with Session(engine) as session:
        user = user_crud.create_user(session=session, data=UserCreate(email="t@example.com"))
        balance_crud.grant_credits(session=session, user_id=user.id, amount=10)
        wf = workflow_crud.create_workflow(
            session=session,
            user_id=user.id,
            data=WorkflowCreate(name="template", definition=json_definition(2)),
        )
        version = workflow_crud.publish_workflow(
            session=session, workflow_id=wf.id, user_id=user.id
        )
        definition, plan, cost = version.definition, version.plan, version.credits_cost
        session.rollback()

    now = datetime.now(UTC)
    next_year = datetime(now.year + 1, 1, 1, tzinfo=UTC)
    users = [uuid.uuid4() for _ in range(max(1, workflows // 10))]
    due_ids: list[uuid.UUID] = []
    wf_rows, version_rows = [], []
    for i in range(workflows):
        wid = uuid.uuid4()
        is_due = i < due
        if is_due:
            due_ids.append(wid)
        wf_rows.append(
            {
                "id": wid,
                "user_id": users[i % len(users)],
                "name": f"wf-{i}",
                # Due ones are set to fire at ``fire`` (as if a minute cron's time had
                # come); a yearly cron keeps them from coming due again at every minute
                # while the benchmark runs.
                "cron": "0 0 1 1 *",
                "timezone": ZONES[i % len(ZONES)] if not is_due else "UTC",
                "definition": {},
                "status": "published",
                "published_version": 1,
                "credits_cost": cost,
                "next_run_at": fire if is_due else next_year,
                "created_at": now,
                "updated_at": now,
            }
        )
        version_rows.append(
            {
                "id": uuid.uuid4(),
                "workflow_id": wid,
                "version": 1,
                "definition": definition,
                "plan": plan,
                "credits_cost": cost,
                "created_at": now,
            }
        )
    with engine.begin() as conn:
        conn.execute(
            sa.insert(User.__table__),
            [
                {
                    "id": u,
                    "email": f"{u}@example.com",
                    "timezone": "UTC",
                    "is_guest": False,
                    "created_at": now,
                    "updated_at": now,
                }
                for u in users
            ],
        )
        conn.execute(
            sa.insert(UserBalance.__table__),
            [
                {"id": uuid.uuid4(), "user_id": u, "credits": 10**9, "updated_at": now}
                for u in users
            ],
        )
        for i in range(0, workflows, 2000):
            conn.execute(sa.insert(Workflow.__table__), wf_rows[i : i + 2000])
            conn.execute(sa.insert(WorkflowVersion.__table__), version_rows[i : i + 2000])
    return due_ids


def _make_due(
    engine: sa.Engine, client: redis.Redis, key: str, ids: list[uuid.UUID], at: datetime
) -> None:
    with engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE workflow SET next_run_at = :at WHERE id = ANY(:ids)"),
            {"at": at, "ids": ids},
        )
    client.zadd(key, {str(wid): at.timestamp() for wid in ids})


# ------------------------------------------------------------------------------ runs


def _tick_figures(firer: Any, timer: _SqsTimer, fire: datetime, wall: float) -> dict[str, Any]:
    fired = sum(s.fired for s in firer.last)
    requests = timer.calls.get("SendMessageBatch", 0)
    lags = [lag for r in firer.last_reports for lag in _lags(r.acked, fire)]
    # The parallel sends' wall-clock time (summed call durations would exceed it).
    sqs_wall = sum(r.sqs_seconds for r in firer.last_reports)
    return {
        "fired": fired,
        "sqs_requests": requests,
        "sqs_requests_per_1000": round(requests * 1000 / max(fired, 1), 1),
        "own_seconds": round(wall - sqs_wall, 4),
        "sqs_seconds": round(sqs_wall, 3),
        "lag_p50": round(_percentile(lags, 0.5), 3),
        "lag_p99": round(_percentile(lags, 0.99), 3),
        "lag_max": round(max(lags), 3) if lags else None,
    }


def _ours(
    settings: Any, timer: _SqsTimer, engine: sa.Engine, ids: list[uuid.UUID], fire: datetime
) -> dict[str, Any]:
    """Cold: the first fire of these workflows in this process. Warm: the same workflows
    fire again (as every minute in production); versions already validated."""
    from flowbuilder.beat.scheduler import CronFirer
    from flowbuilder.platform import cron_schedule
    from flowbuilder.tasks.app import app, configure

    configure(app, settings)
    firer = CronFirer(app, settings=settings)
    out: dict[str, Any] = {}
    try:
        firer.reconcile()
        firer.warm_up()
        for label in ("cold", "warm"):
            _fresh_queues(settings.SQS_ENDPOINT_URL, settings)
            if label == "warm":
                fire = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=3)
                key = cron_schedule.schedule_key(settings)
                _make_due(engine, firer.client, key, ids, fire)
            _sleep_until(fire)
            timer.reset()
            started = time.perf_counter()
            firer.tick()
            out[label] = _tick_figures(firer, timer, fire, time.perf_counter() - started)
    finally:
        firer.close()
    return out


def _bare_redbeat(
    settings: Any, timer: _SqsTimer, workflows: int, due: int, fire: datetime
) -> dict[str, Any]:
    """Bare RedBeat: one entry per workflow, the same due set, its own empty queue."""
    from celery import Celery
    from celery.schedules import schedule
    from redbeat import RedBeatScheduler, RedBeatSchedulerEntry

    from flowbuilder.tasks.app import celery_config, ensure_execution_queues

    ensure_execution_queues(settings)
    app = Celery("bench-redbeat")
    app.conf.update(celery_config(settings))
    app.conf.beat_schedule = {}
    every = schedule(timedelta(hours=1))
    now = datetime.now(UTC)
    for i in range(workflows):
        RedBeatSchedulerEntry(
            name=f"wf-{i}",
            task="flowbuilder.execute_workflow",
            schedule=every,
            args=[str(uuid.uuid4())],
            app=app,
            last_run_at=(fire - timedelta(hours=1)) if i < due else now,
        ).save()
    scheduler = RedBeatScheduler(app=app)
    scheduler.lock_key = None  # one beat, no lock renewal in the measured tick
    acked: list[tuple[int, float]] = []
    original = scheduler.apply_async

    def apply_async(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        acked.append((1, time.time()))
        return result

    scheduler.apply_async = apply_async  # type: ignore[method-assign]
    # Warm the producer (SQS channel) before the fire, as for ours.
    app.send_task("flowbuilder.noop_warm_up", producer=scheduler.producer)
    _fresh_queues(settings.SQS_ENDPOINT_URL, settings)
    _sleep_until(fire)
    timer.reset()
    started = time.perf_counter()
    while True:  # RedBeat sends what its tick found due; loop until all are out
        scheduler.tick()
        if len(acked) >= due or time.perf_counter() - started > 600:
            break
    wall = time.perf_counter() - started
    lags = _lags(acked, fire)
    requests = timer.calls.get("SendMessage", 0)
    return {
        "fired": len(acked),
        "sqs_requests": requests,
        "sqs_requests_per_1000": round(requests * 1000 / max(len(acked), 1), 1),
        "own_seconds": round(wall - timer.seconds, 4),
        "sqs_seconds": round(timer.seconds, 3),
        "lag_p50": round(_percentile(lags, 0.5), 3),
        "lag_p99": round(_percentile(lags, 0.99), 3),
        "lag_max": round(max(lags), 3) if lags else None,
    }


def _two_schedulers(
    settings: Any, engine: sa.Engine, client: redis.Redis, ids: list[uuid.UUID]
) -> dict[str, Any]:
    """Two CronFirers (no lock between them) tick at the same instant on the same due set."""
    from flowbuilder.beat.scheduler import CronFirer
    from flowbuilder.platform import cron_schedule
    from flowbuilder.tasks.app import app

    _fresh_queues(settings.SQS_ENDPOINT_URL, settings)
    fire = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=3)
    _make_due(engine, client, cron_schedule.schedule_key(settings), ids, fire)
    firers = [CronFirer(app, settings=settings) for _ in range(2)]
    for firer in firers:
        firer.warm_up()
    barrier = threading.Barrier(2)

    def go(firer: CronFirer) -> None:
        barrier.wait()
        _sleep_until(fire)
        firer.tick()

    threads = [threading.Thread(target=go, args=(f,)) for f in firers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sent = sum(r.sent for f in firers for r in f.last_reports)
    for firer in firers:
        firer.close()
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT count(*), count(DISTINCT workflow_id) FROM workflow_execution "
                "WHERE scheduled_for = :at"
            ),
            {"at": fire},
        ).one()
    return {
        "due": len(ids),
        "executions": rows[0],
        "distinct_workflows": rows[1],
        "messages_sent": sent,
        "duplicate_executions": rows[0] - rows[1],
        "duplicate_messages": sent - rows[0],
    }


def _memory(
    settings: Any,
    engine: sa.Engine,
    client: redis.Redis,
    ids: list[uuid.UUID],
    rounds: int,
    workdir: Path,
) -> dict[str, Any]:
    """RSS of a real beat process over ``rounds`` rounds of len(ids) fires."""
    from flowbuilder.platform import cron_schedule, sqs
    from flowbuilder.tasks.app import (
        EXECUTIONS_QUEUE,
        SHORT_EXECUTIONS_QUEUE,
        ensure_execution_queues,
        queue_name,
    )

    env = dict(os.environ)
    env.update(
        {
            "DATABASE_URL": settings.DATABASE_URL,
            "BROKER_URL": "sqs://",
            "SQS_ENDPOINT_URL": settings.SQS_ENDPOINT_URL,
            "SQS_QUEUE_PREFIX": settings.SQS_QUEUE_PREFIX,
            "REDIS_URL": settings.REDIS_URL,
            "REDBEAT_KEY_PREFIX": settings.REDBEAT_KEY_PREFIX,
            "BEAT_MAX_LOOP_INTERVAL_SECONDS": "1",
            "SWEEP_PENDING_AFTER_SECONDS": "3600",
            "LOG_JSON": "true",
            # Its "Acquired lock" line (INFO) is how this waits for it, whatever the
            # caller's own LOG_LEVEL.
            "LOG_LEVEL": "INFO",
        }
    )
    log = open(workdir / "beat.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "flowbuilder.tasks", "beat", "--loglevel=INFO",
         f"--pidfile={workdir / 'beat.pid'}"],
        env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    key = cron_schedule.schedule_key(settings)
    sqs_client = sqs.get_sqs_client(settings)
    names = [queue_name(settings, q) for q in (EXECUTIONS_QUEUE, SHORT_EXECUTIONS_QUEUE)]
    urls = ensure_execution_queues(settings)
    samples: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while b"Acquired lock" not in (workdir / "beat.log").read_bytes():
            if time.monotonic() > deadline or proc.poll() is not None:
                tail = (workdir / "beat.log").read_bytes()[-2000:].decode(errors="replace")
                raise RuntimeError(f"beat did not start; its log ends with:\n{tail}")
            time.sleep(0.2)
        for _ in range(rounds):
            # Fresh execution queues each round (moto slows down with depth and allows
            # one purge a minute): delete them and create them again, same names. (These
            # two-node workflows are short runs: their messages go to executions-short.)
            for name in names:
                sqs_client.delete_queue(QueueUrl=urls[name])
            urls = ensure_execution_queues(settings)
            fire = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=2)
            _make_due(engine, client, key, ids, fire)
            deadline = time.monotonic() + 120
            while True:
                with engine.connect() as conn:
                    done = conn.execute(
                        sa.text("SELECT count(*) FROM workflow_execution WHERE scheduled_for=:at"),
                        {"at": fire},
                    ).scalar_one()
                if done >= len(ids) or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            time.sleep(1.5)  # the sends and the Redis update after the commit
            samples.append(_rss_kib(proc.pid))
            print(
                f"memory round {len(samples)}: {done} fires, rss {samples[-1]} KiB", file=sys.stderr
            )
        ticks = [
            json.loads(line)
            for line in (workdir / "beat.log").read_text(errors="replace").splitlines()
            if line.startswith("{") and '"cron_tick"' in line
        ]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    big = [t for t in ticks if t.get("fired", 0) >= len(ids) // 2]
    return {
        "workflows_scheduled": client.zcard(key),
        "rounds": rounds,
        "fires_per_round": len(ids),
        "rss_mib_after_first_round": round(samples[0] / 1024, 1) if samples else None,
        "rss_mib_after_last_round": round(samples[-1] / 1024, 1) if samples else None,
        "rss_mib_samples": [round(s / 1024, 1) for s in samples],
        "beat_process_own_ms_per_round": [t.get("own_ms") for t in big],
    }


# ------------------------------------------------------------------------------ entry


def run(quick: bool = False, sqs_latency_ms: float = 15.0) -> dict[str, Any]:
    """All figures as a dict (for ``python -m benchmarks`` and this module's main)."""
    from flowbuilder.platform import db, models  # noqa: F401 - the tables for create_all
    from flowbuilder.platform.logging import setup_logging
    from flowbuilder.platform.settings import override_settings

    setup_logging(level="WARNING", json=False)
    workflows, due, rounds = (2_000, 200, 3) if quick else (10_000, 1_000, 10)
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    prefix = f"fbbench-{uuid.uuid4().hex[:8]}:"
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    results: dict[str, Any] = {"workflows": workflows, "due": due}
    try:
        with (
            db.temporary_database(PG_ADMIN_URL, "flowbuilder_bench_beat") as url,
            moto_server() as moto_url,
            tempfile.TemporaryDirectory() as tmp,
            _SqsTimer() as timer,
        ):
            engine = sa.create_engine(url)
            SQLModel.metadata.create_all(engine)
            base = {
                "DATABASE_URL": url,
                "BROKER_URL": "sqs://",
                "SQS_ENDPOINT_URL": moto_url,
                "REDIS_URL": REDIS_URL,
                "REDBEAT_KEY_PREFIX": prefix,
                "FLOWBUILDER_HOME": Path(tmp),
                "BEAT_SYNC_ON_CHANGE": False,
            }
            fire = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=30)
            started = time.perf_counter()
            due_ids = _populate(engine, workflows, due, fire)
            results["setup_seconds"] = round(time.perf_counter() - started, 1)
            with override_settings(**base, SQS_QUEUE_PREFIX=f"bb-{prefix[8:16]}-") as s:
                from flowbuilder.tasks.app import app, configure, ensure_execution_queues

                db.reset_engines()
                ensure_execution_queues(s)
                configure(app, s)
                results["ours_both"] = _ours(s, timer, engine, due_ids, fire)
                results["ours"] = results["ours_both"]["cold"]
                results["ours_warm"] = results["ours_both"].pop("warm")
                del results["ours_both"]
                results["two_schedulers"] = _two_schedulers(s, engine, client, due_ids)
                results["memory"] = _memory(s, engine, client, due_ids, rounds, Path(tmp))
            base_b = dict(base, REDBEAT_KEY_PREFIX=f"{prefix}rb:")
            with override_settings(**base_b, SQS_QUEUE_PREFIX=f"br-{prefix[8:16]}-") as s:
                fire_b = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=20)
                results["bare_redbeat"] = _bare_redbeat(s, timer, workflows, due, fire_b)
                from flowbuilder.tasks.app import app, configure

                configure(app)
            engine.dispose()
            db.reset_engines()
    finally:
        for key in client.scan_iter(f"{prefix}*"):
            client.delete(key)
        client.close()

    ours, bare = results["ours"], results["bare_redbeat"]
    from flowbuilder.platform.settings import get_settings

    width = get_settings().BEAT_SQS_CONCURRENCY
    latency = sqs_latency_ms / 1000
    results["projection_real_sqs"] = {
        "per_request_latency_ms": sqs_latency_ms,
        "ours_seconds": round(ours["own_seconds"] + -(-ours["sqs_requests"] // width) * latency, 3),
        "ours_sequential_seconds": round(ours["own_seconds"] + ours["sqs_requests"] * latency, 3),
        "bare_redbeat_seconds": round(bare["own_seconds"] + bare["sqs_requests"] * latency, 3),
        "concurrency": width,
    }
    return results


def format_table(r: dict[str, Any]) -> str:
    ours, bare, p = r["ours"], r["bare_redbeat"], r["projection_real_sqs"]
    two, mem = r["two_schedulers"], r["memory"]
    warm = r["ours_warm"]
    lines = [
        f"{r['workflows']} workflows, {r['due']} due in the same second "
        f"(PostgreSQL, Redis, moto SQS)",
        f"{'':32}{'ours':>12}{'bare RedBeat':>16}",
        f"{'SQS requests per 1,000 fires':32}{ours['sqs_requests_per_1000']:>12}"
        f"{bare['sqs_requests_per_1000']:>16}",
        f"{'scheduler own time (s)':32}{ours['own_seconds']:>12}{bare['own_seconds']:>16}",
        f"{'  same, warm (s)':32}{warm['own_seconds']:>12}{'':>16}",
        f"{'time inside SQS calls (s)':32}{ours['sqs_seconds']:>12}{bare['sqs_seconds']:>16}",
        f"{'fire lag p50 on moto (s)':32}{ours['lag_p50']:>12}{bare['lag_p50']:>16}",
        f"{'fire lag p99 on moto (s)':32}{ours['lag_p99']:>12}{bare['lag_p99']:>16}",
        f"{'projection, real SQS (s)':32}{p['ours_seconds']:>12}{p['bare_redbeat_seconds']:>16}"
        f"   (own + requests x {p['per_request_latency_ms']} ms; ours {p['concurrency']} wide)",
        f"two schedulers, no lock, same {two['due']} fires: {two['executions']} executions, "
        f"{two['messages_sent']} messages, duplicates {two['duplicate_executions']} / "
        f"{two['duplicate_messages']}",
        f"beat process RSS with {mem['workflows_scheduled']} scheduled: "
        f"{mem['rss_mib_after_first_round']} MiB after round 1, "
        f"{mem['rss_mib_after_last_round']} MiB after round {mem['rounds']} "
        f"({mem['fires_per_round']} fires each); samples {mem['rss_mib_samples']}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2,000 workflows, 200 due")
    parser.add_argument("--sqs-latency-ms", type=float, default=15.0)
    parser.add_argument("--json", action="store_true", help="print the raw figures as JSON")
    args = parser.parse_args(argv)
    results = run(args.quick, args.sqs_latency_ms)
    print(json.dumps(results, indent=2, default=str) if args.json else format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
