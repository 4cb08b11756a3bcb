"""The monitoring channel: Celery events and remote control over Redis, tasks on SQS.

kombu's SQS transport has only direct exchanges. Celery's remote control (``celery
inspect``, ``control shutdown``, Flower's worker pages) needs a fan-out exchange, and
events go to the ``celeryev`` topic exchange, so on SQS a worker never answers and events
have nowhere to go (every ``celery events`` or Flower start left a ``celeryev-<uuid>`` SQS
queue behind). Here both travel over Redis (``Settings.monitor_url``, every key and
channel under ``MONITOR_KEY_PREFIX``) while task messages stay on SQS:

- :class:`MonitoredCelery` is the app class. ``control_cls`` broadcasts and collects
  replies on the monitoring connection; ``events_cls`` makes every event dispatcher and
  receiver use it, whatever connection its caller passed (the worker's Events step passes
  the broker's). In the processes that only watch (``celery flower``, ``celery events``),
  ``app.connection()``, which Flower uses to capture events, is the monitoring connection.
- :class:`MonitorPidbox` is a worker bootstep that answers remote control on its own Redis
  connection, in a thread: the worker's event loop only drains the broker connection.
- :func:`queue_depths` reads the SQS queue and dead-letter queue depths
  (``GetQueueAttributes``), since Flower's broker tab cannot read SQS; Flower exposes them
  as ``flowbuilder_sqs_messages`` on ``/metrics`` and ``flowbuilder status`` prints them.

With no monitoring channel (the embedded default), everything is Celery's own behaviour.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import structlog
from celery import Celery, bootsteps
from celery.app.control import Control
from celery.app.events import Events
from celery.events.dispatcher import EventDispatcher
from celery.events.receiver import EventReceiver
from celery.exceptions import WorkerShutdown, WorkerTerminate
from celery.utils.collections import AttributeDict
from kombu import Connection
from kombu.utils.encoding import safe_str

logger = structlog.get_logger(__name__)

# Celery sub-commands that only watch the cluster: in them, app.connection() (what Flower
# captures events with) is the monitoring connection. Workers and beat keep the broker.
WATCHER_COMMANDS = frozenset({"flower", "events"})
# After a failed event publish (monitoring Redis down), events are dropped this long.
EVENT_PAUSE_SECONDS = 30.0


class MonitorConnection(Connection):
    """A kombu connection to the monitoring channel (marks it apart from the broker's)."""

    def get_heartbeat_interval(self) -> float:
        # Redis has no AMQP heartbeats. Asked by the worker's loop at start: answering
        # without connecting keeps a Redis outage from stopping the worker.
        return 0


def monitor_url(app: Celery | None) -> str | None:
    if app is None:
        return None
    return app.conf.get("flowbuilder_monitor_url") or None


def monitor_connection(app: Celery, **kwargs: Any) -> MonitorConnection:
    """A new (lazy) connection to the monitoring channel; the caller closes it."""
    url = monitor_url(app)
    if url is None:
        raise RuntimeError("no monitoring channel is configured (MONITOR_URL)")
    options = dict(app.conf.get("flowbuilder_monitor_transport_options") or {})
    kwargs.setdefault("connect_timeout", 5)
    return MonitorConnection(url, transport_options=options, **kwargs)


def monitor_transport_options(key_prefix: str) -> dict[str, Any]:
    return {
        # Every key and pub/sub channel under the prefix (kombu's Redis transport).
        "global_keyprefix": key_prefix,
        "socket_timeout": 10,
        "socket_connect_timeout": 5,
        "health_check_interval": 25,
        # kombu retries a lost connection forever by default: a publish must give up.
        "max_retries": 1,
        "interval_start": 0,
        "interval_step": 0.2,
        "interval_max": 0.5,
    }


# ------------------------------------------------------------------------------ client side


class MonitorControl(Control):
    """``app.control``: broadcasts and replies on the monitoring channel."""

    def __init__(self, app: Celery | None = None) -> None:
        super().__init__(app)
        # The mailbox would publish through the app's producer pool, which is the broker's
        # (SQS). Without a pool it publishes on the channel it is bound to (Redis).
        self.mailbox._producer_pool = None

    def _after_fork(self) -> None:
        pass  # no pool to drop (see __init__)

    def broadcast(self, command: str, *args: Any, connection: Any = None, **kwargs: Any) -> Any:
        if connection is not None or monitor_url(self.app) is None:
            return super().broadcast(command, *args, connection=connection, **kwargs)
        with monitor_connection(self.app) as conn:
            return super().broadcast(command, *args, connection=conn, **kwargs)


class MonitorEventDispatcher(EventDispatcher):
    """Sends events on the monitoring channel, whatever connection it was given."""

    def __init__(
        self,
        connection: Any = None,
        hostname: Any = None,
        enabled: bool = True,
        channel: Any = None,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        self.app = kwargs.get("app") or self.app
        if monitor_url(self.app) is not None and not isinstance(connection, MonitorConnection):
            # The worker's Events step passes the broker's connection: replace it, and the
            # broker's channel with it.
            connection, channel = monitor_connection(self.app), None
            self._own_connection = connection
        super().__init__(connection, hostname, enabled, channel, *args, **kwargs)

        if getattr(self, "_own_connection", None) is not None:
            # Events are monitoring data: during a Redis outage they are dropped, never
            # buffered without bound, and never allowed to stall the worker's loop.
            self.buffer_while_offline = False
        self._paused_until = 0.0

    def close(self) -> None:
        super().close()
        own = getattr(self, "_own_connection", None)
        if own is not None:
            own.release()

    def _publish(
        self, event: Any, producer: Any, routing_key: str, *args: Any, **kwargs: Any
    ) -> Any:
        if getattr(self, "_own_connection", None) is None:
            return super()._publish(event, producer, routing_key, *args, **kwargs)
        if time.monotonic() < self._paused_until:
            return None
        try:
            return super()._publish(event, producer, routing_key, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - see above: drop, pause, say so once
            self._paused_until = time.monotonic() + EVENT_PAUSE_SECONDS
            logger.warning(
                "monitor_events_dropped",
                error=f"{type(exc).__name__}: {str(exc)[:200]}",
                paused_seconds=EVENT_PAUSE_SECONDS,
            )
            with contextlib.suppress(Exception):
                self._own_connection.collect()  # a fresh connection on the next try
            return None

    def publish(self, type: str, fields: dict, producer: Any, *args: Any, **kwargs: Any) -> Any:
        # Callers that bring the broker's producer (the task-sent event) would publish to
        # the celeryev exchange on SQS: events never go there.
        if monitor_url(self.app) is not None and not isinstance(
            getattr(producer, "connection", None), MonitorConnection
        ):
            return None
        return super().publish(type, fields, producer, *args, **kwargs)


class MonitorEventReceiver(EventReceiver):
    """Receives events from the monitoring channel, whatever connection it was given
    (``celery events`` passes the broker's)."""

    def __init__(self, channel: Any, *args: Any, **kwargs: Any) -> None:
        self.app = kwargs.get("app") or self.app
        if monitor_url(self.app) is not None and not isinstance(channel, MonitorConnection):
            channel = monitor_connection(self.app)
        super().__init__(channel, *args, **kwargs)


class MonitorEvents(Events):
    receiver_cls = "flowbuilder.tasks.monitor:MonitorEventReceiver"
    dispatcher_cls = "flowbuilder.tasks.monitor:MonitorEventDispatcher"


def _invoked_celery_command() -> str | None:
    """The ``celery`` sub-command being run (``flower``, ``worker``...), if any.

    ``celery -A flowbuilder.tasks <command>`` imports the app inside the click context of
    the ``celery`` group, whose ``invoked_subcommand`` is already set then.
    """
    try:
        import click
    except ImportError:  # pragma: no cover - celery depends on click
        return None
    ctx = click.get_current_context(silent=True)
    while ctx is not None:
        if ctx.info_name == "celery" or ctx.parent is None:
            return ctx.invoked_subcommand
        ctx = ctx.parent
    return None


def require_flower_auth(argv: list[str] | None = None, environ: Any = None) -> None:
    """Refuse to start Flower without authentication (basic auth or OAuth).

    Flower serves task arguments and can shut workers down; it is never open. Its own
    options come from ``--basic-auth``/``--auth`` or ``FLOWER_BASIC_AUTH``/``FLOWER_AUTH``.
    """
    import os
    import sys

    argv = sys.argv if argv is None else argv
    environ = os.environ if environ is None else environ
    flags = ("--basic-auth", "--basic_auth", "--auth")
    if any(a.split("=", 1)[0] in flags for a in argv):
        return
    if environ.get("FLOWER_BASIC_AUTH") or environ.get("FLOWER_AUTH"):
        return
    raise SystemExit(
        "error: Flower needs authentication: set FLOWER_BASIC_AUTH=user:password "
        "(or FLOWER_AUTH with an OAuth provider)"
    )


class MonitoredCelery(Celery):
    """The Celery app class, with events and remote control on the monitoring channel."""

    control_cls = "flowbuilder.tasks.monitor:MonitorControl"
    events_cls = "flowbuilder.tasks.monitor:MonitorEvents"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        command = _invoked_celery_command()
        self.watcher = command in WATCHER_COMMANDS
        if command == "flower":
            require_flower_auth()
        self.steps["consumer"].add(MonitorPidbox)

    def connection(self, hostname: Any = None, *args: Any, **kwargs: Any) -> Any:
        # Flower captures events on app.connection(); task code never calls it.
        if self.watcher and hostname is None and monitor_url(self) is not None:
            return monitor_connection(self, **{k: v for k, v in kwargs.items() if v})
        return super().connection(hostname, *args, **kwargs)


# ------------------------------------------------------------------------------ worker side


class MonitorPidbox(bootsteps.StartStopStep):
    """Answers remote control (ping, inspect, shutdown, pool grow/shrink) on the
    monitoring channel, on its own Redis connection and thread.

    Celery's own Control step is skipped on SQS (no fan-out) and, even if it ran, would
    listen on the broker's connection, which the worker's loop drains.
    """

    label = "Monitor pidbox"
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        self.enabled = monitor_url(c.app) is not None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        super().__init__(c, **kwargs)

    def start(self, c: Any) -> None:
        import celery.worker.control  # noqa: F401 - registers the handlers in Panel

        self._stopping.clear()
        self._thread = threading.Thread(
            target=self._run, args=(c,), name="flowbuilder-monitor-pidbox", daemon=True
        )
        self._thread.start()

    def stop(self, c: Any) -> None:
        self._stopping.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    shutdown = stop

    def _run(self, c: Any) -> None:
        from celery.worker import control, state

        node = c.app.control.mailbox.Node(
            safe_str(c.hostname),
            handlers=control.Panel.data,
            # tset=set: handlers copy the worker's sets; this thread is not the loop's.
            state=AttributeDict(app=c.app, hostname=c.hostname, consumer=c, tset=set),
        )
        backoff = 1.0
        while not self._stopping.is_set():
            conn = monitor_connection(c.app)
            try:
                node.channel = conn.channel()
                consumer = node.listen(
                    callback=lambda body, message: self._on_message(node, body, message, c)
                )
                with consumer:
                    backoff = 1.0
                    logger.info("monitor_pidbox_listening", hostname=c.hostname)
                    while not self._stopping.is_set():
                        try:
                            conn.drain_events(timeout=1.0)
                        except TimeoutError:
                            continue
            except (WorkerShutdown, WorkerTerminate) as exc:
                # `control shutdown`: the same path as SIGTERM (a warm shutdown).
                state.should_stop = exc.args[0] if exc.args else 0
                return
            except Exception as exc:  # noqa: BLE001 - reconnect; the worker keeps running
                if self._stopping.is_set():
                    return
                logger.warning(
                    "monitor_pidbox_reconnecting",
                    error=f"{type(exc).__name__}: {str(exc)[:200]}",
                    retry_in=backoff,
                )
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, 30.0)
            finally:
                node.channel = None
                conn.release()

    def _on_message(self, node: Any, body: Any, message: Any, c: Any) -> None:
        c.app.clock.forward()
        try:
            node.handle_message(body, message)
        except KeyError as exc:
            logger.error("remote_control_unknown_command", command=str(exc))
        except (WorkerShutdown, WorkerTerminate):
            raise
        except Exception as exc:  # noqa: BLE001 - one bad command must not stop the box
            logger.error("remote_control_failed", error=f"{type(exc).__name__}: {exc}")


# ------------------------------------------------------------------------------ SQS depth


def queue_depths(settings: Any = None) -> list[dict[str, Any]]:
    """Approximate depth of the execution queues and their dead-letter queue on SQS.

    One row per queue: name, visible, in_flight, delayed; ``error`` instead when the
    queue cannot be read (missing, SQS unreachable). Empty for a broker that is not SQS.
    """
    from flowbuilder.platform import sqs
    from flowbuilder.platform.settings import get_settings
    from flowbuilder.tasks.app import (
        EXECUTIONS_QUEUE,
        SHORT_EXECUTIONS_QUEUE,
        dead_letter_queue_name,
        queue_name,
    )

    settings = settings or get_settings()
    if not settings.broker_url.startswith("sqs://"):
        return []
    client = sqs.get_sqs_client(settings)
    rows = []
    for name in (
        queue_name(settings, EXECUTIONS_QUEUE),
        queue_name(settings, SHORT_EXECUTIONS_QUEUE),
        dead_letter_queue_name(settings),
    ):
        try:
            url = client.get_queue_url(QueueName=name)["QueueUrl"]
            attrs = client.get_queue_attributes(
                QueueUrl=url,
                AttributeNames=[
                    "ApproximateNumberOfMessages",
                    "ApproximateNumberOfMessagesNotVisible",
                    "ApproximateNumberOfMessagesDelayed",
                ],
            )["Attributes"]
        except Exception as exc:  # noqa: BLE001 - shown to the operator, never raised
            code = getattr(exc, "response", {}).get("Error", {}).get("Code")
            rows.append({"queue": name, "error": code or type(exc).__name__})
            continue
        rows.append(
            {
                "queue": name,
                "visible": int(attrs.get("ApproximateNumberOfMessages", 0)),
                "in_flight": int(attrs.get("ApproximateNumberOfMessagesNotVisible", 0)),
                "delayed": int(attrs.get("ApproximateNumberOfMessagesDelayed", 0)),
            }
        )
    return rows


class SqsDepthCollector:
    """Prometheus collector (Flower's ``/metrics``): ``flowbuilder_sqs_messages``."""

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily(
            "flowbuilder_sqs_messages",
            "Approximate messages in the SQS executions queue and dead-letter queue",
            labels=["queue", "state"],
        )
        try:
            rows = queue_depths()
        except Exception as exc:  # noqa: BLE001 - a scrape must not fail
            logger.warning("sqs_depth_unavailable", error=type(exc).__name__)
            rows = []
        for row in rows:
            for state in ("visible", "in_flight", "delayed"):
                if state in row:
                    family.add_metric([row["queue"], state], row[state])
        yield family


_collector_registered = False


def register_flower_metrics() -> None:
    """Add the SQS depth to the registry Flower serves on /metrics (once per process)."""
    global _collector_registered
    if _collector_registered:
        return
    try:
        from prometheus_client import REGISTRY
    except ImportError:  # Flower (and prometheus_client) not installed: nothing to serve
        return
    REGISTRY.register(SqsDepthCollector())
    _collector_registered = True
