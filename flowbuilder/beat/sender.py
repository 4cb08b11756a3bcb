"""Send many ``execute_workflow`` messages at once: SendMessageBatch, in parallel.

A loop of ``apply_async`` is one SQS request per message, one after another. Here each
message is still built by Celery and kombu themselves (``apply_async`` with a producer
whose channel records the request instead of sending it), so the body is byte for byte
what ``apply_async`` sends on the SQS transport (protocol 2, JSON, base64 as kombu does
it, the same headers and properties); then the recorded requests go out ten per
``SendMessageBatch``, BEAT_SQS_CONCURRENCY requests at a time.

Brokers other than SQS (the embedded file-system broker) are sent with ``apply_async``.

A message that SQS refuses is logged; its execution stays pending and the sweep
re-sends it after SWEEP_PENDING_AFTER_SECONDS, as for any send that fails after commit.
"""

from __future__ import annotations

import base64
import concurrent.futures
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import structlog
from celery import Celery
from kombu.utils.json import dumps as json_dumps
from kombu.utils.json import loads as json_loads

from flowbuilder.platform.settings import Settings, get_settings
from flowbuilder.tasks.app import CORRELATION_HEADER, SHORT_EXECUTIONS_QUEUE
from flowbuilder.tasks.execution import execute_workflow, send_execution

logger = structlog.get_logger(__name__)

SQS_BATCH = 10  # the most SendMessageBatch takes


@dataclass
class SendReport:
    sent: int = 0
    failed: list[str] = field(default_factory=list)
    requests: int = 0
    # Seconds spent inside SQS calls (wall clock of the parallel sends).
    sqs_seconds: float = 0.0
    build_seconds: float = 0.0
    # (messages, wall-clock time.time() when SQS acknowledged them), one per request:
    # the benchmark's fire lag.
    acked: list[tuple[int, float]] = field(default_factory=list)


# What to send: (execution id, correlation id, queue); queue None is the executions
# queue (see tasks.app.execution_queue_for).
Item = tuple[uuid.UUID, str | None, str | None]


def _b64(data: str) -> str:
    return base64.b64encode(data.encode("utf-8")).decode("ascii")


def _derive(template: dict[str, Any], execution_id: str, correlation_id: str | None) -> str:
    """``template`` (a decoded kombu SQS envelope) as apply_async would send it for
    ``execution_id``: a new task id, its args, a new delivery tag, its correlation."""
    task_id = str(uuid.uuid4())
    headers = dict(template["headers"])
    headers["id"] = task_id
    headers["root_id"] = task_id
    headers["argsrepr"] = repr([execution_id])  # what celery's saferepr gives for it
    if correlation_id:
        headers[CORRELATION_HEADER] = correlation_id
    else:
        headers.pop(CORRELATION_HEADER, None)
    properties = dict(template["properties"])
    properties["correlation_id"] = task_id
    properties["delivery_tag"] = str(uuid.uuid4())
    inner = json_loads(base64.b64decode(template["body"]))
    inner[0] = [execution_id]
    envelope = dict(template)
    envelope["headers"] = headers
    envelope["properties"] = properties
    envelope["body"] = _b64(json_dumps(inner))
    return _b64(json_dumps(envelope))


class _Recorder:
    """Stands in for kombu's boto3 client while Celery "sends": keeps the request.

    Everything else (the queue declaration kombu makes once per channel) goes to the
    real client.
    """

    def __init__(self, client: Any) -> None:
        self.requests: list[dict[str, Any]] = []
        self._client = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def send_message(self, **kwargs: Any) -> dict[str, Any]:
        self.requests.append(kwargs)
        return {"MessageId": "recorded"}


