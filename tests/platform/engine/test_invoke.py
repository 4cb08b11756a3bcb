"""Starting nodes ahead (``invoke.start_early``), without a database.

The engine waits, briefly, for the threads of the nodes it starts ahead to be running:
its own work (Python that holds the GIL) would otherwise keep them from starting. A pool
whose threads are all busy must not hold it there, and the node still runs once a thread
frees."""

from __future__ import annotations

import concurrent.futures
import threading
import time
import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from flowbuilder.platform.engine import invoke
from flowbuilder.platform.engine.state import RunState
from flowbuilder.platform.models import ExecutionPhase
from flowbuilder.platform.nodes import NodeType, PortSpec, register_node_type, unregister_node_type

_BOUND = 30.0  # seconds: a bound for what must happen, never a measure of speed

_go = threading.Event()


def _waiting(inputs: dict[str, Any], ctx: Any) -> dict[str, Any]:
    _go.wait(_BOUND)
    return {"done": inputs["value"]}


@pytest.fixture(autouse=True)
def _waiting_type() -> Iterator[None]:
    _go.clear()
    register_node_type(
        NodeType(
            type="test_waiting",
            run=_waiting,
            inputs={"value": PortSpec("any")},
            outputs={"done": PortSpec("any")},
            pure=True,
        ),
        replace=True,
    )
    yield
    _go.set()
    unregister_node_type("test_waiting")


def _state() -> RunState:
    return RunState(
        execution_id=uuid.uuid4(),
        user_id=uuid.uuid4(),
        workflow_id=None,
        owner="test",
        lease=60.0,
        deadline=time.monotonic() + 60,
        plan=None,
        phases=[],
    )


def _started() -> list[tuple[ExecutionPhase, Any, Any]]:
    phase = ExecutionPhase(
        id=uuid.uuid4(),
        execution_id=uuid.uuid4(),
        user_id=uuid.uuid4(),
        number=1,
        position=0,
        node_id="n0",
        node_type="test_waiting",
    )
    return [(phase, SimpleNamespace(timeout_seconds=None, credential_id=None), None)]


def _heartbeat() -> Any:
    return SimpleNamespace(cancelled=threading.Event())


class _SlowToStart:
    """A node pool whose threads take ``delay`` to pick up work (a worker under load)."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def submit(self, fn: Any, *args: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def later() -> None:
            time.sleep(self.delay)
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to the future's reader
                future.set_exception(exc)

        threading.Thread(target=later, daemon=True).start()
        return future


def test_start_early_returns_with_its_nodes_running(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(invoke, "_node_pool", _SlowToStart(0.2))
    monkeypatch.setattr(invoke, "_BEGIN_WAIT_SECONDS", _BOUND)
    started = _started()
    inputs = {started[0][0].id: {"value": 7}}
    heartbeat = _heartbeat()
    early = invoke.start_early(started, inputs, _state(), heartbeat)
    first = early.calls[0].first
    assert first is not None
    assert first[0].running()  # its thread has the node (which waits for _go)
    _go.set()
    outcomes = invoke.invoke_all(started, inputs, _state(), heartbeat, early)
    assert [(o.error, o.outputs) for o in outcomes] == [(None, {"done": 7})]


def test_a_busy_pool_does_not_hold_the_engine_and_the_node_runs_once_a_thread_frees() -> None:
    release = threading.Event()
    holders = [
        invoke._node_pool.submit(release.wait, _BOUND) for _ in range(invoke._node_pool.max_workers)
    ]
    started = _started()
    inputs = {started[0][0].id: {"value": "late"}}
    heartbeat = _heartbeat()
    early: list[invoke.Early] = []
    caller = threading.Thread(
        target=lambda: early.append(invoke.start_early(started, inputs, _state(), heartbeat))
    )
    try:
        caller.start()
        # It returns while every node thread is still taken.
        caller.join(_BOUND)
        assert not caller.is_alive() and len(early) == 1
        assert not any(holder.done() for holder in holders)
        first = early[0].calls[0].first
        assert first is not None and not first[0].running()
    finally:
        release.set()
    _go.set()
    outcomes = invoke.invoke_all(started, inputs, _state(), heartbeat, early[0])
    assert [(o.error, o.outputs) for o in outcomes] == [(None, {"done": "late"})]
