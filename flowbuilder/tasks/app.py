"""The Celery application: Amazon SQS as the broker, PostgreSQL as the record.

Each reliability setting below says what it protects against. The execution record in
the database is the source of truth; the broker only carries execution ids, and every
task tolerates being delivered more than once.
"""

from __future__ import annotations

import gc
import os
from typing import Any
from urllib.parse import urlsplit

from celery import Celery, signals
from kombu import Queue
from kombu import pools as kombu_pools

from flowbuilder.platform import db
from flowbuilder.platform.logging import bind_context, clear_context, setup_logging
from flowbuilder.platform.settings import Settings, get_settings
from flowbuilder.tasks import logcontext
from flowbuilder.tasks.monitor import MonitoredCelery, monitor_transport_options
from flowbuilder.tasks.sqs_transport import CONSUMER, TRANSPORT

EXECUTIONS_QUEUE = "executions"
# Runs that cannot take longer than SHORT_RUN_MAX_SECONDS (routed at enqueue). Every worker
# consumes both queues by default; one started with `-Q executions-short` and a deeper
# prefetch drains a backlog of short runs faster (Procfile: worker-short).
SHORT_EXECUTIONS_QUEUE = "executions-short"
# The header that carries the API's correlation id into the worker's log lines.
# (Celery's own ``correlation_id`` is the task id, so it cannot be reused.)
CORRELATION_HEADER = logcontext.HEADERS["correlation_id"]


def queue_name(settings: Settings, name: str) -> str:
    return f"{settings.SQS_QUEUE_PREFIX}{name}"


def dead_letter_queue_name(settings: Settings) -> str:
    return queue_name(settings, f"{EXECUTIONS_QUEUE}-dlq")


def execution_queue_for(settings: Settings, worst_case_seconds: float) -> str:
    """The queue of a run that can take at most ``worst_case_seconds``."""
    longest = min(worst_case_seconds, settings.EXECUTION_TIMEOUT_SECONDS)
    if settings.SHORT_RUN_MAX_SECONDS > 0 and longest <= settings.SHORT_RUN_MAX_SECONDS:
        return SHORT_EXECUTIONS_QUEUE
    return EXECUTIONS_QUEUE


def broker_url(settings: Settings) -> str:
    """The broker URL. For ``sqs://`` without a host, SQS_ENDPOINT_URL supplies one.

    kombu's SQS transport takes its endpoint from the URL's host (and ``is_secure``
    from the transport options), so moto, LocalStack and AWS share one code path.
    """
    url = settings.broker_url
    if url == "filesystem://":
        # kombu warns "No hostname was supplied" each time it describes a connection
        # without a host; the file-system transport ignores the host anyway.
        return "filesystem://localhost/"
    if url.startswith("sqs://") and settings.SQS_ENDPOINT_URL:
        rest = url[len("sqs://") :]
        creds, _, host = rest.rpartition("@")
        if not host.strip("/"):
            endpoint = urlsplit(settings.SQS_ENDPOINT_URL)
            netloc = endpoint.netloc
            return f"sqs://{creds + '@' if creds else ''}{netloc}"
    return url


