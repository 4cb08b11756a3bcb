"""Short runs have a queue of their own (real SQS API on moto's server, real PostgreSQL).

A run whose plan cannot take longer than SHORT_RUN_MAX_SECONDS (ExecutionPlan.
worst_case_seconds, capped by the execution budget) is sent to ``executions-short``;
every other run, and every re-send, to ``executions``. A default worker consumes both;
one started as the Procfile's ``worker-short`` consumes the short queue only, with a
prefetch window of 4.
"""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session

from flowbuilder.platform import sqs
from flowbuilder.platform.definitions import validate_definition
from flowbuilder.platform.models import ExecutionStatus
from flowbuilder.platform.plan import build_plan
from flowbuilder.platform.settings import override_settings
from flowbuilder.tasks import enqueue_execution
from flowbuilder.tasks.app import (
    EXECUTIONS_QUEUE,
    SHORT_EXECUTIONS_QUEUE,
    execution_queue_for,
    queue_name,
)
from tests.factories import json_definition, make_user, make_workflow
from tests.tasks.conftest import WorkerProcess, execution_status, wait_done

pytestmark = pytest.mark.integration

# Production-like budgets for the enqueue side (the tests' own 6 s budget would cap every
# plan at 6 s and make every run short).
PRODUCTION_BUDGET = {
    "EXECUTION_TIMEOUT_SECONDS": 900,
    "SQS_VISIBILITY_TIMEOUT": 1800,
    "EXECUTION_MAX_TOTAL_SECONDS": 3600,
    "SHORT_RUN_MAX_SECONDS": 60,
}


def _delay(seconds: float) -> dict[str, Any]:
    return {"version": 1, "nodes": [{"id": "d", "type": "delay", "inputs": {"seconds": seconds}}]}


def _ids_in(settings: Any, name: str) -> list[str]:
    """The execution ids of the messages now in queue ``name`` (received and deleted)."""
    url = sqs.get_sqs_client().get_queue_url(QueueName=queue_name(settings, name))["QueueUrl"]
    ids = []
    while got := sqs.receive_messages(url, max_number=10, wait_time=1):
        for m in got:
            body = json.loads(base64.b64decode(m["Body"]))
            ids.append(json.loads(base64.b64decode(body["body"]))[0][0])
            sqs.delete_message(url, m["ReceiptHandle"])
    return ids


def _enqueue(session: Session, user: Any, definition: dict[str, Any]) -> uuid.UUID:
    wf = make_workflow(session, user, definition=definition, publish=True)
    session.commit()
    execution_id = enqueue_execution(session, wf.id, user.id).id
    session.commit()
    return execution_id


def test_worst_case_of_a_plan() -> None:
    def plan(definition: dict[str, Any]) -> Any:
        return build_plan(validate_definition(definition, owned_credential_ids=None))

    # Two JSON nodes in a chain: 10 s each, plus the engine's half-second grace each.
    assert plan(json_definition(2)).worst_case_seconds() == 21.0
    # Phases add up; the nodes of one phase run side by side (the slowest counts).
    fan_out = {
        "version": 1,
        "nodes": [
            {
                "id": "a",
                "type": "add_property_to_json",
                "inputs": {"json": {}, "property_path": "x", "value": 1},
            },
            {"id": "b", "type": "delay", "inputs": {"seconds": 1}},
        ],
    }
    with override_settings(MAX_DELAY_SECONDS=30):
        assert plan(fan_out).worst_case_seconds() == 40.5  # the delay's 30 s + 10 s room
    # Retries: every attempt times out, with the back-offs between them.
    http = {
        "version": 1,
        "nodes": [{"id": "h", "type": "http_request", "inputs": {"url": "https://example.com/"}}],
    }
    node = plan(http).nodes[0]
    attempts = 1 + node.max_retries
    expected = attempts * (node.timeout_seconds + 0.5) + sum(
        node.retry_backoff_seconds * 2**k for k in range(attempts - 1)
    )
    assert node.retryable and plan(http).worst_case_seconds() == expected


def test_queue_choice() -> None:
    with override_settings(**PRODUCTION_BUDGET) as s:
        assert execution_queue_for(s, 60) == SHORT_EXECUTIONS_QUEUE
        assert execution_queue_for(s, 60.01) == EXECUTIONS_QUEUE
    with override_settings(**{**PRODUCTION_BUDGET, "EXECUTION_TIMEOUT_SECONDS": 30}) as s:
        # The execution budget bounds every run.
        assert execution_queue_for(s, 10_000) == SHORT_EXECUTIONS_QUEUE
    with override_settings(**{**PRODUCTION_BUDGET, "SHORT_RUN_MAX_SECONDS": 0}) as s:
        assert execution_queue_for(s, 0.1) == EXECUTIONS_QUEUE


def test_enqueue_routes_by_the_plan(worker_settings: Any, pg_session: Session) -> None:
    """No worker: read the queues themselves."""
    user = make_user(pg_session, credits=100)
    with override_settings(**PRODUCTION_BUDGET):
        short = _enqueue(pg_session, user, json_definition(1))  # 10.5 s at most
        long_json = _enqueue(pg_session, user, json_definition(6))  # 63 s
        long_delay = _enqueue(pg_session, user, _delay(0.01))  # MAX_DELAY_SECONDS + 10.5
    with override_settings(**{**PRODUCTION_BUDGET, "SHORT_RUN_MAX_SECONDS": 0}):
        off = _enqueue(pg_session, user, json_definition(1))
    assert _ids_in(worker_settings, SHORT_EXECUTIONS_QUEUE) == [str(short)]
    assert sorted(_ids_in(worker_settings, EXECUTIONS_QUEUE)) == sorted(
        str(i) for i in (long_json, long_delay, off)
    )


def test_a_default_worker_consumes_both_queues(celery_worker: Any, pg_session: Session) -> None:
    user = make_user(pg_session, credits=100)
    short = _enqueue(pg_session, user, json_definition(1))  # short under the tests' budget
    with override_settings(SHORT_RUN_MAX_SECONDS=0):
        main = _enqueue(pg_session, user, json_definition(1))
    for execution_id in (short, main):
        assert wait_done(pg_session, execution_id).status == ExecutionStatus.COMPLETED


class ShortRunWorker(WorkerProcess):
    """The Procfile's worker-short."""

    extra_args = (f"--queues={SHORT_EXECUTIONS_QUEUE}", "--prefetch-multiplier=4")
    hostname_prefix = "short"


def test_the_short_run_worker_reads_its_queue_only(
    worker_settings: Any, pg_session: Session, tmp_path: Path
) -> None:
    user = make_user(pg_session, credits=100)
    short = [_enqueue(pg_session, user, json_definition(1)) for _ in range(6)]
    with override_settings(SHORT_RUN_MAX_SECONDS=0):
        main = _enqueue(pg_session, user, json_definition(1))
    worker = ShortRunWorker(worker_settings, tmp_path / "short.log")
    try:
        worker.wait_ready()
        for execution_id in short:
            assert wait_done(pg_session, execution_id).status == ExecutionStatus.COMPLETED
        # Left for a default worker.
        assert execution_status(pg_session, main).status == ExecutionStatus.PENDING
    finally:
        worker.stop()
    assert _ids_in(worker_settings, EXECUTIONS_QUEUE) == [str(main)]
