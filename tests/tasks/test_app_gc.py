"""The worker's processes move their startup objects out of the garbage collector's way."""

from __future__ import annotations

import gc

import pytest
from celery import signals

import flowbuilder.tasks.app  # noqa: F401 - connects the signal handlers
from flowbuilder.platform import db


@pytest.mark.parametrize("signal_name", ["worker_ready", "worker_process_init"])
def test_worker_processes_freeze_their_startup_objects(
    signal_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The child's handler also drops inherited pooled connections: not in this process.
    monkeypatch.setattr(db, "dispose_engines_after_fork", lambda: None)
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    try:
        getattr(signals, signal_name).send(sender=None)
        assert gc.get_freeze_count() > 10_000
    finally:
        gc.unfreeze()
