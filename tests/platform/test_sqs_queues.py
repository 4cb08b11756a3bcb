"""ensure_queues against moto's SQS server (a real HTTP SQS API on 127.0.0.1)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from flowbuilder.platform import sqs
from flowbuilder.platform.settings import override_settings

pytestmark = pytest.mark.integration


class _CreatedMeanwhile:
    """The real client, except that its first get_queue_url of ``name`` answers as the
    server did before the queue existed, after another creator (as kombu declares a
    queue on a send) has made it with other attributes: the race ensure_queues meets
    when two processes set up the same queue."""

    def __init__(self, client: Any, name: str) -> None:
        self._client = client
        self._name = name
        self._raced = False

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._client, attr)

    def get_queue_url(self, QueueName: str) -> Any:  # noqa: N803 - boto3's keyword
        if QueueName == self._name and not self._raced:
            self._raced = True
            try:
                self._client.get_queue_url(QueueName=QueueName)
            except self._client.exceptions.ClientError as missing:
                self._client.create_queue(
                    QueueName=QueueName, Attributes={"VisibilityTimeout": "5"}
                )
                raise missing from None
            raise AssertionError("the queue existed before the race")
        return self._client.get_queue_url(QueueName=QueueName)


def test_a_queue_created_by_another_process_meanwhile_gets_our_attributes(
    moto_reset: str, monkeypatch: Any
) -> None:
    name = f"race-{uuid.uuid4().hex[:8]}"
    with override_settings(SQS_ENDPOINT_URL=moto_reset, SQS_DLQ_MAX_RECEIVE_COUNT=3) as settings:
        client = sqs.get_sqs_client(settings)
        monkeypatch.setattr(sqs, "get_sqs_client", lambda _s=None: _CreatedMeanwhile(client, name))
        urls = sqs.ensure_queues(name, f"{name}-dlq", settings=settings)
        attributes = client.get_queue_attributes(
            QueueUrl=urls[name], AttributeNames=["VisibilityTimeout", "RedrivePolicy"]
        )["Attributes"]
    # Ours, not the other creator's 5 s and no dead-letter queue.
    assert attributes["VisibilityTimeout"] == str(settings.SQS_VISIBILITY_TIMEOUT) != "5"
    assert int(json.loads(attributes["RedrivePolicy"])["maxReceiveCount"]) == 3
