"""The execution lease: one worker at a time runs an execution.

A run first takes the execution's lease (one conditional UPDATE,
``execution_crud.acquire_lease``). While it holds it, a :class:`Heartbeat` thread renews
it; every phase start and phase end re-checks it in the same transaction as its writes
(:func:`renew`, fencing), so a worker that lost its lease writes nothing more. A
duplicate that finds a live lease is told to come back after it lapses; a killed
worker's lease lapses and the redelivered message takes over.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable

import structlog
from sqlalchemy.engine import Connection, Engine
from sqlmodel import Session

from flowbuilder.platform.crud import (
    execution_crud,
)
from flowbuilder.platform.db import unit_of_work
from flowbuilder.platform.engine.state import RunState

logger = structlog.get_logger(__name__)


class Heartbeat(threading.Thread):
    """Renews the lease while a node runs; notices cancellation and a lost lease."""

    def __init__(self, engine: Engine, execution_id: uuid.UUID, owner: str, lease: float) -> None:
        super().__init__(name=f"lease-{execution_id}", daemon=True)
        self.engine, self.execution_id, self.owner, self.lease = engine, execution_id, owner, lease
        self.stop_event = threading.Event()
        self.cancelled = threading.Event()
        self.lost = threading.Event()

    def run(self) -> None:
        interval = max(0.2, self.lease / 3)
        while not self.stop_event.wait(interval):
            try:
                with unit_of_work(self.engine) as s:
                    held, cancel = execution_crud.renew_lease(
                        session=s,
                        execution_id=self.execution_id,
                        owner=self.owner,
                        lease_seconds=self.lease,
                    )
            except Exception as exc:  # noqa: BLE001 - a blip; the next beat tries again
                logger.warning("lease_renew_failed", error=type(exc).__name__)
                continue
            if cancel:
                self.cancelled.set()
            if not held:
                self.lost.set()
                return

    def stop(self) -> None:
        self.stop_event.set()


def release_quietly(engine: Engine, execution_id: uuid.UUID, owner: str) -> None:
    try:
        with unit_of_work(engine) as s:
            execution_crud.release_lease(session=s, execution_id=execution_id, owner=owner)
    except Exception:  # noqa: BLE001 - the lease then lapses on its own
        logger.warning("lease_release_failed", execution_id=str(execution_id))


def renew(s: Session, state: RunState) -> tuple[bool, bool]:
    """Fence a transaction: renew our lease; ``(still held, cancel requested)``."""
    return execution_crud.renew_lease(
        session=s, execution_id=state.execution_id, owner=state.owner, lease_seconds=state.lease
    )


def send_renew(connection: Connection, state: RunState) -> Callable[[], tuple[bool, bool]]:
    """:func:`renew` queued in a batch (psycopg's pipeline mode): returns the function that
    reads ``(still held, cancel requested)`` once the batch is sent."""
    return execution_crud.send_renew_lease(
        connection=connection,
        execution_id=state.execution_id,
        owner=state.owner,
        lease_seconds=state.lease,
    )
