"""A worker survives any message an SQS queue can hold: poison messages are dead-lettered.

kombu's SQS transport turns an SQS message into a kombu message inside the worker's event
loop; a body it cannot decode there (say an envelope that declares ``body_encoding:
base64`` over text that is not base64) raises out of the loop and Celery exits with
"Unrecoverable error". And when Celery refuses a message (unknown task, not a task
message, undecodable body) it logs that it deleted or discarded it, while kombu leaves
it in a queue that has a redrive policy, to come back until SQS dead-letters it.

Here, at the boundary where the message enters:

* :class:`Channel` checks each received message before kombu builds a message from it:
  a kombu envelope, a ``task`` header, a body that decodes with its declared encoding
  and content type, a Celery protocol 2 body ``[args, kwargs, embed]``. A message that
  fails is never handed to Celery: it is **moved to the dead-letter queue** (raw body and
  attributes copied there, with the reason, then deleted from the work queue).
* :class:`Consumer` (``worker_consumer``) handles what Celery itself refuses by rejecting
  it, and a rejected message is moved to the dead-letter queue the same way.
* Every log line says what really happened: ``poison_message_dead_lettered``, or, when
  the copy could not be made, ``poison_message_left_in_queue`` (SQS redrives it after
  SQS_DLQ_MAX_RECEIVE_COUNT receives), or ``poison_message_deleted`` when the queue has
  no dead-letter queue at all (the body is logged, truncated, so it is not lost unseen).

Acknowledgements are batched. kombu deletes each acknowledged message with a blocking
``DeleteMessage`` call inside the worker's event loop: under load a third of the main
process's time went to waiting for those answers, while nothing else (receiving,
dispatching to the pool) could happen. Here, in a worker's event loop, an acknowledged
message is released at once (its prefetch slot is free) and its deletion joins a
``DeleteMessageBatch`` (up to 10 receipts, one request) sent through kombu's
asynchronous HTTP client, at most ``ACK_BATCH_SECONDS`` later; whatever is still
pending when the channel closes is deleted before it closes. A deletion that never
reaches SQS (the worker killed in between, a failed request) only means the message is
delivered again after its visibility timeout: a delivery of an execution that has ended
does nothing (the run's lease and status make every delivery safe to repeat).

The send path is kombu's, unchanged.
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any

import structlog
from botocore.exceptions import BotoCoreError, ClientError
from celery.worker.consumer.consumer import Consumer as CeleryConsumer
from kombu.asynchronous import get_event_loop
from kombu.transport import virtual
from kombu.transport.SQS import Channel as SQSChannel
from kombu.transport.SQS import Transport as SQSTransport

logger = structlog.get_logger(__name__)

# Use with ``broker_transport`` (it wins over the ``sqs://`` scheme of the URL).
TRANSPORT = "flowbuilder.tasks.sqs_transport:Transport"
CONSUMER = "flowbuilder.tasks.sqs_transport:Consumer"

REASON_KEY = "flowbuilder_reject_reason"
_MAX_ATTRIBUTES = 10  # SQS's limit per message
_OWN_ATTRIBUTES = ("x-poison-reason", "x-source-queue", "x-original-message-id")
_DLQ_CACHE_SECONDS = 300.0
# How long an acknowledged message may wait for others to share its DeleteMessageBatch.
ACK_BATCH_SECONDS = 0.05
_ACK_BATCH_MAX = 10  # SQS's limit per DeleteMessageBatch


class _Poison(Exception):
    """Raised for a message that was taken out of the queue instead of being delivered."""


def envelope_problem(payload: Any, decode_body: Any) -> str | None:
    """Why ``payload`` (kombu's parse of an SQS body) is not a Celery task message."""
    if not isinstance(payload, dict):
        return "not a JSON object"
    headers = payload.get("headers")
    if not isinstance(headers, dict) or "content-type" not in payload:
        return "not a kombu message envelope"
    if not isinstance(headers.get("task"), str) or not isinstance(headers.get("id"), str):
        return "no task name or id in the headers (not a Celery protocol 2 message)"
    properties = payload.get("properties")
    if not isinstance(properties, dict):
        return "no properties in the envelope"
    if payload.get("content-type") != "application/json":
        return f"content type {str(payload.get('content-type'))[:60]!r} is not accepted"
    encoding = properties.get("body_encoding")
    try:
        body = decode_body(payload.get("body"), encoding)
    except Exception:
        return f"body is not valid {str(encoding)[:30]} (declared body_encoding)"
    try:
        if isinstance(body, bytes):
            body = body.decode(payload.get("content-encoding") or "utf-8")
        decoded = json.loads(body)
    except (ValueError, TypeError, LookupError, RecursionError):
        return "body is not valid JSON"
    if not (
        isinstance(decoded, list)
        and len(decoded) == 3
        and isinstance(decoded[0], list)
        and isinstance(decoded[1], dict)
        and isinstance(decoded[2], dict | type(None))
    ):
        return "body is not [args, kwargs, embed]"
    return None


class Channel(SQSChannel):
    """kombu's SQS channel, where one bad message can no longer stop the worker."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._dead_letter_urls: dict[str, tuple[str | None, float]] = {}
        # Receipt handles acknowledged but not yet deleted, by queue URL (with its name).
        self._pending_deletes: dict[str, tuple[str | None, list[str]]] = {}
        self._ack_timer: Any = None

    # --- acknowledging -------------------------------------------------------------------

    def basic_ack(self, delivery_tag: Any, multiple: bool = False) -> None:
        hub = get_event_loop()
        try:
            info = self.qos.get(delivery_tag).delivery_info
            handle = info["sqs_message"]["ReceiptHandle"]
            queue_url = info["sqs_queue"]
        except (KeyError, TypeError):
            return super().basic_ack(delivery_tag, multiple)
        if hub is None:  # no event loop (a script, the solo pool's tests): kombu's own
            return super().basic_ack(delivery_tag, multiple)
        # The delivery is released now: its prefetch slot is free for the next message.
        virtual.Channel.basic_ack(self, delivery_tag, multiple)
        queue = self.canonical_queue_name(info["routing_key"]) if "routing_key" in info else None
        _name, handles = self._pending_deletes.setdefault(queue_url, (queue, []))
        handles.append(handle)
        if len(handles) >= _ACK_BATCH_MAX:
            self._send_deletes(queue_url)
        elif self._ack_timer is None:
            self._ack_timer = hub.call_later(ACK_BATCH_SECONDS, self._flush_deletes)
        return None

    def _flush_deletes(self) -> None:
        self._ack_timer = None
        for queue_url in list(self._pending_deletes):
            self._send_deletes(queue_url)

    def _send_deletes(self, queue_url: str) -> None:
        queue, handles = self._pending_deletes.pop(queue_url, (None, []))
        for start in range(0, len(handles), _ACK_BATCH_MAX):
            entries = [
                {"Id": str(i), "ReceiptHandle": h}
                for i, h in enumerate(handles[start : start + _ACK_BATCH_MAX])
            ]
            try:
                self.asynsqs(queue=queue).make_request(
                    "DeleteMessageBatch",
                    {},
                    queue_url,
                    "POST",
                    callback=_deleted_callback(queue_url, len(entries)),
                    protocol_params={
                        "json": {"Entries": entries},
                        "query": {
                            f"DeleteMessageBatchRequestEntry.{n}.{key}": value
                            for n, entry in enumerate(entries, 1)
                            for key, value in entry.items()
                        },
                    },
                )
            except Exception as exc:  # noqa: BLE001 - redelivered later, which is safe
                _log_undeleted(queue_url, len(entries), exc)

    def _delete_pending_now(self) -> None:
        """Delete what is still pending with blocking calls (the channel is closing)."""
        if self._ack_timer is not None:
            with contextlib.suppress(Exception):
                self._ack_timer.cancel()
            self._ack_timer = None
        pending, self._pending_deletes = self._pending_deletes, {}
        for queue_url, (queue, handles) in pending.items():
            for start in range(0, len(handles), _ACK_BATCH_MAX):
                chunk = handles[start : start + _ACK_BATCH_MAX]
                entries = [{"Id": str(i), "ReceiptHandle": h} for i, h in enumerate(chunk)]
                try:
                    answer = self.sqs(queue=queue).delete_message_batch(
                        QueueUrl=queue_url, Entries=entries
                    )
                    if answer.get("Failed"):
                        _log_undeleted(queue_url, len(answer["Failed"]), answer["Failed"][0])
                except Exception as exc:  # noqa: BLE001 - redelivered later, which is safe
                    _log_undeleted(queue_url, len(entries), exc)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._delete_pending_now()
        super().close()

    # --- receiving -----------------------------------------------------------------------

    def _message_to_python(self, message: Any, queue_name: str, q_url: str) -> Any:
        try:
            payload = super()._message_to_python(message, queue_name, q_url)
            problem = envelope_problem(payload, self.decode_body)
        except Exception as exc:  # anything kombu's own decoding raises
            payload, problem = None, f"undecodable message ({type(exc).__name__})"
        if problem is not None:
            self._dead_letter(message, queue_name, q_url, problem)
            raise _Poison(problem)
        return payload

    def _messages_to_python(self, messages: Any, queue: str) -> list[Any]:
        q_url = self._new_queue(queue)
        out = []
        for message in messages:
            try:
                out.append(self._message_to_python(message, queue, q_url))
            except _Poison:
                continue
        return out

    def _on_messages_ready(self, queue: str, qname: str, messages: Any) -> int:
        # kombu's version, with each message handled on its own: a poison message is
        # skipped (already dead-lettered) and the others in the batch are delivered.
        msgs = messages.get("Messages") if isinstance(messages, dict) else None
        if not msgs:
            return 0
        callback = self.connection._callbacks.get(qname)
        if callback is None:
            self._release_messages(queue, qname, msgs)
            return 0
        for msg in msgs:
            try:
                parsed = self._message_to_python(msg, qname, queue)
            except _Poison:
                continue
            callback(parsed)
        return len(msgs)

    # --- rejecting -----------------------------------------------------------------------

    def _delete_rejected_message(self, delivery_tag: Any) -> None:
        # Called by kombu for a reject without requeue. kombu leaves the message in a
        # queue with a redrive policy (to come back up to maxReceiveCount times) and
        # deletes it otherwise; here it goes to the dead-letter queue at once.
        try:
            delivered = self.qos.get(delivery_tag)
            info = delivered.delivery_info
            sqs_message = info["sqs_message"]
            queue_url = info["sqs_queue"]
        except KeyError:
            return
        reason = info.get(REASON_KEY) or "rejected by the worker"
        queue_name = self.canonical_queue_name(info.get("routing_key") or "")
        self._dead_letter(sqs_message, queue_name, queue_url, reason)

    # --- the dead-letter queue ----------------------------------------------------------

    def _dead_letter_url(self, client: Any, queue_url: str) -> str | None:
        cached = self._dead_letter_urls.get(queue_url)
        if cached is not None and time.monotonic() - cached[1] < _DLQ_CACHE_SECONDS:
            return cached[0]
        attributes = client.get_queue_attributes(
            QueueUrl=queue_url, AttributeNames=["RedrivePolicy"]
        ).get("Attributes", {})
        url = None
        if "RedrivePolicy" in attributes:
            arn = json.loads(attributes["RedrivePolicy"])["deadLetterTargetArn"]
            account, name = arn.split(":")[-2:]
            url = client.get_queue_url(QueueName=name, QueueOwnerAWSAccountId=account)["QueueUrl"]
        self._dead_letter_urls[queue_url] = (url, time.monotonic())
        return url

    def _dead_letter(self, message: Any, queue_name: str, queue_url: str, reason: str) -> None:
        """Copy ``message`` to the queue's dead-letter queue, then delete it. Never raises."""
        message_id = _get(message, "MessageId")
        body = _get(message, "Body")
        receipt = _get(message, "ReceiptHandle")
        fields = {"queue": queue_name, "message_id": message_id, "reason": reason}
        try:
            client = self.sqs(queue=queue_name or None)
            dlq_url = self._dead_letter_url(client, queue_url)
            if dlq_url is None:
                client.delete_message(QueueUrl=queue_url, ReceiptHandle=receipt)
                logger.error(
                    "poison_message_deleted",
                    **fields,
                    note="the queue has no dead-letter queue",
                    body=str(body)[:2000],
                )
                return
            client.send_message(
                QueueUrl=dlq_url,
                MessageBody=body if isinstance(body, str) and body else str(body) or "(empty)",
                MessageAttributes=_attributes(message, queue_name, reason),
            )
            client.delete_message(QueueUrl=queue_url, ReceiptHandle=receipt)
        except (BotoCoreError, ClientError, OSError, ValueError, KeyError, TypeError) as exc:
            logger.error(
                "poison_message_left_in_queue",
                **fields,
                error=f"{type(exc).__name__}: {exc}"[:500],
                note="SQS moves it to the dead-letter queue after SQS_DLQ_MAX_RECEIVE_COUNT "
                "receives",
            )
            return
        logger.error("poison_message_dead_lettered", **fields, dead_letter_queue=dlq_url)


def _log_undeleted(queue_url: str, count: int, error: Any) -> None:
    logger.warning(
        "sqs_ack_not_deleted",
        queue=queue_url.rsplit("/", 1)[-1],
        messages=count,
        error=str(error)[:200],
        consequence="delivered again after the visibility timeout; a repeated delivery is safe",
    )


def _deleted_callback(queue_url: str, count: int) -> Any:
    """The DeleteMessageBatch answer: failures are logged, never raised into the loop."""

    def on_response(response: Any) -> None:  # kombu's AsyncHTTPResponse
        try:
            status, body = response.status, response.read() or b""
        except Exception as exc:  # noqa: BLE001 - never raise into the event loop
            _log_undeleted(queue_url, count, exc)
            return
        if status != 200:
            _log_undeleted(queue_url, count, f"HTTP {status}: {body[:150]!r}")
            return
        # JSON protocol: {"Successful": [...], "Failed": [...]}; query protocol: XML with
        # a <BatchResultErrorEntry> per failure.
        if b"BatchResultErrorEntry" in body:
            _log_undeleted(queue_url, body.count(b"<BatchResultErrorEntry>"), body[:150])
            return
        with contextlib.suppress(ValueError, AttributeError):
            failed = json.loads(body).get("Failed") or []
            if failed:
                _log_undeleted(queue_url, len(failed), failed[0])

    return on_response


def _get(message: Any, key: str) -> Any:
    try:
        return message[key]
    except (KeyError, TypeError):
        return None


def _attributes(message: Any, queue_name: str, reason: str) -> dict[str, Any]:
    original = _get(message, "MessageAttributes") or {}
    kept = {
        name: value
        for name, value in original.items()
        if name not in _OWN_ATTRIBUTES and isinstance(value, dict)
    }
    kept = dict(list(kept.items())[: _MAX_ATTRIBUTES - len(_OWN_ATTRIBUTES)])
    ours = {
        "x-poison-reason": reason[:1000],
        "x-source-queue": queue_name or "(unknown)",
        "x-original-message-id": str(_get(message, "MessageId") or "(unknown)"),
    }
    kept.update({k: {"DataType": "String", "StringValue": v} for k, v in ours.items()})
    return kept


class Transport(SQSTransport):
    Channel = Channel


class Consumer(CeleryConsumer):
    """Celery's consumer, with refusals that reject (to the dead-letter queue).

    Celery's own handlers log "deleted"/"discarded" and acknowledge a body it cannot
    decode (deleting it unseen). Here each refusal logs one line saying why, and the
    message is rejected: :class:`Channel` moves it to the dead-letter queue and logs that.
    """

    def _refuse(self, message: Any, reason: str, exc: BaseException | None = None) -> None:
        headers = getattr(message, "headers", None) or {}
        logger.error(
            "task_message_refused",
            reason=reason,
            task=headers.get("task") if isinstance(headers, dict) else None,
            task_id=headers.get("id") if isinstance(headers, dict) else None,
            error=f"{type(exc).__name__}: {exc}"[:500] if exc is not None else None,
        )
        info = getattr(message, "delivery_info", None)
        if isinstance(info, dict):
            info[REASON_KEY] = reason
        message.reject_log_error(logger, self.connection_errors)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self._refuse(message, "not a task message")

    def on_unknown_task(self, body: Any, message: Any, exc: BaseException) -> None:
        name = (getattr(message, "headers", None) or {}).get("task")
        self._refuse(message, f"unknown task {str(name)[:200]!r}", exc)

    def on_invalid_task(self, body: Any, message: Any, exc: BaseException) -> None:
        self._refuse(message, "invalid task message", exc)

    def on_decode_error(self, message: Any, exc: BaseException) -> None:
        self._refuse(message, "undecodable body", exc)
