"""SQL round trips per phase, counted on the PostgreSQL server's side of the wire.

Runs go through the public entry points only (``enqueue_execution``, then the worker task
``execute_workflow`` run in this process), so the count holds whatever the engine's
internals. The proxy counts flights: what the client sends between two answers of the
server that includes a simple Query (BEGIN, COMMIT) or a Sync (the end of a statement, or
of a batch of statements sent without waiting).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlmodel import Session

from flowbuilder.platform import db
from flowbuilder.platform.nodes import register_node_type, unregister_node_type
from flowbuilder.platform.nodes.base import NodeType, PortSpec
from flowbuilder.tasks import enqueue_execution, execute_workflow
from tests.factories import make_user, make_workflow

# Round trips of one more phase (one node that logs), on psycopg: BEGIN, the lease
# fence, the previous node's log batch and result, this node's debit and start, and the
# COMMIT, in one batch (the transaction sent whole, see engine.run). No pool ping: the
# run holds one connection. It was 7 before the batches, then 2. Lower it when the engine
# does better; never raise it silently.
ROUND_TRIPS_PER_PHASE = 1


def _chatty(inputs: dict[str, Any], ctx: Any) -> dict[str, Any]:
    for i in range(inputs["lines"]):
        ctx.log.info(f"line {i}")
    return {"n": inputs["lines"]}


@pytest.fixture
def chatty_node() -> Iterator[None]:
    register_node_type(
        NodeType(
            type="test_rt_chatty",
            run=_chatty,
            inputs={"lines": PortSpec("integer", required=True), "after": PortSpec("any")},
            outputs={"n": PortSpec("integer")},
            credits=1,
        ),
        replace=True,
    )
    yield
    unregister_node_type("test_rt_chatty")


def _chain(phases: int, lines: int) -> dict[str, Any]:
    return {
        "version": 1,
        "nodes": [
            {"id": f"c{i}", "type": "test_rt_chatty", "inputs": {"lines": lines}}
            for i in range(phases)
        ],
        "edges": [
            {"source": f"c{i - 1}", "sourceHandle": "n", "target": f"c{i}", "targetHandle": "after"}
            for i in range(1, phases)
        ],
    }


def test_round_trips_per_phase_are_a_constant(pg_round_trips: Any, chatty_node: None) -> None:
    with Session(db.get_engine(), expire_on_commit=False) as session:
        user = make_user(session, credits=10_000)
        workflows = {
            shape: make_workflow(session, user, definition=_chain(*shape), publish=True)
            for shape in ((2, 1), (4, 1), (6, 1), (6, 40))
        }
        session.commit()

        def run(shape: tuple[int, int]) -> int:
            execution = enqueue_execution(session, workflows[shape].id, user.id)
            session.commit()
            before = pg_round_trips.round_trips
            assert execute_workflow.apply(args=[str(execution.id)]).get() == "completed"
            return pg_round_trips.round_trips - before

        def steady(shape: tuple[int, int]) -> int:
            # psycopg prepares a statement on its 5th execution on a connection, at the
            # cost of one extra round trip: wait until two runs in a row agree.
            last = run(shape)
            for _ in range(10):
                now = run(shape)
                if now == last:
                    return now
                last = now
            raise AssertionError(f"round trips of {shape} never settled")

        for shape in workflows:  # warm every statement on the connection first
            for _ in range(3):
                run(shape)
        counts = {shape: steady(shape) for shape in workflows}
    per_phase = (counts[(4, 1)] - counts[(2, 1)]) / 2
    assert (counts[(6, 1)] - counts[(4, 1)]) / 2 == per_phase, counts
    assert per_phase == ROUND_TRIPS_PER_PHASE, counts
    assert counts[(6, 40)] == counts[(6, 1)], f"log lines must not add round trips: {counts}"
