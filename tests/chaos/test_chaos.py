"""Fault injection on real workers (moto's SQS server, PostgreSQL): run ``pytest -m chaos``.

Each scenario injects one class of fault, then checks the same invariants (see
``conftest.check_invariants``) and adds a row to the table printed at the end.
``chaos_quick`` marks the scenarios that also run in the default run (CI): hostile
outputs, duplicate deliveries, the credit refusal with a crash (about 40 s together)."""

from __future__ import annotations

import base64
import json
import random
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlmodel import Session

from flowbuilder.platform import sqs
from flowbuilder.platform.crud import balance_crud, phase_crud
from flowbuilder.platform.models import ExecutionPhase, ExecutionStatus, PhaseStatus
from flowbuilder.platform.settings import override_settings
from flowbuilder.tasks import enqueue_execution, sweep_stale_executions
from flowbuilder.tasks.app import app
from tests.chaos import crash_node
from tests.chaos.conftest import (
    ScenarioRow,
    check_invariants,
    execution_queue_urls,
    purge,
    queue_url,
    statuses,
)
from tests.factories import make_user, make_workflow
from tests.pg_cut import terminate_other_backends
from tests.platform._http_server import local_server
from tests.tasks.conftest import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.chaos, pytest.mark.timeout(600)]


def _delays(*seconds: float) -> dict[str, Any]:
    nodes = [
        {"id": f"d{i}", "type": "delay", "inputs": {"seconds": s}} for i, s in enumerate(seconds)
    ]
    edges = [
        {"source": f"d{i - 1}", "sourceHandle": "data", "target": f"d{i}", "targetHandle": "data"}
        for i in range(1, len(seconds))
    ]
    return {"version": 1, "nodes": nodes, "edges": edges}


def _enqueue(
    session: Session, definition: dict[str, Any], runs: int, *, users: int = 5, credits: int = 100
) -> list[uuid.UUID]:
    owners = [make_user(session, credits=credits) for _ in range(users)]
    flows = [make_workflow(session, u, definition=definition, publish=True) for u in owners]
    session.commit()
    ids = []
    with override_settings(RATE_LIMIT_USER=10_000):
        for i in range(runs):
            ex = enqueue_execution(session, flows[i % users].id, owners[i % users].id)
            session.commit()
            ids.append(ex.id)
    return ids


@pytest.fixture
def sweeper(worker_settings: Any) -> Iterator[list[int]]:
    """The beat's job, every second: returns the list of re-send counts."""
    counts: list[int] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(1.0):
            try:
                counts.append(sweep_stale_executions.apply().get())
            except Exception:  # noqa: BLE001 - a sweep during a fault; the next one runs
                counts.append(0)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    yield counts
    stop.set()
    thread.join(10)


@pytest.fixture(autouse=True)
def _clean_queues(worker_settings: Any) -> None:
    for url in execution_queue_urls(worker_settings):
        purge(url)
    purge(queue_url(worker_settings, dlq=True))


def _completed(current: dict[uuid.UUID, Any]) -> int:
    return sum(1 for e in current.values() if e.status == ExecutionStatus.COMPLETED)


# ---------------------------------------------------------------------------- crashes


@pytest.mark.parametrize(
    "runs, kills, workers",
    [
        pytest.param(10, 3, 2, id="small"),
        pytest.param(50, 15, 3, id="full"),
    ],
)
def test_sigkill_storm(
    pool, worker_settings, pg_session, sweeper, runs: int, kills: int, workers: int
) -> None:
    ids = _enqueue(pg_session, _delays(0.3, 0.3, 0.3), runs)
    p = pool()
    for _ in range(workers):
        p.spawn()
    rng = random.Random(runs)
    done = 0
    while done < kills:
        time.sleep(rng.uniform(0.8, 2.0))
        alive = [w for w in p.workers if w.alive()]
        if alive and not all(e.status.is_terminal for e in statuses(pg_session, ids).values()):
            p.kill(rng.choice(alive))
            done += 1
        p.supervise()
        if all(e.status.is_terminal for e in statuses(pg_session, ids).values()):
            break
    row = ScenarioRow(f"SIGKILL storm ({runs} runs)", faults=done)
    current = check_invariants(row, pg_session, worker_settings, ids, p, timeout=240)
    # A run may only fail for having crashed its worker too often, with that reason.
    for e in current.values():
        assert e.status == ExecutionStatus.COMPLETED or "crashed its worker" in (e.error or "")
    row.notes.append(f"{_completed(current)} completed")


@pytest.mark.chaos_quick
def test_duplicate_deliveries(pool, worker_settings, pg_session, sweeper) -> None:
    ids = _enqueue(pg_session, _delays(0.2, 0.2), 10)
    url = queue_url(worker_settings)
    bodies: list[str] = []
    wait_for(lambda: bodies.extend(m["Body"] for m in _take(url)) or len(bodies) >= 10, 30)
    copies = 0
    for body in bodies:
        for _ in range(3):
            sqs.send_message(url, body)
            copies += 1
    p = pool()
    p.spawn()
    p.spawn()
    row = ScenarioRow("duplicate deliveries (x3)", faults=copies - len(bodies))
    current = check_invariants(row, pg_session, worker_settings, ids, p)
    assert _completed(current) == len(ids)
    phases = pg_session.exec(
        sa.select(ExecutionPhase).where(ExecutionPhase.execution_id.in_(ids))  # type: ignore[attr-defined]
    ).scalars()
    assert all(ph.status == PhaseStatus.COMPLETED for ph in phases)