def transport_options(settings: Settings) -> dict[str, Any]:
    url = settings.broker_url
    if url.startswith("sqs://"):
        options: dict[str, Any] = {
            "region": settings.AWS_REGION,
            # Must exceed the longest allowed execution attempt, or SQS re-delivers a
            # message whose run is still going (the lease makes that harmless, but it
            # is wasted work). `flowbuilder sqs ensure-queues` sets it on the queue too:
            # kombu only applies it to queues that it creates itself.
            "visibility_timeout": settings.SQS_VISIBILITY_TIMEOUT,
            # Long polling: an idle worker waits on SQS, which answers as soon as a
            # message arrives, so this sets the cost of an idle queue (empty receives),
            # not latency. It is also how long a stopped worker's pending poll may still
            # receive a message that then stays invisible for the visibility timeout
            # (README, Operations).
            "wait_time_seconds": settings.SQS_WAIT_TIME_SECONDS,
            # Chosen by measurement (`python -m benchmarks --only broker`, results in
            # benchmarks/results/): kombu waits this long after a poll that brought
            # nothing, and also after each check it makes while every process is busy.
            # So a busy worker picks up its next message up to this late: 0.5 s capped a
            # 2-process worker at ~3.8 one-phase runs/s and delayed the start of a run
            # after a busy moment by up to ~0.45 s. 0.01 s gave the best throughput and
            # drain with the polling parent at ~1% of a core while its children are busy;
            # 0 was not faster (and makes that check a tight loop). An empty queue is
            # still long-polled, so idle cost is unchanged.
            "polling_interval": 0.01,
            "queue_name_prefix": settings.SQS_QUEUE_PREFIX,
            # Prefetch (worker_prefetch_multiplier in celery_config) stays 1 and there is
            # no separate batch-receive setting: kombu asks SQS for as many messages as
            # the prefetch window has room for. A window of 4 drains a backlog of short
            # runs faster (measured 2026-11-27: 200 one-phase runs, 88 against 61 runs/s),
            # but with late acks it holds up to 4 messages per process invisible behind
            # a long run while another worker is idle. So short runs (known short from
            # their plan, SHORT_RUN_MAX_SECONDS) have a queue of their own, which workers
            # started with `-Q executions-short --prefetch-multiplier 4` drain (Procfile:
            # worker-short); a default worker consumes both queues with a window of 1.
        }
        if settings.SQS_ENDPOINT_URL:
            options["is_secure"] = settings.SQS_ENDPOINT_URL.startswith("https://")
        return options
    if url.startswith("filesystem://"):
        # The embedded default: a broker in plain folders, no server needed.
        folder = (settings.FLOWBUILDER_HOME / "broker").resolve()
        for sub in ("out", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        return {
            "data_folder_in": str(folder / "out"),
            "data_folder_out": str(folder / "out"),
            "processed_folder": str(folder / "processed"),
            # kombu's default is ./control, in whatever directory the process runs in.
            "control_folder": str(folder / "control"),
            "store_processed": False,
        }
    return {}


def celery_config(settings: Settings) -> dict[str, Any]:
    budget = settings.EXECUTION_TIMEOUT_SECONDS
    return {
        "broker_url": broker_url(settings),
        "broker_transport_options": transport_options(settings),
        "broker_connection_retry_on_startup": True,
        # A worker survives any message the queue holds: poison ones are dead-lettered.
        "broker_transport": TRANSPORT if broker_url(settings).startswith("sqs://") else None,
        "worker_consumer": CONSUMER,
        # Results live in PostgreSQL (the execution row), not in a result backend.
        "result_backend": None,
        "task_ignore_result": True,
        # JSON only: a pickle payload from a compromised queue would be code execution.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        # Acknowledge after the run, not on receipt: a worker that dies mid-run leaves the
        # message for another worker. The cost: a task may be executed twice if the
        # worker crashes, which the execution lease and per-phase checkpoints absorb.
        "task_acks_late": True,
        # A child killed by the OS (SIGKILL, OOM) gets its message re-queued rather than
        # acknowledged as failed; same cost as above.
        "task_reject_on_worker_lost": True,
        # A task that raised (bad arguments, a bug) is rejected, not acknowledged: on SQS
        # its message goes to the dead-letter queue instead of being deleted unseen.
        "task_acks_on_failure": False,
        # Executions are long: a worker should not hoard messages that an idle worker
        # could run. One message per process at a time.
        "worker_prefetch_multiplier": 1,
        # Hard limit above the engine's own budget, so the engine records a clean
        # timeout first; the hard limit only catches a stuck process.
        "task_soft_time_limit": budget + 30,
        "task_time_limit": budget + 60,
        # Our structlog configuration owns the root logger.
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "task_default_queue": EXECUTIONS_QUEUE,
        "task_routes": {"flowbuilder.*": {"queue": EXECUTIONS_QUEUE}},
        # What a worker consumes unless told otherwise (-Q): both queues. Short runs are
        # sent to theirs explicitly (send_execution); everything else goes to the default.
        "task_queues": [
            Queue(EXECUTIONS_QUEUE, routing_key=EXECUTIONS_QUEUE),
            Queue(SHORT_EXECUTIONS_QUEUE, routing_key=SHORT_EXECUTIONS_QUEUE),
        ],
        # Events and remote control travel on the monitoring channel (Redis), never on
        # SQS; see flowbuilder/tasks/monitor.py.
        "worker_send_task_events": True,
        # task-sent would be published on the broker's producer (SQS): off.
        "task_send_sent_event": False,
        "flowbuilder_monitor_url": settings.monitor_url,
        "flowbuilder_monitor_transport_options": monitor_transport_options(
            settings.MONITOR_KEY_PREFIX
        ),
        "beat_schedule": {
            "sweep-stale-executions": {
                "task": "flowbuilder.sweep_stale_executions",
                "schedule": max(1.0, settings.SWEEP_PENDING_AFTER_SECONDS / 2),
            },
            "housekeeping": {
                "task": "flowbuilder.housekeeping",
                "schedule": settings.HOUSEKEEPING_INTERVAL_SECONDS,
            },
        },
        # The housekeeping task's module, so workers know it (beat only sends its name).
        "imports": ["flowbuilder.tasks.housekeeping"],
        # Beat: `celery -A flowbuilder.tasks beat` needs no -S. Our scheduler is RedBeat
        # (schedule and lock in Redis: a second beat waits on the lock instead of sending
        # every task twice) plus users' cron workflows fired in batches.
        "beat_scheduler": "flowbuilder.beat.scheduler:FlowBuilderScheduler",
        # Its own Redis URL and options, never inherited from the SQS broker's options.
        "redbeat_redis_url": settings.REDIS_URL,
        "redbeat_redis_options": {
            "socket_timeout": 5,
            "socket_connect_timeout": 5,
            "health_check_interval": 30,
            # RedBeat retries Redis calls this long before beat gives up.
            "retry_period": 10,
        },
        "redbeat_key_prefix": settings.REDBEAT_KEY_PREFIX,
        # The lock is renewed every tick (at most beat_max_loop_interval apart); a standby
        # beat polls for it every beat_max_loop_interval. So a standby takes over at most
        # lock timeout + loop interval after the active beat dies: 35 s by default, not
        # RedBeat's 25 minutes. Shorter would risk a slow tick losing the lock.
        "redbeat_lock_timeout": settings.BEAT_LOCK_TIMEOUT_SECONDS,
        "beat_max_loop_interval": settings.BEAT_MAX_LOOP_INTERVAL_SECONDS,
        # No result backend, so nothing for celery.backend_cleanup to clean.
        "result_expires": None,
        "timezone": "UTC",
        "enable_utc": True,
    }


def _prefer_derived_broker_url(settings: Settings | None = None) -> None:
    """Undo the celery CLI's own reading of BROKER_URL.

    ``celery worker`` reads the BROKER_URL environment variable itself and copies it to
    CELERY_BROKER_URL, which then wins over ``app.conf``. Our BROKER_URL may be a bare
    ``sqs://`` completed by SQS_ENDPOINT_URL, so the CLI's copy is replaced with the
    URL derived from the settings.
    """
    settings = settings or get_settings()
    env = os.environ.get("CELERY_BROKER_URL")
    if env and settings.BROKER_URL and env == settings.BROKER_URL:
        os.environ["CELERY_BROKER_URL"] = broker_url(settings)


def configure(app: Celery, settings: Settings | None = None) -> Celery:
    """(Re)apply the settings to ``app``; tests call it after overriding settings."""
    settings = settings or get_settings()
    _prefer_derived_broker_url(settings)
    app.conf.update(celery_config(settings))
    # Connections made under the old configuration must not be reused. kombu keeps its
    # pools in a process-wide registry, so that is what gets reset.
    if app._pool is not None:
        kombu_pools.reset()
        app._pool = None
    amqp = app.__dict__.get("amqp")
    if amqp is not None:
        amqp._producer_pool = None
    return app


app = MonitoredCelery("flowbuilder", include=["flowbuilder.tasks.execution"])
configure(app)
logcontext.install()  # execution ids on Celery's received/succeeded/failed/retry lines
if app.watcher:  # `celery flower`: the SQS depth on /metrics
    from flowbuilder.tasks.monitor import register_flower_metrics

    register_flower_metrics()


# ------------------------------------------------------------------------------ signals


@signals.setup_logging.connect
def _setup_logging(**_: Any) -> None:
    # Connecting this signal stops Celery from configuring logging itself.
    setup_logging()


@signals.celeryd_init.connect
@signals.beat_init.connect
def _on_cli_start(**_: Any) -> None:
    _prefer_derived_broker_url()


@signals.worker_process_init.connect
def _after_fork(**_: Any) -> None:
    # Never share a pooled connection with the parent process.
    db.dispose_engines_after_fork()
    _freeze_startup_objects()


@signals.worker_ready.connect
def _on_worker_ready(**_: Any) -> None:
    _freeze_startup_objects()  # the main process, whose one loop serves every child


def _freeze_startup_objects() -> None:
    """Move what exists once the process is set up (modules, the app, the node registry:
    about 180,000 objects) out of the cyclic garbage collector's reach. A run allocates
    enough (a phase's outputs are thousands of objects) to set off full collections,
    and each of those otherwise walks all of them again: measured, ~2 ms of a 14 ms
    phase passing 122 KB (benchmarks/results/). Objects made later are collected as
    usual; startup objects that die later are simply not reclaimed (there are few)."""
    gc.freeze()


@signals.task_prerun.connect
def _bind_task_context(task: Any = None, task_id: str | None = None, **_: Any) -> None:
    clear_context()
    request = task.request if task is not None else None
    headers = dict((getattr(request, "headers", None) or {}) if request is not None else {})
    # Protocol 2 merges custom headers into the request itself.
    correlation = getattr(request, CORRELATION_HEADER, None)
    if correlation and CORRELATION_HEADER not in headers:
        headers[CORRELATION_HEADER] = correlation
    name = getattr(task, "name", None)
    # The message's ids come from the worker's main process with the request (or from
    # the request itself, eager apply). The execution's owner ids are not read here: the
    # run binds them itself once it has claimed the execution (its first read), and
    # Celery's own lines read them only if one is written (logcontext.TaskLogContext).
    context = logcontext.passed_context(request)
    if context is None:
        context = logcontext.context_for(
            name, headers, getattr(request, "argsrepr", None), task_id, owners=False
        )
    logcontext.remember(task_id, context)  # Celery's own lines in this (child) process
    bind_context(task_id=task_id, task_name=name, **logcontext.public(context))


@signals.task_postrun.connect
def _clear_task_context(**_: Any) -> None:
    clear_context()


def ensure_execution_queues(settings: Settings | None = None) -> dict[str, str]:
    """Create or update the execution queues and their (shared) dead-letter queue on SQS."""
    from flowbuilder.platform import sqs

    settings = settings or get_settings()
    urls: dict[str, str] = {}
    for name in (EXECUTIONS_QUEUE, SHORT_EXECUTIONS_QUEUE):
        urls.update(
            sqs.ensure_queues(
                queue_name(settings, name), dead_letter_queue_name(settings), settings=settings
            )
        )
    return urls
