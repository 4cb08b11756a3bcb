"""The execution engine: prepare an execution (the API side) and run it (the worker side).

No Celery here. The worker task in ``flowbuilder.tasks`` is a thin shell that calls
:func:`run_execution` and decides retries; the API calls :func:`prepare_execution` and
sends the task after its transaction commits.

Modules, in the order a run meets them:

- :mod:`.enqueue`: check and record a new execution (and cancel one), API side.
- :mod:`.lease`: the execution's lease (acquire, renew, heartbeat, release): one worker
  at a time.
- :mod:`.run`: the run loop: claim, phases and their checkpoints, the credits policy,
  how a run ends.
- :mod:`.invoke`: calling a node with its timeout and retries.
- :mod:`.outputs`: node outputs made storable (the boundary between a node and the
  database).
- :mod:`.state`: :class:`Outcome`, :class:`RunResult` and the state of one run.

Exactly once under at-least-once delivery
------------------------------------------
A message may arrive twice, two workers may hold the same execution, a worker may be
killed mid-run. The engine makes that harmless with a lease (:mod:`.lease`), checkpoints
and idempotent debits (:mod:`.run`). Node side effects (an HTTP call) are at-least-once,
like in every queue-driven system: a phase interrupted mid-call runs its node again after
a crash.
"""

from flowbuilder.platform.engine.enqueue import Written, cancel_execution, prepare_execution
from flowbuilder.platform.engine.run import run_execution
from flowbuilder.platform.engine.state import Outcome, RunResult

__all__ = [
    "Outcome",
    "RunResult",
    "Written",
    "cancel_execution",
    "prepare_execution",
    "run_execution",
]
