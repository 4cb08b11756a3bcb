"""celery beat (the app's RedBeat-based scheduler) on the real Redis at 127.0.0.1:6379
drives the sweep: an execution whose task message was lost is re-sent and run by a real
worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlmodel import Session

from flowbuilder.platform.engine import prepare_execution
from flowbuilder.platform.models import ExecutionStatus, utcnow
from tests.factories import json_definition, make_user, make_workflow
from tests.tasks.conftest import wait_done, wait_for, worker_env

pytestmark = pytest.mark.integration

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def redbeat_prefix() -> Any:
    prefix = f"fbtest-redbeat-{uuid.uuid4().hex[:8]}:"
    client = redis.Redis.from_url(REDIS_URL)
    yield prefix, client
    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)
    client.close()


def test_beat_on_redis_sweeps_a_lost_execution(
    celery_worker: Any,
    worker_settings: Any,
    pg_session: Session,
    redbeat_prefix: Any,
    tmp_path: Path,
) -> None:
    prefix, client = redbeat_prefix
    user = make_user(pg_session, credits=10)
    wf = make_workflow(pg_session, user, definition=json_definition(2), publish=True)
    pg_session.commit()
    # Recorded but never sent, as when the broker was down at commit time.
    execution = prepare_execution(session=pg_session, workflow_id=wf.id, user_id=user.id)
    execution.resend_after = utcnow().replace(year=2000)
    pg_session.commit()

    log = open(tmp_path / "beat.log", "wb")  # noqa: SIM115 - closed below
    beat = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "flowbuilder.tasks",
            "beat",  # no -S: the app's scheduler (RedBeat + cron workflows)
            "--loglevel=INFO",
            f"--pidfile={tmp_path / 'beat.pid'}",
        ],
        env=worker_env(worker_settings, REDIS_URL=REDIS_URL, REDBEAT_KEY_PREFIX=prefix),
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        done = wait_done(pg_session, execution.id, timeout=60)
        assert done.status == ExecutionStatus.COMPLETED, done.error
        # The schedule and beat's lock live in Redis under our prefix.
        keys = wait_for(lambda: {k.decode() for k in client.scan_iter(f"{prefix}*")}, 10)
        assert f"{prefix}sweep-stale-executions" in keys
        assert any(k.endswith("::lock") for k in keys), keys
    finally:
        os.killpg(beat.pid, signal.SIGTERM)
        beat.wait(20)
        log.close()
    text = (tmp_path / "beat.log").read_text(errors="replace")
    assert "flowbuilder.sweep_stale_executions" in text
