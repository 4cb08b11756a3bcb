"""A worker survives any message a queue can hold (issue 10, item 5).

Poison messages are sent raw with boto3 (or through kombu for well-formed ones) to fresh
queues on moto's server; a real worker process consumes them and then runs a real
execution. The worker stays up, every poison message ends in the dead-letter queue
(raw body and reason), nothing else does, and the work queue is drained.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlmodel import Session

from flowbuilder.platform import sqs
from flowbuilder.platform.models import ExecutionStatus
from flowbuilder.platform.settings import override_settings
from flowbuilder.tasks import enqueue_execution
from flowbuilder.tasks.app import (
    EXECUTIONS_QUEUE,
    app,
    configure,
    dead_letter_queue_name,
    ensure_execution_queues,
    queue_name,
)
from flowbuilder.tasks.sqs_transport import envelope_problem
from tests.factories import json_definition, make_user, make_workflow
from tests.tasks.conftest import wait_done, wait_for

pytestmark = pytest.mark.integration


def _b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def _envelope(
    body: str,
    body_encoding: str | None = "base64",
    content_type: str = "application/json",
    **headers: Any,
) -> str:
    """A kombu envelope as kombu's SQS transport sends it (base64 of the JSON)."""
    headers = {"task": "flowbuilder.execute_workflow", "id": str(uuid.uuid4()), **headers}
    properties: dict[str, Any] = {"delivery_info": {"routing_key": EXECUTIONS_QUEUE}}
    if body_encoding:
        properties["body_encoding"] = body_encoding
    message = {
        "body": body,
        "content-encoding": "utf-8",
        "content-type": content_type,
        "headers": headers,
        "properties": properties,
    }
    return _b64(json.dumps(message))


RAW_POISON = {
    "declared base64, not base64": _envelope("!!!not base64!!!"),
    "base64 of bytes that are not text": _b64(b"\xff\xfe\xfd\x00\x01garbage"),
    "not JSON": "this is { not json",
    "JSON, not an envelope": json.dumps({"hello": "world"}),
    "JSON list": "[1, 2, 3]",
    "envelope without a task header": _b64(
        json.dumps({"body": "e30=", "headers": {}, "content-type": "application/json"})
    ),
    "body not [args, kwargs, embed]": _envelope(_b64(json.dumps({"a": 1}))),
    "body deeply nested": _envelope(_b64("[" * 3000 + "]" * 3000)),
    "unknown body encoding": _envelope("abc", body_encoding="rot13"),
    "pickle content type": _envelope(
        _b64("[[], {}, {}]"), content_type="application/x-python-serialize"
    ),
}


@pytest.fixture
def fresh_queues(worker_settings: Any) -> Iterator[dict[str, Any]]:
    """Queues of their own, so the dead-letter queue's content is exactly this test's."""
    prefix = f"fbpoison-{uuid.uuid4().hex[:6]}-"
    with override_settings(SQS_QUEUE_PREFIX=prefix) as settings:
        urls = ensure_execution_queues(settings)
        configure(app, settings)
        yield {
            "prefix": prefix,
            "url": urls[queue_name(settings, EXECUTIONS_QUEUE)],
            "dlq": urls[dead_letter_queue_name(settings)],
        }
    configure(app, worker_settings)


def _drain(url: str) -> list[dict[str, Any]]:
    client = sqs.get_sqs_client()
    seen: list[dict[str, Any]] = []
    while True:
        batch = client.receive_message(
            QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0, MessageAttributeNames=["All"]
        ).get("Messages", [])
        if not batch:
            return seen
        for message in batch:
            client.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
        seen.extend(batch)


def _count(url: str) -> int:
    attributes = sqs.queue_attributes(url)
    return int(attributes["ApproximateNumberOfMessages"]) + int(
        attributes["ApproximateNumberOfMessagesNotVisible"]
    )


