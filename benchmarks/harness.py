"""The services and worker processes the benchmarks run on (the same as the tests').

- moto's server on a free port on 127.0.0.1 (SQS over real HTTP, as in the tests),
- a throwaway PostgreSQL database (``flowbuilder.platform.db.temporary_database``),
  reached directly by everything that is timed, and through a
  :class:`~benchmarks.pg_roundtrips.RoundTripProxy` only where SQL round trips are
  counted (the proxy is Python threads in the harness process: in the path of a timed
  measure it would add its own latency and CPU to every round trip of the project, and
  to none of the bare baselines'),
- Redis database 13 under a random key prefix (the bare baseline tasks record their
  start and end times there),
- real ``celery worker`` processes (prefork, 2 processes).

Every worker session gets its own SQS queue prefix. A worker that stops may leave a
long poll pending on SQS; a message that poll receives stays invisible for the whole
visibility timeout. A queue is therefore never reused after its worker stopped: the next
benchmark (or round) has fresh queues and nothing it sends can be swallowed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import sqlalchemy as sa
from sqlmodel import SQLModel

from benchmarks.pg_roundtrips import RoundTripProxy
from flowbuilder.platform import db, models  # noqa: F401  (registers the tables)
from flowbuilder.platform.settings import override_settings

PG_ADMIN_URL = os.environ.get(
    "FLOWBUILDER_BENCH_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("FLOWBUILDER_BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")

# Settings shared by the harness process and every worker. Rate limits off (a benchmark
# sends hundreds of runs), logs quiet (log lines are not the benchmark).
BASE_ENV = {
    "BROKER_URL": "sqs://",
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "SECRET_ENCRYPTION_PASSWORD": "bench-encryption-password-7c1d",
    "SECRET_ENCRYPTION_SALT": "bench-encryption-salt-2a9f",
    "RATE_LIMIT_USER": "100000000",
    "LOG_LEVEL": "WARNING",
    "LOG_JSON": "true",
    "SQS_VISIBILITY_TIMEOUT": "1800",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process_group(proc: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM the process group (a warm shutdown), SIGKILL it after ``grace`` seconds.
    Shared by the benchmark harness and the tests' worker, beat and Flower processes."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1).read()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.1)
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@dataclass
class Services:
    sqs_endpoint: str
    database_url: str  # straight to the server: workers, enqueues, raw baselines
    counting_database_url: str  # through the counting proxy (round-trip counts only)
    proxy: RoundTripProxy
    redis: redis.Redis
    redis_prefix: str
    home: Path
    env: dict[str, str] = field(default_factory=dict)

    def settings_env(self, queue_prefix: str, **extra: Any) -> dict[str, str]:
        values = dict(BASE_ENV)
        values.update(
            SQS_ENDPOINT_URL=self.sqs_endpoint,
            DATABASE_URL=self.database_url,
            SQS_QUEUE_PREFIX=queue_prefix,
            FLOWBUILDER_HOME=str(self.home),
            REDIS_URL=REDIS_URL,
            # The monitoring channel (events, remote control) stays on as in production,
            # under this run's own prefix (deleted at the end with the other keys).
            MONITOR_KEY_PREFIX=f"{self.redis_prefix}:monitor:",
        )
        values.update({k: str(v) for k, v in extra.items()})
        return values

    @contextlib.contextmanager
    def settings(self, queue_prefix: str, **extra: Any) -> Iterator[Any]:
        """Settings (in this process) pointing at the services, the Celery app reconfigured."""
        from flowbuilder.tasks.app import app, configure

        env = self.settings_env(queue_prefix, **extra)
        keys = [
            k
            for k in env
            if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
        ]
        with override_settings(**{k: env[k] for k in keys}) as settings:
            configure(app, settings)
            try:
                yield settings
            finally:
                configure(app)

    def key(self, name: str) -> str:
        return f"{self.redis_prefix}:{name}:{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def services() -> Iterator[Services]:
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        os.environ.setdefault(k, BASE_ENV[k])
    r = redis.Redis.from_url(REDIS_URL)
    r.ping()
    prefix = f"fbbench-{uuid.uuid4().hex[:8]}"
    with (
        moto_server() as endpoint,
        db.temporary_database(PG_ADMIN_URL, "flowbuilder_bench") as direct_url,
        RoundTripProxy() as proxy,
        tempfile.TemporaryDirectory() as home,
    ):
        engine = sa.create_engine(direct_url)
        SQLModel.metadata.create_all(engine)
        engine.dispose()
        try:
            yield Services(
                sqs_endpoint=endpoint,
                database_url=direct_url,
                counting_database_url=proxy.url_for(direct_url),
                proxy=proxy,
                redis=r,
                redis_prefix=prefix,
                home=Path(home),
            )
        finally:
            db.reset_engines()
            keys = list(r.scan_iter(f"{prefix}:*", count=1000))
            for i in range(0, len(keys), 500):
                r.delete(*keys[i : i + 500])
            r.close()


class Worker:
    """``celery -A benchmarks.worker_apps:<app> worker --pool=prefork --concurrency=2``."""

    def __init__(
        self,
        svc: Services,
        app: str,
        queue_prefix: str,
        *,
        transport_options: dict[str, Any] | None = None,
        prefetch: int | None = None,
        concurrency: int = 2,
        queue: str | None = None,
        bare_channel: str | None = None,
    ) -> None:
        env = dict(os.environ)
        env.update(svc.settings_env(queue_prefix))
        if bare_channel:
            env["BENCH_BARE_CHANNEL"] = bare_channel
        env["BENCH_REDIS_URL"] = REDIS_URL
        env["PYTHONUNBUFFERED"] = "1"
        if transport_options:
            env["BENCH_TRANSPORT_OPTIONS"] = json.dumps(transport_options)
        if prefetch is not None:
            env["BENCH_PREFETCH"] = str(prefetch)
        self.log_path = svc.home / f"worker-{app}-{uuid.uuid4().hex[:6]}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        args = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            f"benchmarks.worker_apps:{app}",
            "worker",
            "--pool=prefork",
            f"--concurrency={concurrency}",
            "--loglevel=WARNING",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            f"--hostname=bench{uuid.uuid4().hex[:6]}@%h",
        ]
        if queue:
            args.append(f"--queues={queue}")
        self.proc = subprocess.Popen(
            args, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_process_group(self.proc)
        self._log.close()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.01) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"benchmark condition not met within {timeout:g}s")
        time.sleep(interval)