def _take(url: str) -> list[dict[str, Any]]:
    got = sqs.receive_messages(url, max_number=10, wait_time=1)
    for m in got:
        sqs.delete_message(url, m["ReceiptHandle"])
    return got


# ------------------------------------------------------------------------ poison messages


def test_poison_messages(pool, worker_settings, pg_session, sweeper) -> None:
    """Unknown task, bad arguments and a run that kills its worker every time, among
    normal runs. (The undecodable body has its own test below.)"""
    normal = _enqueue(pg_session, _delays(0.1), 5)
    crash_def = {"version": 1, "nodes": [{"id": "boom", "type": crash_node.CRASH_NODE}]}
    crashing = _enqueue(pg_session, crash_def, 1, users=1)
    app.send_task("flowbuilder.no_such_task", args=["x"])
    app.send_task("flowbuilder.execute_workflow", args=["not-a-uuid"])
    app.send_task("flowbuilder.execute_workflow", args=[])
    app.send_task("flowbuilder.execute_workflow", args=[str(uuid.uuid4())])  # no such row
    # A supervisor respawns the worker the crashing run kills; attempts end it.
    p = pool(EXECUTION_MAX_ATTEMPTS=2)
    p.spawn()
    p.spawn()
    row = ScenarioRow("poison messages + crash loop", faults=4)
    # The unknown task and the two with bad arguments are refused into the dead-letter
    # queue (kept for inspection, never deleted unseen); everything else is consumed.
    current = check_invariants(
        row, pg_session, worker_settings, normal + crashing, p, timeout=180, dlq_expected=3
    )
    row.faults += p.respawned
    assert _completed(current) == len(normal)
    failed = current[crashing[0]]
    assert failed.status == ExecutionStatus.FAILED
    assert "crashed its worker 2 times" in failed.error
    assert p.respawned >= 2  # it really killed its worker each time


def test_undecodable_message(pool, worker_settings, pg_session, sweeper) -> None:
    """A body declared base64 that is not: the worker must survive it."""
    ids = _enqueue(pg_session, _delays(0.1), 3)
    url = queue_url(worker_settings)
    sqs.send_message(url, "!!! not base64 \x01 {{{")
    sqs.send_message(url, "abcde")  # bad padding: binascii.Error inside kombu
    p = pool()
    p.spawn()
    p.spawn()
    row = ScenarioRow("undecodable body", faults=2)
    # Not supervised: a worker killed by a message would stay dead (the defect this
    # proves gone). Each poison body is copied to the dead-letter queue, then deleted.
    check_invariants(
        row, pg_session, worker_settings, ids, p, timeout=60, supervise=False, dlq_expected=2
    )


# ------------------------------------------------------------------------ the database


def test_terminated_database_connections(pool, worker_settings, pg_session, sweeper) -> None:
    ids = _enqueue(pg_session, _delays(0.3, 0.3, 0.3), 10)
    p = pool()
    p.spawn()
    p.spawn()
    terminated = 0
    end = time.monotonic() + 60
    while time.monotonic() < end and terminated < 8:
        time.sleep(0.7)
        # On a connection outside the pool, waiting until the backends are gone: what
        # the test reads next never races a connection being cut. The test's session
        # holds none meanwhile (its pooled ones are cut like the workers').
        pg_session.rollback()
        terminated += terminate_other_backends(pg_session.get_bind())
        if all(e.status.is_terminal for e in statuses(pg_session, ids).values()):
            break
    row = ScenarioRow("terminated DB connections", faults=terminated)
    current = check_invariants(row, pg_session, worker_settings, ids, p, timeout=120)
    assert _completed(current) == len(ids)


# ------------------------------------------------------------------------ the sweep


def test_backlog_with_the_sweep_running(pool, worker_settings, pg_session, sweeper) -> None:
    ids = _enqueue(pg_session, _delays(0.1, 0.1), 30)
    # No worker for longer than SWEEP_PENDING_AFTER_SECONDS: the whole backlog is due.
    time.sleep(worker_settings.SWEEP_PENDING_AFTER_SECONDS + 2)
    p = pool()
    p.spawn()
    p.spawn()
    row = ScenarioRow("backlog + sweep", faults=0)
    current = check_invariants(row, pg_session, worker_settings, ids, p, timeout=120)
    resent = sum(sweeper)
    row.faults = resent
    row.notes.append(f"{resent} re-sends")
    assert _completed(current) == len(ids)
    # At most one extra copy per run per window, never one per sweep.
    windows = 1 + len(sweeper) / (
        worker_settings.SQS_VISIBILITY_TIMEOUT + worker_settings.SWEEP_PENDING_AFTER_SECONDS
    )
    assert resent <= len(ids) * windows


