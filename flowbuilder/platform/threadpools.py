"""Process-wide thread pools that a forked child can use.

A ``ThreadPoolExecutor`` that ran anything before a fork is broken in the child: it
counts the parent's idle threads, which the child does not have, so a task submitted
there waits forever (the engine's run would wait forever for its node or its phase's
transaction). Celery's prefork pool forks its children from a parent that runs no task,
but an embedding process may run one first (a preloading web server, a script, a test).
:class:`ThreadPool` gives the child a fresh executor of its own.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Callable
from typing import Any, TypeVar

_T = TypeVar("_T")


class ThreadPool:
    """A ``ThreadPoolExecutor`` (``submit`` only), made anew in a forked child."""

    def __init__(self, max_workers: int, thread_name_prefix: str) -> None:
        self.max_workers, self.thread_name_prefix = max_workers, thread_name_prefix
        self._executor = self._new()
        if hasattr(os, "register_at_fork"):
            # Held for the process's life: these pools are module-level, made once.
            os.register_at_fork(after_in_child=self._after_fork)

    def _new(self) -> concurrent.futures.ThreadPoolExecutor:
        return concurrent.futures.ThreadPoolExecutor(
            max_workers=self.max_workers, thread_name_prefix=self.thread_name_prefix
        )

    def _after_fork(self) -> None:
        # The parent's executor is dropped, not shut down: its threads do not exist here.
        self._executor = self._new()

    def submit(
        self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[_T]:
        return self._executor.submit(fn, *args, **kwargs)
