"""Amazon SQS: the seed's message helpers and the queue set-up that kombu does not do.

kombu's SQS transport creates a missing queue with a visibility timeout, but never
updates an existing queue and never configures a dead-letter queue. :func:`ensure_queues`
does both, idempotently, so a deploy step (``flowbuilder sqs ensure-queues``) can run it
every time. No Celery here: the queue names are passed in.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import boto3
import structlog
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from flowbuilder.platform.errors import TransientError
from flowbuilder.platform.settings import Settings, get_settings

logger = structlog.get_logger(__name__)


@functools.lru_cache(maxsize=8)
def _client(region: str, endpoint_url: str | None) -> Any:
    return boto3.client(
        "sqs",
        region_name=region,
        endpoint_url=endpoint_url,
        config=Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=5),
    )


def get_sqs_client(settings: Settings | None = None) -> Any:
    settings = settings or get_settings()
    return _client(settings.AWS_REGION, settings.SQS_ENDPOINT_URL)


def _wrap(action: str, exc: Exception) -> TransientError:
    code = exc.response["Error"]["Code"] if isinstance(exc, ClientError) else type(exc).__name__
    return TransientError(f"SQS {action} failed: {code}")


def send_message(
    queue_url: str, message_body: str, *, delay_seconds: int = 0, **attributes: Any
) -> str:
    """Send one message; returns its message id."""
    try:
        response = get_sqs_client().send_message(
            QueueUrl=queue_url, MessageBody=message_body, DelaySeconds=delay_seconds, **attributes
        )
    except (BotoCoreError, ClientError) as exc:
        raise _wrap("send_message", exc) from exc
    return response["MessageId"]


def receive_messages(queue_url: str, max_number: int = 5, wait_time: int = 20) -> list[dict]:
    """Long-poll up to ``max_number`` messages (SQS allows 10)."""
    try:
        response = get_sqs_client().receive_message(
            QueueUrl=queue_url,
            MaxNumberOfMessages=max(1, min(max_number, 10)),
            WaitTimeSeconds=max(0, min(wait_time, 20)),
            AttributeNames=["All"],
        )
    except (BotoCoreError, ClientError) as exc:
        raise _wrap("receive_message", exc) from exc
    return response.get("Messages", [])


def delete_message(queue_url: str, receipt_handle: str) -> None:
    try:
        get_sqs_client().delete_message(QueueUrl=queue_url, ReceiptHandle=receipt_handle)
    except (BotoCoreError, ClientError) as exc:
        raise _wrap("delete_message", exc) from exc


def _create_or_update(client: Any, name: str, attributes: dict[str, str]) -> str:
    try:
        url = client.get_queue_url(QueueName=name)["QueueUrl"]
    except ClientError as exc:
        if exc.response["Error"]["Code"] not in (
            "AWS.SimpleQueueService.NonExistentQueue",
            "QueueDoesNotExist",
        ):
            raise
        try:
            url = client.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]
        except ClientError as exists:
            # Created by someone else since we looked (another worker starting, or kombu
            # declaring it on a send), with other attributes: SQS refuses a create whose
            # attributes differ. It exists now; set ours on it, as for any existing queue.
            if exists.response["Error"]["Code"] not in ("QueueAlreadyExists", "QueueNameExists"):
                raise
            url = client.get_queue_url(QueueName=name)["QueueUrl"]
        else:
            logger.info("sqs_queue_created", queue=name)
            return url
    client.set_queue_attributes(QueueUrl=url, Attributes=attributes)
    logger.info("sqs_queue_updated", queue=name)
    return url


def ensure_queues(
    queue_name: str,
    dead_letter_queue_name: str,
    *,
    settings: Settings | None = None,
) -> dict[str, str]:
    """Create or update the work queue and its dead-letter queue.

    The work queue gets SQS_VISIBILITY_TIMEOUT and a redrive policy that moves a
    message to the dead-letter queue after SQS_DLQ_MAX_RECEIVE_COUNT receives (a
    message that keeps killing workers stops being retried). Returns name -> URL.
    """
    settings = settings or get_settings()
    client = get_sqs_client(settings)
    try:
        dlq_url = _create_or_update(
            client,
            dead_letter_queue_name,
            # Keep dead letters for the maximum (14 days) so they can be inspected.
            {"MessageRetentionPeriod": str(14 * 24 * 3600)},
        )
        dlq_arn = client.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])[
            "Attributes"
        ]["QueueArn"]
        url = _create_or_update(
            client,
            queue_name,
            {
                "VisibilityTimeout": str(settings.SQS_VISIBILITY_TIMEOUT),
                "ReceiveMessageWaitTimeSeconds": str(settings.SQS_WAIT_TIME_SECONDS),
                "RedrivePolicy": json.dumps(
                    {
                        "deadLetterTargetArn": dlq_arn,
                        "maxReceiveCount": str(settings.SQS_DLQ_MAX_RECEIVE_COUNT),
                    }
                ),
            },
        )
    except (BotoCoreError, ClientError) as exc:
        raise _wrap("queue set-up", exc) from exc
    return {queue_name: url, dead_letter_queue_name: dlq_url}


def queue_attributes(queue_url: str) -> dict[str, str]:
    try:
        return get_sqs_client().get_queue_attributes(QueueUrl=queue_url, AttributeNames=["All"])[
            "Attributes"
        ]
    except (BotoCoreError, ClientError) as exc:
        raise _wrap("get_queue_attributes", exc) from exc
