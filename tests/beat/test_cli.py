"""`flowbuilder demo` schedules its workflow and shows the next fire times; `flowbuilder
beat sync` repairs the Redis schedule and says what it changed (real subprocesses, the
embedded SQLite default, the real Redis under a prefix of our own)."""

from __future__ import annotations

import re
from pathlib import Path

import redis

from tests.beat.conftest import REDIS_URL
from tests.test_cli import _run


def test_demo_schedules_its_workflow_and_sync_restores_it(
    tmp_path: Path, redis_prefix: tuple[str, redis.Redis]
) -> None:
    prefix, client = redis_prefix
    env = {"REDIS_URL": REDIS_URL, "REDBEAT_KEY_PREFIX": prefix, "BEAT_SYNC_ON_CHANGE": "true"}
    result = _run(["demo"], tmp_path, **env)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "schedule:  cron '0 9 * * 1-5' in Europe/Paris; next fire times:" in out
    fires = re.findall(r"^  (\d{4}-\d\d-\d\d) 09:00 (CET|CEST)  \((0[78]):00 UTC\)$", out, re.M)
    assert len(fires) == 3, out
    assert len({day for day, _, _ in fires}) == 3
    assert "on beat's Redis schedule" in out
    key = f"{prefix}flowbuilder:cron"
    [(workflow_id, _score)] = client.zrange(key, 0, -1, withscores=True)

    client.delete(key)
    synced = _run(["beat", "sync"], tmp_path, **env)
    assert synced.returncode == 0, synced.stdout + synced.stderr
    assert f"added {workflow_id}" in synced.stdout
    assert "1 scheduled workflows; 1 added, 0 updated, 0 removed" in synced.stdout
    assert client.zrange(key, 0, -1) == [workflow_id]
    again = _run(["beat", "sync"], tmp_path, **env)
    assert "0 added, 0 updated, 0 removed" in again.stdout
    listed = _run(["beat", "next"], tmp_path, **env)
    assert workflow_id in listed.stdout and "'0 9 * * 1-5' (Europe/Paris)" in listed.stdout


def test_beat_sync_with_redis_down_is_one_clear_error(tmp_path: Path) -> None:
    assert _run(["db", "upgrade"], tmp_path).returncode == 0
    result = _run(["beat", "sync"], tmp_path, REDIS_URL="redis://127.0.0.1:1/0")
    assert result.returncode == 3
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "Redis unreachable at 127.0.0.1:1" in result.stderr