def test_envelope_check_names_the_problem() -> None:
    def decode(body: Any, encoding: Any) -> Any:
        return base64.b64decode(body, validate=True) if encoding == "base64" else body

    good = json.loads(base64.b64decode(_envelope(_b64("[[], {}, {}]"))))
    assert envelope_problem(good, decode) is None
    bad = json.loads(base64.b64decode(RAW_POISON["declared base64, not base64"]))
    assert "base64" in envelope_problem(bad, decode)
    assert "envelope" in envelope_problem({"body": "x", "properties": {}}, decode)
    pickled = json.loads(base64.b64decode(RAW_POISON["pickle content type"]))
    assert "not accepted" in envelope_problem(pickled, decode)


def test_worker_survives_poison_messages_and_dead_letters_exactly_them(
    spawn_worker: Any, fresh_queues: dict[str, Any], pg_session: Session
) -> None:
    client = sqs.get_sqs_client()
    raw = dict(RAW_POISON)
    for body in raw.values():
        client.send_message(QueueUrl=fresh_queues["url"], MessageBody=body)
    # Well-formed messages that Celery refuses or that fail in the task: through kombu.
    app.send_task("flowbuilder.no_such_task", args=[], queue=EXECUTIONS_QUEUE)
    app.send_task("flowbuilder.execute_workflow", args=["not-a-uuid"], queue=EXECUTIONS_QUEUE)
    app.send_task("flowbuilder.execute_workflow", args=[1, 2, 3], queue=EXECUTIONS_QUEUE)
    poison_count = len(raw) + 3

    worker = spawn_worker(SQS_QUEUE_PREFIX=fresh_queues["prefix"])
    wait_for(lambda: _count(fresh_queues["dlq"]) >= poison_count or worker.proc.poll(), 60)
    assert worker.proc.poll() is None, worker.text()[-3000:]

    # The worker still runs good executions afterwards.
    user = make_user(pg_session, credits=10)
    workflow = make_workflow(pg_session, user, definition=json_definition(2), publish=True)
    pg_session.commit()
    execution = enqueue_execution(pg_session, workflow.id, user.id)
    pg_session.commit()
    done = wait_done(pg_session, execution.id)
    assert done.status == ExecutionStatus.COMPLETED, done.error
    assert worker.proc.poll() is None

    wait_for(lambda: _count(fresh_queues["url"]) == 0, 30)
    dead = _drain(fresh_queues["dlq"])
    assert len(dead) == poison_count
    bodies = [m["Body"] for m in dead]
    for body in raw.values():
        assert bodies.count(body) == 1  # the raw body, unchanged
    reasons = [m["MessageAttributes"]["x-poison-reason"]["StringValue"] for m in dead]
    assert any("base64" in r for r in reasons)
    assert any("unknown task" in r and "no_such_task" in r for r in reasons)
    assert sum("rejected by the worker" in r for r in reasons) == 2  # the two bad-args runs

    lines = worker.lines()
    events = [line.get("event") for line in lines]
    assert events.count("poison_message_dead_lettered") == poison_count
    assert "poison_message_left_in_queue" not in events
    text = worker.text()
    assert "Unrecoverable error" not in text
    assert "Received and deleted unknown message" not in text
    worker.stop()
    assert worker.proc.returncode == 0, worker.text()[-2000:]  # a clean, warm shutdown


def test_when_the_copy_fails_the_log_says_the_message_stays(
    spawn_worker: Any, fresh_queues: dict[str, Any]
) -> None:
    """The dead-letter queue is gone: the poison message cannot be copied, so it is not
    deleted either, the log says it was left for the redrive policy, and the worker
    keeps running."""
    client = sqs.get_sqs_client()
    client.delete_queue(QueueUrl=fresh_queues["dlq"])
    client.send_message(QueueUrl=fresh_queues["url"], MessageBody="this is { not json")
    worker = spawn_worker(SQS_QUEUE_PREFIX=fresh_queues["prefix"])

    def left_in_queue() -> bool:
        events = [line.get("event") for line in worker.lines()]
        return "poison_message_left_in_queue" in events or worker.proc.poll() is not None

    wait_for(left_in_queue, 60)
    assert worker.proc.poll() is None, worker.text()[-3000:]
    events = [line.get("event") for line in worker.lines()]
    assert "poison_message_dead_lettered" not in events
    assert _count(fresh_queues["url"]) == 1  # still there (in flight), not deleted
