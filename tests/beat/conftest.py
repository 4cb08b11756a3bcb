"""Fixtures for beat tests: a Redis key prefix of our own on the shared server."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def redis_prefix() -> Iterator[tuple[str, redis.Redis]]:
    """A random REDBEAT_KEY_PREFIX; every key under it is deleted afterwards."""
    prefix = f"fbtest-beat-{uuid.uuid4().hex[:8]}:"
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    yield prefix, client
    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)
    client.close()


@pytest.fixture
def beat_settings(settings: Any, redis_prefix: tuple[str, redis.Redis]) -> Iterator[Any]:
    """The database settings of ``settings`` plus our Redis prefix, syncing on change."""
    from flowbuilder.platform.settings import override_settings

    prefix, _client = redis_prefix
    with override_settings(
        REDIS_URL=REDIS_URL, REDBEAT_KEY_PREFIX=prefix, BEAT_SYNC_ON_CHANGE=True
    ) as s:
        yield s


# The SQS + PostgreSQL + worker fixtures of tests/tasks (moto's server, real workers).
from tests.tasks.conftest import (  # noqa: E402,F401
    _queues,
    celery_worker,
    pg_session,
    worker_settings,
)