class BatchSender:
    def __init__(self, app: Celery, settings: Settings | None = None) -> None:
        self.app = app
        self.settings = settings or get_settings()
        self.is_sqs = str(app.conf.broker_url).startswith("sqs://")
        self._connection: Any = None
        self._channel: Any = None
        self._recorder: Any = None
        self._client: Any = None
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.settings.BEAT_SQS_CONCURRENCY, thread_name_prefix="beat-sqs"
        )

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self._connection is not None:
            self._connection.release()
            self._connection = None

    # ------------------------------------------------------------------ building

    def _recording_producer(self) -> Any:
        if self._channel is None:
            # A connection of our own: the recording patch never touches the app's pool.
            self._connection = self.app.connection_for_write()
            channel = self._connection.default_channel
            self._client = channel.sqs()
            self._recorder = _Recorder(self._client)
            channel.sqs = lambda queue=None: self._recorder
            self._channel = channel
        return self.app.amqp.Producer(self._channel, auto_declare=False)

    def build_exact(self, items: list[Item]) -> list[dict[str, Any]]:
        """The SendMessage requests that ``apply_async`` makes, one call per item."""
        producer = self._recording_producer()
        self._recorder.requests = []
        for execution_id, correlation_id, queue in items:
            headers = {CORRELATION_HEADER: correlation_id} if correlation_id else None
            execute_workflow.apply_async(
                args=[str(execution_id)], headers=headers, producer=producer, queue=queue
            )
        requests, self._recorder.requests = self._recorder.requests, []
        return requests

    def build(self, items: list[Item]) -> list[dict[str, Any]]:
        """The same requests, fast: ``apply_async`` builds the first one of each queue
        (Celery's current format, from Celery itself); the others are that message with
        the fields that ``apply_async`` makes per call replaced (task id, args, delivery
        tag, correlation).

        ``apply_async`` costs about 0.25 ms a message, a quarter of a second for 1,000
        fires; the copy costs a tenth of that. tests/beat/test_sender.py checks the two
        agree field by field and that a real worker runs what this builds.
        """
        if not items:
            return []
        # One message built by apply_async per queue: the template of the others.
        templates: dict[str | None, tuple[dict[str, Any], dict[str, Any]]] = {}
        requests = []
        for item in items:
            execution_id, correlation_id, queue = item
            if queue not in templates:
                first = self.build_exact([item])[0]
                if not self._channel.sqs_base64_encoding:
                    return self.build_exact(items)
                templates[queue] = (first, json_loads(base64.b64decode(first["MessageBody"])))
                requests.append(first)
                continue
            first, template = templates[queue]
            requests.append(
                dict(first, MessageBody=_derive(template, str(execution_id), correlation_id))
            )
        return requests

    # ------------------------------------------------------------------ sending

    def send(self, items: list[Item]) -> SendReport:
        report = SendReport()
        if not items:
            return report
        if not self.is_sqs:
            for execution_id, correlation_id, queue in items:
                try:
                    send_execution(execution_id, correlation_id, queue=queue)
                    report.sent += 1
                    report.acked.append((1, time.time()))
                except Exception as exc:  # noqa: BLE001 - the sweep re-sends it
                    report.failed.append(str(execution_id))
                    logger.error("cron_send_failed", error=type(exc).__name__)
                report.requests += 1
            return report

        started = time.perf_counter()
        requests = self.build(items)
        report.build_seconds = time.perf_counter() - started
        by_queue: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for request in requests:
            by_queue[request["QueueUrl"]].append(request)
        batches = []
        for queue_url, reqs in by_queue.items():
            for i in range(0, len(reqs), SQS_BATCH):
                entries = []
                for n, req in enumerate(reqs[i : i + SQS_BATCH]):
                    entry = {k: v for k, v in req.items() if k != "QueueUrl"}
                    entry["Id"] = str(n)
                    entries.append(entry)
                batches.append((queue_url, entries))
        started = time.perf_counter()
        futures = [self._pool.submit(self._send_batch, url, entries) for url, entries in batches]
        for future in futures:
            sent, failed, acked_at = future.result()
            report.sent += sent
            report.failed.extend(failed)
            report.acked.append((sent, acked_at))
        report.sqs_seconds = time.perf_counter() - started
        report.requests = len(batches)
        if report.failed:
            logger.error("cron_send_failed", failed=len(report.failed), sent=report.sent)
        return report

    def _send_batch(
        self, queue_url: str, entries: list[dict[str, Any]]
    ) -> tuple[int, list[str], float]:
        try:
            response = self._client.send_message_batch(QueueUrl=queue_url, Entries=entries)
        except Exception as exc:  # noqa: BLE001 - logged; the sweep re-sends
            logger.error("cron_send_batch_failed", error=type(exc).__name__, size=len(entries))
            return 0, [e["Id"] for e in entries], time.time()
        failed = [f.get("Id", "?") for f in response.get("Failed", [])]
        return len(response.get("Successful", [])), failed, time.time()

    def warm_up(self) -> None:
        """Open the SQS channel and build one message per queue now (kombu looks each
        queue's URL up once), not in the first fire."""
        if self.is_sqs:
            self.build_exact(
                [(uuid.uuid4(), None, None), (uuid.uuid4(), None, SHORT_EXECUTIONS_QUEUE)]
            )
