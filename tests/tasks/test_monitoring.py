"""The monitoring channel on an SQS broker: a real worker process on moto's SQS, a real
`celery inspect`, `celery events` and a real Flower process, events and remote control over
the real Redis (under a random key prefix), tasks on SQS."""

from __future__ import annotations

import base64
import contextlib
import json
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import redis

from benchmarks.harness import free_port, stop_process_group
from flowbuilder.platform.crud import balance_crud, user_crud, workflow_crud
from flowbuilder.platform.db import unit_of_work
from flowbuilder.platform.models import UserCreate, WorkflowCreate
from flowbuilder.tasks import enqueue_execution
from tests.tasks.conftest import wait_done, wait_for, worker_env

pytestmark = pytest.mark.integration

DEFINITION = {
    "version": 1,
    "nodes": [
        {
            "id": "extract",
            "type": "extract_text_from_html",
            "inputs": {"html": "<p class='x'>7</p>", "selector": "p.x"},
        }
    ],
    "edges": [],
}
FLOWER_USER, FLOWER_PASSWORD = "ops", "flower-pass-8812"


@pytest.fixture
def monitor_env(worker_settings: Any) -> Iterator[dict[str, str]]:
    prefix = f"fbtest-mon-{uuid.uuid4().hex[:8]}:"
    env = worker_env(worker_settings, MONITOR_KEY_PREFIX=prefix, LOG_LEVEL="INFO")
    env.pop("MONITOR_URL", None)  # derived from REDIS_URL because the broker is SQS
    yield env
    client = redis.Redis.from_url(env.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    for key in client.scan_iter(match=prefix + "*"):
        client.delete(key)


class Proc:
    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._file = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv, env=env, stdout=self._file, stderr=subprocess.STDOUT, start_new_session=True
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        stop_process_group(self.proc, 30)
        self._file.close()


@pytest.fixture
def processes() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for proc in reversed(started):
        proc.stop()


def _celery(*args: str) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "flowbuilder.tasks", *args]


def _start_worker(env: dict[str, str], tmp_path: Path, processes: list[Proc]) -> str:
    hostname = f"mon{uuid.uuid4().hex[:6]}@test"
    # Heartbeats on (unlike tests/tasks/conftest.py's workers): Flower's "online" needs them.
    worker = Proc(
        _celery(
            "worker",
            "--pool=solo",
            "--loglevel=INFO",
            "--without-mingle",
            "--without-gossip",
            f"--hostname={hostname}",
        ),
        env,
        tmp_path / "worker.log",
    )
    processes.append(worker)
    wait_for(
        lambda: "monitor_pidbox_listening" in worker.text() or worker.proc.poll() is not None, 60
    )
    assert worker.proc.poll() is None, worker.text()
    return hostname


def _enqueue() -> uuid.UUID:
    with unit_of_work() as session:
        user = user_crud.create_user(
            session=session, data=UserCreate(email=f"{uuid.uuid4().hex[:8]}@example.com")
        )
        balance_crud.grant_credits(
            session=session, user_id=user.id, amount=10, idempotency_key=uuid.uuid4().hex
        )
        workflow = workflow_crud.create_workflow(
            session=session, user_id=user.id, data=WorkflowCreate(name="m", definition=DEFINITION)
        )
        workflow_crud.publish_workflow(session=session, workflow_id=workflow.id, user_id=user.id)
    with unit_of_work() as session:
        execution = enqueue_execution(session, workflow.id, user.id, correlation_id="corr-mon-1")
    return execution.id


def _queue_names(moto_server: str) -> list[str]:
    client = boto3.client("sqs", endpoint_url=moto_server, region_name="us-east-1")
    return [u.rsplit("/", 1)[1] for u in client.list_queues().get("QueueUrls", [])]


