"""Celery apps for the benchmark workers: the project's own app and a bare baseline app.

Both read the same settings (environment) and the same overrides, so the only difference
between a project run and its baseline is the project's code:

- ``benchmarks.worker_apps:project`` is ``flowbuilder.tasks.app`` itself.
- ``benchmarks.worker_apps:bare`` is a plain Celery app built from the project's
  ``celery_config`` (same broker, same transport options, same prefetch, acks_late...)
  on kombu's own SQS transport and Celery's own consumer
  whose tasks do only the work itself (sleep, pass a payload on) and record when they
  start and finish in Redis (the harness reads the times back).

``BENCH_BARE_CHANNEL=project`` runs the bare app on the project's SQS channel and
consumer instead of kombu's and Celery's own. ``BENCH_TRANSPORT_OPTIONS`` (JSON, merged
into ``broker_transport_options``) and
``BENCH_PREFETCH`` (``worker_prefetch_multiplier``) let the harness measure other
broker settings without editing the project: both apps apply them at import.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis
from celery import Celery

from flowbuilder.platform.nodes import register_node_type
from flowbuilder.platform.nodes.builtin import DelayNode
from flowbuilder.platform.settings import get_settings
from flowbuilder.tasks.app import app as project
from flowbuilder.tasks.app import celery_config

BARE_QUEUE = "bare"


class NotPureDelay(DelayNode):
    """The built-in delay, declared not pure: it starts only once its phase's start is
    committed, as a node with side effects (an HTTP request) does. Registered in the
    harness (which validates the definitions) and in the project's workers alike."""

    type = "bench_delay_not_pure"
    pure = False
    inline = False  # (inline requires pure)


NOT_PURE_DELAY = NotPureDelay.type
register_node_type(NotPureDelay(), replace=True)


def _apply_overrides(app: Celery) -> None:
    options = os.environ.get("BENCH_TRANSPORT_OPTIONS")
    if options:
        merged = dict(app.conf.broker_transport_options or {})
        merged.update(json.loads(options))
        app.conf.broker_transport_options = merged
    prefetch = os.environ.get("BENCH_PREFETCH")
    if prefetch:
        app.conf.worker_prefetch_multiplier = int(prefetch)


def _bare_config() -> dict[str, Any]:
    config = celery_config(get_settings())
    config["task_default_queue"] = BARE_QUEUE
    config["task_routes"] = {"bench.*": {"queue": BARE_QUEUE}}
    # Its one queue only (the project's app declares its two execution queues).
    config.pop("task_queues", None)
    config.pop("beat_schedule", None)
    # Stock Celery and kombu: the project's SQS channel (poison messages, batched
    # acknowledgements) and its consumer are the project's code, measured on its side.
    # BENCH_BARE_CHANNEL=project keeps them: no-op tasks on the project's channel, the
    # floor of what the project's worker can do on this broker.
    if os.environ.get("BENCH_BARE_CHANNEL") != "project":
        config.pop("broker_transport", None)
        config.pop("worker_consumer", None)
    return config


def _bare_app() -> Celery:
    app = Celery("bench_bare")
    app.conf.update(_bare_config())
    return app


_apply_overrides(project)
bare = _bare_app()
_apply_overrides(bare)


def configure_bare() -> Celery:
    """Re-read the settings into the bare app (the harness process switches queues)."""
    from kombu import pools as kombu_pools

    bare.conf.update(_bare_config())
    _apply_overrides(bare)
    if bare._pool is not None:
        kombu_pools.reset()
        bare._pool = None
    amqp = bare.__dict__.get("amqp")
    if amqp is not None:
        amqp._producer_pool = None
    return bare


_redis: redis.Redis | None = None


def _r() -> redis.Redis:
    global _redis
    if _redis is None:
        _redis = redis.Redis.from_url(
            os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")
        )
    return _redis


def _started(key: str) -> None:
    _r().set(f"{key}:first_start", repr(time.time()), nx=True)
    _r().rpush(f"{key}:starts", repr(time.time()))


def _done(key: str) -> None:
    now = repr(time.time())
    pipe = _r().pipeline()
    pipe.incr(f"{key}:count")
    pipe.set(f"{key}:last_done", now)
    pipe.execute()


@bare.task(name="bench.noop", ignore_result=True, acks_late=True)
def noop(key: str) -> None:
    """A no-op task: broker throughput and drain."""
    _started(key)
    _done(key)


@bare.task(name="bench.step", ignore_result=True, acks_late=True)
def step(payload: Any, key: str, index: int, total: int, seconds: float) -> Any:
    """One step of a chain: sleep, then pass ``payload`` on (the chain's next argument)."""
    if index == 0:
        _started(key)
    time.sleep(seconds)
    if index == total - 1:
        _done(key)
    return payload


@bare.task(name="bench.floor", ignore_result=True, acks_late=True)
def floor(key: str, steps: int, seconds: float, payload: Any = None) -> None:
    """The floor: one task doing all the steps' work itself."""
    _started(key)
    for _ in range(steps):
        time.sleep(seconds)
        payload = json.loads(json.dumps(payload))
    _done(key)
