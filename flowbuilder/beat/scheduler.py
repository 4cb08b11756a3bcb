"""The beat scheduler: RedBeat for the static entries and the lock, plus users' cron
workflows fired in batches.

``celery -A flowbuilder.tasks beat`` uses :class:`FlowBuilderScheduler` (``beat_scheduler``
in the app's configuration). Each tick, holding RedBeat's lock:

1. RedBeat's own tick: renew the lock, run the static entries (the sweep, housekeeping).
2. :meth:`CronFirer.tick`: reconcile the Redis schedule with the database if it is time
   (start-up, every BEAT_RECONCILE_INTERVAL_SECONDS, or the schedule key is missing after
   a Redis restart); take the due workflow ids from the Redis sorted set (one command);
   record their executions in one transaction (:func:`flowbuilder.platform.scheduling.
   fire_due`); after the commit, write the new next fire times to Redis (only where an
   entry still holds the score this batch read: a workflow edited meanwhile keeps what
   its edit wrote), then send with SendMessageBatch in parallel.
3. Sleep until the earliest next fire time (at most the loop interval).

Why not one RedBeat entry per workflow: RedBeat loads every due entry from its own hash
(one HGET each), sends one message per entry one after another, and saves each entry's
meta back (one more round trip each). At 1,000 due workflows that is thousands of Redis
round trips and 1,000 sequential SQS requests, and its cron schedule keeps only the five
fields in the app's time zone. Batches cost a fixed number of round trips instead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis
import structlog
from redbeat import RedBeatScheduler

from flowbuilder.beat.sender import BatchSender, SendReport
from flowbuilder.platform import cron_schedule
from flowbuilder.platform.db import unit_of_work
from flowbuilder.platform.models import utcnow
from flowbuilder.platform.scheduling import FireOutcome, fire_due
from flowbuilder.platform.settings import Settings, get_settings
from flowbuilder.tasks.app import execution_queue_for

logger = structlog.get_logger(__name__)


@dataclass
class TickStats:
    """Timings of one batch, for the benchmark and the logs."""

    fired: int = 0
    skipped: int = 0
    duplicates: int = 0
    # Seconds of the scheduler's own work (Redis, database, building messages),
    # excluding time inside SQS calls.
    own_seconds: float = 0.0
    sqs_seconds: float = 0.0
    sqs_requests: int = 0


class CronFirer:
    """Fires due cron workflows; usable without a beat process (tests, benchmark)."""

    def __init__(
        self,
        app: Any,
        *,
        client: redis.Redis | None = None,
        settings: Settings | None = None,
        sender: BatchSender | None = None,
    ) -> None:
        self.settings = settings or get_settings()
        self.client = client or cron_schedule.get_client(self.settings)
        self.sender = sender or BatchSender(app, self.settings)
        self._next_reconcile = 0.0
        self.last: list[TickStats] = []
        self.last_reports: list[SendReport] = []

    def warm_up(self) -> None:
        """Pay the one-off costs (imports, SQS channel, message template) before the
        first fire rather than in it."""
        import flowbuilder.platform.definitions  # noqa: F401
        import flowbuilder.platform.plan  # noqa: F401

        self.sender.warm_up()

    def close(self) -> None:
        self.sender.close()

    def reconcile(self) -> cron_schedule.ReconcileReport:
        with unit_of_work() as session:
            report = cron_schedule.reconcile(
                session=session, client=self.client, settings=self.settings
            )
        self._next_reconcile = time.monotonic() + self.settings.BEAT_RECONCILE_INTERVAL_SECONDS
        return report

    def _reconcile_if_due(self) -> None:
        key = cron_schedule.schedule_key(self.settings)
        if time.monotonic() >= self._next_reconcile or not self.client.exists(key):
            self.reconcile()

    def tick(self, now: datetime | None = None) -> float:
        """Fire what is due at ``now``; seconds until the next fire (capped)."""
        self._reconcile_if_due()
        self.last = []
        self.last_reports = []
        batch = self.settings.BEAT_FIRE_BATCH_SIZE
        while True:
            started = time.perf_counter()
            at = now or utcnow()
            scores = cron_schedule.due(at, batch, client=self.client, settings=self.settings)
            if not scores:
                break
            ids = list(scores)
            with unit_of_work() as session:
                outcome: FireOutcome = fire_due(
                    session=session, now=at, workflow_ids=ids, settings=self.settings
                )
            # Before the sends (seconds on a slow endpoint), and only where the entry is
            # unchanged: a workflow edited meanwhile keeps the schedule its edit wrote.
            cron_schedule.apply_if_unchanged(
                outcome.next_runs, scores, client=self.client, settings=self.settings
            )
            report: SendReport = self.sender.send(
                [
                    (execution_id, correlation_id, execution_queue_for(self.settings, longest))
                    for execution_id, correlation_id, longest in outcome.to_send
                ]
            )
            self.last_reports.append(report)
            elapsed = time.perf_counter() - started
            stats = TickStats(
                fired=outcome.fired,
                skipped=outcome.skipped,
                duplicates=outcome.duplicates,
                own_seconds=elapsed - report.sqs_seconds,
                sqs_seconds=report.sqs_seconds,
                sqs_requests=report.requests,
            )
            self.last.append(stats)
            logger.info(
                "cron_tick",
                fired=stats.fired,
                skipped=stats.skipped,
                duplicates=stats.duplicates,
                sqs_requests=stats.sqs_requests,
                own_ms=round(stats.own_seconds * 1000, 1),
                sqs_ms=round(stats.sqs_seconds * 1000, 1),
            )
            if len(ids) < batch:
                break
        nxt = cron_schedule.next_fire(client=self.client, settings=self.settings)
        if nxt is None:
            return self.settings.BEAT_MAX_LOOP_INTERVAL_SECONDS
        wait = (nxt - utcnow()).total_seconds()
        return max(0.0, min(wait, self.settings.BEAT_MAX_LOOP_INTERVAL_SECONDS))


class FlowBuilderScheduler(RedBeatScheduler):
    """RedBeat (lock, static entries) + batched cron fires. See the module docstring."""

    def __init__(self, app: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(app, *args, **kwargs)
        self._firer: CronFirer | None = None

    @property
    def firer(self) -> CronFirer:
        if self._firer is None:
            self._firer = CronFirer(self.app)
            try:
                self._firer.warm_up()
            except Exception as exc:  # noqa: BLE001 - the first fire pays instead
                logger.warning("cron_warm_up_failed", error=type(exc).__name__)
        return self._firer

    def tick(self, min: Any = min, **kwargs: Any) -> float:  # noqa: A002 - Celery's name
        interval = super().tick(min=min, **kwargs)  # renews the lock first
        try:
            wait = self.firer.tick()
        except Exception as exc:  # noqa: BLE001 - one bad tick must not stop beat
            # Database or Redis away: nothing was sent for an uncommitted batch; the same
            # fires are retried next tick (the unique constraint keeps them single).
            logger.error("cron_tick_failed", error=f"{type(exc).__name__}: {str(exc)[:200]}")
            wait = self.max_interval
        return min(interval, wait)

    def close(self) -> None:
        if self._firer is not None:
            self._firer.close()
            self._firer = None
        super().close()

    @property
    def info(self) -> str:
        settings = get_settings()
        return (
            super().info
            + f"\n       . cron workflows -> `{cron_schedule.schedule_key(settings)}`"
            + f" (failover <= {self.lock_timeout + self.max_interval:.0f}s)"
        )