def _get(url: str, auth: bool = True) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if auth:
        token = base64.b64encode(f"{FLOWER_USER}:{FLOWER_PASSWORD}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except OSError:
        return 0, ""


def test_inspect_events_and_flower_on_sqs(
    worker_settings: Any,
    monitor_env: dict[str, str],
    pg_session: Any,
    moto_server: str,
    tmp_path: Path,
    processes: list[Proc],
) -> None:
    hostname = _start_worker(monitor_env, tmp_path, processes)

    # `celery inspect ping` reaches the worker through the monitoring channel.
    ping = subprocess.run(
        _celery("inspect", "ping", "--timeout=5", "--json"),
        env=monitor_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ping.returncode == 0, ping.stdout + ping.stderr
    assert json.loads(ping.stdout.strip().splitlines()[-1]) == {hostname: {"ok": "pong"}}
    registered = subprocess.run(
        _celery("inspect", "registered", "--timeout=5", "--json"),
        env=monitor_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "flowbuilder.execute_workflow" in registered.stdout, registered.stderr

    # A Flower process, with basic auth from its environment, and `celery events --dump`.
    port = free_port()
    flower_env = dict(monitor_env, FLOWER_BASIC_AUTH=f"{FLOWER_USER}:{FLOWER_PASSWORD}")
    flower = Proc(
        _celery("flower", f"--port={port}", "--address=127.0.0.1"),
        flower_env,
        tmp_path / "flower.log",
    )
    processes.append(flower)
    base = f"http://127.0.0.1:{port}"
    wait_for(
        lambda: _get(base + "/healthcheck", auth=False)[0] == 200 or flower.proc.poll() is not None,
        60,
    )
    assert flower.proc.poll() is None, flower.text()
    dump = Proc(_celery("events", "--dump"), monitor_env, tmp_path / "events.log")
    processes.append(dump)
    wait_for(lambda: "starting capture" in dump.text() or dump.proc.poll() is not None, 60)

    # Never open without authentication.
    assert _get(base + "/api/workers", auth=False)[0] == 401

    execution_id = _enqueue()
    assert wait_done(pg_session, execution_id, timeout=60).status.value == "completed"

    def flower_task() -> Any:
        status, body = _get(base + "/api/tasks?taskname=flowbuilder.execute_workflow")
        if status != 200:
            return None
        tasks = [t for t in json.loads(body).values() if str(execution_id) in (t["args"] or "")]
        return tasks and tasks[0]["state"] == "SUCCESS" and tasks[0]

    task = wait_for(flower_task, 60, interval=0.5)
    assert task["runtime"] is not None and task["runtime"] > 0
    assert task["worker"] == hostname

    def online() -> bool:
        status, body = _get(base + "/api/workers?status=true")
        return status == 200 and json.loads(body).get(hostname) is True

    wait_for(online, 60, interval=0.5)
    status, body = _get(base + "/api/workers?refresh=1")
    assert status == 200 and "flowbuilder.execute_workflow" in json.dumps(
        json.loads(body)[hostname]
    )

    # /metrics answers without auth and counts the task; the SQS depth is there too.
    status, metrics = _get(base + "/metrics", auth=False)
    assert status == 200
    succeeded = [
        line
        for line in metrics.splitlines()
        if line.startswith("flower_events_total{")
        and 'type="task-succeeded"' in line
        and "flowbuilder.execute_workflow" in line
    ]
    assert succeeded and float(succeeded[0].rsplit(" ", 1)[1]) >= 1
    prefix = worker_settings.SQS_QUEUE_PREFIX
    for queue in ("executions", "executions-short", "executions-dlq"):
        assert f'flowbuilder_sqs_messages{{queue="{prefix}{queue}",state="visible"}}' in metrics

    # `flowbuilder status`: the worker from the monitoring channel, the SQS queues.
    status = subprocess.run(
        [sys.executable, "-m", "flowbuilder", "status"],
        env=monitor_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert status.returncode == 0, status.stdout + status.stderr
    assert hostname in status.stdout and "online" in status.stdout
    for queue in ("executions ", "executions-short ", "executions-dlq"):
        assert f"{prefix}{queue}" in status.stdout
    assert "completed" in status.stdout

    # The event stream carried the task; and nothing of Celery's monitoring touched SQS.
    wait_for(lambda: str(execution_id) in dump.text(), 30)
    assert "task succeeded" in dump.text()
    names = _queue_names(moto_server)
    assert not [n for n in names if "celeryev" in n or "pidbox" in n or "undeliver" in n], names

    # The worker's own lines about the task carry the execution's ids.
    lines = []
    for line in processes[0].text().splitlines():
        with contextlib.suppress(ValueError):
            lines.append(json.loads(line))
    about = [
        r
        for r in lines
        if r.get("logger") in ("celery.worker.strategy", "celery.app.trace")
        and "flowbuilder.execute_workflow[" in r.get("event", "")
    ]
    assert any(r["event"].endswith("received") for r in about), about
    assert any(" succeeded in " in r["event"] for r in about), about
    for record in about:
        assert record["execution_id"] == str(execution_id), record
        assert record["correlation_id"] == "corr-mon-1", record
        assert record["workflow_id"] and record["user_id"], record

    # `control shutdown` on the monitoring channel stops the worker (warm shutdown).
    subprocess.run(
        _celery("control", "shutdown", f"--destination={hostname}"),
        env=monitor_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    wait_for(lambda: processes[0].proc.poll() is not None, 60)
    assert processes[0].proc.returncode == 0, processes[0].text()[-2000:]


def test_worker_runs_executions_while_the_monitoring_redis_is_down(
    worker_settings: Any,
    monitor_env: dict[str, str],
    pg_session: Any,
    tmp_path: Path,
    processes: list[Proc],
) -> None:
    """Monitoring is best effort: a worker whose monitoring Redis is unreachable starts,
    runs executions, drops events (saying so) and keeps trying to reconnect."""
    env = dict(monitor_env, MONITOR_URL=f"redis://127.0.0.1:{free_port()}/0")
    worker = Proc(
        _celery(
            "worker",
            "--pool=solo",
            "--loglevel=INFO",
            "--without-mingle",
            "--without-gossip",
            f"--hostname=down{uuid.uuid4().hex[:6]}@test",
        ),
        env,
        tmp_path / "worker-down.log",
    )
    processes.append(worker)
    wait_for(lambda: " ready." in worker.text() or worker.proc.poll() is not None, 60)
    assert worker.proc.poll() is None, worker.text()
    execution_id = _enqueue()
    assert wait_done(pg_session, execution_id, timeout=60).status.value == "completed"
    assert worker.proc.poll() is None
    wait_for(lambda: "monitor_events_dropped" in worker.text(), 30)
    wait_for(lambda: "monitor_pidbox_reconnecting" in worker.text(), 60)
    assert worker.proc.poll() is None
