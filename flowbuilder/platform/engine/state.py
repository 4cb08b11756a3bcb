"""The state of one run, and how a call of the engine ends."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from flowbuilder.platform.models import ExecutionPhase


class Outcome(StrEnum):
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    ALREADY_DONE = "already_done"  # a duplicate delivery of a finished execution
    LEASE_HELD = "lease_held"  # another worker runs it now
    LEASE_LOST = "lease_lost"  # our lease lapsed and someone else took over
    MISSING = "missing"


@dataclass
class RunResult:
    outcome: Outcome
    # LEASE_HELD: come back after this many seconds (when the holder's lease would lapse);
    # 0 means do not come back (the run is past every bound; attempts end it).
    retry_after: float = 0.0
    phases_run: int = 0
    credits: int = 0
    error: str | None = None


@dataclass
class RunState:
    execution_id: uuid.UUID
    user_id: uuid.UUID
    workflow_id: uuid.UUID | None
    owner: str
    lease: float
    deadline: float
    plan: Any
    phases: list[ExecutionPhase]
    outputs_by_node: dict[str, dict[str, Any]] = field(default_factory=dict)
    next_seq: int = 1
    phases_run: int = 0
    # When the execution first started (set by the claim): for its duration at the end.
    started_at: datetime | None = None


# Exception types that mean "the worker's time limit struck" (Celery's
# SoftTimeLimitExceeded, raised asynchronously into the running code). The platform
# imports no Celery, so the task layer registers them (register_time_limit_error).
_TIME_LIMIT_ERRORS: list[type[BaseException]] = []


def register_time_limit_error(exc_type: type[BaseException]) -> None:
    if exc_type not in _TIME_LIMIT_ERRORS:
        _TIME_LIMIT_ERRORS.append(exc_type)


def is_time_limit(exc: BaseException) -> bool:
    return isinstance(exc, tuple(_TIME_LIMIT_ERRORS))
