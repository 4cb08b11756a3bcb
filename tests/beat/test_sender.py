"""Cron fires go out ten per SendMessageBatch, in Celery's own message format: the same
fields apply_async sends, and a real worker (moto's SQS, PostgreSQL) runs them."""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import redis
import sqlalchemy as sa
from sqlmodel import Session

from flowbuilder.beat.scheduler import CronFirer
from flowbuilder.beat.sender import BatchSender
from flowbuilder.platform import cron_schedule
from flowbuilder.platform.models import ExecutionStatus, WorkflowExecution, utcnow
from flowbuilder.platform.settings import override_settings
from flowbuilder.tasks.app import app
from tests.beat.conftest import REDIS_URL
from tests.factories import json_definition, make_user, make_workflow
from tests.tasks.conftest import wait_done


def _decode(request: dict[str, Any]) -> dict[str, Any]:
    envelope = json.loads(base64.b64decode(request["MessageBody"]))
    envelope["body"] = json.loads(base64.b64decode(envelope["body"]))
    return envelope


def test_batched_messages_are_what_apply_async_sends(worker_settings: Any) -> None:
    sender = BatchSender(app, worker_settings)
    try:
        items = [(uuid.uuid4(), f"cron:{i}", None) for i in range(3)] + [(uuid.uuid4(), None, None)]
        exact = [_decode(r) for r in sender.build_exact(items)]
        fast = [_decode(r) for r in sender.build(items)]
    finally:
        sender.close()
    per_call = {"id", "root_id"}
    for (execution_id, correlation, _queue), a, b in zip(items, exact, fast, strict=True):
        assert a["body"] == b["body"] and b["body"][0] == [str(execution_id)]
        assert {k: v for k, v in a.items() if k not in ("headers", "properties")} == {
            k: v for k, v in b.items() if k not in ("headers", "properties")
        }
        assert set(a["headers"]) == set(b["headers"])
        for key in set(a["headers"]) - per_call:
            assert a["headers"][key] == b["headers"][key], key
        assert b["headers"]["id"] == b["headers"]["root_id"] == b["properties"]["correlation_id"]
        assert b["headers"].get("x_correlation_id") == correlation
        for key in set(a["properties"]) - {"correlation_id", "delivery_tag"}:
            assert a["properties"][key] == b["properties"][key], key
    # Every message has its own task id and delivery tag.
    assert len({m["headers"]["id"] for m in fast}) == len(items)
    assert len({m["properties"]["delivery_tag"] for m in fast}) == len(items)


def test_batched_messages_keep_each_item_s_queue(worker_settings: Any) -> None:
    """Short runs to the short-run queue, the others to the executions queue: one message
    built by apply_async per queue, the others derived from it, field for field."""
    from flowbuilder.tasks.app import EXECUTIONS_QUEUE, SHORT_EXECUTIONS_QUEUE, queue_name

    sender = BatchSender(app, worker_settings)
    try:
        queues = [SHORT_EXECUTIONS_QUEUE, None, SHORT_EXECUTIONS_QUEUE, None, None]
        items = [(uuid.uuid4(), f"cron:{i}", q) for i, q in enumerate(queues)]
        exact = sender.build_exact(items)
        fast = sender.build(items)
    finally:
        sender.close()
    urls = [r["QueueUrl"] for r in fast]
    assert urls == [r["QueueUrl"] for r in exact]
    names = [queue_name(worker_settings, q or EXECUTIONS_QUEUE) for q in queues]
    assert [url.rsplit("/", 1)[1] for url in urls] == names
    for (execution_id, correlation, _q), a, b in zip(items, exact, fast, strict=True):
        a, b = _decode(a), _decode(b)
        assert a["body"] == b["body"] and b["body"][0] == [str(execution_id)]
        assert b["headers"].get("x_correlation_id") == correlation
        assert a["properties"]["delivery_info"] == b["properties"]["delivery_info"]


def test_a_real_worker_runs_the_fires_sent_in_batches(
    celery_worker: Any, worker_settings: Any, pg_session: Session
) -> None:
    prefix = f"fbtest-beat-{uuid.uuid4().hex[:8]}:"
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    user = make_user(pg_session, credits=1000)
    wfs = [
        make_workflow(
            pg_session, user, definition=json_definition(2), publish=True, cron="* * * * *"
        )
        for _ in range(12)
    ]
    now = utcnow()
    for wf in wfs:
        wf.next_run_at = now
    pg_session.commit()
    try:
        with override_settings(REDIS_URL=REDIS_URL, REDBEAT_KEY_PREFIX=prefix) as settings:
            firer = CronFirer(app, settings=settings)
            try:
                firer.tick()  # reconciles (the key is missing), then fires all 12
                [stats] = firer.last
                assert stats.fired == 12
                assert stats.sqs_requests == 2  # 10 + 2, not 12 sends
                # The schedule moved on to each workflow's next fire time.
                entries = cron_schedule.entries(client=client, settings=settings)
                assert len(entries) == 12 and min(entries.values()) > now.timestamp()
            finally:
                firer.close()
        ids = pg_session.execute(
            sa.select(WorkflowExecution.id).where(
                WorkflowExecution.workflow_id.in_([wf.id for wf in wfs])
            )
        ).scalars()
        for execution_id in list(ids):
            done = wait_done(pg_session, execution_id, timeout=60)
            assert done.status == ExecutionStatus.COMPLETED, done.error
            assert done.scheduled_for is not None
    finally:
        for key in client.scan_iter(f"{prefix}*"):
            client.delete(key)
        client.close()
