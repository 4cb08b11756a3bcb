"""Fixtures for tests with real Celery workers on SQS (moto's server) and PostgreSQL.

moto's in-process mock cannot reach kombu's pycurl client, so the SQS API is moto's
server mode on 127.0.0.1 (the ``moto_server`` fixture): real HTTP, real visibility
timeouts, real redrive policies.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlmodel import Session, SQLModel

from benchmarks.harness import stop_process_group
from flowbuilder.platform import db
from flowbuilder.platform.settings import override_settings
from flowbuilder.tasks.app import app, configure, ensure_execution_queues

ROOT = Path(__file__).resolve().parents[2]

# Short clocks so crash-and-redelivery tests finish in seconds. The visibility timeout
# stays above the execution budget, as in production.
WORKER_SETTINGS = {
    "BROKER_URL": "sqs://",
    "SQS_QUEUE_PREFIX": f"fbtest-{uuid.uuid4().hex[:6]}-",
    "SQS_VISIBILITY_TIMEOUT": 8,
    "EXECUTION_TIMEOUT_SECONDS": 6,
    "SQS_WAIT_TIME_SECONDS": 1,
    "LEASE_SECONDS": 1.5,
    "SWEEP_PENDING_AFTER_SECONDS": 2,
    # The monitoring channel (Redis) of these workers, apart from other runs sharing Redis.
    "MONITOR_KEY_PREFIX": f"fbtest-{uuid.uuid4().hex[:6]}-monitor:",
}


@pytest.fixture(scope="session")
def _queues(moto_server: str, _pg_schema: str) -> dict[str, Any]:
    values = dict(WORKER_SETTINGS, SQS_ENDPOINT_URL=moto_server, DATABASE_URL=_pg_schema)
    with override_settings(**values):
        ensure_execution_queues()
    return values


@pytest.fixture
def worker_settings(_queues: dict[str, Any], tmp_path: Path) -> Iterator[Any]:
    """Settings for SQS + PostgreSQL, an empty database, and the Celery app reconfigured."""
    with override_settings(**_queues, FLOWBUILDER_HOME=tmp_path) as settings:
        db.reset_engines()
        engine = db.get_engine()
        tables = ", ".join(f'"{t.name}"' for t in SQLModel.metadata.sorted_tables)
        with engine.begin() as conn:
            conn.exec_driver_sql(f"TRUNCATE {tables} CASCADE")
        configure(app, settings)
        yield settings
    db.reset_engines()
    configure(app)


@pytest.fixture
def pg_session(worker_settings: Any) -> Iterator[Session]:
    with Session(db.get_engine(), expire_on_commit=False) as s:
        yield s


@pytest.fixture
def celery_worker(worker_settings: Any) -> Iterator[Any]:
    """A real Celery worker (solo pool) consuming the SQS queue in this process."""
    from celery.contrib.testing.worker import start_worker

    with start_worker(
        app, pool="solo", concurrency=1, perform_ping_check=False, shutdown_timeout=30
    ) as worker:
        yield worker


def worker_env(settings: Any, **extra: Any) -> dict[str, str]:
    env = dict(os.environ)
    for key in (*WORKER_SETTINGS, "SQS_ENDPOINT_URL", "DATABASE_URL"):
        env[key] = str(getattr(settings, key))
    env.update({k: str(v) for k, v in extra.items()})
    env["LOG_JSON"] = "true"
    env["PYTHONUNBUFFERED"] = "1"
    return env


class WorkerProcess:
    """`celery -A flowbuilder.tasks worker` in its own process group."""

    # Subclasses add worker options (e.g. ``--include`` of a test-only module).
    extra_args: tuple[str, ...] = ()
    hostname_prefix = "w"

    def __init__(self, settings: Any, log_path: Path, **extra_env: Any) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        env = worker_env(settings, **extra_env)
        # The repository root on the path, so test-only modules can be included.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "flowbuilder.tasks",
                "worker",
                "--pool=solo",
                "--concurrency=1",
                "--loglevel=INFO",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                *self.extra_args,
                f"--hostname={self.hostname_prefix}{uuid.uuid4().hex[:6]}@%h",
            ],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=ROOT,
        )

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.text().splitlines():
            line = line.strip()
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    def wait_ready(self, timeout: float = 30) -> None:
        wait_for(lambda: "ready" in self.text() or self.proc.poll() is not None, timeout)
        assert self.proc.poll() is None, self.text()

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        stop_process_group(self.proc, 20)
        self._log.close()


@pytest.fixture
def spawn_worker(worker_settings: Any, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def spawn(**extra_env: Any) -> WorkerProcess:
        worker = WorkerProcess(
            worker_settings, tmp_path / f"worker-{len(started)}.log", **extra_env
        )
        started.append(worker)
        worker.wait_ready()
        return worker

    yield spawn
    for worker in started:
        worker.stop()


def wait_for(predicate: Callable[[], Any], timeout: float = 30, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


def execution_status(session: Session, execution_id: uuid.UUID) -> Any:
    """A fresh read of an execution (ends the session's transaction first)."""
    from flowbuilder.platform.models import WorkflowExecution

    session.rollback()
    session.expire_all()
    return session.get(WorkflowExecution, execution_id)


def wait_done(session: Session, execution_id: uuid.UUID, timeout: float = 40) -> Any:
    """Wait until the execution is completed, failed or cancelled; return it."""
    return wait_for(
        lambda: (ex := execution_status(session, execution_id)).status.is_terminal and ex, timeout
    )


def fetch_one(session: Session, sql: str, **params: Any) -> Any:
    session.rollback()
    return session.execute(sa.text(sql), params).first()