# ------------------------------------------------------------------------ credits


@pytest.mark.chaos_quick
def test_credit_refusal_crash_and_top_up(pool, worker_settings, pg_session, sweeper) -> None:
    """Two nodes in phase 1 (one paid, one refused), a phase 2; the worker is killed
    while the paid node runs, the user tops up, the run is redelivered: it must end
    failed with the refusal, phase 2 never run nor charged."""
    definition = {
        "version": 1,
        "nodes": [
            {"id": "a", "type": "delay", "inputs": {"seconds": 4}},
            {"id": "b", "type": "delay", "inputs": {"seconds": 4}},
            {"id": "c", "type": "delay", "inputs": {"seconds": 0.1}},
        ],
        "edges": [
            {"source": "a", "sourceHandle": "data", "target": "c", "targetHandle": "data"},
        ],
    }
    user = make_user(pg_session, credits=3)
    wf = make_workflow(pg_session, user, definition=definition, publish=True)
    pg_session.commit()
    ex = enqueue_execution(pg_session, wf.id, user.id)
    # Spent elsewhere between enqueue and run: 1 credit left for 3 nodes.
    balance_crud.debit_credits(
        session=pg_session, user_id=user.id, amount=2, idempotency_key=f"elsewhere:{ex.id}"
    )
    pg_session.commit()
    p = pool()
    worker = p.spawn()

    def one_running() -> bool:
        pg_session.rollback()
        phases = phase_crud.list_phases(session=pg_session, execution_id=ex.id, user_id=user.id)
        return any(ph.status == PhaseStatus.RUNNING for ph in phases)

    wait_for(one_running, 30)
    p.kill(worker)
    balance_crud.grant_credits(session=pg_session, user_id=user.id, amount=100)  # top-up
    pg_session.commit()
    p.spawn()
    row = ScenarioRow("credit refusal, crash, top-up", faults=1)
    current = check_invariants(row, pg_session, worker_settings, [ex.id], p, timeout=60)
    done = current[ex.id]
    assert done.status == ExecutionStatus.FAILED and "insufficient credits" in done.error
    phases = {
        ph.node_id: ph
        for ph in phase_crud.list_phases(session=pg_session, execution_id=ex.id, user_id=user.id)
    }
    assert phases["c"].status == PhaseStatus.SKIPPED and phases["c"].credits_charged == 0
    # 3 - 2 spent elsewhere + 100 top-up; the interrupted node was refunded.
    assert balance_crud.get_balance(session=pg_session, user_id=user.id) == 101


# ------------------------------------------------------------------------ hostile data


@pytest.mark.chaos_quick
def test_hostile_node_outputs(pool, worker_settings, pg_session, sweeper) -> None:
    bodies = {
        "/nul": b'{"v": "a\\u0000b", "k\\u0000": 1}',
        "/nan": b'{"v": NaN, "w": [Infinity, -Infinity]}',
        "/surrogate": b'{"v": "\\ud800 alone"}',
        "/deep": b"[" * 600 + b"]" * 600,
        "/deeper": b"[" * 100_000 + b"]" * 100_000,
    }
    with local_server() as server, override_settings(OUTBOUND_ALLOWLIST=["127.0.0.1"]):
        for path, body in bodies.items():
            server.route(path, body=body, headers={"Content-Type": "application/json"})
        runs: dict[str, uuid.UUID] = {}
        for path in bodies:
            definition = {
                "version": 1,
                "nodes": [
                    {
                        "id": "hook",
                        "type": "deliver_via_webhook",
                        "inputs": {"url": server.url(path), "body": {"event": path}},
                    },
                    {
                        "id": "next",
                        "type": "add_property_to_json",
                        "inputs": {"property_path": "seen", "value": True},
                    },
                ],
                "edges": [
                    {
                        "source": "hook",
                        "sourceHandle": "body",
                        "target": "next",
                        "targetHandle": "json",
                    }
                ],
            }
            (runs[path],) = _enqueue(pg_session, definition, 1, users=1)
        p = pool(OUTBOUND_ALLOWLIST="127.0.0.1")
        p.spawn()
        row = ScenarioRow("hostile node outputs", faults=len(bodies))
        current = check_invariants(row, pg_session, worker_settings, list(runs.values()), p)
        posts = {path: sum(1 for r in server.requests if r.path == path) for path in bodies}
    row.duplicated = sum(max(0, n - 1) for n in posts.values())
    assert posts == {path: 1 for path in bodies}, posts  # each webhook POSTed once
    for path in ("/nul", "/nan", "/surrogate"):
        assert current[runs[path]].status == ExecutionStatus.COMPLETED, current[runs[path]].error
    for path in ("/deep",):
        assert current[runs[path]].status == ExecutionStatus.FAILED
        assert "cannot be stored" in current[runs[path]].error
    # 100,000 levels: the node cannot even parse it as JSON; whatever it returns, the run
    # ended (terminal, checked above) and with a reason.
    assert current[runs["/deeper"]].status.is_terminal


# keep the helpers importable for ad-hoc runs
__all__ = ["base64", "json"]
