"""The engine's and the resolver's thread pools work in a forked child of a process that
used them (a plain ThreadPoolExecutor would wait forever there: it counts the parent's
idle threads, which the child does not have)."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import sys

import pytest

from flowbuilder.platform import ssrf
from flowbuilder.platform.engine import invoke
from flowbuilder.platform.threadpools import ThreadPool

_POOLS = {
    "node": lambda: invoke._node_pool,
    "phase": lambda: invoke._phase_pool,
    "transaction": lambda: invoke._transaction_pool,
    "dns": lambda: ssrf._dns_pool,
}


def _use_in_child(name: str, results: multiprocessing.Queue) -> None:
    try:
        answer = _POOLS[name]().submit(lambda: os.getpid()).result(timeout=5)
        results.put((name, answer == os.getpid()))
    except concurrent.futures.TimeoutError:
        results.put((name, False))


@pytest.mark.skipif(sys.platform == "win32", reason="fork")
@pytest.mark.parametrize("name", sorted(_POOLS))
def test_a_pool_used_before_a_fork_runs_tasks_in_the_child(name: str) -> None:
    pool = _POOLS[name]()
    assert isinstance(pool, ThreadPool)
    # Used here first, so that this process has an idle thread of it when it forks.
    assert pool.submit(lambda: 1).result(timeout=5) == 1
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(target=_use_in_child, args=(name, results))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    assert results.get(timeout=5) == (name, True)
